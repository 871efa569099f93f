"""Typed configuration: the model's shape, its presets, and the training run.

Configs are dataclasses. Files (JSON or YAML) and command-line ``--key value`` pairs only fill
them in; every field is checked once in ``validate()`` with a message naming the field and what
it accepts. The key names of the published NVIDIA-style GPT-3 example configs (``n_embd``,
``learning_rate``, ``train_dataset``, ...) are accepted as aliases.
"""

from __future__ import annotations

import copy

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which one and what is allowed."""


ATTENTION_KINDS = ("dense", "alternating_banded")
ACTIVATIONS = ("gelu", "gelu_exact")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")


@dataclass
class ModelConfig:
    """The shape of a GPT. Defaults are GPT-2 small / GPT-3 Small without the context change."""

    vocab_size: int = 50257
    block_size: int = 1024          # context length (n_ctx / n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768               # d_model; d_head = n_embd / n_head
    embd_pdrop: float = 0.1         # dropout on token + position embeddings
    attn_pdrop: float = 0.1         # dropout on attention probabilities
    resid_pdrop: float = 0.1        # dropout on each residual branch
    clf_pdrop: float = 0.1          # dropout before a classification head (fine-tuning)
    activation: str = "gelu"        # "gelu" = tanh approximation as in GPT-2/3; "gelu_exact" = erf
    layer_norm_eps: float = 1e-5
    attention: str = "dense"        # "dense" | "alternating_banded" (GPT-3: even layers dense, odd layers local)
    band_width: int = 256           # keys visible to a banded layer, the query's own position included

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_is_banded(self, layer: int) -> bool:
        return self.attention == "alternating_banded" and layer % 2 == 1

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "band_width"):
            require(getattr(self, name) >= 1, f"model.{name} must be a positive integer, got {getattr(self, name)}")
        require(self.n_embd % self.n_head == 0,
                 f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "clf_pdrop"):
            require(0.0 <= getattr(self, name) < 1.0, f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        require(self.activation in ACTIVATIONS, f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        require(self.attention in ATTENTION_KINDS,
                 f"model.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        return self


# --- Presets ------------------------------------------------------------------------------------
# GPT-3 paper (Brown et al. 2020), Table 2.1: n_layers, d_model, n_heads, d_head, batch size in
# tokens and learning rate; every GPT-3 model has a 2048-token context and alternates dense and
# locally banded sparse attention. Two rows of the table do not add up, and are read so that
# d_model = n_heads * d_head holds with the printed d_head and parameter count: XL prints 24 heads,
# which do not divide d_model 2048, so 16 heads of 128 are used; 13B prints d_model 5140, which is
# not 40 * 128, so 5120 is used.
GPT3_TABLE = {
    #  name          n_layer d_model n_heads lr       batch (tokens)
    "gpt3-small":   (12,  768,   12,  6.0e-4, 500_000),
    "gpt3-medium":  (24,  1024,  16,  3.0e-4, 500_000),
    "gpt3-large":   (24,  1536,  16,  2.5e-4, 500_000),
    "gpt3-xl":      (24,  2048,  16,  2.0e-4, 1_000_000),
    "gpt3-2.7b":    (32,  2560,  32,  1.6e-4, 1_000_000),
    "gpt3-6.7b":    (32,  4096,  32,  1.2e-4, 2_000_000),
    "gpt3-13b":     (40,  5120,  40,  1.0e-4, 2_000_000),
    "gpt3-175b":    (96,  12288, 96,  0.6e-4, 3_200_000),
}
GPT2_TABLE = {
    "gpt2":        (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large":  (36, 1280, 20),
    "gpt2-xl":     (48, 1600, 25),
}


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    learning_rate: float | None = None
    batch_tokens: int | None = None
    note: str = ""


def _presets() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    for name, (n_layer, d_model, n_heads, lr, batch) in GPT3_TABLE.items():
        presets[name] = Preset(ModelConfig(block_size=2048, n_layer=n_layer, n_embd=d_model, n_head=n_heads,
                                           attention="alternating_banded"), lr, batch, "GPT-3 paper, Table 2.1")
    for name, (n_layer, d_model, n_heads) in GPT2_TABLE.items():
        presets[name] = Preset(ModelConfig(block_size=1024, n_layer=n_layer, n_embd=d_model, n_head=n_heads),
                               note="GPT-2 (Radford et al. 2019)")
    # Small models for a laptop CPU: "tiny" for tests, "cpu-small" for the demo.
    presets["tiny"] = Preset(ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=64,
                                         embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0), 1e-3, None, "tests")
    presets["cpu-small"] = Preset(ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=256,
                                              embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1), 1e-3, None, "demo")
    presets["cpu-medium"] = Preset(ModelConfig(block_size=256, n_layer=6, n_head=6, n_embd=384), 6e-4, None, "CPU")
    return presets


PRESETS = _presets()


def preset(name: str) -> Preset:
    """A copy of the named preset: callers change its fields freely, the table stays as written."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# --- Training -----------------------------------------------------------------------------------
