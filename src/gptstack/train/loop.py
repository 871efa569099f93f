"""The pretraining loop: ``train(TrainConfig)``.

Each optimizer step accumulates ``micro_batches(step)`` micro-batches (gradient accumulation and
GPT-3's batch ramp-up), clips, steps AdamW under the warmup + decay schedule, and logs. Every
``eval_interval`` steps it measures validation loss, keeps ``best/`` by val loss and ``last/`` with
the full train state. Because batches, learning rate and dropout RNG are all restored from
``last/``, a killed run resumed from there ends bit-identical to one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..checkpoint import load_model, load_train_state, save_checkpoint
from ..config import TrainConfig, model_info, to_dict
from ..data.loader import BatchSampler, TokenDataset, eval_batches, read_manifest
from ..data.prepare import MANIFEST, prepare
from ..files import write_text_atomic
from ..model import GPT
from ..runtime import autocast, dtype_name, resolve_dtype, tune_allocator
from ..tokenizer import load_tokenizer
from . import distributed
from .metrics import MetricsWriter, measure_peak_flops
from .optim import build_optimizer, clip_and_step, learning_rate, micro_batches, set_learning_rate


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_second: float


def resolve_dataset(path: str, out_dir: Path, tokenizer: str, info: distributed.DistInfo, progress: bool) -> Path:
    """A prepared dataset dir as is; raw text (file or folder) prepared once into out_dir/data."""
    source = Path(path)
    if (source / MANIFEST).exists():
        return source
    if not source.exists():
        raise FileNotFoundError(f"data {source} does not exist; pass a dataset made by `gptstack prepare` or a text file/folder")
    target = out_dir / "data" / source.stem
    if info.is_main and not (target / MANIFEST).exists():
        prepare([source], target, tokenizer=tokenizer, progress=progress)
    distributed.barrier(info)
    return target


def validation_set(directory: Path, explicit: bool) -> TokenDataset | None:
    """The val split; for an explicitly given eval dataset without one, its train split."""
    splits = read_manifest(directory)["splits"]
    if splits.get("val", {}).get("tokens"):
        return TokenDataset(directory, "val")
    return TokenDataset(directory, "train") if explicit else None


def total_steps(cfg: TrainConfig, train_tokens: int, world_size: int, block_size: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum_steps * world_size
    return max(1, math.ceil(cfg.max_epochs * train_tokens / tokens_per_step))


def train(cfg: TrainConfig, on_eval: Callable[[int, int, dict], None] | None = None) -> TrainResult:
    """Run (or resume) a pretraining run; ``on_eval(step, total_steps, {"val_loss": ...})`` is called after each
    validation on every rank (tuning prunes there)."""
    cfg.validate()
    tune_allocator()
    with distributed.process_group(cfg.device) as info:
        return _train(cfg, info, on_eval)


def _train(cfg: TrainConfig, info: distributed.DistInfo, on_eval) -> TrainResult:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, show = info.device, cfg.progress and info.is_main
    dtype = resolve_dtype(cfg.dtype, device)

    data_dir = resolve_dataset(cfg.data, out, cfg.tokenizer, info, show)
    train_set = TokenDataset(data_dir, "train")
    eval_dir = resolve_dataset(cfg.eval_data, out, cfg.tokenizer, info, show) if cfg.eval_data else data_dir
    val_set = validation_set(eval_dir, explicit=bool(cfg.eval_data))
    tokenizer = load_tokenizer(train_set.manifest["tokenizer"], base_dir=data_dir)
    model_cfg = cfg.model_config(vocab_size=train_set.vocab_size)
    if model_cfg.vocab_size < train_set.vocab_size:
        raise ValueError(f"model.vocab_size {model_cfg.vocab_size} is smaller than the dataset's tokenizer "
                         f"({train_set.vocab_size}); remove the override")

    torch.manual_seed(cfg.seed + info.rank)
    resume_dir = out / "last"
    state = load_train_state(resume_dir) if cfg.resume and (resume_dir / "checksums.json").exists() else None
    if state is not None:
        model, _, _ = load_model(resume_dir)
        if dataclasses.asdict(model.config) != dataclasses.asdict(model_cfg):
            raise ValueError(f"{resume_dir} holds a model of another shape than this config; "
                             "use another out_dir or pass --resume false")
    elif cfg.init_from:
        model, _, _ = load_model(cfg.init_from)
        model = with_config(model, model_cfg)
    else:
        model = GPT(model_cfg)
    model.to(device).train()
    model.activation_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    step, best_val = 0, float("inf")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best_val = state["step"], state["best_val_loss"]
        rng = state["rng"]
        if len(rng) == info.world_size:
            torch.set_rng_state(rng[info.rank]["cpu"])
            if device.type == "cuda" and rng[info.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rng[info.rank]["cuda"], device)

    trained = model
    if cfg.compile:
        trained = torch.compile(trained)
    if info.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None)

    steps = total_steps(cfg, train_set.num_tokens, info.world_size, model_cfg.block_size)
    sampler = BatchSampler(train_set, model_cfg.block_size, cfg.batch_size, cfg.seed, info.rank, info.world_size)
    metrics = MetricsWriter(out, enabled=info.is_main, tensorboard=cfg.tensorboard)
    flops_per_token = model_info(model_cfg)["flops_per_token_train"]
    peak = cfg.peak_flops or measure_peak_flops(device, dtype)
    if info.is_main:
        write_text_atomic(out / "train_config.json", json.dumps({**to_dict(cfg), "resolved_model": to_dict(model_cfg),
                                                            "total_steps": steps, "world_size": info.world_size}, indent=2))
        if state is None:   # a fresh run starts a fresh metrics file
            metrics.path.unlink(missing_ok=True)
            metrics.write(0, event="start", parameters=model.num_parameters(), dtype=dtype_name(dtype),
                          device=str(device), total_steps=steps, world_size=info.world_size)

    def evaluate() -> float | None:
        if val_set is None:
            return None
        model.eval()
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        with torch.no_grad():
            for x, y in eval_batches(val_set, model_cfg.block_size, cfg.eval_batch_size, cfg.eval_iters,
                                     info.rank, info.world_size):
                with autocast(device, dtype):
                    _, loss = model(x.to(device), y.to(device))
                total += loss.float() * y.numel()
                count += y.numel()
        model.train()
        total, count = distributed.sum_across_ranks(total, info), distributed.sum_across_ranks(count, info)
        return (total / count).item()

    def checkpoint(name: str, val_loss: float | None) -> None:
        """Rank 0 writes; every rank calls it (with the same name), as the RNG gather is collective."""
        train_state = None
        if name == "last":
            rng = distributed.gather_objects({"cpu": torch.get_rng_state(),
                                              "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                                             info)
            train_state = {"step": step, "best_val_loss": best_val, "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rng,
                           "data": {"seed": cfg.seed, "next_step": step}}
        if info.is_main:
            meta = {"step": step, "val_loss": val_loss, "train_config": to_dict(cfg)}
            save_checkpoint(out / name, model, tokenizer, meta=meta, train_state=train_state)
        distributed.barrier(info)

    bar = tqdm(total=steps, initial=step, desc="training", unit="step", disable=not show, dynamic_ncols=True)
    loss_sum, window_tokens, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    run_start, run_tokens = time.perf_counter(), 0
    last_loss, val_loss = float("nan"), None
    while step < steps:
        lr = learning_rate(step, cfg, steps)
        set_learning_rate(optimizer, lr)
        n_micro = micro_batches(step, cfg)
        for micro in range(n_micro):
            x, y = sampler.micro_batch(step, micro, n_micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == n_micro - 1 or not info.enabled
            with (nullcontext() if sync else trained.no_sync()):
                with autocast(device, dtype):
                    _, loss = trained(x, y, label_smoothing=cfg.label_smoothing)
                scaler.scale(loss / n_micro).backward()
            loss_sum += loss.detach().float() / n_micro
            window_tokens += x.numel() * info.world_size
        grad_norm = clip_and_step(model, optimizer, cfg.grad_clip, scaler)
        step += 1
        bar.update(1)

        if step % cfg.log_interval == 0 or step == steps:
            steps_in_window = (step - 1) % cfg.log_interval + 1
            last_loss = (distributed.mean_across_ranks(loss_sum, info) / steps_in_window).item()
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            mfu = flops_per_token * tokens_per_s / (peak * info.world_size)
            run_tokens += window_tokens
            metrics.write(step, loss=last_loss, lr=lr, tokens_per_s=round(tokens_per_s, 1), mfu=round(mfu, 4),
                          grad_norm=None if grad_norm is None else round(float(grad_norm), 4),
                          micro_batches=n_micro)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}", lr=f"{lr:.2e}")
            loss_sum.zero_()
            window_tokens, window_start = 0, time.perf_counter()

        if step % cfg.eval_interval == 0 or step == steps:
            val_loss = evaluate()
            if val_loss is not None:
                metrics.write(step, val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50)))
                if show:
                    bar.write(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
                if val_loss < best_val:
                    best_val = val_loss
                    checkpoint("best", val_loss)
            checkpoint("last", val_loss)
            if on_eval is not None and val_loss is not None:
                on_eval(step, steps, {"val_loss": val_loss})
            window_start = time.perf_counter()   # evaluation and saving do not count against tokens/s
        elif cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            checkpoint("last", val_loss)
            window_start = time.perf_counter()
    bar.close()
    if val_set is None:   # nothing to rank checkpoints by: the final weights are the best we know
        checkpoint("best", None)
    metrics.close()
    elapsed = time.perf_counter() - run_start
    return TrainResult(out, step, last_loss, val_loss, best_val if best_val < float("inf") else None,
                       run_tokens / elapsed if elapsed > 0 else 0.0)


def with_config(model: GPT, cfg) -> GPT:
    """A GPT of config ``cfg`` (e.g. other dropout rates) holding ``model``'s weights."""
    fresh = GPT(cfg.validate())
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return fresh
