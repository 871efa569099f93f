"""FSDP2, tensor and pipeline parallelism, sharded checkpoints and multi-node runs, under torchrun
with gloo on the CPU (the NCCL / CUDA paths share this code and are tested where CUDA is present).

Tolerance. Every layout here trains on the same rows as one process accumulating two micro-batches
of 4 (a global batch of 8), so the only difference is the order of floating-point additions:
tensor parallelism sums each row-parallel matmul in two halves and then across processes, FSDP2
and DDP average gradients in a reduce-scatter or all-reduce, a pipeline sums micro-batch losses in
its schedule's order. Each such sum of n fp32 terms moves by about sqrt(n) * 2^-24 relative (n <=
4 * n_embd here: ~1e-6). Adam (eps 1e-5, so tiny gradients are not blown up to full steps)
turns that into weight differences far below lr * 1e-3 per step, and the losses of 6 steps agree
to ~1e-7 relative, measured on this machine. We allow 1e-5 on losses and 1e-4 on weights; a layout
that drops an all-reduce, double-counts a tied gradient or shards a weight wrongly moves the step-2
loss by more than 1e-3 (lr 3e-3 on weights of std 0.02). Where the layout does not change (resume
at the same layout), results are compared bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_same_tensors, checkpoint_tensors, cli_args, free_port, run_cli, tiny_overrides
from gptstack.checkpoint import load_model, recover_interrupted_save, verify
from gptstack.config import preset
from gptstack.train.metrics import read_metrics
from gptstack.train.plan import Layout as PlanLayout, parameters_per_device

pytestmark = pytest.mark.slow
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4
# each layout's processes and settings; all train on the same global batch of 8 rows per step
LAYOUTS = {
    "ddp": (2, {}),
    "fsdp": (2, {"fsdp": True}),
    "tensor": (2, {"tensor_parallel": 2, "batch_size": 8}),
    "pipeline": (2, {"pipeline_parallel": 2, "grad_accum_steps": 2}),
    "fsdp_x_tensor": (4, {"fsdp": True, "tensor_parallel": 2}),
}


def torchrun(nproc: int, overrides: dict, *launcher: str) -> subprocess.CompletedProcess:
    """`gptstack train` under torchrun, as a user starts it (default: one machine, ``nproc`` processes)."""
    launcher = launcher or ("--standalone",)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc),
                           "-m", "gptstack.cli", "train", *cli_args(overrides)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def overrides_for(shakespeare: Path, out_dir: Path, **extra) -> dict:
    return tiny_overrides(shakespeare, out_dir, **{"batch_size": 4, "max_steps": 6, "eval_interval": 3, "eps": 1e-5, **extra})


def losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out_dir / "metrics.jsonl") if "loss" in row]


def held_bytes(out_dir: Path) -> list[dict]:
    return next(r for r in read_metrics(out_dir / "metrics.jsonl") if r.get("event") == "memory")["held_bytes_per_rank"]


def model_weights(checkpoint: Path) -> dict:
    return {k: v for k, v in checkpoint_tensors(checkpoint).items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def runs(shakespeare, tmp_path_factory) -> dict[str, Path]:
    """One process (2 micro-batches of 4), and every layout, each trained 6 steps."""
    root = tmp_path_factory.mktemp("layouts")
    out = {"single": root / "single"}
    run_cli("train", *cli_args(overrides_for(shakespeare, out["single"], grad_accum_steps=2)),
            env={"OMP_NUM_THREADS": "1"}, check=True)
    for name, (nproc, settings) in LAYOUTS.items():
        out[name] = root / name
        torchrun(nproc, overrides_for(shakespeare, out[name], **settings))
    return out


@pytest.mark.parametrize("layout", ["fsdp", "tensor", "pipeline", "fsdp_x_tensor"])
def test_each_layout_trains_as_one_process_does(runs, layout):
    """Losses, validation and final weights of each layout match the one-process run."""
    assert losses(runs[layout]) == pytest.approx(losses(runs["single"]), rel=LOSS_RTOL)
    val = [[r["val_loss"] for r in read_metrics(runs[name] / "metrics.jsonl") if "val_loss" in r]
           for name in ("single", layout)]
    assert len(val[0]) == 2 and val[1] == pytest.approx(val[0], rel=LOSS_RTOL)
    single, parallel = model_weights(runs["single"] / "last"), model_weights(runs[layout] / "last")
    assert single.keys() == parallel.keys()
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], atol=WEIGHT_ATOL, rtol=0, msg=name)
    # the weights a user serves: best/ of a sharded run is read whole by one process
    model, _, _ = load_model(runs[layout] / "best")
    assert torch.equal(model.transformer.wte.weight, parallel["model.transformer.wte.weight"])


def test_each_parallelism_divides_the_work(runs):
    """Bytes of parameters, gradients and optimizer state each process holds, as each run logged
    them after its first step: FSDP2 about half of DDP's per process; tensor parallelism halves the
    layers it splits (q, k, v, the attention output and both MLP matrices of every block) and
    replicates the rest (embeddings, LayerNorms, biases of the row-split layers); a pipeline stage
    holds its half of the blocks, the first the embeddings, the last the final LayerNorm and the tied
    head (at this tiny size the vocabulary dominates, so a stage is not much smaller than the whole)."""
    def states(name: str) -> list[dict]:
        return [{k: v for k, v in rank.items() if k != "peak_memory_mib"} for rank in held_bytes(runs[name])]
    ddp, fsdp, tensor, pipeline = (states(name) for name in ("ddp", "fsdp", "tensor", "pipeline"))
    whole = ddp[0]
    assert ddp[0] == ddp[1] and whole["optimizer"] == 2 * whole["parameters"] == 2 * whole["gradients"]
    for rank in fsdp:
        for kind in whole:   # FSDP2 pads each sharded tensor to a multiple of the process count
            assert rank[kind] == pytest.approx(whole[kind] / 2, rel=0.01), kind

    cfg = preset("tiny").model
    h, v, n = cfg.n_embd, 50257, cfg.n_layer
    split = n * (3 * (h * h + h) + h * h + (4 * h * h + 4 * h) + 4 * h * h)   # tensor-parallel weights and biases
    replicated = whole["parameters"] // 4 - split
    for rank in tensor:
        assert rank["parameters"] == 4 * (split // 2 + replicated)
        assert rank["optimizer"] == 2 * rank["parameters"]
    per_block = 12 * h * h + 13 * h   # 4 matrices of h x h in attention, 2 of h x 4h in the MLP; biases, LayerNorms
    assert pipeline[0]["parameters"] == 4 * (v * h + cfg.block_size * h + n // 2 * per_block)   # embeddings, first half
    assert pipeline[1]["parameters"] == 4 * (n // 2 * per_block + 2 * h + v * h)   # second half, ln_f, the tied head


def test_sharded_checkpoints_resume_at_other_layouts(shakespeare, tmp_path):
    """Save at 2 FSDP2 processes after 5 of 10 steps; resume at 1 process and at 4 (FSDP2 x tensor
    parallel): both continue as the uninterrupted run did (within the tolerance above). Resumed at
    the same layout, the run is the uninterrupted one bit for bit."""
    schedule = dict(max_steps=10, lr_decay_steps=10, eval_interval=5)   # the schedule does not depend on where it stops
    straight = tmp_path / "straight"
    run_cli("train", *cli_args(overrides_for(shakespeare, straight, grad_accum_steps=2, **schedule)),
            env={"OMP_NUM_THREADS": "1"}, check=True)
    first = tmp_path / "first_half"
    torchrun(2, overrides_for(shakespeare, first, fsdp=True, **{**schedule, "max_steps": 5}))
    assert json.loads((first / "last" / "config.json").read_text())["meta"]["step"] == 5
    for name in ("at_one", "at_four", "at_two"):
        shutil.copytree(first, tmp_path / name)
    run_cli("train", *cli_args(overrides_for(shakespeare, tmp_path / "at_one", grad_accum_steps=2, **schedule)),
            env={"OMP_NUM_THREADS": "1"}, check=True)
    torchrun(4, overrides_for(shakespeare, tmp_path / "at_four", fsdp=True, tensor_parallel=2, **schedule))
    for resumed in ("at_one", "at_four"):
        assert losses(tmp_path / resumed)[5:] == pytest.approx(losses(straight)[5:], rel=LOSS_RTOL)
        reference, weights = model_weights(straight / "last"), model_weights(tmp_path / resumed / "last")
        for name in reference:
            torch.testing.assert_close(weights[name], reference[name], atol=WEIGHT_ATOL, rtol=0, msg=name)

    fsdp_straight = tmp_path / "fsdp_straight"
    torchrun(2, overrides_for(shakespeare, fsdp_straight, fsdp=True, **schedule))
    torchrun(2, overrides_for(shakespeare, tmp_path / "at_two", fsdp=True, **schedule))
    assert losses(tmp_path / "at_two")[5:] == losses(fsdp_straight)[5:]
    assert_same_tensors(checkpoint_tensors(fsdp_straight / "last"), checkpoint_tensors(tmp_path / "at_two" / "last"))


def test_two_nodes_on_the_loopback_interface(runs, shakespeare, tmp_path):
    """The documented multi-node command (c10d rendezvous), as two one-process "nodes" on 127.0.0.1:
    they find each other, train FSDP2, and match the one-machine FSDP2 run exactly."""
    endpoint = f"127.0.0.1:{free_port()}"
    overrides = overrides_for(shakespeare, tmp_path / "two_nodes", fsdp=True)
    launcher = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "loopback"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", "1",
               "-m", "gptstack.cli", "train", *cli_args(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert losses(tmp_path / "two_nodes") == losses(runs["fsdp"])


def test_a_kill_during_a_save_never_leaves_a_checkpoint_that_loads(shakespeare, tmp_path):
    """SIGKILL at random moments of a run that saves last/ at every step: last/ is always a whole
    checkpoint (the save writes a hidden sibling and renames it), and the run resumes from it."""
    overrides = overrides_for(shakespeare, tmp_path / "run", fsdp=True, max_steps=400, checkpoint_interval=1,
                              eval_interval=1000, log_interval=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gptstack.cli", "train", *cli_args(overrides)]
    last = tmp_path / "run" / "last"
    steps = []
    for delay in (0.0, 0.13, 0.29):
        proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        start = (json.loads((last / "config.json").read_text())["meta"]["step"] if last.exists() else 0) + 3
        while time.time() < deadline and proc.poll() is None and (
                not (last / "config.json").exists() or
                json.loads((last / "config.json").read_text())["meta"]["step"] < start):
            time.sleep(0.01)
        time.sleep(delay)
        kill_everything_running(str(last.parent))   # torchrun and both workers, mid-step or mid-save
        proc.wait()
        recover_interrupted_save(last)   # what a resume does first, should the kill fall between two renames
        verify(last)   # every file present and matching its checksum
        steps.append(json.loads((last / "config.json").read_text())["meta"]["step"])
    assert steps == sorted(steps) and steps[-1] < 400
    overrides["max_steps"] = steps[-1] + 2
    torchrun(2, overrides)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == steps[-1] + 2


def kill_everything_running(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker`` (torchrun starts its workers in
    sessions of their own, so killing torchrun's group would leave them running), and wait until
    they are gone."""
    def matching() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:   # exited while we looked
                pass
        return pids
    for pid in matching():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while matching() and time.time() < deadline:
        time.sleep(0.05)


