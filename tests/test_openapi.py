"""/openapi.json tells the truth: schemathesis, with all its checks, generates requests from the
document against a live server and finds no disagreement (status codes, error shapes, Allow on
405, content types, requests the document allows refused or ones it forbids accepted)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("schemathesis")


def test_the_document_documents_what_the_server_does(server):
    document = httpx.get(server.url + "/openapi.json", headers=server.headers).json()
    completions = document["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in completions and {"400", "401", "404", "413", "429", "503"} <= set(completions)
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert "/v1/classify" not in document["paths"] and "/v1/ner" not in document["paths"]   # no such heads here
    refused = httpx.request("TRACE", server.url + "/v1/models", headers=server.headers)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"


def test_schemathesis_finds_nothing(server):
    cli = Path(sys.executable).with_name("schemathesis")
    cli = str(cli) if cli.exists() else shutil.which("schemathesis")
    proc = subprocess.run([cli, "run", server.url + "/openapi.json", "--checks", "all", "--max-examples", "60",
                           "--seed", "1", "--no-color", "-H", f"Authorization: Bearer {server.key}",
                           "--request-timeout", "30"],     # a hang is a finding (an error), not a stalled test
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "No issues found" in proc.stdout.splitlines()[-1]