DEFAULT_STEPS = 1000   # a run's length when neither max_steps, max_epochs nor max_time is given

# What scrubbing of personal and secret data (data/pii.py) can be asked for: settings, read here,
# below the code that does it, since the configs of training and fine-tuning check them too.
PII_TYPES = ("SECRET", "EMAIL", "IBAN", "CARD", "SSN", "IP", "PHONE", "ADDRESS", "NAME")    # most specific first
PII_REPLACEMENTS = ("tag", "pseudonym")


def pii_settings(scrub_pii: bool, replacement: str, types: str) -> dict | None:
    """What scrubbing was asked for, checked (a bad type or replacement fails before any work), as a
    manifest records it; None without scrubbing. A ValueError says what is wrong."""
    if not scrub_pii:
        return None
    check_replacement(replacement)
    return {"types": list(parse_pii_types(types)), "replacement": replacement}


def check_replacement(replacement: str) -> None:
    if replacement not in PII_REPLACEMENTS:
        raise ValueError(f"pii replacement must be one of {PII_REPLACEMENTS}, got {replacement!r}")


def parse_pii_types(spec: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated choice of PII_TYPES (any case), in PII_TYPES order."""
    if spec.strip().lower() == "all":
        return PII_TYPES
    chosen = {t.strip().upper() for t in spec.split(",") if t.strip()}
    unknown = sorted(chosen - set(PII_TYPES))
    if unknown or not chosen:
        raise ValueError(f"pii types must be 'all' or a comma-separated choice of {', '.join(PII_TYPES)}; got {spec!r}"
                         + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
    return tuple(t for t in PII_TYPES if t in chosen)


@dataclass
class TrainConfig:
    """One training run. ``model`` is a preset name plus optional per-field overrides."""

    data: str = ""                      # a prepared dataset dir (`gptstack prepare`) or raw text to prepare
    eval_data: str = ""                 # optional second dataset for validation (its val split)
    out_dir: str = "runs/default"
    preset: str = "cpu-small"
    model: dict = field(default_factory=dict)   # ModelConfig fields overriding the preset
    tokenizer: str = "gpt2"             # used only when `data` is raw text and gets prepared here
    scrub_pii: bool = False             # replace personal and secret data before tokenizing (docs/security.md)
    pii_replacement: str = "tag"        # "tag" (<EMAIL>) | "pseudonym" (<EMAIL_3f9a0c1e>, the same per value in a run)
    pii_types: str = "all"              # "all" or some of SECRET,EMAIL,IBAN,CARD,SSN,IP,PHONE,NAME
    init_from: str = ""                 # a checkpoint dir to start from (weights only)
    resume: bool = True                 # continue from out_dir/last if it exists

    # batch: tokens per optimizer step = batch_size * block_size * grad_accum_steps * world_size
    batch_size: int = 16                # sequences per micro-batch per process
    grad_accum_steps: int = 1
    batch_rampup_steps: int = 0         # GPT-3 batch ramp-up: micro-batches grow linearly over these steps
    batch_rampup_start: int = 1         # micro-batches per step at the start of the ramp
    eval_batch_size: int = 16

    # length of the run: max_steps when set (> 0); otherwise max_epochs passes over the training data;
    # otherwise 1000 steps. max_time (seconds, evaluations included) caps the run by wall time: the
    # step count is then planned from the measured speed, so the schedule still ends its decay.
    max_steps: int = 0
    max_epochs: float = 0.0
    max_time: float = 0.0

    # optimizer and schedule (GPT-3: Adam beta2 0.95, eps 1e-8, wd 0.1, clip 1.0, cosine to 10%)
    optimizer: str = "adamw"            # "adamw": decoupled weight decay; "adam": decay as an L2 term in the gradient
    learning_rate: float | None = None  # None = the preset's (GPT-3: Table 2.1), else 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    lr_decay: str = "cosine"            # "cosine" | "linear" | "constant"
    lr_decay_steps: int = 0             # 0 = decay over the whole run
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0              # 0 disables clipping
    label_smoothing: float = 0.0

    # numerics and speed
    device: str = "auto"                # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"                 # "auto" (bf16 where fast, else fp32) | "fp32" | "bf16" | "fp16" (CUDA)
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 1337

    # parallelism under torchrun (docs/distributed.md): processes = data x tensor_parallel x pipeline_parallel.
    # Data parallelism is DDP (every process holds the whole model), or with fsdp FSDP2 (parameters,
    # gradients and optimizer state sharded over the data-parallel processes; required when data
    # parallelism is combined with tensor or pipeline parallelism).
    fsdp: bool = False
    tensor_parallel: int = 1            # Megatron-style split of attention heads and MLP columns (DTensor)
    pipeline_parallel: int = 1          # consecutive layers per stage; micro-batches = grad_accum_steps
    pipeline_schedule: str = "1f1b"     # "1f1b" | "gpipe"
    cpu_offload: bool = False           # FSDP2: parameters, gradients and optimizer state in host memory (CUDA)

    # bookkeeping
    eval_interval: int = 200
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 0        # 0 = checkpoint only at evals and at the end
    encrypt: bool = False               # seal checkpoints with AES-256-GCM, the key from --key-file or the environment (docs/security.md)
    best_metric: str = "val_loss"       # what picks best/ (and what tuning reads): one of available_metrics()
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0             # for MFU; 0 = measure this device's matmul rate once at start

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate or preset(self.preset).learning_rate or 6e-4

    def available_metrics(self) -> tuple[str, ...]:
        """What this run's validation reports, and so what ``best_metric`` may name."""
        return ("val_loss", "val_perplexity")

    def planned_steps(self, steps_per_epoch: float) -> int:
        """The run's length before any max_time planning: max_steps if set, else max_epochs passes of
        ``steps_per_epoch`` optimizer steps, else DEFAULT_STEPS (none without a cap under max_time)."""
        if self.max_steps:
            return self.max_steps
        if self.max_epochs:
            return max(1, math.ceil(self.max_epochs * steps_per_epoch))
        return 0 if self.max_time else DEFAULT_STEPS

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        base = dataclasses.replace(preset(self.preset).model)
        known = {f.name for f in fields(ModelConfig)}
        unknown = set(self.model) - known
        if unknown:
            raise ConfigError(f"unknown model field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        cfg = dataclasses.replace(base, **{k: _coerce(v, field_hint(ModelConfig, k), f"model.{k}") for k, v in self.model.items()})
        if vocab_size is not None and "vocab_size" not in self.model:
            cfg.vocab_size = vocab_size
        return cfg.validate()

    def pii_settings(self) -> dict | None:
        """What ``scrub_pii`` asks for (see pii_settings); None without it."""
        return pii_settings(self.scrub_pii, self.pii_replacement, self.pii_types)

    def validate(self) -> "TrainConfig":
        preset(self.preset)
        self.model_config()
        require(bool(self.data), "data is required: a dataset dir made by `gptstack prepare`, or a text file/folder")
        try:
            self.pii_settings()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("batch_size", "grad_accum_steps", "eval_batch_size", "batch_rampup_start",
                     "eval_interval", "eval_iters", "log_interval"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "lr_decay_steps", "batch_rampup_steps", "checkpoint_interval"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(self.max_epochs >= 0, f"max_epochs must be >= 0, got {self.max_epochs}")
        require(self.max_time >= 0, f"max_time must be >= 0 seconds, got {self.max_time}")
        require(self.best_metric in self.available_metrics(),
                f"best_metric must be one of {self.available_metrics()}, got {self.best_metric!r}")
        require(self.learning_rate is None or self.learning_rate > 0,
                 f"learning_rate must be > 0, got {self.learning_rate}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.lr_decay in ("cosine", "linear", "constant"),
                 f"lr_decay must be 'cosine', 'linear' or 'constant', got {self.lr_decay!r}")
        require(self.optimizer in ("adamw", "adam"), f"optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        require(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        require(self.dtype in ("auto", "fp32", "bf16", "fp16"),
                 f"dtype must be 'auto', 'fp32', 'bf16' or 'fp16', got {self.dtype!r}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        for name in ("tensor_parallel", "pipeline_parallel"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.pipeline_schedule in PIPELINE_SCHEDULES,
                f"pipeline_schedule must be one of {PIPELINE_SCHEDULES}, got {self.pipeline_schedule!r}")
        require(not self.cpu_offload or self.fsdp, "cpu_offload is an FSDP2 option: set fsdp: true as well")
        model = self.model_config()
        require(model.n_head % self.tensor_parallel == 0,
                f"tensor_parallel {self.tensor_parallel} must divide model.n_head {model.n_head} (each process takes whole heads)")
        require(self.pipeline_parallel <= model.n_layer,
                f"pipeline_parallel {self.pipeline_parallel} exceeds model.n_layer {model.n_layer}: a stage needs a layer")
        fewest_micro_batches = min(self.grad_accum_steps, self.batch_rampup_start) if self.batch_rampup_steps else self.grad_accum_steps
        require(fewest_micro_batches >= self.pipeline_parallel,
                f"pipeline_parallel {self.pipeline_parallel} needs at least as many micro-batches per step to fill "
                f"the pipeline: raise grad_accum_steps (now {self.grad_accum_steps}"
                + (f", and batch_rampup_start, now {self.batch_rampup_start})" if self.batch_rampup_steps else ")"))
        return self


# Keys of the NVIDIA-style GPT-3 example configs, mapped onto ours ("model." = a model field).
ALIASES = {
    "n_embd": "model.n_embd", "n_layer": "model.n_layer", "n_head": "model.n_head",
    "n_ctx": "model.block_size", "n_positions": "model.block_size", "block_size": "model.block_size",
    "vocab_size": "model.vocab_size",
    "embd_pdrop": "model.embd_pdrop", "attn_pdrop": "model.attn_pdrop", "resid_pdrop": "model.resid_pdrop",
    "clf_pdrop": "model.clf_pdrop", "afn": "model.activation", "attention": "model.attention",
    "band_width": "model.band_width",
    "train_dataset": "data", "eval_dataset": "eval_data", "lr": "learning_rate",
}
AFN_NAMES = {"gelu": "gelu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_exact": "gelu_exact"}


def normalise_keys(raw: dict) -> dict:
    """Map alias keys and nested/dotted model keys onto TrainConfig's own layout."""
    out: dict[str, Any] = {}
    model: dict[str, Any] = dict(raw.get("model") or {}) if isinstance(raw.get("model"), dict) else {}
    named = [k for k in [*raw, *model] if not isinstance(k, str)]
    if named:   # YAML makes keys of numbers, booleans and null too
        raise ConfigError(f"config keys must be names, got {named[0]!r}")
    for key, value in raw.items():
        if key == "model" and isinstance(value, dict):
            continue
        if key == "model" and isinstance(value, str):   # `model: gpt3-small` names a preset
            out["preset"] = value
            continue
        target = ALIASES.get(key, key)
        if target.startswith("model."):
            model[target[len("model."):]] = value
        else:
            out[target] = value
    if "activation" in model:
        afn = str(model["activation"])
        if afn not in AFN_NAMES:
            raise ConfigError(f"afn/activation {afn!r} is not supported; use one of {sorted(AFN_NAMES)}")
        model["activation"] = AFN_NAMES[afn]
    if "lr_decay" in out and isinstance(out["lr_decay"], bool):  # NVIDIA style: lr_decay: true
        out["lr_decay"] = "cosine" if out["lr_decay"] else "constant"
    if model:
        out["model"] = model
    return out


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def build_train_config(path: str | Path | None = None, overrides: dict | None = None, cls: type = TrainConfig):
    """A TrainConfig (or a subclass such as FinetuneConfig) from an optional file plus
    ``{"key": value}`` overrides (dotted keys allowed)."""
    raw = normalise_keys(load_config_file(path)) if path else {}
    for key, value in (overrides or {}).items():
        for k, v in normalise_keys({key: value}).items():
            if k == "model":
                raw.setdefault("model", {}).update(v)
            else:
                raw[k] = v
    return from_dict(cls, raw).validate()


def from_dict(cls, raw: dict):
    """Instantiate a dataclass from a dict, converting strings from the command line to field types."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        hint = ", ".join(sorted(known))
        raise ConfigError(f"unknown config key(s) {unknown}; allowed keys: {hint} (and model.<field>)")
    return cls(**{k: _coerce(v, field_hint(cls, k), k) for k, v in raw.items()})


def field_hint(cls, name: str):
    return get_type_hints(cls)[name]


def _coerce(value: Any, hint, name: str):
    """Convert ``value`` to the field's type, or raise a ConfigError naming the field."""
    origin = get_origin(hint)
    if dict in (origin, hint):
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name} must be a mapping, got {value!r}")
    if origin is not None and type(None) in get_args(hint):
        if value is None or str(value).lower() in ("none", "null"):
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower() or "." in value) else int(value)
        if hint is float:
            result = float(value)
            if not math.isfinite(result):
                raise ValueError
            return result
        if hint is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):   # OverflowError: int(float("1e400"))
        raise ConfigError(f"{name} must be of type {hint.__name__}, got {value!r}") from None
    return value


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --- Sizes without allocating the model -------------------------------------------------------