def test_bad_layouts_are_explained(shakespeare, tmp_path):
    base = cli_args(overrides_for(shakespeare, tmp_path))
    for extra, message in ((["--tensor_parallel", "2"], "cannot be split into tensor_parallel 2"),
                           (["--tensor_parallel", "3"], "must divide model.n_head"),
                           (["--pipeline_parallel", "2"], "raise grad_accum_steps"),
                           (["--cpu_offload", "true"], "set fsdp: true")):
        proc = run_cli("train", *base, *extra)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_gpt3_175b_on_the_meta_device_at_the_planned_layout():
    """gpt3-175b built on the meta device (nothing allocated) at a layout `gptstack plan` prints: the
    parameters each process holds, counted from the real modules, pipeline split and tensor-parallel
    plan, are the plan's arithmetic (which splits the blocks' matrices by tp, and leaves LayerNorms
    and row-parallel biases whole: 6 * n_embd per block, ~1e-4 of the total)."""
    for layout in ([], ["--tp", "8", "--pp", "8"]):
        proc = run_cli("plan", "gpt3-175b", "--gpus", "1024", "--gpu-memory", "80GB", *layout, "--on-meta", check=True)
        assert "built on the meta device (no memory allocated)" in proc.stdout
        line = next(l for l in proc.stdout.splitlines() if l.startswith("per process, counted on the meta device"))
        counted = float(line.split(":")[1].split("B parameters")[0].replace(",", "")) * 1e9
        planned = json.loads(run_cli("plan", "gpt3-175b", "--gpus", "1024", "--gpu-memory", "80GB", *layout, "--json",
                                     check=True).stdout)["layouts"][0]
        assert counted == pytest.approx(parameters_per_device(preset("gpt3-175b").model, PlanLayout(**planned["layout"])),
                                        rel=1e-3)
        assert counted < 4e9 if layout else counted > 170e9


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL and FSDP2 CPU offload need 2 CUDA devices; this machine has none")
def test_fsdp_with_cpu_offload_on_two_gpus(runs, shakespeare, tmp_path):
    overrides = overrides_for(shakespeare, tmp_path, fsdp=True, cpu_offload=True, device="cuda")
    torchrun(2, overrides)
    assert losses(tmp_path) == pytest.approx(losses(runs["single"]), rel=1e-3)   # GPU kernels sum in other orders
