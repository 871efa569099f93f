"""The one training loop: pretraining and every fine-tuning task run through ``run(cfg, task)``.

A :class:`Task` supplies what differs between kinds of training: the model and tokenizer, the
micro-batches of each optimizer step, the loss of a batch and the validation. The loop owns the
rest, once: the schedule, gradient accumulation and clipping, mixed precision, DDP, logging with
throughput, ``best/`` (by ``best_metric``) and ``last/`` checkpoints, exact resume, a wall-time
budget and a clean stop on Ctrl-C.

Because batches are a pure function of (seed, step) and ``last/`` keeps the optimizer, scaler, RNG
states and step, a killed run resumed from there ends bit-identical to one that was never stopped.
A run that finishes writes ``result.json`` beside its checkpoints; one that was stopped has none,
so a recipe can tell a half-trained ``best/`` from a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from ..checkpoint import (is_encrypted, is_sharded, load_model, load_train_state, recover_interrupted_save,
                          save_checkpoint, unwrap)
from ..config import ConfigError, ModelConfig, TrainConfig, to_dict
from ..crypto import HOW_TO_GIVE_A_KEY, key_from_environment
from ..files import write_text_atomic
from ..runtime import autocast, choose_dtype, dtype_name, resolve_dtype, tune_allocator
from ..tokenizer import Tokenizer
from ..sharded_checkpoint import load_sharded, save_sharded
from . import distributed, parallel
from .metrics import MetricsWriter, measure_peak_flops
from .optim import build_optimizer, clip_and_step, learning_rate, set_learning_rate

log = logging.getLogger("gptstack.train")
RESULT = "result.json"
UNPLANNED = 10 ** 12   # the step count of a max_time run before its first measured steps
LOWER_IS_BETTER = ("val_loss", "val_perplexity")
OnEval = Callable[[int, int, dict], None]


class Task(Protocol):
    """What one kind of training supplies to the loop."""

    name: str                       # for logs and checkpoint metadata: "language_model", "classification", ...
    unit: str                       # what throughput counts: "tokens" or "examples"
    flops_per_unit: float | None    # training FLOPs per unit, for MFU (None: not reported)

    def build(self, resume_dir: Path | None) -> tuple[torch.nn.Module, Tokenizer]:
        """The model to train and its tokenizer; from ``resume_dir`` (weights, adapters, head) when
        resuming a ``last/`` written before sharded checkpoints (the loop restores those itself)."""

    def steps_per_epoch(self, dp_size: int) -> float:
        """Optimizer steps in one pass over the training data with ``dp_size`` data-parallel processes."""

    def step_batches(self, step: int, info: distributed.DistInfo) -> list[tuple[Any, float, int]]:
        """This process's micro-batches of optimizer step ``step``: (batch, share of the step's loss,
        units); processes with the same ``info.dp_rank`` get the same ones."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of one micro-batch."""

    def evaluate(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 info: distributed.DistInfo) -> dict:
        """Validation results with the same numbers on every rank ({} without held-out data)."""

    def checkpoint_meta(self) -> dict:
        """Extra metadata for config.json["meta"] of every checkpoint."""

    def for_serving(self, model: torch.nn.Module) -> torch.nn.Module:
        """What ``best/`` holds (e.g. a copy with LoRA adapters merged)."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float | None           # mean training loss of the last logging window
    val_loss: float | None             # at the last evaluation
    best_val_loss: float | None        # at the best step (picked by best_metric)
    metrics: dict = field(default_factory=dict)   # all validation results at the best step, with "step"
    units_per_second: float = 0.0      # tokens (pretraining) or examples (fine-tuning) per second, all ranks


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory: the accelerator's allocations, or on the CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def run(cfg: TrainConfig, make_task: Callable[[distributed.DistInfo], Task],
        on_eval: OnEval | None = None) -> TrainResult:
    """Run (or resume) a training run in one process or under torchrun. ``on_eval(step, total_steps,
    results)`` is called after each validation on every rank (tuning prunes there)."""
    cfg.validate()
    tune_allocator()
    with distributed.process_group(cfg.device) as info:
        layout = parallel.Layout.create(cfg, info)
        info = dataclasses.replace(info, dp_rank=layout.dp_rank, dp_size=layout.dp)
        return Trainer(cfg, make_task(info), info, layout).run(on_eval)


class Trainer:
    """One run's state: model, optimizer, step, best score; ``run`` is the loop."""

    def __init__(self, cfg: TrainConfig, task: Task, info: distributed.DistInfo,
                 layout: parallel.Layout | None = None):
        self.cfg, self.task, self.info = cfg, task, info
        self.layout = layout or parallel.Layout(dp=info.world_size, dp_rank=info.rank)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device, self.show = info.device, cfg.progress and info.is_main
        self.dtype, dtype_reason = self._pick_dtype()
        torch.manual_seed(cfg.seed + info.dp_rank)

        resume_dir = self.out / "last"
        if info.is_main:   # before the resume check (every save also recovers, in replace_dir)
            recover_interrupted_save(resume_dir)
        distributed.barrier(info)
        found = cfg.resume and (resume_dir / "checksums.json").exists()
        self._check_encryption(resume_dir if found else None)
        sharded_resume = found and is_sharded(resume_dir)
        state = load_train_state(resume_dir) if found and not sharded_resume else None   # written before sharded last/
        self.model, self.tokenizer = self._build(resume_dir if state is not None else None)
        self.model.train()
        backbone = unwrap(getattr(self.model, "gpt", self.model))   # a GPT, or a pipeline stage of one
        self.model_config: ModelConfig = backbone.config
        backbone.activation_checkpointing = cfg.activation_checkpointing
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.lower_is_better = cfg.best_metric in LOWER_IS_BETTER
        self.step, self.elapsed, self.best_results = 0, 0.0, {}
        self.best_score = math.inf if self.lower_is_better else -math.inf
        self.cap = cfg.planned_steps(task.steps_per_epoch(info.dp_size))
        self.total_steps = self.cap or UNPLANNED   # under max_time alone, planned after the first steps
        if sharded_resume:
            state = load_sharded(resume_dir, self.model, self.optimizer)
        if state is not None:
            self._restore(state)
        self.trained = self._wrap(self.model)
        # the logging window: loss summed on the device, steps and units since the last log line
        self.loss_sum, self.window_steps, self.window_units = torch.zeros((), device=self.device), 0, 0
        self.window_start = time.perf_counter()
        self.stop_requested = False   # set by Ctrl-C; honoured at the next step boundary
        self.memory_written = False   # what each process holds, written after the first step
        self.eval_seconds = 0.0       # the last validation's cost, kept back when planning under max_time
        self.metrics = MetricsWriter(self.out, enabled=info.is_main, tensorboard=cfg.tensorboard)
        self.peak_flops = (cfg.peak_flops or measure_peak_flops(self.device, self.dtype)) if task.flops_per_unit else 0.0
        if info.is_main:
            self._write_start(state is None, dtype_reason)

    def _check_encryption(self, resume_dir: Path | None) -> None:
        """An encrypting run needs its key now, not at its first checkpoint; a run from encrypted
        weights may not write what it derives from them in the clear."""
        if self.cfg.encrypt:
            if key_from_environment() is None:
                raise ConfigError(f"encrypt: true needs a key: {HOW_TO_GIVE_A_KEY}")
            return
        for source in (resume_dir, self.cfg.init_from):
            if source and is_encrypted(source):
                raise ConfigError(f"{source} is encrypted, and this run would write the checkpoints it derives from it "
                                  "in the clear: set encrypt: true (or --encrypt true) and give the key")

    def _pick_dtype(self) -> tuple[torch.dtype, str]:
        """The training dtype; ``auto`` is measured on rank 0 alone and shared, so all ranks agree."""
        if self.cfg.dtype != "auto":
            return resolve_dtype(self.cfg.dtype, self.device, "train"), "set in the config"
        choice = choose_dtype(self.device, "train") if self.info.is_main else None
        name, reason = distributed.broadcast_object(
            (dtype_name(choice.dtype), choice.reason) if choice else None, self.info)
        return resolve_dtype(name, self.device, "train"), reason

    def _build(self, legacy_resume_dir: Path | None) -> tuple[torch.nn.Module, Tokenizer]:
        """The model on its device: the task's, or this process's shard of it under a sharded layout."""
        if not self.layout.sharded:
            model, tokenizer = self.task.build(legacy_resume_dir)
            return model.to(self.device), tokenizer
        if self.task.name != "language_model":
            raise ConfigError("fsdp, tensor_parallel and pipeline_parallel are for pretraining (`gptstack train`); "
                              "fine-tuning runs data-parallel (DDP): leave them unset")
        if legacy_resume_dir is not None:
            raise ConfigError(f"{legacy_resume_dir} was written by a gptstack without sharded checkpoints; resume it "
                              "without fsdp/tensor_parallel/pipeline_parallel, or start from its weights with "
                              f"--init_from {legacy_resume_dir} --resume false")
        # the seed the single-process model draws its initial values from (see model.GPT.__init__)
        seed = int(torch.randint(2 ** 62, (), generator=torch.Generator().manual_seed(self.cfg.seed)))
        model = parallel.build_model(self.task.model_cfg, self.cfg, self.layout, self.device, self.dtype, seed)
        if self.cfg.init_from:
            weights = load_model(self.cfg.init_from)[0].state_dict()
            parallel.fill_parameters(model, weights.__getitem__)
        return model, self.task.tokenizer

    def _restore(self, state: dict) -> None:
        if "optimizer" in state:   # a sharded checkpoint restored the optimizer with the model
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError:   # e.g. written when attention had one fused q/k/v projection
                raise ConfigError(f"{self.out / 'last'} holds optimizer state for another parameter layout (an older "
                                  f"gptstack); start from its weights with --init_from {self.out / 'last'} "
                                  "--resume false --out_dir <a new directory>") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # states written before the loop was shared lack elapsed / best_results and name the score best_val_loss
        self.step, self.elapsed = state["step"], state.get("elapsed", 0.0)
        self.best_score = state.get("best_score", state.get("best_val_loss", self.best_score))
        self.best_results = state.get("best_results", {})
        if self.cfg.max_time:   # the plan continues; otherwise the config's length holds (it may have grown)
            self.total_steps = state["total_steps"]
        rng = state["rng"]
        same_layout = len(rng) == self.info.world_size and state.get("layout", self.layout.as_dict()) == self.layout.as_dict()
        if same_layout:   # another layout draws fresh dropout masks
            mine = rng[self.info.rank] if isinstance(rng[self.info.rank], dict) else {"cpu": rng[self.info.rank]}
            torch.set_rng_state(mine["cpu"])
            if self.device.type == "cuda" and mine.get("cuda") is not None:
                torch.cuda.set_rng_state(mine["cuda"], self.device)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module | parallel.Pipeline:
        """What the forward passes go through: compiled and/or DDP, or the pipeline of this stage; the
        optimizer holds the plain model. Sharded models are called as they are (compiled block by block)."""
        if self.layout.pp > 1:
            return parallel.Pipeline(model, self.layout, self.cfg, self.device)
        if self.layout.sharded:
            return model
        if self.cfg.compile:
            model = torch.compile(model)
        if self.info.enabled:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def _write_start(self, fresh: bool, dtype_reason: str) -> None:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = None if self.cfg.max_time else self.total_steps   # under max_time, planned as the run goes
        write_text_atomic(self.out / "train_config.json", json.dumps(
            {**to_dict(self.cfg), "task": self.task.name, "total_steps": total, "world_size": self.info.world_size,
             "layout": self.layout.as_dict(), "trainable_parameters": trainable, **self.task.checkpoint_meta()},
            indent=2, default=str))
        (self.out / RESULT).unlink(missing_ok=True)   # written again only when this run finishes
        message = f"training in {dtype_name(self.dtype)} on {self.device}: {dtype_reason}"
        if self.info.enabled:
            message += f"; {self.info.world_size} processes: {self.layout.describe()}"
        if self.show:
            tqdm.write(message)
        log.info(message)
        if fresh:   # a fresh run starts a fresh metrics file
            self.metrics.path.unlink(missing_ok=True)
            self.metrics.write(0, event="start", task=self.task.name, dtype=dtype_name(self.dtype),
                               dtype_reason=dtype_reason, device=str(self.device), total_steps=total,
                               world_size=self.info.world_size, layout=self.layout.as_dict(),
                               trainable_parameters=trainable,
                               parameters=sum(p.numel() for p in self.model.parameters()))

    # --- the loop --------------------------------------------------------------------------------

    def run(self, on_eval: OnEval | None) -> TrainResult:
        cfg = self.cfg
        bar = tqdm(total=None if self.total_steps == UNPLANNED else self.total_steps, initial=self.step,
                   desc=f"training ({self.task.name})", unit="step", disable=not self.show, dynamic_ncols=True)
        clock = time.perf_counter() - self.elapsed   # elapsed carries on across resumes (max_time counts it)
        session_start, session_units, pace_from = time.perf_counter(), 0, None
        results, last_loss = {}, None
        with self._ctrl_c_stops_at_a_step_boundary():
            while self.step < self.total_steps:
                lr = learning_rate(self.step, cfg, self.total_steps)
                grad_norm = self._train_step(lr)
                self.step += 1
                bar.update(1)
                # ranks agree on time and on Ctrl-C at log lines, where they synchronise anyway
                in_step = not self.info.enabled or self.step % cfg.log_interval == 0
                if in_step:
                    self.elapsed = distributed.max_across_ranks(time.perf_counter() - clock, self.info)
                    if cfg.max_time:
                        self._plan_steps(bar, pace_from)
                        pace_from = pace_from or (self.elapsed, self.step)   # after compiling and allocating
                final = self.step == self.total_steps
                if self.step % cfg.log_interval == 0 or final:
                    session_units += self.window_units
                    last_loss = self._log(lr, grad_norm, bar)
                if self.step % cfg.eval_interval == 0 or final:
                    results = self._validate(bar, on_eval)
                elif cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                    self._save("last", {})
                    self.window_start = time.perf_counter()
                if in_step and not final and self._agree_to_stop():   # a finished run just finishes
                    self._stop(bar)
        bar.close()
        self.elapsed = time.perf_counter() - clock
        self.metrics.write(self.step, event="end", seconds=round(self.elapsed, 1),
                           peak_memory_mib_per_rank=distributed.gather_objects(peak_memory_mib(self.device), self.info))
        if not self.best_results:   # nothing to rank checkpoints by: the final weights are the best we know
            self._save("best", results)
        self.metrics.close()
        session = time.perf_counter() - session_start
        result = TrainResult(self.out, self.step, last_loss, results.get("val_loss"),
                             self.best_results.get("val_loss"), self.best_results,
                             session_units / session if session > 0 else 0.0)
        if self.info.is_main:
            write_text_atomic(self.out / RESULT, json.dumps({**asdict(result), "out_dir": str(self.out),
                                                             "seconds": round(self.elapsed, 1)}, indent=2))
        return result

    def _train_step(self, lr: float) -> torch.Tensor | None:
        """Accumulate this step's micro-batches, then clip and step; returns the gradient norm."""
        set_learning_rate(self.optimizer, lr)
        batches = self.task.step_batches(self.step, self.info)
        self.window_units += sum(units for _, _, units in batches) * self.info.dp_size
        if self.layout.pp > 1:   # the schedule runs the micro-batches through the stages
            with autocast(self.device, self.dtype):
                self.loss_sum += self.trained.run(torch.cat([x for (x, _), _, _ in batches]),
                                                  torch.cat([y for (_, y), _, _ in batches]), len(batches), train=True)
        for i, (batch, share, units) in enumerate(batches if self.layout.pp == 1 else []):
            # gradients are reduced across processes after the last micro-batch only
            with parallel.gradient_sync(self.trained, i == len(batches) - 1):
                with autocast(self.device, self.dtype):
                    loss = self.task.loss(self.trained, batch)
                self.scaler.scale(loss * share).backward()
            self.loss_sum += loss.detach().float() * share   # stays on the device: no sync per micro-batch
        self.window_steps += 1
        clip = (lambda model, max_norm: parallel.clip_gradients(model, max_norm, self.layout)) if self.layout.sharded else None
        gradient_bytes = parallel.held_bytes(self.model)["gradients"] if not self.memory_written else 0
        grad_norm = clip_and_step(self.model, self.optimizer, self.cfg.grad_clip, self.scaler, clip)
        if not self.memory_written:
            self._write_memory(gradient_bytes)
        return grad_norm

    def _write_memory(self, gradient_bytes: int) -> None:
        """What each process holds once its optimizer state exists (after this session's first step):
        the bytes of its parameters, gradients and optimizer state, which show what a layout shards,
        and its peak memory so far (the training step's, before any evaluation)."""
        held = {**parallel.held_bytes(self.model, self.optimizer), "gradients": gradient_bytes,
                "peak_memory_mib": round(peak_memory_mib(self.device), 1)}
        per_rank = distributed.gather_objects(held, self.info)
        self.metrics.write(self.step + 1, event="memory", layout=self.layout.as_dict(), held_bytes_per_rank=per_rank)
        self.memory_written = True

    def _plan_steps(self, bar: tqdm, pace_from: tuple[float, int] | None) -> None:
        """Under max_time: the step count that fits the time left at the pace measured so far (from
        ``pace_from`` = (elapsed, step), past this session's first steps, once there is one;
        evaluations and checkpoints included), keeping back the time of one more evaluation for the
        last step, so the schedule still ends its decay in time."""
        since_elapsed, since_step = pace_from if pace_from and pace_from[1] < self.step else (0.0, 0)
        per_step = (self.elapsed - since_elapsed) / (self.step - since_step)
        left = self.cfg.max_time - self.elapsed - self.eval_seconds
        planned = self.step + max(0, int(left / per_step))
        planned = min(planned, self.cap) if self.cap else planned
        if planned != self.total_steps:
            self.total_steps = bar.total = max(self.step, planned)

    def _log(self, lr: float, grad_norm: torch.Tensor | None, bar: tqdm) -> float:
        loss = (distributed.mean_across_ranks(self.loss_sum, self.info) / self.window_steps).item()
        rate = self.window_units / (time.perf_counter() - self.window_start)
        values = {"loss": loss, "lr": lr, f"{self.task.unit}_per_s": round(rate, 1),
                  "grad_norm": None if grad_norm is None else round(float(grad_norm), 4)}
        postfix = {"loss": f"{loss:.3f}", self.task.unit[:3] + "/s": f"{rate:,.0f}", "lr": f"{lr:.2e}"}
        if self.peak_flops:
            values["mfu"] = round(self.task.flops_per_unit * rate / (self.peak_flops * self.info.world_size), 4)
            postfix["mfu"] = f"{values['mfu']:.1%}"
        if self.cfg.max_time:
            values["planned_steps"] = self.total_steps
        self.metrics.write(self.step, **values)
        bar.set_postfix(postfix)
        self.loss_sum.zero_()
        self.window_steps, self.window_units, self.window_start = 0, 0, time.perf_counter()
        return loss

    def _validate(self, bar: tqdm, on_eval: OnEval | None) -> dict:
        """Validation, best/ when it improved on best_metric, and last/."""
        started = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            results = self.task.evaluate(self.trained if self.layout.pp > 1 else self.model, self.device, self.dtype, self.info)
        self.model.train()
        if results:
            self.metrics.write(self.step, **{k if k.startswith("val_") else f"val_{k}": v for k, v in results.items()})
            if self.show:
                bar.write(f"step {self.step}/{self.total_steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
            score = results[self.cfg.best_metric]
            if score < self.best_score if self.lower_is_better else score > self.best_score:
                self.best_score, self.best_results = score, {**results, "step": self.step}
                self._save("best", self.best_results)
        self._save("last", results)
        if on_eval is not None and results:
            on_eval(self.step, self.total_steps, results)
        self.window_start = time.perf_counter()   # evaluation and saving do not count against throughput
        self.eval_seconds = self.window_start - started
        return results

    def _save(self, name: str, results: dict) -> None:
        """Every process calls it with the same name: last/ (and best/ of a sharded model) is a sharded
        checkpoint each process writes its part of; otherwise rank 0 writes best/."""
        meta = {"step": self.step, "total_steps": self.total_steps, "val_loss": results.get("val_loss"),
                "metrics": results, "task": self.task.name, "train_config": to_dict(self.cfg),
                **self.task.checkpoint_meta()}
        if name == "last":
            rng = distributed.gather_objects({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(
                self.device) if self.device.type == "cuda" else None}, self.info)
            state = {"step": self.step, "total_steps": self.total_steps, "elapsed": self.elapsed,
                     "best_score": self.best_score, "best_results": self.best_results, "rng": rng,
                     "layout": self.layout.as_dict(), "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
            save_sharded(self.out / name, self.model, self.tokenizer, self.model_config, meta, self.optimizer, state,
                         encrypt=self.cfg.encrypt)
        elif self.layout.sharded:
            save_sharded(self.out / name, self.model, self.tokenizer, self.model_config, meta, encrypt=self.cfg.encrypt)
        elif self.info.is_main:
            save_checkpoint(self.out / name, self.task.for_serving(self.model), self.tokenizer, meta=meta,
                            encrypt=self.cfg.encrypt)
        distributed.barrier(self.info)

    @contextmanager
    def _ctrl_c_stops_at_a_step_boundary(self):
        """The first Ctrl-C asks the loop to stop after the step in flight (a step cut in half, or an
        optimizer update applied but not counted, would not resume exactly); a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning("stopping after this step (Ctrl-C again to stop at once)")
        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _agree_to_stop(self) -> bool:
        return distributed.max_across_ranks(float(self.stop_requested), self.info) > 0

    def _stop(self, bar: tqdm) -> None:
        """Save last/ (every rank takes part) and leave the run unfinished: no result.json."""
        self._save("last", {})
        bar.close()
        message = (f"stopped at step {self.step} of {self.total_steps}; run the same command again to resume "
                   f"from {self.out / 'last'} (this run's best/ is not final: no {RESULT} was written)")
        log.warning(message)
        if self.show:
            tqdm.write(message)
        raise KeyboardInterrupt(message)