def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    d, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    per_layer = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    embeddings = V * d + T * d
    total = embeddings + L * per_layer + 2 * d   # + final LayerNorm; the LM head is tied
    return {"total": total, "embeddings": embeddings, "non_embedding": total - embeddings}


def model_info(cfg: ModelConfig) -> dict[str, Any]:
    """Parameters, FLOPs per token and memory needs, computed from the shape alone."""
    params = count_parameters(cfg)
    d, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    # Attention FLOPs per token (QK^T and AV, forward) over the keys each layer actually sees,
    # averaged over positions of a full context.
    attended = sum(min(T, cfg.band_width) if cfg.layer_is_banded(i) else (T + 1) / 2 for i in range(L))
    fwd_matmul = 2 * (params["non_embedding"] + cfg.vocab_size * d)  # LM head counts as a matmul
    fwd_attention = 2 * 2 * d * attended
    fwd = fwd_matmul + fwd_attention
    kv_bytes_per_token = {dt: 2 * L * d * b for dt, b in (("fp32", 4), ("bf16", 2), ("int8", 1))}   # while dense
    return {
        "parameters": params["total"],
        "non_embedding_parameters": params["non_embedding"],
        "n_layer": L, "n_embd": d, "n_head": cfg.n_head, "head_dim": cfg.head_dim, "block_size": T,
        "vocab_size": cfg.vocab_size, "attention": cfg.attention,
        "flops_per_token_forward": fwd,
        "flops_per_token_train": 3 * fwd,
        "weights_bytes": {"fp32": 4 * params["total"], "bf16": 2 * params["total"]},
        # AdamW keeps two fp32 moments per parameter; with bf16 training add an fp32 master copy.
        "adamw_state_bytes": 8 * params["total"],
        "grad_bytes_fp32": 4 * params["total"],
        "kv_cache_bytes_per_token": kv_bytes_per_token,
        # the engine's paged cache keeps every position of every layer, banded ones too: one block
        # table serves all layers, which is what lets a cached prefix be shared (see kv_cache.py)
        "kv_cache_bytes_full_context": {k: v * T for k, v in kv_bytes_per_token.items()},
    }
