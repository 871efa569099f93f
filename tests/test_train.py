import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptstack.config import build_train_config
from gptstack.checkpoint import is_sharded
from gptstack.train.pretrain import train
from gptstack.train.metrics import read_metrics
from gptstack.train.optim import learning_rate, micro_batches

from conftest import (assert_same_tensors, assert_torchrun_matches_one_process, checkpoint_tensors, cli_args,
                      run_cli, tiny_overrides)


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
    assert (tmp_path / "last" / "train_state.safetensors").exists() and is_sharded(tmp_path / "last")
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
    """2 micro-batches of 4 equal one batch of 8, to within the float arithmetic.

    The two sum each gradient over 8 x 64 token positions in different orders, so they differ by
    float rounding: relatively ~sqrt(512) * 2^-24 < 2e-6 of a gradient element's magnitude, and the
    losses (which then see slightly different weights) likewise. Adam divides a step by the gradient's
    own size, which turns rounding noise in a near-zero gradient into a full-size step of opposite
    sign; with eps = 1e-5 instead of 1e-8 a step changes by at most lr * |noise| / eps per unit of
    noise, and noise stays below 1e-8 for gradients below 5e-3, so weights agree to
    3 steps * lr 3e-3 * 1e-3 = 1e-5 (atol 5e-5 with margin), while a real accumulation bug moves
    weights by lr ~ 3e-3."""
    common = dict(max_steps=3, eval_interval=100, grad_clip=1e9, eps=1e-5)   # clip never bites, norm is logged
    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "big", batch_size=8, **common)))
    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "acc", batch_size=4,
                                                      grad_accum_steps=2, **common)))
    logs = [[r for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("big", "acc")]
    assert len(logs[0]) == len(logs[1]) == 3
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in logs[0]] == pytest.approx([r[key] for r in logs[1]], rel=1e-5), key
    big, acc = (checkpoint_tensors(tmp_path / d / "last") for d in ("big", "acc"))
    for name in big:
        torch.testing.assert_close(big[name], acc[name], atol=5e-5, rtol=0, msg=name)


def first_step_loss(checkpoint, data, cfg, smoothing: float) -> float:
    """The loss a run starting from ``checkpoint`` must log at step 1, computed here independently
    with torch's own cross-entropy over the full logits."""
    import torch.nn.functional as F
    from gptstack.checkpoint import load_model
    from gptstack.data.loader import BatchSampler, TokenDataset
    model, _, _ = load_model(checkpoint)
    x, y = BatchSampler(TokenDataset(data), model.config.block_size, cfg["batch_size"], 1337).micro_batch(0, 0, 1)
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(x))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=smoothing).item()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_label_smoothing_and_dtype_are_in_effect(tiny_checkpoint, shakespeare, tmp_path, dtype):
    """Step 1's logged loss is the label-smoothed loss of the starting weights, in the asked dtype."""
    cfg = tiny_overrides(shakespeare, tmp_path, max_steps=2, eval_interval=100, dtype=dtype, label_smoothing=0.2,
                         init_from=str(tiny_checkpoint), **{"model.block_size": 256})
    train(build_train_config(overrides=cfg))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["dtype"] == dtype and rows[0]["dtype_reason"] == "set in the config"
    logged = next(r for r in rows if "loss" in r)["loss"]
    smoothed, plain = (first_step_loss(tiny_checkpoint, shakespeare, cfg, s) for s in (0.2, 0.0))
    assert abs(smoothed - plain) > 0.05   # the two differ by far more than any tolerance below
    if dtype == "fp32":   # fused chunked loss vs torch's: the same sums in another order
        assert logged == pytest.approx(smoothed, rel=1e-5)
    else:   # bf16 keeps 8 significant bits: logits within ~2^-8 relative, the loss within 1%
        assert logged == pytest.approx(smoothed, rel=1e-2)
        # and bf16 is really in effect: a mean over 1,024 tokens averages the rounding away (the
        # losses agree to ~1e-6), but the gradient norm moves by ~1e-4 where fp32 repeats to the bit
        train(build_train_config(overrides={**cfg, "dtype": "fp32", "out_dir": str(tmp_path / "fp32")}))
        norms = [next(r for r in read_metrics(d / "metrics.jsonl") if "loss" in r)["grad_norm"]
                 for d in (tmp_path, tmp_path / "fp32")]
        assert norms[0] != pytest.approx(norms[1], rel=1e-5), norms


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
    # weights and optimizer state, bit for bit
    assert_same_tensors(checkpoint_tensors(tmp_path / "straight" / "last"), checkpoint_tensors(tmp_path / "killed" / "last"))


