"""Shared fixtures: the bundled corpus prepared once, and a tiny trained checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptstack.config import build_train_config
from gptstack.data.prepare import prepare
from gptstack.inference import kernels
from gptstack.train.pretrain import train

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "src" / "gptstack" / "assets" / "corpus" / "tinyshakespeare.txt"


@pytest.fixture(scope="session", autouse=True)
def own_probe_cache(tmp_path_factory):
    """dtype probes measured under the test suite's load stay out of the user's cache (subprocesses inherit this)."""
    os.environ["GPTSTACK_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


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
    # a context of 256 leaves room for requests long enough to cancel part-way in the server tests
    train(build_train_config(overrides=tiny_overrides(shakespeare, out, max_steps=30, **{"model.block_size": 256})))
    return out / "best"


def cli_args(overrides: dict) -> list[str]:
    """A config dict as the `--key value` arguments of the CLI."""
    return [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `gptstack ...` as a real process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptstack {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def assert_torchrun_matches_one_process(command: str, overrides: dict, keys: tuple[str, ...],
                                        rank_summed: tuple[str, ...] = ()) -> None:
    """``gptstack <command>`` as one process accumulating 2 micro-batches per step must equal 2 gloo
    processes under torchrun taking one micro-batch each, to the bit.

    Exact by construction: both see the same rows in micro-batches of the same shape (so each
    micro-batch's gradient is the same bits), and the one process adds 0.5 * g0 + 0.5 * g1 where DDP
    adds g0 + g1 and halves the sum; scaling by a power of two commutes with rounding, and a sum of
    two terms is the same in either order. Only ``rank_summed`` metrics, whose ranks each sum a part
    of the validation set, add in another order: they get n * 2^-24 relative, n <= 8 terms."""
    from gptstack.train.metrics import read_metrics
    single = {**overrides, "out_dir": str(Path(overrides["out_dir"]) / "single"), "grad_accum_steps": 2}
    double = {**overrides, "out_dir": str(Path(overrides["out_dir"]) / "ddp"), "grad_accum_steps": 1}
    run_cli(command, *cli_args(single), env={"OMP_NUM_THREADS": "1"}, check=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gptstack.cli", command, *cli_args(double)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [read_metrics(Path(cfg["out_dir"]) / "metrics.jsonl") for cfg in (single, double)]
    assert rows[1][0]["world_size"] == 2
    for key in keys:
        a, b = ([r[key] for r in run if key in r] for run in rows)
        assert len(a) == len(b) > 0, key
        assert a == (pytest.approx(b, rel=8 * 2 ** -24) if key in rank_summed else b), key
    assert_same_tensors(*(checkpoint_tensors(Path(cfg["out_dir"]) / "last") for cfg in (single, double)))


def checkpoint_tensors(directory: Path) -> dict:
    """Every tensor a checkpoint holds, by flat name: a sharded (DCP) checkpoint's model and
    optimizer state, or a single-file checkpoint's weights."""
    import torch
    from safetensors.torch import load_file
    from gptstack.checkpoint import is_sharded
    if not is_sharded(directory):
        return load_file(Path(directory) / "model.safetensors")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    saved = Path(directory).parent / f".{Path(directory).name}.pt"
    dcp_to_torch_save(directory, saved)
    state, flat = torch.load(saved, weights_only=False), {}

    def walk(value, name):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    walk(state, "")
    saved.unlink()
    return flat


def assert_same_tensors(a: dict, b: dict) -> None:
    import torch
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `gptstack serve` process on a free local port."""

    def __init__(self, checkpoint: Path, *args: str, key: str = "test-key", scheme: str = "http"):
        import httpx
        self.port, self.key = free_port(), key
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = open(Path(checkpoint).parent / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "gptstack.cli", "serve", "--checkpoint", str(checkpoint),
                                      "--port", str(self.port), "--api-key", key, "--model-name", "tiny", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        import time
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not become ready: {self.output()}")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint, "--max-batch-size", "8")
    yield s
    s.stop()


POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "terrible", "dull", "boring", "dreadful"]
FILLER = ["the film", "this movie", "the plot", "the acting", "the ending", "every scene"]


def write_sentiment(path: Path, n: int, seed: int = 0) -> Path:
    """A synthetic two-class sentiment TSV (label 1 iff the sentence holds a positive word)."""
    import random
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.random() < 0.5
        word = rng.choice(POSITIVE if label else NEGATIVE)
        lines.append(f"{rng.choice(FILLER)} was {word} , {rng.choice(FILLER)} too\t{int(label)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_finetune_overrides(base: Path, data: Path, out_dir: Path, **extra) -> dict:
    """A fine-tune of the tiny checkpoint that runs in seconds."""
    cfg = {"init_from": str(base), "data": str(data), "out_dir": str(out_dir), "batch_size": 16, "max_steps": 60,
           "max_epochs": 0, "learning_rate": 1e-2, "warmup_steps": 4, "eval_interval": 30, "eval_batch_size": 64,
           "log_interval": 5, "progress": False, "tensorboard": False, "dtype": "fp32", "val_fraction": 0.2}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="session")
def tiny_classifier(tiny_checkpoint, tmp_path_factory) -> Path:
    from gptstack.adapt.finetune import FinetuneConfig, finetune
    work = tmp_path_factory.mktemp("classifier")
    data = write_sentiment(work / "sentiment.tsv", 400)
    finetune(build_train_config(overrides=tiny_finetune_overrides(tiny_checkpoint, data, work / "run"), cls=FinetuneConfig))
    return work / "run" / "best"


ISAS = ("generic", "avx2", "avx512", "avx512_vnni", "avx512_bf16")   # the kernel copies, least capable first


def runnable_isas() -> list[str]:
    """The kernel copies this machine runs: capping at each gives a distinct one."""
    if not kernels.available():
        return []
    best = kernels.isa()
    try:
        return [kernels.select_isa(cap) for cap in ISAS[:ISAS.index(best) + 1]]
    finally:
        kernels.select_isa(best)


@pytest.fixture()
def each_isa():
    """Yields a function that caps the ISA; the best one is restored afterwards."""
    if not kernels.available():
        pytest.skip("the kernels are not built")
    best = kernels.isa()
    yield kernels.select_isa
    kernels.select_isa(best)
