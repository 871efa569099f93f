"""Fine-tuning a checkpoint: ``finetune(FinetuneConfig)``, two tasks run by the one training loop.

* ``classification``: a :class:`~gptstack.heads.SequenceClassifier` (head on the last token's
  hidden state) trained with cross-entropy, optionally class-weighted, in dynamically padded batches;
  validation reports loss, accuracy and macro precision / recall / F1.
* ``sft``: language modelling on prompt/response pairs or chats, with the loss only on response
  tokens, over packed fixed-length windows; validation reports loss and perplexity.

Full fine-tuning, LoRA adapters and frozen layers are all choices of the config. Batches are a pure
function of (seed, step): every rank draws the same rows and works on its own share, in
micro-batches of ``batch_size``. ``last/`` (adapters unmerged) resumes a killed run exactly
(``resume: true``); ``best/`` (by ``best_metric``) is an ordinary checkpoint that ``generate``,
``eval`` and ``serve`` load; with ``lora_merge`` its adapters are folded into the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_classifier, load_model, with_config
from ..config import ConfigError, TrainConfig, require
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
from ..heads import SequenceClassifier, classification_ids, pad_right
from ..lora import LORA_TARGETS, LoRAConfig, add_lora, is_lora_key, merge_lora
from ..model import GPT
from ..runtime import autocast
from ..tokenizer import Tokenizer
from ..train import distributed
from ..train.loop import RESULT, OnEval, TrainResult, run

log = logging.getLogger("gptstack.finetune")
TASKS = ("classification", "sft")
# What each task's validation reports (and so what can pick best/ or be a tuning objective).
TASK_METRICS = {"classification": ("val_loss", "accuracy", "f1_macro", "precision_macro", "recall_macro"),
                "sft": ("val_loss", "val_perplexity")}
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

    lora_rank: int = 0                   # 0 = no LoRA: train the weights themselves
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = ",".join(LORA_TARGETS)
    lora_merge: bool = True              # best/ with adapters folded in (False: kept in adapter.safetensors)
    freeze_layers: int = 0               # the first k transformer blocks get no updates
    freeze_embeddings: bool = False      # token + position embeddings (the tied LM head with them)

    out_dir: str = "runs/finetune"
    batch_size: int = 32
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

    def available_metrics(self) -> tuple[str, ...]:
        return TASK_METRICS.get(self.task, ())

    def validate(self) -> "FinetuneConfig":
        require(bool(self.init_from), "init_from is required: the checkpoint to fine-tune (e.g. runs/demo/best)")
        require(bool(self.data), "data is required: a .tsv/.csv/.jsonl file of examples (see README, Fine-tune)")
        require(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        super().validate()
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



def finetune(cfg: FinetuneConfig, on_eval: OnEval | None = None) -> TrainResult:
    """Run (or resume) a fine-tune, in one process or under torchrun; see :func:`gptstack.train.loop.run`."""
    task_class = ClassificationTask if cfg.task == "classification" else SFTTask
    return run(cfg, lambda info: task_class(cfg, info), on_eval)


@functools.lru_cache(maxsize=2)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation one epoch walks through (drawn once per epoch, not per step)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_rows(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of optimizer step ``step``: epochs walk seeded permutations, batch by batch."""
    per_epoch = max(1, num_examples // batch_size)
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(num_examples, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


class FinetuneTask:
    """What both fine-tuning tasks share: the base checkpoint (or last/) with adapters and freezing
    applied, the records split into training and validation, and the rows of each step.
    A subclass encodes the records (``encode``) and gives ``batch``, ``loss`` and ``evaluate``."""

    unit, flops_per_unit = "examples", None

    def __init__(self, cfg: FinetuneConfig, info: distributed.DistInfo):
        self.cfg, self.info, self.name = cfg, info, cfg.task
        self.train = self.val = None

    def build(self, resume_dir: Path | None) -> tuple[torch.nn.Module, Tokenizer]:
        cfg = self.cfg
        classifier = None
        if resume_dir is not None and cfg.task == "classification":
            classifier, tokenizer, _ = load_classifier(resume_dir, merge_adapter=False)
            gpt = classifier.gpt
        elif resume_dir is not None:
            gpt, tokenizer, _ = load_model(resume_dir, merge_adapter=False)
        else:
            warn_if_unfinished(cfg.init_from)
            gpt, tokenizer, _ = load_model(cfg.init_from)
            if cfg.model:
                gpt = with_config(gpt, dataclasses.replace(gpt.config, **{k: float(v) for k, v in cfg.model.items()}))
        model = self.encode(*self._records(), tokenizer, gpt, classifier)
        if cfg.lora_rank and resume_dir is None:
            add_lora(gpt, cfg.lora_config())
        elif resume_dir is not None and hasattr(gpt, "lora_config"):   # adapters train, the base stays frozen
            for name, p in gpt.named_parameters():
                p.requires_grad_(is_lora_key(name))
        freeze(gpt, cfg.freeze_layers, cfg.freeze_embeddings)
        return model, tokenizer

    def _records(self) -> tuple[list[dict], list[dict]]:
        records = read_records(self.cfg.data)
        if self.cfg.eval_data:
            return records, read_records(self.cfg.eval_data)
        train, val = split_records(records, self.cfg.val_fraction, self.cfg.seed)
        if val and self.info.is_main:   # written down, so `gptstack eval` can score the same held-out rows
            write_jsonl(Path(self.cfg.out_dir) / "splits" / "train.jsonl", train)
            write_jsonl(Path(self.cfg.out_dir) / "splits" / "val.jsonl", val)
        return train, val

    def encode(self, train: list[dict], val: list[dict], tokenizer: Tokenizer, gpt: GPT,
               classifier: SequenceClassifier | None) -> torch.nn.Module:
        """Encode the records into self.train / self.val; return the model to train."""
        raise NotImplementedError

    @property
    def num_examples(self) -> int:
        return len(self.train[0])

    def steps_per_epoch(self, dp_size: int) -> float:
        return max(1, self.num_examples // (self.cfg.batch_size * self.cfg.grad_accum_steps * dp_size))

    def step_batches(self, step: int, info: distributed.DistInfo) -> list:
        """Every rank draws the step's rows and takes its share, in micro-batches of batch_size."""
        step_rows = self.cfg.batch_size * self.cfg.grad_accum_steps * info.dp_size
        rows = np.array_split(batch_rows(self.num_examples, step_rows, self.cfg.seed, step), info.dp_size)[info.dp_rank]
        micro = [rows[i:i + self.cfg.batch_size] for i in range(0, len(rows), self.cfg.batch_size)]
        return [(self.batch(m, info.device), len(m) / len(rows), len(m)) for m in micro]

    def checkpoint_meta(self) -> dict:
        return {"base": self.cfg.init_from}

    def for_serving(self, model: torch.nn.Module) -> torch.nn.Module:
        """With ``lora_merge``, a copy whose adapters are folded into the weights."""
        if not (self.cfg.lora_rank and self.cfg.lora_merge):
            return model
        merged = copy.deepcopy(model)
        merge_lora(merged.gpt if isinstance(merged, SequenceClassifier) else merged)
        return merged


def warn_if_unfinished(checkpoint: str) -> None:
    """A best/ from a run that was stopped part-way is a usable but half-trained start: say so."""
    run_dir = Path(checkpoint).parent
    if (run_dir / "train_config.json").exists() and not (run_dir / RESULT).exists():
        log.warning("%s comes from a run that has not finished (no %s in %s); resume that run first for "
                    "a fully trained start", checkpoint, RESULT, run_dir)


class ClassificationTask(FinetuneTask):
    """Labelled texts as token lists, right-padded per batch; (class-weighted) cross-entropy."""

    def encode(self, train_records, val_records, tokenizer, gpt, classifier):
        source, cfg = self.cfg.data, self.cfg
        train = labelled_texts(train_records, source, cfg.text_field, cfg.label_field)
        val = labelled_texts(val_records, source, cfg.text_field, cfg.label_field) if val_records else None
        self.labels = classifier.labels if classifier else label_order(train.labels)
        unknown = sorted(set(val.labels if val else []) - set(self.labels))
        if unknown:
            raise DataError(f"validation labels {unknown} never occur in the training data {self.labels}")
        max_tokens = min(cfg.max_length or gpt.config.block_size, gpt.config.block_size)
        index = {label: i for i, label in enumerate(self.labels)}

        def tensors(data) -> tuple[list[list[int]], torch.Tensor]:
            return ([classification_ids(tokenizer, text, max_tokens) for text in data.texts],
                    torch.tensor([index[label] for label in data.labels]))
        self.train, self.val = tensors(train), tensors(val) if val else None
        weights = class_weights(cfg.class_weights, train.labels, self.labels)
        self.class_weights = None if weights is None else weights.to(self.info.device)
        return classifier or SequenceClassifier(gpt, self.labels)

    def batch(self, rows: np.ndarray, device) -> tuple:
        ids, labels = self.train
        idx, lengths = pad_right([ids[r] for r in rows], device)
        return idx, lengths, labels[rows].to(device)

    def loss(self, model: SequenceClassifier, batch: tuple) -> torch.Tensor:
        idx, lengths, labels = batch
        return F.cross_entropy(model(idx, lengths).float(), labels, weight=self.class_weights,
                               label_smoothing=self.cfg.label_smoothing)

    def evaluate(self, model: SequenceClassifier, device, dtype, info) -> dict:
        """The whole held-out set on every rank: the same numbers everywhere, no messages."""
        if self.val is None:
            return {}
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


def class_weights(setting: str, train_labels: list[str], labels: list[str]) -> torch.Tensor | None:
    """Per-class loss weights in ``labels`` order from the ``class_weights`` setting."""
    if setting == "none":
        return None
    if setting == "balanced":   # n / (k * count): each class weighs the same in total
        counts = torch.tensor([train_labels.count(label) for label in labels], dtype=torch.float)
        return len(train_labels) / (len(labels) * counts)
    weights = [float(w) for w in setting.split(",")]
    if len(weights) != len(labels):
        raise ConfigError(f"class_weights has {len(weights)} values but there are {len(labels)} labels {labels}")
    return torch.tensor(weights)


class SFTTask(FinetuneTask):
    """Prompt/response examples packed into windows; the loss counts response tokens only."""

    def encode(self, train_records, val_records, tokenizer, gpt, classifier):
        def pack(records, name: str) -> tuple[torch.Tensor, torch.Tensor]:
            x, y, truncated = pack_windows(encode_sft(records, tokenizer, self.cfg.data), gpt.config.block_size,
                                           tokenizer.eot_id)
            if truncated:
                log.warning("%d %s example(s) longer than the context of %d tokens lost the start of their prompt",
                            truncated, name, gpt.config.block_size)
            if not (y != IGNORE_INDEX).any():
                raise DataError(f"the {name} examples have no response tokens to learn from")
            return x, y
        self.train = pack(train_records, "training")
        self.val = pack(val_records, "validation") if val_records else None
        return gpt

    def batch(self, rows: np.ndarray, device) -> tuple:
        x, y = self.train
        return x[rows].to(device), y[rows].to(device)

    def loss(self, model: GPT, batch: tuple) -> torch.Tensor:
        x, y = batch
        return model(x, y, label_smoothing=self.cfg.label_smoothing)[1]

    def evaluate(self, model: GPT, device, dtype, info) -> dict:
        if self.val is None:
            return {}
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