@pytest.mark.slow
def test_ddp_two_processes_match_one(shakespeare, tmp_path):
    """torchrun with 2 CPU processes (gloo), one micro-batch each, equals one process accumulating two."""
    overrides = tiny_overrides(shakespeare, tmp_path, batch_size=2, max_steps=6, eval_interval=3, log_interval=1)
    assert_torchrun_matches_one_process("train", overrides, ("loss", "val_loss"), rank_summed=("val_loss",))


def test_a_corrupted_shard_is_refused_by_name(shakespeare, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shakespeare, data)
    shard = sorted(data.glob("train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF                      # same size, one byte changed
    shard.write_bytes(bytes(raw))
    proc = run_cli("train", *cli_args(tiny_overrides(data, tmp_path / "run", max_steps=1)))
    assert proc.returncode == 2 and shard.name in proc.stderr and "checksum" in proc.stderr, proc.stderr[-2000:]


def test_train_cli_bad_input_is_explained(tmp_path, shakespeare):
    proc = run_cli("train", "--data", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--data", str(shakespeare), "--learning_rate", "fast")
    assert proc.returncode == 2 and "learning_rate must be of type float" in proc.stderr
    proc = run_cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_activation_checkpointing_gives_the_same_training(shakespeare, tmp_path):
    """Same losses with and without, and in effect: each block's forward runs again in the backward."""
    from gptstack.train import distributed
    from gptstack.train.loop import Trainer
    from gptstack.train.pretrain import LanguageModelTask
    common = dict(max_steps=3, eval_interval=100)
    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "plain", **common)))
    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "ckpt", activation_checkpointing=True,
                                                      **common)))
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("plain", "ckpt")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-6)

    for enabled, forwards_per_step in ((False, 1), (True, 2)):
        cfg = build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / f"hook{enabled}", resume=False,
                                                          activation_checkpointing=enabled, **common))
        info = distributed.DistInfo()
        trainer = Trainer(cfg, LanguageModelTask(cfg, info), info)
        calls = []
        trainer.model.transformer.h[0].register_forward_pre_hook(lambda *args: calls.append(1))
        trainer.loss_sum, trainer.window_units = torch.zeros(()), 0
        trainer._train_step(1e-3)
        assert len(calls) == forwards_per_step, enabled


def test_nvidia_style_keys_drive_the_run(shakespeare, tmp_path):
    """A GPT-3 example-style config: its shape, epochs, decay steps and datasets are what runs."""
    from gptstack.data.loader import TokenDataset
    train_tokens = TokenDataset(shakespeare).num_tokens
    tokens_per_step = 4 * 32
    config = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_ctx": 32, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
              "resid_pdrop": 0.0, "afn": "gelu_new", "learning_rate": 2e-3, "lr_decay": True, "lr_decay_steps": 4,
              "max_epochs": 6.5 * tokens_per_step / train_tokens, "train_dataset": str(shakespeare),
              "eval_dataset": str(shakespeare), "batch_size": 4, "eval_batch_size": 2, "optimizer": "adam",
              "out_dir": str(tmp_path), "preset": "tiny", "warmup_steps": 1, "min_lr_ratio": 0.1, "eval_interval": 100,
              "eval_iters": 1, "log_interval": 1, "progress": False, "tensorboard": False, "dtype": "fp32",
              "peak_flops": 1e12}
    (tmp_path / "gpt3.json").write_text(json.dumps(config))
    run_cli("train", "--config", str(tmp_path / "gpt3.json"), check=True)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["total_steps"] == 7                       # ceil(6.5) steps: one max_epochs pass fraction
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 7 and lrs[0] == pytest.approx(2e-3)   # warmup of 1 step to the peak
    assert lrs[1] > lrs[2] > lrs[3] > 2e-4 and lrs[4:] == pytest.approx([2e-4] * 3)   # floor from lr_decay_steps on
    model = json.loads((tmp_path / "best" / "config.json").read_text())["model"]
    assert (model["n_embd"], model["n_layer"], model["n_head"], model["block_size"]) == (32, 1, 2, 32)
    assert [r["step"] for r in rows if "val_loss" in r] == [7]


def test_max_time_plans_the_steps_and_ends_the_decay(shakespeare, tmp_path):
    """No step count given: the run fits its wall-time budget and its schedule still decays to the end."""
    overrides = tiny_overrides(shakespeare, tmp_path, max_time=6, eval_interval=1000, warmup_steps=2,
                               lr_decay="cosine", min_lr_ratio=0.1, learning_rate=1e-3)
    del overrides["max_steps"]
    cfg = build_train_config(overrides=overrides)
    result = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    assert len(rows) == result.steps == rows[-1]["step"] == rows[-1]["planned_steps"] >= 4
    # each step's rate comes from the plan in force when it ran: the one logged the step before
    for before, row in zip(rows, rows[1:]):
        assert row["lr"] == pytest.approx(learning_rate(row["step"] - 1, cfg, before["planned_steps"]))
    after_warmup = [r["lr"] for r in rows[2:]]
    assert after_warmup == sorted(after_warmup, reverse=True) and after_warmup[-1] < after_warmup[0] / 2
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["steps"] == result.steps and summary["seconds"] < 2 * 6


