"""Fine-tuning a checkpoint: ``finetune(FinetuneConfig)``, three tasks run by the one training loop.

* ``classification``: a :class:`~gptstack.heads.SequenceClassifier` (head on the last token's
  hidden state) trained with cross-entropy, optionally class-weighted, in dynamically padded batches;
  validation reports loss, accuracy and macro precision / recall / F1.
* ``token_classification``: a :class:`~gptstack.heads.TokenClassifier` (a label per word, e.g.
  named-entity tags; optionally with the words' lexical features and a CRF layer) on CoNLL or JSONL
  sentences; validation reports loss and entity-level micro precision / recall / F1 and macro F1
  (seqeval's default mode).
* ``sft``: language modelling on prompt/response pairs or chats, with the loss only on response
  tokens, over packed fixed-length windows; validation reports loss and perplexity.

Full fine-tuning, LoRA adapters, frozen layers and, for classification, adversarial training on the
token embeddings (adversarial.py) or on copies of the texts with the attack's edits are all choices
of the config. Batches are a pure function of (seed, step): every rank draws the same rows and works
on its own share, in micro-batches of ``batch_size``. ``last/`` (adapters unmerged) resumes a killed
run exactly (``resume: true``); ``best/`` (by ``best_metric``) is an ordinary checkpoint that
``generate``, ``eval`` and ``serve`` load; with ``lora_merge`` its adapters are folded into the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..chat import DEFAULT_CHAT_TEMPLATE
from ..checkpoint import load_classifier, load_model, load_token_classifier, with_config
from ..config import ConfigError, TrainConfig, require
from ..data.conll import read_tagged
from ..data.pii import Scrubber, run_key
from ..data.prepare import PII_REPORT, DataError, pii_report
from ..data.records import (
    IGNORE_INDEX,
    LabelledTexts,
    encode_sft,
    label_order,
    labelled_texts,
    pack_windows,
    read_records,
    scrubbed,
    split_records,
    write_jsonl,
)
from ..evaluate.attack import ATTACKS, perturb
from ..evaluate.metrics import classification_metrics, entity_metrics
from ..heads import (POOLINGS, TOKEN_CONTEXTS, SequenceClassifier, TokenClassifier, classification_ids, pad_right,
                     real_tokens, tagging_windows)
from ..lora import LORA_TARGETS, LoRAConfig, add_lora, is_lora_key, merge_lora
from ..model import GPT
from ..runtime import autocast
from ..tokenizer import Tokenizer
from ..train import distributed
from ..train.loop import RESULT, OnEval, TrainResult, run
from .adversarial import METHODS as ADVERSARIAL_METHODS, adversarial_loss

log = logging.getLogger("gptstack.finetune")
TASKS = ("classification", "sft", "token_classification")
# What each task's validation reports (and so what can pick best/ or be a tuning objective).
TASK_METRICS = {"classification": ("val_loss", "accuracy", "f1_macro", "precision_macro", "recall_macro"),
                "sft": ("val_loss", "val_perplexity"),
                "token_classification": ("val_loss", "f1_micro", "precision_micro", "recall_micro", "f1_macro")}
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

    task: str = "classification"         # "classification" | "sft" | "token_classification"
    text_field: str = ""                 # classification: "" = first of text / sentence / input / document
    label_field: str = "label"
    class_weights: str = "none"          # "none" | "balanced" | comma-separated weights in label (tag) order
    val_fraction: float = 0.1            # held out of `data` when no eval_data is given (picks best/)
    test_fraction: float = 0.0           # held out of `data` first, never trained on nor used to pick best/:
                                         # written to splits/test.jsonl for an unbiased `gptstack eval`
    max_length: int = 0                  # classification: tokens per text (0 = the model's context)
    token_context: str = "first"         # token_classification: which states label a word (heads.TOKEN_CONTEXTS;
                                         # first scored best on WNUT 2017 dev, docs/benchmarks.md)
    word_features: int = 0               # token_classification: hash buckets of the words' lexical features
                                         # (shape, affixes, neighbours) read beside the states (0 = none)
    token_crf: bool = False              # token_classification: a CRF output layer (Viterbi over whole sentences)
    pooling: str = "last"                # classification: the state(s) the head reads (heads.POOLINGS): the last
                                         # token's, as GPT-1, or the mean of all tokens' (docs/benchmarks.md, SST-2)
    lm_loss_weight: float = 0.0          # classification: weight of GPT-1's auxiliary language-modelling
                                         # loss on the training texts (the paper used 0.5)
    adversarial: str = "none"            # classification: "none" | "fgm" | "pgd": also train on token embeddings moved to raise the loss (adapt/adversarial.py)
    adversarial_epsilon: float = 0.05    # adversarial: L2 bound of that move, per sequence (all its tokens' embeddings together)
    adversarial_steps: int = 3           # adversarial pgd: gradient steps (fgm takes one)
    adversarial_weight: float = 1.0      # adversarial: the loss is clean + weight * perturbed
    augment: str = "none"                # classification: "none" | "deepwordbug" | "synonym" | "both": also train
                                         # on copies of each text with the attack's edits at random words (attack.perturb)
    augment_copies: int = 2              # augment: edited copies per training text (an epoch walks them all)
    augment_share: float = 0.1           # augment: share of a copy's words changed (at least one the attack can change)

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
        require(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        require(self.token_context in TOKEN_CONTEXTS,
                f"token_context must be one of {TOKEN_CONTEXTS}, got {self.token_context!r}")
        require(self.word_features >= 0, f"word_features is a number of hash buckets (0: none), got {self.word_features}")
        require(not self.token_crf or (self.class_weights == "none" and not self.label_smoothing),
                "class_weights and label_smoothing weigh words one by one; a token_crf scores whole sentences")
        super().validate()
        defaults = FinetuneConfig.__dataclass_fields__
        changed = [name for name in PRETRAINING_ONLY if getattr(self, name) != defaults[name].default]
        require(not changed, f"{changed} only apply to pretraining (`gptstack train`); remove them from the fine-tune config")
        other = sorted(set(self.model) - set(DROPOUT_FIELDS))
        require(not other, f"a fine-tune keeps its checkpoint's shape; model overrides may only set {DROPOUT_FIELDS}, "
                            f"not {other}")
        require(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        require(0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
                f"test_fraction must be in [0, 1) and leave rows to train on beside val_fraction, got "
                f"{self.test_fraction} with val_fraction {self.val_fraction}")
        require(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        require(self.freeze_layers >= 0, f"freeze_layers must be >= 0, got {self.freeze_layers}")
        require(self.max_length >= 0, f"max_length must be >= 0, got {self.max_length}")
        require(self.lm_loss_weight >= 0, f"lm_loss_weight must be >= 0, got {self.lm_loss_weight}")
        require(not self.lm_loss_weight or self.task == "classification",
                f"lm_loss_weight is for task classification (sft is language modelling already), got task {self.task!r}")
        require(self.adversarial in ADVERSARIAL_METHODS,
                f"adversarial must be one of {ADVERSARIAL_METHODS}, got {self.adversarial!r}")
        require(self.adversarial == "none" or self.task == "classification",
                f"adversarial training is for task classification, got task {self.task!r}")
        require(self.adversarial_epsilon > 0, f"adversarial_epsilon must be > 0, got {self.adversarial_epsilon}")
        require(self.adversarial_steps >= 1, f"adversarial_steps must be >= 1, got {self.adversarial_steps}")
        require(self.adversarial_weight >= 0, f"adversarial_weight must be >= 0, got {self.adversarial_weight}")
        require(self.augment in ATTACKS, f"augment must be one of {ATTACKS}, got {self.augment!r}")
        require(self.augment == "none" or self.task == "classification",
                f"augment is for task classification, got task {self.task!r}")
        require(self.augment_copies >= 1, f"augment_copies must be >= 1, got {self.augment_copies}")
        require(0 < self.augment_share <= 1, f"augment_share must be in (0, 1], got {self.augment_share}")
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
    task_class = {"classification": ClassificationTask, "sft": SFTTask,
                  "token_classification": TokenClassificationTask}[cfg.task]
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
        self.pii, self.pii_found = cfg.pii_settings(), {}
        self.scrubber = None
        if self.pii:   # with the run's key, from rank 0: every rank, and a resumed run, scrubs to the same text
            key = distributed.broadcast_object(run_key(cfg.out_dir) if info.is_main else None, info)
            self.scrubber = Scrubber(tuple(self.pii["types"]), self.pii["replacement"], key)
        self.train = self.val = None

    def build(self, resume_dir: Path | None) -> tuple[torch.nn.Module, Tokenizer]:
        cfg = self.cfg
        classifier = None
        if resume_dir is not None and cfg.task in ("classification", "token_classification"):
            load = load_classifier if cfg.task == "classification" else load_token_classifier
            classifier, tokenizer, _ = load(resume_dir, merge_adapter=False)
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

    def read(self, path: str) -> list[dict]:
        """The records of a data file (a task with its own file formats reads them here)."""
        return read_records(path)

    def _read(self, path: str) -> list[dict]:
        """``read``, scrubbed of personal and secret data when ``scrub_pii`` asks (labels and tags
        kept); out_dir/pii_report.json counts what was replaced in each file."""
        if not self.pii:
            return self.read(path)
        records, self.pii_found[path] = scrubbed(self.read(path), self.scrubber, (self.cfg.label_field, "tags"))
        if self.info.is_main:
            Path(self.cfg.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.cfg.out_dir) / PII_REPORT).write_text(json.dumps(pii_report(self.pii, self.pii_found), indent=2))
        return records

    def _records(self) -> tuple[list[dict], list[dict]]:
        """(train, val); the splits cut from ``data`` are written down, so that `gptstack eval` and
        a baseline score the very same held-out rows."""
        records = self._read(self.cfg.data)
        splits = {}
        if self.cfg.test_fraction:    # cut first, with its own seed: the test rows do not move with val_fraction
            records, splits["test"] = split_records(records, self.cfg.test_fraction, self.cfg.seed + 1)
        if self.cfg.eval_data:
            train, val = records, self._read(self.cfg.eval_data)
        else:
            train, val = split_records(records, self.cfg.val_fraction, self.cfg.seed)
            if val:
                splits["val"] = val
        if splits and self.info.is_main:
            for name, rows in {"train": train, **splits}.items():
                write_jsonl(Path(self.cfg.out_dir) / "splits" / f"{name}.jsonl", rows)
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
        merge_lora(getattr(merged, "gpt", merged))   # a task head's backbone, or the GPT itself
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
        if cfg.augment != "none":    # seeded: a resumed run trains on the very same copies
            rng = random.Random(cfg.seed)
            train = LabelledTexts(train.texts + [perturb(text, cfg.augment, cfg.augment_share, rng)
                                                 for _ in range(cfg.augment_copies) for text in train.texts],
                                  train.labels * (1 + cfg.augment_copies))
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
        return classifier or SequenceClassifier(gpt, self.labels, cfg.pooling)

    def batch(self, rows: np.ndarray, device) -> tuple:
        ids, labels = self.train
        idx, lengths = pad_right([ids[r] for r in rows], device)
        return idx, lengths, labels[rows].to(device)

    def loss(self, model: SequenceClassifier, batch: tuple) -> torch.Tensor:
        idx, lengths, labels = batch
        cfg = self.cfg
        logits, lm_loss = model(idx, lengths, with_lm_loss=True) if cfg.lm_loss_weight else (model(idx, lengths), 0.0)
        loss = self.criterion(logits, labels) + cfg.lm_loss_weight * lm_loss
        if cfg.adversarial == "none":
            return loss
        # past DDP's wrapper: the search's passes are not steps of their own, and the gradients of
        # both losses meet in each parameter before DDP reduces them
        classifier = getattr(model, "module", model)
        perturbed = adversarial_loss(classifier.gpt, lambda: self.criterion(classifier(idx, lengths), labels), idx,
                                     real_tokens(lengths, idx.shape[1]),
                                     cfg.adversarial_epsilon, cfg.adversarial_steps if cfg.adversarial == "pgd" else 1)
        return loss + cfg.adversarial_weight * perturbed

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights, label_smoothing=self.cfg.label_smoothing)

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


class TokenClassificationTask(FinetuneTask):
    """Tagged sentences (CoNLL or JSONL, data/conll.py) read by a :class:`~gptstack.heads.TokenClassifier`:
    each sentence is one or more windows of BPE pieces, a batch is whole sentences, the loss is per
    word (cross-entropy, or the CRF's sentence likelihood), and validation scores entities as
    seqeval's default mode does (exact type and boundaries)."""

    def read(self, path: str) -> list[dict]:
        return read_tagged(path)

    def encode(self, train_records, val_records, tokenizer, gpt, classifier):
        self.labels = classifier.labels if classifier else tag_order(r["tags"] for r in train_records)
        context = classifier.context if classifier else self.cfg.token_context
        unknown = sorted({t for r in val_records for t in r["tags"]} - set(self.labels))
        if unknown:
            raise DataError(f"validation tags {unknown} never occur in the training data {self.labels}")
        block = min(self.cfg.max_length or gpt.config.block_size, gpt.config.block_size)
        index = {label: i for i, label in enumerate(self.labels)}

        def tensors(records) -> tuple[list, list[torch.Tensor]]:
            return ([tagging_windows(tokenizer, r["tokens"], context, block) for r in records],
                    [torch.tensor([index[t] for t in r["tags"]]) for r in records])
        self.train = tensors(train_records)
        self.val = tensors(val_records) if val_records else None
        self.val_tags = [r["tags"] for r in val_records]
        weights = class_weights(self.cfg.class_weights, [t for r in train_records for t in r["tags"]], self.labels)
        self.class_weights = None if weights is None else weights.to(self.info.device)
        return classifier or TokenClassifier(gpt, self.labels, context, self.cfg.word_features, self.cfg.token_crf)

    def batch(self, rows: np.ndarray, device) -> tuple:
        sentences, targets = self.train
        return [sentences[r] for r in rows], padded_tags([targets[r] for r in rows], device)

    def loss(self, model: TokenClassifier, batch: tuple) -> torch.Tensor:
        sentences, tags = batch
        # the loss lies past DDP's wrapper, which only forwards ``forward``
        return getattr(model, "module", model).loss(*model(sentences), tags, self.class_weights, self.cfg.label_smoothing)

    def evaluate(self, model: TokenClassifier, device, dtype, info) -> dict:
        """The whole held-out set on every rank: the same numbers everywhere, no messages."""
        if self.val is None:
            return {}
        sentences, targets = self.val
        nll, predicted = 0.0, []
        for start in range(0, len(sentences), self.cfg.eval_batch_size):
            rows = slice(start, start + self.cfg.eval_batch_size)
            with autocast(device, dtype):
                scores, mask = model(sentences[rows])
                loss = model.loss(scores, mask, padded_tags(targets[rows], device))
            nll += loss.item() * int(mask.sum())
            predicted += [[self.labels[i] for i in path] for path, _ in model.decode(scores, mask)]
        report = entity_metrics(self.val_tags, predicted)
        words = sum(len(t) for t in targets)
        return {"val_loss": nll / words, **{k: report[k] for k in TASK_METRICS["token_classification"][1:]}}


def padded_tags(targets: list[torch.Tensor], device) -> torch.Tensor:
    """Sentences' tag ids as one [S, longest] batch, IGNORE_INDEX past each sentence's end."""
    return torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX).to(device)


