"""The GPT itself, as in GPT-2 / GPT-3, readable top to bottom.

token + learned position embeddings -> n_layer pre-LayerNorm blocks (causal self-attention, GELU
MLP) -> final LayerNorm -> LM head tied to the token embedding.

One forward path serves training, prefill and decode: ``forward(idx, targets, cache, positions)``.
With a :class:`KVCache`, keys and values are written at each token's absolute position, so rows of
a batch may sit at different positions (what continuous batching needs) while the tensors keep
static shapes. This module knows nothing of training or serving.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .loss import linear_cross_entropy


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: [n_layer, slots, n_head, max_len, head_dim].

    ``rows`` maps the batch rows of a forward call to cache slots (None: row i is slot i), so an
    engine can run any subset of its slots without moving cache memory around.
    """

    k: torch.Tensor
    v: torch.Tensor
    rows: torch.Tensor | slice | None = None

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "KVCache":
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.block_size, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def select(self, rows: list[int]) -> "KVCache":
        """The cache as seen by a batch whose row i uses slot ``rows[i]``. Consecutive slots are a
        view; any other set is gathered on read."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return KVCache(self.k, self.v, slice(rows[0], rows[0] + len(rows)))
        return KVCache(self.k, self.v, torch.tensor(rows, device=self.k.device))

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] at ``positions`` [B, T]; return each row's keys and values for
        positions [0, k_len)."""
        if isinstance(self.rows, torch.Tensor):
            k_cache, v_cache, rows = self.k[layer], self.v[layer], self.rows[:, None]
        else:
            span = self.rows or slice(0, k.shape[0])
            k_cache, v_cache = self.k[layer, span], self.v[layer, span]
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
        k_cache.transpose(1, 2)[rows, positions] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache.transpose(1, 2)[rows, positions] = v.transpose(1, 2).to(v_cache.dtype)
        if isinstance(self.rows, torch.Tensor):
            return k_cache[self.rows, :, :k_len], v_cache[self.rows, :, :k_len]
        return k_cache[:, :, :k_len], v_cache[:, :, :k_len]


def attention_mask(q_pos: torch.Tensor, k_len: int, band_width: int | None) -> torch.Tensor:
    """Boolean [B, 1, Tq, k_len] mask: a query at position p sees keys at positions <= p
    (and > p - band_width in a locally banded layer)."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    q = q_pos[:, None, :, None]
    allowed = k_pos <= q
    if band_width is not None:
        allowed = allowed & (k_pos > q - band_width)
    return allowed


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.layer = layer
        self.band_width = cfg.band_width if cfg.layer_is_banded(layer) else None
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)   # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def mask(self, positions: torch.Tensor, T: int, cached: bool) -> torch.Tensor | None:
        """This layer's attention mask with a cache; None without one (plain causal attention, or
        block-local attention for a banded layer, needs none)."""
        if not cached:
            return None
        return attention_mask(positions, int(positions.max()) + 1, self.band_width)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` as made by :meth:`mask` (GPT builds it once per forward, not per layer);
        built here when not given."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        dropout = self.attn_pdrop if self.training else 0.0
        if mask is None and cache is not None:
            mask = self.mask(positions, T, cached=True)

        if cache is None and self.band_width is not None and self.band_width < T:
            y = local_attention(q, k, v, self.band_width, dropout)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            # Write this step's keys/values at their absolute positions, then attend over the
            # cache up to the furthest position in the batch (rows mask out what is not theirs).
            keys, values = cache.update(self.layer, positions, k, v, mask.shape[-1])
            y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
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
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two residual adds per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())   # tied weights counted once

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states [B, T, n_embd]; heads (LM, classifier) sit on top."""
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
            positions = torch.arange(T, device=idx.device).expand(B, T)
        elif cache is not None and int(positions.max()) >= cache.max_len:
            raise ValueError(f"position {int(positions.max())} is past the KV cache length {cache.max_len}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        # Masks depend only on positions and the layer kind: build each kind once per forward.
        masks = {}
        for block in self.transformer.h:
            kind = block.attn.band_width
            if kind not in masks:
                masks[kind] = block.attn.mask(positions, T, cache is not None)
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, positions, None, masks[kind], use_reentrant=False)
            else:
                x = block(x, positions, cache, masks[kind])
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, label_smoothing: float = 0.0,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, or with ``targets`` the mean cross-entropy instead (-100 targets are ignored).

        The loss is fused with the LM head (see loss.py), so no logits come back with it.

        ``positions`` [B, T] are absolute positions, needed with a cache; ``last_only`` returns
        logits for the last position only, which is all that decoding needs.
        """
        h = self.hidden_states(idx, positions, cache)
        if targets is None:
            return self.lm_head(h[:, -1:] if last_only else h), None
        return None, linear_cross_entropy(h, self.lm_head.weight, targets, label_smoothing)