def test_ctrl_c_keeps_last_and_marks_the_run_unfinished(shakespeare, tmp_path):
    """SIGINT mid-run: exit 130 with a message, last/ holds the steps done, no result.json; a fine-tune
    from that best/ warns; running the command again resumes and finishes."""
    # a constant rate after warmup: the run's length then does not change its steps
    overrides = tiny_overrides(shakespeare, tmp_path / "run", max_steps=400, eval_interval=10, log_interval=5,
                               lr_decay="constant")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptstack.cli", "train", *cli_args(overrides)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    best = tmp_path / "run" / "best" / "config.json"
    deadline = time.time() + 120
    while not best.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped at step" in stderr and "Traceback" not in stderr
    stopped_at = json.loads((tmp_path / "run" / "last" / "config.json").read_text())["meta"]["step"]
    assert 10 <= stopped_at < 400 and not (tmp_path / "run" / "result.json").exists()

    data = tmp_path / "s.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"line {i}\t{i % 2}\n" for i in range(40)))
    ft = run_cli("finetune", "--init_from", str(tmp_path / "run" / "best"), "--data", str(data), "--out_dir",
                 str(tmp_path / "ft"), "--max_steps", "1", "--progress", "false", "--tensorboard", "false",
                 "--dtype", "fp32", check=True)
    assert "has not finished" in ft.stderr

    run_cli("train", *cli_args({**overrides, "max_steps": stopped_at + 5}), env={"OMP_NUM_THREADS": "1"}, check=True)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == stopped_at + 5
    # stopped at a step boundary, so the resumed run is the run that was never stopped
    straight = {**overrides, "out_dir": str(tmp_path / "straight"), "max_steps": stopped_at + 5}
    run_cli("train", *cli_args(straight), env={"OMP_NUM_THREADS": "1"}, check=True)
    assert_same_tensors(*(checkpoint_tensors(tmp_path / d / "last") for d in ("run", "straight")))


@pytest.mark.slow
def test_max_time_under_torchrun_keeps_the_ranks_in_step(shakespeare, tmp_path):
    """Both ranks plan the same step count (from the slowest clock) and finish together."""
    overrides = tiny_overrides(shakespeare, tmp_path, max_time=8, eval_interval=1000, log_interval=2)
    del overrides["max_steps"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gptstack.cli", "train", *cli_args(overrides)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["steps"] == rows[-1]["step"] == rows[-1]["planned_steps"] >= 2


def test_auto_dtype_rule_picks_the_faster():
    from gptstack.runtime import faster_dtype
    assert faster_dtype({"fp32": 1.0, "bf16": 1.6}, "train").dtype == torch.float32   # AVX512-BF16 Xeon: 0.6x
    assert faster_dtype({"fp32": 1.0, "bf16": 0.95}, "train").dtype == torch.float32  # a tie keeps fp32
    choice = faster_dtype({"fp32": 1.0, "bf16": 0.25}, "inference")                     # AMX: 4x
    assert choice.dtype == torch.bfloat16 and "bf16 4.00x fp32" in choice.reason


def test_auto_dtype_is_measured_cached_and_logged(shakespeare, tmp_path, monkeypatch):
    from gptstack.runtime import BF16_MARGIN, choose_dtype, dtype_name, probe_cache_path
    monkeypatch.setenv("GPTSTACK_CACHE_DIR", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    first = choose_dtype(cpu, "train")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():   # no bf16 units: fp32 without a probe
        assert first.dtype == torch.float32 and "no bf16" in first.reason and not probe_cache_path().exists()
    else:
        (timing,) = json.loads(probe_cache_path().read_text()).values()
        faster = timing["fp32"] / timing["bf16"] >= BF16_MARGIN
        assert first.dtype == (torch.bfloat16 if faster else torch.float32), (timing, first)
        assert "measured train probe" in first.reason and "[cached]" not in first.reason
        again = choose_dtype(cpu, "train")
        assert again.dtype == first.dtype and "[cached]" in again.reason

    train(build_train_config(overrides=tiny_overrides(shakespeare, tmp_path / "run", max_steps=1, dtype="auto")))
    start = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert start["dtype"] == dtype_name(first.dtype) and start["dtype_reason"].startswith(first.reason.split(" [")[0])
