"""Pretraining: ``train(TrainConfig)``, the language-modelling task run by the one loop.

Each optimizer step accumulates ``micro_batches(step)`` micro-batches of random windows of the
prepared token shards (gradient accumulation and GPT-3's batch ramp-up); validation scores the same
evenly spaced windows of the val split every time, so val losses compare across steps.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..checkpoint import load_model, with_config
from ..config import TrainConfig, model_info
from ..data.loader import BatchSampler, TokenDataset, eval_batches, read_manifest
from ..data.pii import run_key
from ..data.prepare import ensure_prepared, prepared_location
from ..model import GPT
from ..runtime import autocast
from ..tokenizer import Tokenizer, load_tokenizer
from . import distributed
from .loop import OnEval, TrainResult, run
from .optim import micro_batches


def train(cfg: TrainConfig, on_eval: OnEval | None = None) -> TrainResult:
    """Run (or resume) a pretraining run; see :func:`gptstack.train.loop.run`."""
    return run(cfg, lambda info: LanguageModelTask(cfg, info), on_eval)


def prepared_dataset(path: str, out_dir: Path, tokenizer: str, info: distributed.DistInfo, progress: bool,
                     pii: dict | None = None) -> Path:
    """``path`` as a prepared dataset; raw text is prepared once, by rank 0, into out_dir/data (other
    ranks, which may be on other machines, read it there: out_dir must be shared), scrubbed if ``pii``
    with the run's pseudonym key, so that training and validation data share pseudonyms."""
    if info.is_main:
        ensure_prepared(path, Path(out_dir) / "data", tokenizer, progress, pii, run_key(out_dir) if pii else None)
    distributed.barrier(info)
    return prepared_location(path, Path(out_dir) / "data")


def validation_set(directory: Path, explicit: bool) -> TokenDataset | None:
    """The val split; for an explicitly given eval dataset without one, its train split."""
    splits = read_manifest(directory)["splits"]
    if splits.get("val", {}).get("tokens"):
        return TokenDataset(directory, "val", verify=True)
    return TokenDataset(directory, "train", verify=True) if explicit else None


class LanguageModelTask:
    """Next-token prediction over token shards."""

    name, unit = "language_model", "tokens"

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo):
        self.cfg = cfg
        show = cfg.progress and info.is_main
        data_dir = prepared_dataset(cfg.data, cfg.out_dir, cfg.tokenizer, info, show, cfg.pii_settings())
        self.train_set = TokenDataset(data_dir, "train", verify=True)   # a flipped byte is an error, not garbage
        eval_dir = (prepared_dataset(cfg.eval_data, cfg.out_dir, cfg.tokenizer, info, show, cfg.pii_settings())
                    if cfg.eval_data else data_dir)
        self.val_set = validation_set(eval_dir, explicit=bool(cfg.eval_data))
        self.tokenizer = load_tokenizer(self.train_set.manifest["tokenizer"], base_dir=data_dir)
        self.model_cfg = cfg.model_config(vocab_size=self.train_set.vocab_size)
        if self.model_cfg.vocab_size < self.train_set.vocab_size:
            raise ValueError(f"model.vocab_size {self.model_cfg.vocab_size} is smaller than the dataset's tokenizer "
                             f"({self.train_set.vocab_size}); remove the override")
        self.block = self.model_cfg.block_size
        self.sampler = BatchSampler(self.train_set, self.block, cfg.batch_size, cfg.seed, info.dp_rank, info.dp_size)
        self.flops_per_unit = model_info(self.model_cfg)["flops_per_token_train"]

    def build(self, resume_dir: Path | None) -> tuple[GPT, Tokenizer]:
        if resume_dir is not None:
            model, _, _ = load_model(resume_dir)
            if dataclasses.asdict(model.config) != dataclasses.asdict(self.model_cfg):
                raise ValueError(f"{resume_dir} holds a model of another shape than this config; "
                                 "use another out_dir or pass --resume false")
        elif self.cfg.init_from:
            model = with_config(load_model(self.cfg.init_from)[0], self.model_cfg)
        else:
            model = GPT(self.model_cfg)
        return model, self.tokenizer

    def steps_per_epoch(self, dp_size: int) -> float:
        return self.train_set.num_tokens / (self.cfg.batch_size * self.block * self.cfg.grad_accum_steps * dp_size)

    def step_batches(self, step: int, info: distributed.DistInfo) -> list:
        n_micro = micro_batches(step, self.cfg)
        batches = [self.sampler.micro_batch(step, m, n_micro) for m in range(n_micro)]
        device = info.device
        return [((x.to(device, non_blocking=True), y.to(device, non_blocking=True)), 1 / n_micro, x.numel())
                for x, y in batches]

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return model(x, y, label_smoothing=self.cfg.label_smoothing)[1]

    def evaluate(self, model: GPT, device: torch.device, dtype: torch.dtype, info: distributed.DistInfo) -> dict:
        """Mean loss over the fixed validation windows; ranks score interleaved batches and sum."""
        if self.val_set is None:
            return {}
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        for x, y in eval_batches(self.val_set, self.block, self.cfg.eval_batch_size, self.cfg.eval_iters,
                                 info.dp_rank, info.dp_size):
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            total += loss.float() * y.numel()
            count += y.numel()
        loss = (distributed.sum_across_ranks(total, info) / distributed.sum_across_ranks(count, info)).item()
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50))}

    def checkpoint_meta(self) -> dict:
        return {}

    def for_serving(self, model: GPT) -> GPT:
        return model
