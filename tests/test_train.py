import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gptstack.config import build_train_config
from gptstack.train.loop import train
from gptstack.train.metrics import read_metrics
from gptstack.train.optim import learning_rate, micro_batches

from conftest import assert_torchrun_matches_one_process, cli_args, run_cli, tiny_overrides


def test_training_lowers_loss_and_writes_everything(shakespeare, tmp_path):
    result = train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path, max_steps=40, tensorboard=True)))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and losses[-1] < losses[0] - 1.0
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in rows if "loss" in r)
    assert result.best_val_loss == min(r["val_loss"] for r in evals)
    best = json.loads((tmp_path / "best" / "config.json").read_text())["meta"]
    assert best["val_loss"] == result.best_val_loss
    assert (tmp_path / "last" / "train_state.safetensors").exists()
    assert any((tmp_path / "tensorboard").iterdir())


def test_schedule_warmup_then_cosine_to_floor():
    cfg = build_train_config(overrides={"data": "x", "learning_rate": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1})
    lrs = [learning_rate(s, cfg, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    linear = build_train_config(overrides={"data": "x", "learning_rate": 1.0, "warmup_steps": 0, "lr_decay": "linear",
                                           "min_lr_ratio": 0.0})
    assert learning_rate(50, linear, 100) == pytest.approx(0.5)


def test_batch_rampup_grows_linearly():
    cfg = build_train_config(overrides={"data": "x", "grad_accum_steps": 8, "batch_rampup_steps": 100,
                                        "batch_rampup_start": 2})
    assert [micro_batches(s, cfg) for s in (0, 25, 50, 99, 100, 500)] == [2, 3, 5, 7, 8, 8]


def test_gradient_accumulation_equals_one_big_batch(shakespeare, tmp_path):
    common = dict(max_steps=3, eval_interval=100, grad_clip=0.0)
    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "big", batch_size=8, **common)))
    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "acc", batch_size=4,
                                                      grad_accum_steps=2, **common)))
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("big", "acc")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    big, acc = (load_file(tmp_path / d / "last" / "model.safetensors") for d in ("big", "acc"))
    for name in big:
        # Adam turns float noise in near-zero gradients (e.g. the key bias, which softmax ignores)
        # into full-size steps, so vectors are compared only through the losses above.
        if big[name].dim() == 2:
            assert torch.allclose(big[name], acc[name], atol=1e-5), name


def test_label_smoothing_and_bf16_train(shakespeare, tmp_path):
    result = train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path, max_steps=5, dtype="bf16",
                                                               label_smoothing=0.1)))
    assert result.steps == 5 and result.final_loss < 11.5


def test_exact_resume_after_a_real_kill(shakespeare, tmp_path):
    """Train 40 steps straight; separately train, SIGKILL mid-run, resume: bit-identical weights."""
    overrides = tiny_overrides(shakespeare, tmp_path / "straight", max_steps=40, eval_interval=15,
                               checkpoint_interval=5, log_interval=5,
                               **{"model.embd_pdrop": 0.1, "model.attn_pdrop": 0.1, "model.resid_pdrop": 0.1})
    env = {"OMP_NUM_THREADS": "1"}
    run_cli("train", *cli_args(overrides), env=env, check=True)

    overrides["out_dir"] = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "gptstack.cli", "train", *cli_args(overrides)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last" / "config.json"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(last.read_text())["meta"]["step"]
    assert 5 <= killed_at < 40, "the run must be killed part-way"

    run_cli("train", *cli_args(overrides), env=env, check=True)
    straight = load_file(tmp_path / "straight" / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "last" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    opt_a = load_file(tmp_path / "straight" / "last" / "train_state.safetensors")
    opt_b = load_file(tmp_path / "killed" / "last" / "train_state.safetensors")
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)


@pytest.mark.slow
def test_ddp_two_processes_match_one(shakespeare, tmp_path):
    """torchrun with 2 CPU processes (gloo) and half the micro-batch each equals one process."""
    common = dict(max_steps=6, eval_interval=3, grad_accum_steps=2, log_interval=1)
    single = tiny_overrides(shakespeare, tmp_path / "single", batch_size=4, **common)
    double = tiny_overrides(shakespeare, tmp_path / "ddp", batch_size=2, **common)
    assert_torchrun_matches_one_process("train", single, double, ("loss", "val_loss"), weights_atol=1e-5)


def test_train_cli_bad_input_is_explained(tmp_path, shakespeare):
    proc = run_cli("train", "--data", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--data", str(shakespeare), "--learning_rate", "fast")
    assert proc.returncode == 2 and "learning_rate must be of type float" in proc.stderr
    proc = run_cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_activation_checkpointing_gives_the_same_training(shakespeare, tmp_path):
    common = dict(max_steps=3, eval_interval=100)
    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "plain", **common)))
    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "ckpt", activation_checkpointing=True,
                                                      **common)))
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("plain", "ckpt")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-6)
