"""The GPT itself, as in GPT-2 / GPT-3, readable top to bottom.

token + learned position embeddings -> n_layer pre-LayerNorm blocks (causal self-attention, GELU
MLP) -> final LayerNorm -> LM head tied to the token embedding.

One path serves training, prefill and decode: ``hidden_states(idx, cache)``. With a paged KV
cache (kv_cache.py), ``idx`` is a flat batch of several sequences' tokens, each at its own position:
one-token decode steps and prompt chunks side by side in one forward, which is what continuous
batching needs. With ``documents``, a row holds several texts packed one after another (fine-tuning
packs conversations so): each attends only to itself and counts its positions from 0, so its
logits are the ones it would get alone. This module knows nothing of training or serving.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import PagedBatch
from .loss import linear_cross_entropy


QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")   # attention's input projections, by module name


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention in which each query sees only the ``band`` newest keys, itself included,
    computed block by block: the sequence is cut into blocks of ``band`` queries, and block i attends
    to key blocks i - 1 and i only. The work and the score memory are T x 2 band instead of T x T
    (at T 2048, band 256: a quarter); the result is the dense banded attention's. The first block has
    no previous one and is plain causal attention; all the others share one additive mask."""
    B, H, T, D = q.shape
    blocks = -(-T // band)
    pad = blocks * band - T   # padded keys are later than every real query, so causality hides them
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    head = slice(0, band)
    first = F.scaled_dot_product_attention(q[:, :, head], k[:, :, head], v[:, :, head], dropout_p=dropout_p,
                                           is_causal=True)
    if blocks == 1:
        return first[:, :, :T]

    def blocks_from(t: torch.Tensor, start: int) -> torch.Tensor:   # blocks start .. start + blocks - 2
        return t[:, :, start * band:(start + blocks - 1) * band].reshape(B, H * (blocks - 1), band, D)
    keys = torch.cat([blocks_from(k, 0), blocks_from(k, 1)], dim=2)       # previous block, then this one
    values = torch.cat([blocks_from(v, 0), blocks_from(v, 1)], dim=2)
    rest = F.scaled_dot_product_attention(blocks_from(q, 1), keys, values, dropout_p=dropout_p,
                                          attn_mask=local_band_bias(band, q.device, q.dtype))
    return torch.cat([first, rest.view(B, H, (blocks - 1) * band, D)], dim=2)[:, :, :T]


@functools.lru_cache(maxsize=8)
def local_band_bias(band: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[band, 2 band] additive mask: query i of a block sees key j of (previous block + this block)
    iff i < j <= i + band. Additive in the query's dtype, so the attention kernel converts nothing."""
    i = torch.arange(band, device=device)[:, None]
    j = torch.arange(2 * band, device=device)[None]
    bias = torch.zeros(band, 2 * band, device=device, dtype=dtype)
    return bias.masked_fill(~((j > i) & (j <= i + band)), float("-inf"))


@functools.lru_cache(maxsize=8)
def band_mask(T: int, band: int, device: torch.device) -> torch.Tensor:
    """[T, T]: key j is among the ``band`` newest keys of query i (j > i - band; causality apart)."""
    i = torch.arange(T, device=device)[:, None]
    return torch.arange(T, device=device)[None] > i - band


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[B, T] document number of each token -> its position within its document."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean: query i may see key j iff j <= i and both are in the same document."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. q, k and v have a projection each, so tensor parallelism can
    shard every one of them by heads; the forward pass reads the number of heads from the projected
    width, and so runs unchanged on a shard of them."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.layer = layer
        self.band_width = cfg.band_width if cfg.layer_is_banded(layer) else None
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        self.register_load_state_dict_pre_hook(split_fused_qkv)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cache: PagedBatch | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention over ``x`` itself, or with a cache over what the cache holds for each
        sequence of the flat batch (which writes this call's keys and values first), or under
        ``mask`` (packed documents: see document_mask)."""
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.project_qkv(x))
        dropout = self.attn_pdrop if self.training else 0.0
        if cache is not None:
            y = cache.attend(self.layer, q, k, v, self.band_width)
        elif mask is not None:
            if self.band_width is not None:
                mask = mask & band_mask(T, self.band_width, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif self.band_width is not None and self.band_width < T:
            y = local_attention(q, k, v, self.band_width, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


def split_fused_qkv(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Load-state-dict pre-hook: weights saved when q, k and v shared one projection, ``c_attn``
    (rows q; k; v), get split into the three, so old checkpoints, init_from weights and LoRA
    adapters still load. LoRA's A acts on the input, which all three share, so each gets a copy."""
    fused_prefix = prefix + "c_attn."
    for key in [k for k in state_dict if k.startswith(fused_prefix)]:
        name = key.removeprefix(fused_prefix)
        fused = state_dict.pop(key)
        parts = [fused] * 3 if name == "lora_A" else fused.chunk(3)
        for projection, part in zip(QKV_PROJECTIONS, parts):
            state_dict[f"{prefix}{projection}.{name}"] = part.clone()   # a tensor of its own: trainable, saveable


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU(approximate="tanh" if cfg.activation == "gelu" else "none")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: PagedBatch | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


def initial_value(cfg: ModelConfig, name: str, shape: torch.Size, seed: int, index: int) -> torch.Tensor:
    """GPT-2's initial value of parameter ``name`` (the ``index``-th of named_parameters()), on the CPU:
    weights and embeddings normal(0, 0.02), residual projections (``c_proj``) scaled by 1/sqrt(2 n_layer)
    for the two residual adds per block, zero biases, unit LayerNorm gains. Each parameter draws from
    its own generator, seeded by (seed, index), so a model built in shards on many devices draws
    exactly the values the single-process model does, one parameter at a time."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if ".ln_" in f".{name}":
        return torch.ones(shape)
    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
    return torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(seed + index))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        seed = int(torch.randint(2 ** 62, (), device="cpu"))   # the first draw after torch.manual_seed: see init_weights
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.embd_pdrop),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight   # tied embeddings
        self.activation_checkpointing = False
        if self.lm_head.weight.device.type != "meta":   # a meta model is materialised shard by shard (train/parallel.py)
            self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        """Every parameter set to :func:`initial_value` (drawn from ``seed``)."""
        with torch.no_grad():
            for index, (name, param) in enumerate(self.named_parameters()):
                param.copy_(initial_value(self.config, name, param.shape, seed, index))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())   # tied weights counted once

    def hidden_states(self, idx: torch.Tensor, cache: PagedBatch | None = None,
                      documents: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states [B, T, n_embd]; heads (LM, classifier) sit on top. With a
        cache, ``idx`` [1, N] is a flat batch of several sequences' tokens at the cache's positions.
        With ``documents`` [B, T] (each token's document number, runs of equal numbers), each
        document of a row is attended and positioned as if it were alone."""
        B, T = idx.shape
        mask = None
        if cache is not None:
            positions = cache.positions
        elif T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
        elif documents is not None:
            positions, mask = document_positions(documents), document_mask(documents)
        else:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, None, mask, use_reentrant=False)
            else:
                x = block(x, cache, mask)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, label_smoothing: float = 0.0,
                documents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, or with ``targets`` the mean cross-entropy instead (-100 targets are ignored);
        ``documents`` as in :meth:`hidden_states`.

        The loss is fused with the LM head (see loss.py), so no logits come back with it.
        Decoding with a KV cache goes through :meth:`hidden_states` (see inference/engine.py).
        """
        h = self.hidden_states(idx, documents=documents)
        if targets is None:
            return self.lm_head(h), None
        return None, linear_cross_entropy(h, self.lm_head.weight, targets, label_smoothing)
