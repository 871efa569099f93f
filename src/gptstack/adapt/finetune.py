"""Fine-tuning a checkpoint: ``finetune(FinetuneConfig)``.

Two tasks share one loop:

* ``classification``: a :class:`~gptstack.heads.SequenceClassifier` (head on the last token's
  hidden state) trained with cross-entropy, optionally class-weighted, in dynamically padded batches;
  validation reports loss, accuracy and macro precision / recall / F1.
* ``sft``: language modelling on prompt/response pairs or chats, with the loss only on response
  tokens, over packed fixed-length windows; validation reports loss and perplexity.

Full fine-tuning, LoRA adapters and frozen layers are all choices of the config; under torchrun the
ranks split each batch (DistributedDataParallel). Batches are a pure function of (seed, step), so
``last/`` (weights with adapters unmerged, optimizer, RNG, step) resumes a killed run exactly
(``resume: true``). ``best/`` (by ``best_metric``, validation loss by default) is an ordinary
checkpoint that ``generate``, ``eval`` and ``serve`` load; with ``lora_merge`` its adapters are folded
into the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import load_classifier, load_model, load_train_state, save_checkpoint
from ..config import ConfigError, TrainConfig, require, to_dict
from ..data.prepare import DataError
from ..data.records import (
    IGNORE_INDEX,
    encode_sft,
    label_order,
    labelled_texts,
    pack_windows,
    read_records,
    split_records,
    write_jsonl,
)
from ..evaluate.metrics import classification_metrics
from ..files import write_text_atomic
from ..heads import SequenceClassifier, classification_ids, pad_right
from ..lora import LORA_TARGETS, LoRAConfig, add_lora, is_lora_key, merge_lora
from ..model import GPT
from ..runtime import autocast, resolve_dtype, tune_allocator
from ..train import distributed
from ..train.metrics import MetricsWriter
from ..train.loop import with_config
from ..train.optim import build_optimizer, clip_and_step, learning_rate, set_learning_rate

log = logging.getLogger("gptstack.finetune")
TASKS = ("classification", "sft")
# What each task's validation reports (and so what can pick best/ or be a tuning objective).
TASK_METRICS = {"classification": ("val_loss", "accuracy", "f1_macro", "precision_macro", "recall_macro"),
                "sft": ("val_loss", "val_perplexity")}
LOWER_IS_BETTER = ("val_loss", "val_perplexity")
DROPOUT_FIELDS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "clf_pdrop")
# Pretraining fields with no meaning here: the model and tokenizer come from init_from, validation
# always covers the whole held-out set, and there is no batch ramp-up or compilation.
PRETRAINING_ONLY = ("preset", "tokenizer", "batch_rampup_steps", "batch_rampup_start", "compile", "eval_iters",
                    "peak_flops")


@dataclass
class FinetuneConfig(TrainConfig):
    """A fine-tuning run: every TrainConfig field means the same here, plus the task's own.

    ``init_from`` is the checkpoint to adapt (required); ``data`` a .tsv/.csv/.jsonl file;
    ``model`` may override only dropout rates. Defaults follow common fine-tuning practice
    (GPT-1: a few epochs, small learning rate, short warmup, weight decay 0.01).
    """

    task: str = "classification"         # "classification" | "sft"
    text_field: str = ""                 # classification: "" = first of text / sentence / input / document
    label_field: str = "label"
    class_weights: str = "none"          # "none" | "balanced" | comma-separated weights in label order
    val_fraction: float = 0.1            # held out of `data` when no eval_data is given
    max_length: int = 0                  # classification: tokens per text (0 = the model's context)
    best_metric: str = "val_loss"        # what picks best/: val_loss, or accuracy / f1_macro / ... (classification)

    lora_rank: int = 0                   # 0 = no LoRA: train the weights themselves
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = ",".join(LORA_TARGETS)
    lora_merge: bool = True              # best/ with adapters folded in (False: kept in adapter.safetensors)
    freeze_layers: int = 0               # the first k transformer blocks get no updates
    freeze_embeddings: bool = False      # token + position embeddings (the tied LM head with them)

    out_dir: str = "runs/finetune"
    batch_size: int = 32
    max_steps: int = 0
    max_epochs: float = 3.0
    warmup_steps: int = 20
    weight_decay: float = 0.01
    eval_interval: int = 50
    resume: bool = False

    @property
    def peak_learning_rate(self) -> float:
        # LoRA's few fresh parameters want a larger step than the pretrained weights themselves.
        return self.learning_rate or (1e-3 if self.lora_rank else 1e-4)

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout,
                          [t.strip() for t in self.lora_targets.split(",") if t.strip()])

    def validate(self) -> "FinetuneConfig":
        require(bool(self.init_from), "init_from is required: the checkpoint to fine-tune (e.g. runs/demo/best)")
        require(bool(self.data), "data is required: a .tsv/.csv/.jsonl file of examples (see README, Fine-tune)")
        super().validate()
        require(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        require(self.best_metric in TASK_METRICS[self.task],
                f"best_metric must be one of {TASK_METRICS[self.task]} for task {self.task}, got {self.best_metric!r}")
        defaults = FinetuneConfig.__dataclass_fields__
        changed = [name for name in PRETRAINING_ONLY if getattr(self, name) != defaults[name].default]
        require(not changed, f"{changed} only apply to pretraining (`gptstack train`); remove them from the fine-tune config")
        other = sorted(set(self.model) - set(DROPOUT_FIELDS))
        require(not other, f"a fine-tune keeps its checkpoint's shape; model overrides may only set {DROPOUT_FIELDS}, "
                            f"not {other}")
        require(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        require(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        require(self.freeze_layers >= 0, f"freeze_layers must be >= 0, got {self.freeze_layers}")
        require(self.max_length >= 0, f"max_length must be >= 0, got {self.max_length}")
        if self.lora_rank:
            try:
                self.lora_config().validate()
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.class_weights not in ("none", "balanced"):
            try:
                weights = [float(w) for w in self.class_weights.split(",")]
            except ValueError:
                weights = []
            require(bool(weights) and all(w > 0 for w in weights),
                     f"class_weights must be 'none', 'balanced' or positive numbers like '1,3', got {self.class_weights!r}")
        return self


@dataclass
class FinetuneResult:
    out_dir: Path
    steps: int
    final_loss: float
    best_val_loss: float | None    # validation loss at the best step (picked by best_metric)
    metrics: dict                  # the validation results at the best step


def freeze(model: GPT, layers: int, embeddings: bool) -> None:
    """Stop gradients to the first ``layers`` blocks and, optionally, the embeddings."""
    if layers > model.config.n_layer:
        raise ConfigError(f"freeze_layers {layers} is more than the model's {model.config.n_layer} layers")
    frozen = list(model.transformer.h[:layers])
    if embeddings:
        frozen += [model.transformer.wte, model.transformer.wpe]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


# --- the two tasks -------------------------------------------------------------------------------
# A task gives the loop its data and its loss: num_examples, batch(rows, device) -> tensors,
# loss(model, batch) -> scalar, evaluate(model, device, dtype) -> {"val_loss", ...}.

class ClassificationTask:
    """Labelled texts as token lists, right-padded per batch; (class-weighted) cross-entropy."""

    def __init__(self, cfg: FinetuneConfig, tokenizer, block_size: int, train_records: list[dict],
                 val_records: list[dict], source: str, labels: list[str] | None = None):
        train = labelled_texts(train_records, source, cfg.text_field, cfg.label_field)
        val = labelled_texts(val_records, source, cfg.text_field, cfg.label_field) if val_records else None
        self.labels = labels or label_order(train.labels)
        unknown = sorted(set(val.labels if val else []) - set(self.labels))
        if unknown:
            raise DataError(f"validation labels {unknown} never occur in the training data {self.labels}")
        self.cfg, self.tokenizer, self.block_size = cfg, tokenizer, block_size
        self.train, self.val = self._encode(train), self._encode(val) if val else None
        self.class_weights = self._class_weights(train.labels)

    def _encode(self, data) -> tuple[list[list[int]], torch.Tensor]:
        max_tokens = self.cfg.max_length or self.block_size
        ids = [classification_ids(self.tokenizer, text, min(max_tokens, self.block_size)) for text in data.texts]
        index = {label: i for i, label in enumerate(self.labels)}
        return ids, torch.tensor([index[label] for label in data.labels])

    def _class_weights(self, labels: list[str]) -> torch.Tensor | None:
        if self.cfg.class_weights == "none":
            return None
        if self.cfg.class_weights == "balanced":   # n / (k * count): each class weighs the same in total
            counts = torch.tensor([labels.count(label) for label in self.labels], dtype=torch.float)
            return len(labels) / (len(self.labels) * counts)
        weights = [float(w) for w in self.cfg.class_weights.split(",")]
        if len(weights) != len(self.labels):
            raise ConfigError(f"class_weights has {len(weights)} values but there are {len(self.labels)} labels "
                              f"{self.labels}")
        return torch.tensor(weights)

    @property
    def num_examples(self) -> int:
        return len(self.train[0])

    def batch(self, rows: np.ndarray, device) -> tuple:
        ids, labels = self.train
        idx, lengths = pad_right([ids[r] for r in rows], device)
        return idx, lengths, labels[rows].to(device)

    def loss(self, model: SequenceClassifier, batch: tuple) -> torch.Tensor:
        idx, lengths, labels = batch
        weight = None if self.class_weights is None else self.class_weights.to(idx.device)
        return F.cross_entropy(model(idx, lengths).float(), labels, weight=weight,
                               label_smoothing=self.cfg.label_smoothing)

    def evaluate(self, model: SequenceClassifier, device, dtype) -> dict:
        ids, labels = self.val
        losses, predictions = [], []
        for start in range(0, len(ids), self.cfg.eval_batch_size):
            idx, lengths = pad_right(ids[start:start + self.cfg.eval_batch_size], device)
            with autocast(device, dtype):
                logits = model(idx, lengths).float()
            target = labels[start:start + len(idx)].to(device)
            losses.append(F.cross_entropy(logits, target, reduction="sum").item())
            predictions += logits.argmax(-1).tolist()
        report = classification_metrics(labels.tolist(), predictions, self.labels)
        return {"val_loss": sum(losses) / len(ids), "accuracy": report["accuracy"], "f1_macro": report["f1_macro"],
                "precision_macro": report["precision_macro"], "recall_macro": report["recall_macro"]}


class SFTTask:
    """Prompt/response examples packed into windows; the loss counts response tokens only."""

    def __init__(self, cfg: FinetuneConfig, tokenizer, block_size: int, train_records: list[dict],
                 val_records: list[dict], source: str):
        self.cfg, self.block_size = cfg, block_size
        self.train = self._pack(encode_sft(train_records, tokenizer, source), tokenizer, "training")
        self.val = self._pack(encode_sft(val_records, tokenizer, source), tokenizer, "validation") if val_records else None

    def _pack(self, examples, tokenizer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, truncated = pack_windows(examples, self.block_size, tokenizer.eot_id)
        if truncated:
            log.warning("%d %s example(s) longer than the context of %d tokens lost the start of their prompt",
                        truncated, name, self.block_size)
        if not (y != IGNORE_INDEX).any():
            raise DataError(f"the {name} examples have no response tokens to learn from")
        return x, y

    @property
    def num_examples(self) -> int:
        return len(self.train[0])

    def batch(self, rows: np.ndarray, device) -> tuple:
        x, y = self.train
        return x[rows].to(device), y[rows].to(device)

    def loss(self, model: GPT, batch: tuple) -> torch.Tensor:
        x, y = batch
        return model(x, y, label_smoothing=self.cfg.label_smoothing)[1]

    def evaluate(self, model: GPT, device, dtype) -> dict:
        x, y = self.val
        nll, count = 0.0, 0
        for start in range(0, len(x), self.cfg.eval_batch_size):
            targets = y[start:start + self.cfg.eval_batch_size].to(device)
            with autocast(device, dtype):
                _, loss = model(x[start:start + len(targets)].to(device), targets)
            n = int((targets != IGNORE_INDEX).sum())
            if n:
                nll, count = nll + loss.float().item() * n, count + n
        return {"val_loss": nll / count, "val_perplexity": math.exp(min(nll / count, 700))}


# --- the loop ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation one epoch walks through (drawn once per epoch, not per step)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_rows(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of optimizer step ``step``: epochs walk seeded permutations, batch by batch."""
    per_epoch = max(1, num_examples // batch_size)
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(num_examples, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


def finetune(cfg: FinetuneConfig, on_eval: Callable[[int, int, dict], None] | None = None) -> FinetuneResult:
    """Run (or resume) a fine-tune, in one process or under torchrun; ``on_eval(step, total_steps, results)`` is
    called after each validation (tuning prunes there)."""
    cfg.validate()
    tune_allocator()
    with distributed.process_group(cfg.device) as info:
        return _finetune(cfg, info, on_eval)


def _finetune(cfg: FinetuneConfig, info: distributed.DistInfo, on_eval) -> FinetuneResult:
    device, show = info.device, cfg.progress and info.is_main
    dtype = resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + info.rank)

    resume_dir = out / "last"
    state = load_train_state(resume_dir) if cfg.resume and (resume_dir / "checksums.json").exists() else None
    model, tokenizer, task = _build(cfg, state is not None, out, info.is_main)
    model.to(device).train()
    (model.gpt if isinstance(model, SequenceClassifier) else model).activation_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lower_is_better = cfg.best_metric in LOWER_IS_BETTER
    step, best_score, best_results = 0, math.inf if lower_is_better else -math.inf, {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, best_score, best_results = state["step"], state["best_score"], state["best_results"]
        if len(state["rng"]) == info.world_size:
            torch.set_rng_state(state["rng"][info.rank])
    trained = model
    if info.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # Each optimizer step takes batch_size x grad_accum_steps x world_size examples; every rank
    # draws the same rows and works on its own share, in micro-batches of batch_size.
    step_batch = cfg.batch_size * cfg.grad_accum_steps * info.world_size
    per_epoch = max(1, task.num_examples // step_batch)
    steps = cfg.max_steps or max(1, math.ceil(cfg.max_epochs * per_epoch))
    metrics = MetricsWriter(out, enabled=info.is_main, tensorboard=cfg.tensorboard)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if info.is_main:
        write_text_atomic(out / "finetune_config.json", json.dumps({**to_dict(cfg), "total_steps": steps,
                                                                   "trainable_parameters": trainable,
                                                                   "world_size": info.world_size}, indent=2))
        if state is None:
            metrics.path.unlink(missing_ok=True)
            metrics.write(0, event="start", task=cfg.task, examples=task.num_examples, total_steps=steps,
                          parameters=sum(p.numel() for p in model.parameters()), trainable_parameters=trainable,
                          world_size=info.world_size)

    def save(name: str, results: dict) -> None:
        """Rank 0 writes; every rank calls it, as gathering the RNG states is collective."""
        meta = {"step": step, "val_loss": results.get("val_loss"), "metrics": results,
                "finetune_config": to_dict(cfg), "base": cfg.init_from}
        if name == "last":
            rng = distributed.gather_objects(torch.get_rng_state(), info)
            if info.is_main:
                train_state = {"step": step, "best_score": best_score, "best_results": best_results,
                               "optimizer": optimizer.state_dict(), "rng": rng}
                save_checkpoint(out / name, model, tokenizer, meta=meta, train_state=train_state)
        elif info.is_main:
            save_checkpoint(out / name, _for_serving(model, cfg), tokenizer, meta=meta)
        distributed.barrier(info)

    bar = tqdm(total=steps, initial=step, desc=f"fine-tuning ({cfg.task})", unit="step", disable=not show,
               dynamic_ncols=True)
    loss_sum, window_start, window_examples = torch.zeros((), device=device), time.perf_counter(), 0
    last_loss = float("nan")
    while step < steps:
        lr = learning_rate(step, cfg, steps)
        set_learning_rate(optimizer, lr)
        rows = np.array_split(batch_rows(task.num_examples, step_batch, cfg.seed, step), info.world_size)[info.rank]
        micro_batches = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        for m, micro in enumerate(micro_batches):
            sync = m == len(micro_batches) - 1 or not info.enabled
            with (nullcontext() if sync else trained.no_sync()):
                with autocast(device, dtype):
                    loss = task.loss(trained, task.batch(micro, device))
                scaler.scale(loss * len(micro) / len(rows)).backward()
            loss_sum += loss.detach().float() * len(micro) / len(rows)   # stays on the device: no sync
        grad_norm = clip_and_step(model, optimizer, cfg.grad_clip, scaler)
        step += 1
        window_examples += len(rows) * info.world_size
        bar.update(1)
        if step % cfg.log_interval == 0 or step == steps:
            last_loss = (distributed.mean_across_ranks(loss_sum, info) / ((step - 1) % cfg.log_interval + 1)).item()
            rate = window_examples / (time.perf_counter() - window_start)
            metrics.write(step, loss=last_loss, lr=lr, examples_per_s=round(rate, 1),
                          grad_norm=None if grad_norm is None else round(float(grad_norm), 4))
            bar.set_postfix(loss=f"{last_loss:.3f}", ex_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
            loss_sum.zero_()
            window_examples, window_start = 0, time.perf_counter()
        if step % cfg.eval_interval == 0 or step == steps:
            results = {}
            if task.val is not None:   # every rank scores the whole held-out set: same numbers, no messages
                model.eval()
                with torch.no_grad():
                    results = task.evaluate(model, device, dtype)
                model.train()
                metrics.write(step, **{f"val_{k}" if not k.startswith("val_") else k: v for k, v in results.items()})
                if show:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
                score = results[cfg.best_metric]
                if score < best_score if lower_is_better else score > best_score:
                    best_score, best_results = score, {**results, "step": step}
                    save("best", best_results)
            save("last", results)
            if on_eval is not None and results:
                on_eval(step, steps, results)
            window_start = time.perf_counter()
        elif cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            save("last", {})
            window_start = time.perf_counter()
    bar.close()
    if task.val is None:
        save("best", {})
    metrics.close()
    return FinetuneResult(out, step, last_loss, best_results.get("val_loss"), best_results)


def _build(cfg: FinetuneConfig, resuming: bool, out: Path, is_main: bool = True):
    """The model to train (GPT or classifier, with adapters and freezing applied), its tokenizer
    and the task with its data; ``resuming`` takes weights, adapters and head from out/last."""
    classifier, labels = None, None
    if resuming and cfg.task == "classification":
        classifier, tokenizer, _ = load_classifier(out / "last", merge_adapter=False)
        gpt, labels = classifier.gpt, classifier.labels
    elif resuming:
        gpt, tokenizer, _ = load_model(out / "last", merge_adapter=False)
    else:
        gpt, tokenizer, _ = load_model(cfg.init_from)
        if cfg.model:
            gpt = with_config(gpt, dataclasses.replace(gpt.config, **{k: float(v) for k, v in cfg.model.items()}))

    records = read_records(cfg.data)
    if cfg.eval_data:
        train_records, val_records = records, read_records(cfg.eval_data)
    else:
        train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
        if val_records and is_main:   # written down, so `gptstack eval` can score the same held-out rows
            write_jsonl(out / "splits" / "train.jsonl", train_records)
            write_jsonl(out / "splits" / "val.jsonl", val_records)
    block_size = gpt.config.block_size
    if cfg.task == "classification":
        task = ClassificationTask(cfg, tokenizer, block_size, train_records, val_records, cfg.data, labels)
        model = classifier or SequenceClassifier(gpt, task.labels)
    else:
        task = SFTTask(cfg, tokenizer, block_size, train_records, val_records, cfg.data)
        model = gpt

    if cfg.lora_rank and not resuming:
        add_lora(gpt, cfg.lora_config())
    elif resuming and hasattr(gpt, "lora_config"):   # adapters train, the base stays frozen
        for name, p in gpt.named_parameters():
            p.requires_grad_(is_lora_key(name))
    freeze(gpt, cfg.freeze_layers, cfg.freeze_embeddings)
    return model, tokenizer, task


def _for_serving(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """What best/ holds: with ``lora_merge`` a copy whose adapters are folded into the weights."""
    if not (cfg.lora_rank and cfg.lora_merge):
        return model
    merged = copy.deepcopy(model)
    merge_lora(merged.gpt if isinstance(merged, SequenceClassifier) else merged)
    return merged
