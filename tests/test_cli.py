"""The CLI's flags come from the dataclasses they fill: every field has one, typed and defaulted as the
field, and every command the README and the Makefile show still parses."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex

import pytest

from conftest import REPO
from gptstack.cli import add_dataclass_flags, build_parser, dataclass_from_args, field_comments
from gptstack.evaluate.tasks import EvalConfig
from gptstack.inference.engine import EngineConfig
from gptstack.inference.sampling import SamplingParams
from gptstack.serve.run import ServeOptions
from gptstack.tune import TuneConfig

FILLED_BY = {"eval": EvalConfig, "tune": TuneConfig, "generate": SamplingParams, "serve": ServeOptions}


def command_parser(command: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


@pytest.mark.parametrize("command, cls", FILLED_BY.items())
def test_every_field_has_a_flag(command, cls):
    dests = {action.dest for action in command_parser(command)._actions}
    assert not {f.name for f in dataclasses.fields(cls)} - dests


def test_every_engine_option_the_server_can_use_is_a_serve_flag():
    dests = {action.dest for action in command_parser("serve")._actions}
    # context_shift is for `generate`: the server must refuse a request longer than the context
    assert {f.name for f in dataclasses.fields(EngineConfig)} - dests == {"context_shift"}


@pytest.mark.parametrize("argv, expected", [
    (["eval", "--checkpoint", "c", "--data", "d"], EvalConfig(checkpoint="c", data="d")),
    (["tune", "--space", "s.yaml"], TuneConfig(space="s.yaml")),
    (["serve", "--checkpoint", "c"], ServeOptions(checkpoint="c")),
    (["generate", "--checkpoint", "c"], SamplingParams(max_new_tokens=200, temperature=0.8, top_p=0.95)),
    (["eval", "--checkpoint", "c", "--data", "d", "--quiet", "--max-tokens", "7", "--task", "lm"],
     EvalConfig(checkpoint="c", data="d", progress=False, max_tokens=7, task="lm")),
    (["tune", "--space", "s", "--out", "o", "--keep-last", "--n-jobs", "2"],
     TuneConfig(space="s", out_dir="o", keep_last=True, n_jobs=2)),
    (["serve", "--checkpoint", "c", "--api-key", "a", "--api-key", "b", "--max-batch-size", "3", "--dtype", "bf16",
      "--graceful-shutdown-seconds", "2.5", "--ssl-certfile", "cert.pem"],
     ServeOptions(checkpoint="c", api_keys=["a", "b"], max_batch_size=3, dtype="bf16", graceful_shutdown_seconds=2.5,
                  ssl_certfile="cert.pem")),
    (["generate", "--checkpoint", "c", "--min-p", "0.1", "--seed", "3", "--stop", "x", "--stop", r"\n\n",
      "--stop-token-ids", "7", "--ignore-eos", "--logprobs", "2", "--repetition-penalty", "1.2"],
     SamplingParams(max_new_tokens=200, temperature=0.8, top_p=0.95, min_p=0.1, seed=3, stop=["x", "\n\n"],
                    stop_token_ids=[7], ignore_eos=True, logprobs=2, repetition_penalty=1.2)),
])
def test_flags_build_the_dataclass(argv, expected):
    args = build_parser(only=argv[0]).parse_args(argv)
    assert dataclass_from_args(type(expected), args) == expected


def test_help_is_the_field_comment():
    assert field_comments(SamplingParams)["min_p"] == "drop tokens below min_p * p(most likely); 0 = off"
    assert "drop tokens below min_p" in command_parser("generate").format_help()
    assert "requests running at once (decoded together)" in command_parser("serve").format_help()


def test_a_field_without_a_command_line_form_is_refused():
    @dataclasses.dataclass
    class Odd:
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="Odd.table: no command-line form"):
        add_dataclass_flags(argparse.ArgumentParser(), Odd)
    with pytest.raises(TypeError, match="no fields"):
        add_dataclass_flags(argparse.ArgumentParser(), SamplingParams, {"nucleus": {}})


def documented_commands() -> list[str]:
    """Every `gptstack ...` command line of the README and the Makefile."""
    text = (REPO / "README.md").read_text() + "\n" + (REPO / "Makefile").read_text()
    lines = text.replace("\\\n", " ").splitlines()          # a command continued with \ is one line
    found = [re.sub(r"^\s*(\$\(BIN\)/)?gptstack ", "", line).replace("$(PORT)", "8000").rstrip(" &")
             for line in lines if re.match(r"^\s*(\$\(BIN\)/)?gptstack \w", line)]
    assert len(found) > 20
    return found


@pytest.mark.parametrize("line", documented_commands())
def test_documented_commands_parse(line):
    argv = shlex.split(line, comments=True)
    try:
        args, extra = build_parser(only=argv[0]).parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"gptstack {line} does not parse")
    assert not extra or args.command in ("train", "finetune")
