"""``gptstack plan``: will a preset train on a cluster, laid out how, and in how many days?

Arithmetic only, nothing is allocated. Per device, for a layout of data parallel (dp) x tensor
parallel (tp) x pipeline parallel (pp) ranks, optionally fully sharded (FSDP / ZeRO-3) over dp:

* model states, mixed-precision Adam (ZeRO paper, Rajbhandari et al. 2020): 2 bytes of bf16 weights,
  2 of bf16 gradients and 12 of fp32 master weights and Adam moments, 16 bytes per parameter. TP
  splits each block's matrices (as train/parallel.py does: the embeddings and the tied LM head stay
  whole on every tensor-parallel process), PP gives each stage n_layer / pp blocks (the first stage
  also holds the embeddings, so it is the one planned for), FSDP divides it all by dp but gathers
  one block whole at a time (and prefetches the next), with its gradients. Data parallelism over
  tensor- or pipeline-parallel groups is FSDP, as gptstack runs it.
* batch: the preset's batch in tokens (GPT-3: Table 2.1) must hold at least one micro-batch per
  data-parallel rank; the pipeline bubble of 1F1B is (pp - 1) / micro-batches per step.
* activations of one micro-batch, per block, with bf16 activations and the attention scores never
  stored (FlashAttention / SDPA), after Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models"): s * b * h * (10 + 24 / tp) bytes. With full activation checkpointing
  a block keeps only its 2 * s * b * h byte input, plus one block's full activations while it is
  recomputed. Under 1F1B the first pipeline stage holds pp micro-batches in flight, so n_layer
  blocks' worth in all, whatever pp is.
* time: training FLOPs per token from ``model_info`` (3x the forward FLOPs, or 4x when activations
  are recomputed), divided by the cluster's rate at the given MFU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError, ModelConfig, model_info, preset, require

GB = 1e9
STATE_BYTES_PER_PARAM = 2 + 2 + 12   # bf16 weights + bf16 grads + fp32 master, Adam m and v
MAX_TP = 8                           # tensor parallelism stays inside one node's fast links


@dataclass
class PlanConfig:
    preset: str = "gpt3-175b"
    gpus: int = 1024
    gpu_memory: str = "80GB"             # per device, e.g. 80GB, 40GB, 24GiB
    gpu_tflops: float = 312.0            # dense bf16 peak per device (A100: 312, H100 SXM: 989)
    mfu: float = 0.4                     # model FLOPs utilisation assumed for the time estimate
    tokens: float = 300e9                # training tokens (GPT-3: 300B)
    micro_batch: int = 1                 # sequences per micro-batch per device
    tp: int = 0                          # tensor parallel degree; 0 = search
    pp: int = 0                          # pipeline parallel degree; 0 = search
    fsdp: bool = False                   # shard model states over the data-parallel ranks (also searched when tp/pp are 0)
    activation_checkpointing: bool = True   # recompute activations in the backward pass

    def validate(self) -> "PlanConfig":
        preset(self.preset)
        require(self.gpus >= 1, f"gpus must be >= 1, got {self.gpus}")
        require(memory_bytes(self.gpu_memory) > 0, f"gpu_memory must be positive, got {self.gpu_memory!r}")
        require(0 < self.mfu <= 1, f"mfu must be in (0, 1], got {self.mfu}")
        for name in ("gpu_tflops", "tokens", "micro_batch"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        require(self.tp >= 0 and self.pp >= 0, "tp and pp must be >= 0 (0 = search)")
        return self


def memory_bytes(text: str) -> float:
    """'80GB' -> 80e9, '24GiB' -> 24 * 2**30, '512MB' -> 512e6."""
    units = {"gib": 2 ** 30, "mib": 2 ** 20, "gb": 1e9, "mb": 1e6, "tb": 1e12}
    lowered = text.strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            try:
                return float(lowered[:-len(unit)]) * scale
            except ValueError:
                break
    raise ConfigError(f"gpu_memory {text!r} is not a size like 80GB or 24GiB")


@dataclass
class Layout:
    dp: int
    tp: int
    pp: int
    fsdp: bool

    def __str__(self) -> str:
        return f"dp {self.dp} x tp {self.tp} x pp {self.pp}" + (" (FSDP over dp)" if self.fsdp else "")


def parameters_per_device(model: ModelConfig, layout: Layout) -> float:
    """Parameters on the first pipeline stage's device: its blocks, split by TP, and the embeddings."""
    h = model.n_embd
    per_block = 12 * h * h + 13 * h
    blocks = math.ceil(model.n_layer / layout.pp)
    return blocks * per_block / layout.tp + (model.vocab_size + model.block_size) * h + 2 * h


def memory_per_device(model: ModelConfig, layout: Layout, micro_batch: int, checkpointing: bool) -> dict:
    """Bytes on the busiest device (the first pipeline stage), by kind."""
    params = parameters_per_device(model, layout)
    states = params * STATE_BYTES_PER_PARAM / (layout.dp if layout.fsdp else 1)
    if layout.fsdp and layout.dp > 1:   # a block gathered whole (and the next prefetched), its bf16 grads
        states += 3 * 2 * (12 * model.n_embd ** 2 + 13 * model.n_embd) / layout.tp
    s, b, h = model.block_size, micro_batch, model.n_embd
    full_block = s * b * h * (10 + 24 / layout.tp)
    blocks_held = math.ceil(model.n_layer / layout.pp) * layout.pp   # 1F1B: pp micro-batches in flight
    if checkpointing:
        activations = blocks_held * 2 * s * b * h + full_block
    else:
        activations = blocks_held * full_block
    return {"parameters": params, "model_states": states, "activations": activations,
            "total": states + activations}