def tag_order(tag_lists) -> list[str]:
    """The tags a tagger predicts: O first, then by entity type and position in the entity."""
    order = {"O": 0, "B": 1, "I": 2, "E": 3, "S": 4}
    return sorted({t for tags in tag_lists for t in tags}, key=lambda t: (t != "O", t[2:], order[t[0]]))


class SFTTask(FinetuneTask):
    """Prompt/response examples or whole conversations, packed into windows in which no example
    attends to another; the loss counts response (assistant) tokens only."""

    def encode(self, train_records, val_records, tokenizer, gpt, classifier):
        self.conversations = any("messages" in r for r in train_records)
        def pack(records, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, y, documents, truncated = pack_windows(encode_sft(records, tokenizer, self.cfg.data),
                                                      gpt.config.block_size, tokenizer.eot_id)
            if truncated:
                log.warning("%d %s example(s) longer than the context of %d tokens lost the start of their prompt",
                            truncated, name, gpt.config.block_size)
            if not (y != IGNORE_INDEX).any():
                raise DataError(f"the {name} examples have no response tokens to learn from")
            return x, y, documents
        self.train = pack(train_records, "training")
        self.val = pack(val_records, "validation") if val_records else None
        return gpt

    def checkpoint_meta(self) -> dict:
        """Conversations were rendered in the default chat format: the server must render them so too."""
        return {**super().checkpoint_meta(), **({"chat_template": DEFAULT_CHAT_TEMPLATE} if self.conversations else {})}

    def batch(self, rows: np.ndarray, device) -> tuple:
        return tuple(t[rows].to(device) for t in self.train)

    def loss(self, model: GPT, batch: tuple) -> torch.Tensor:
        x, y, documents = batch
        return model(x, y, label_smoothing=self.cfg.label_smoothing, documents=documents)[1]

    def evaluate(self, model: GPT, device, dtype, info) -> dict:
        if self.val is None:
            return {}
        x, y, documents = self.val
        nll, count = 0.0, 0
        for start in range(0, len(x), self.cfg.eval_batch_size):
            rows = slice(start, start + self.cfg.eval_batch_size)
            targets = y[rows].to(device)
            with autocast(device, dtype):
                _, loss = model(x[rows].to(device), targets, documents=documents[rows].to(device))
            n = int((targets != IGNORE_INDEX).sum())
            if n:
                nll, count = nll + loss.float().item() * n, count + n
        return {"val_loss": nll / count, "val_perplexity": math.exp(min(nll / count, 700))}
