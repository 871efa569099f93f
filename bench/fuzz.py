"""Fuzzing: schemathesis against the server's own /openapi.json, every operation, all its checks.

Starts `gptstack serve` on the demo model (or, without one, a small random-weight model) and runs
`schemathesis run` with ``--max-examples`` cases per operation in each of its phases (examples,
coverage, fuzzing), positive and negative. Every request it sent is counted from its HAR record:
by status, 5xx apart; a request with no answer within ``--request-timeout`` is a hang; the other
checks' findings (status codes, content types and schemas the document does not declare, data the
document allows refused or forbids accepted, ...) are listed too. tests/test_openapi.py runs the
same with fewer cases.

    OMP_NUM_THREADS=1 python bench/fuzz.py --checkpoint runs/demo/best --max-examples 1000
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model             # bench/machine.py
from serve import launch, stop            # bench/serve.py


def random_checkpoint(directory: Path) -> str:
    """A cpu-small GPT with random weights and GPT-2's tokenizer: every route works, the text is noise."""
    from gptstack.checkpoint import save_checkpoint
    from gptstack.config import preset
    from gptstack.model import GPT
    from gptstack.tokenizer import load_tokenizer
    return str(save_checkpoint(directory, GPT(preset("cpu-small").model), load_tokenizer("gpt2")))


def schemathesis(url: str, key: str, args: argparse.Namespace, reports: Path) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("schemathesis")
    return subprocess.run([str(cli) if cli.exists() else shutil.which("schemathesis"), "run", url + "/openapi.json",
                           "--checks", "all", "--max-examples", str(args.max_examples), "--seed", str(args.seed),
                           "--workers", str(args.workers), "--request-timeout", str(args.request_timeout),
                           "--continue-on-failure", "--no-color", "-H", f"Authorization: Bearer {key}",
                           "--report", "json,har", "--report-dir", str(reports)],
                          capture_output=True, text=True)


def tally(reports: Path) -> tuple[collections.Counter, dict]:
    """Requests by HTTP status (from the HAR record of every request sent) and the JSON summary."""
    har = json.loads(next(reports.glob("har-*.json")).read_text())
    statuses = collections.Counter(entry["response"]["status"] for entry in har["log"]["entries"])
    return statuses, json.loads(next(reports.glob("json-*.json")).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/best")
    parser.add_argument("--max-examples", type=int, default=1000, help="cases per operation and phase")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--request-timeout", type=float, default=30, help="seconds; no answer by then is a hang")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    key = "bench-key"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint if Path(args.checkpoint).is_dir() else random_checkpoint(Path(tmp) / "random")
        proc, url = launch(checkpoint, key, [])
        started = time.perf_counter()
        try:
            run = schemathesis(url, key, args, Path(tmp) / "reports")
        finally:
            stop(proc)
        duration = time.perf_counter() - started
        statuses, summary = tally(Path(tmp) / "reports")
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    hangs = sum(e["count"] for e in summary["errors"] if "timed out" in e["title"].lower())
    others = [f for f in summary["failures"] if f["type"] != "ServerError"]   # 5xx: counted above
    print(f"{checkpoint}: schemathesis {summary['schemathesis_version']}, --max-examples {args.max_examples}, "
          f"--seed {args.seed}, {args.workers} workers, {summary['operations']['tested']} operations; "
          f"CPU: {cpu_model()}\n")
    print("| requests | 5xx | hangs (no answer in %gs) | other check failures | errors | duration |" % args.request_timeout)
    print("|---|---|---|---|---|---|")
    print(f"| {sum(statuses.values())} | {server_errors} | {hangs} | {sum(f['count'] for f in others)} | "
          f"{sum(e['count'] for e in summary['errors'])} | {duration / 60:.1f} min |")
    print("\nby status: " + ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items())))
    for finding in others + summary["errors"]:
        print(f"- {finding['title']} ({finding['count']})")
    if run.returncode != 0:
        print("\n" + run.stdout[-4000:])


if __name__ == "__main__":
    main()