def layouts(cfg: PlanConfig, model: ModelConfig) -> list[Layout]:
    """Every layout of cfg.gpus devices the model's shape allows, or the one the config names. Data
    parallelism over tensor- or pipeline-parallel groups is FSDP (as train/parallel.py runs it)."""
    tps = [cfg.tp] if cfg.tp else [t for t in (1, 2, 4, 8) if t <= MAX_TP and model.n_head % t == 0]
    pps = [cfg.pp] if cfg.pp else [p for p in range(1, model.n_layer + 1) if model.n_layer % p == 0]
    found = []
    for tp in tps:
        for pp in pps:
            if cfg.gpus % (tp * pp):
                continue
            dp = cfg.gpus // (tp * pp)
            if dp > 1 and tp * pp > 1:
                shard = [True]
            else:
                shard = [cfg.fsdp] if (cfg.tp and cfg.pp) else [False, True]
            found += [Layout(dp, tp, pp, fsdp) for fsdp in shard]
    return found


def plan(cfg: PlanConfig) -> dict:
    """Memory per device for each layout (those that fit first, least model parallelism first),
    and the training time of the cluster."""
    cfg.validate()
    chosen = preset(cfg.preset)
    model, info = chosen.model, model_info(chosen.model)
    limit = memory_bytes(cfg.gpu_memory)
    batch_tokens = chosen.batch_tokens or cfg.gpus * cfg.micro_batch * model.block_size
    rows = []
    for layout in layouts(cfg, model):
        memory = memory_per_device(model, layout, cfg.micro_batch, cfg.activation_checkpointing)
        # micro-batches per step per pipeline: fewer than one overshoots the batch; the 1F1B bubble is (pp-1)/m
        micro_batches = batch_tokens // (layout.dp * cfg.micro_batch * model.block_size)
        rows.append({"layout": layout, **memory, "micro_batches": micro_batches,
                     "bubble": (layout.pp - 1) / micro_batches if micro_batches else None,
                     "fits": memory["total"] <= limit and micro_batches >= 1})
    require(bool(rows), f"no layout of {cfg.gpus} devices fits the shape of {cfg.preset} with tp={cfg.tp} pp={cfg.pp}: "
                        "gpus must be a multiple of tp * pp, tp must divide n_head, pp must divide n_layer")
    rows.sort(key=lambda r: (not r["fits"], r["layout"].tp * r["layout"].pp, r["layout"].fsdp, r["total"]))
    passes = 4 if cfg.activation_checkpointing else 3   # recomputing the forward pass costs one more
    flops_per_token = info["flops_per_token_forward"] * passes
    tokens_per_second = cfg.gpus * cfg.gpu_tflops * 1e12 * cfg.mfu / flops_per_token
    return {"preset": cfg.preset, "parameters": info["parameters"], "gpu_memory_bytes": limit, "layouts": rows,
            "flops_per_token": flops_per_token, "tokens_per_second": tokens_per_second,
            "days": cfg.tokens / tokens_per_second / 86400, "batch_tokens": batch_tokens}


def format_plan(result: dict, cfg: PlanConfig, most: int = 8) -> str:
    """The plan as text, its arithmetic shown."""
    def gb(n: float) -> str:
        return f"{n / GB:,.1f} GB"
    lines = [f"{cfg.preset}: {result['parameters'] / 1e9:,.1f}B parameters on {cfg.gpus} devices of "
             f"{gb(result['gpu_memory_bytes'])}; micro-batch {cfg.micro_batch}, activation checkpointing "
             f"{'on' if cfg.activation_checkpointing else 'off'}",
             f"model states: {STATE_BYTES_PER_PARAM} bytes/parameter (bf16 weights 2 + bf16 grads 2 + fp32 master "
             "and Adam moments 12), on the first pipeline stage (its blocks / tp, the embeddings whole; all / dp with FSDP)",
             "activations: bf16, attention scores not stored; with checkpointing 2*s*b*h bytes per block "
             "+ one block's s*b*h*(10 + 24/tp); 1F1B keeps n_layer blocks' worth on the first stage",
             f"batch: {result['batch_tokens']:,} tokens per step; m = micro-batches per step per pipeline, "
             "pipeline bubble (pp-1)/m",
             "", "| layout | params (stage / tp) | model states | activations | total | m | bubble | fits |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["layouts"][:most]:
        bubble = "-" if row["bubble"] is None else f"{row['bubble']:.1%}"
        lines.append(f"| {row['layout']} | {row['parameters'] / 1e9:,.2f}B | {gb(row['model_states'])} | "
                     f"{gb(row['activations'])} | {gb(row['total'])} | {row['micro_batches']} | {bubble} | "
                     f"{'yes' if row['fits'] else 'no'} |")
    hidden = len(result["layouts"]) - most
    if hidden > 0:
        lines.append(f"({hidden} more layouts; --tp / --pp / --fsdp to see one)")
    fitting = [row for row in result["layouts"] if row["fits"]]
    lines.append("")
    lines.append(f"smallest layout that fits: {fitting[0]['layout']}" if fitting else
                 "no layout fits: add devices, use FSDP, or a smaller micro-batch")
    lines.append(f"time: {result['flops_per_token'] / 1e9:,.1f} GFLOPs per token ({'4' if cfg.activation_checkpointing else '3'}"
                 f"x forward) / ({cfg.gpus} x {cfg.gpu_tflops:g} TFLOP/s x MFU {cfg.mfu:g}) = "
                 f"{result['tokens_per_second']:,.0f} tokens/s; {cfg.tokens:,.3g} tokens in {result['days']:,.1f} days")
    return "\n".join(lines)
