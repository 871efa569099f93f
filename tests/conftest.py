"""Shared fixtures: the bundled corpus prepared once, and a tiny trained checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptstack.config import build_train_config
from gptstack.data.prepare import prepare
from gptstack.train.loop import train

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "src" / "gptstack" / "assets" / "corpus" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare([CORPUS], out, progress=False)
    return out


def tiny_overrides(data: Path, out_dir: Path, **extra) -> dict:
    """A configuration that trains in seconds on the CPU."""
    base = {"data": str(data), "out_dir": str(out_dir), "preset": "tiny", "batch_size": 4, "max_steps": 20,
            "warmup_steps": 2, "learning_rate": 3e-3, "eval_interval": 10, "eval_iters": 2,
            "eval_batch_size": 4, "log_interval": 1, "progress": False, "tensorboard": False, "dtype": "fp32",
            "peak_flops": 1e12}
    base.update(extra)
    return base


@pytest.fixture(scope="session")
def tiny_checkpoint(shakespeare, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(build_train_config(overrides=tiny_overrides(shakespeare, out, max_steps=30)))
    return out / "best"


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `gptstack ...` as a real process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptstack {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
