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


QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")   # attention's input projections, by module name


@dataclass
class KVCache:
    """Preallocated keys and values, one [slots, n_head, length, head_dim] pair per layer.

    A dense layer keeps ``max_len`` positions. A locally banded layer never looks further back than
    its band, so it keeps only ``band_width`` positions, as a ring in which position p sits at
    p % band_width: GPT-3's banded layers (band 256, context 2048) then cache an eighth as much.

    ``rows`` maps the batch rows of a forward call to cache slots (None: row i is slot i), so an
    engine can run any subset of its slots without moving cache memory around. A row's positions
    within a call are consecutive, and its slot already holds every earlier position (a new request
    starts at 0): the masks rely on both, which is how the ring's contents are known without a
    per-slot record of them.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    rows: torch.Tensor | slice | None = None

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "KVCache":
        shapes = [(batch_size, cfg.n_head, length, cfg.head_dim)
                  for length in cls.layer_lengths(cfg, max_len or cfg.block_size)]
        return cls([torch.zeros(shape, device=device, dtype=dtype) for shape in shapes],
                   [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes])

    @staticmethod
    def layer_lengths(cfg: ModelConfig, max_len: int) -> list[int]:
        """Positions each layer keeps: max_len, or its band for a locally banded layer."""
        return [min(cfg.band_width, max_len) if cfg.layer_is_banded(layer) else max_len
                for layer in range(cfg.n_layer)]

    @classmethod
    def slot_bytes(cls, cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
        """Bytes of one slot (keys and values of every layer), to size a cache before allocating it."""
        return 2 * sum(cls.layer_lengths(cfg, max_len)) * cfg.n_embd * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    @property
    def max_len(self) -> int:
        return max(t.shape[2] for t in self.k)

    def ring_len(self, layer: int) -> int:
        return self.k[layer].shape[2]

    def select(self, rows: list[int]) -> "KVCache":
        """The cache as seen by a batch whose row i uses slot ``rows[i]``. Consecutive slots are a
        view; any other set is gathered on read."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return KVCache(self.k, self.v, slice(rows[0], rows[0] + len(rows)))
        return KVCache(self.k, self.v, torch.tensor(rows, device=self.k[0].device))

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense layer: write k, v [B, H, T, D] at ``positions`` [B, T]; return each row's keys and
        values for positions [0, k_len)."""
        k_cache, v_cache, rows = self._layer(layer, k.shape[0])
        self._write(k_cache, v_cache, rows, positions, k, v)
        return self._read(k_cache, k_len), self._read(v_cache, k_len)

    def update_ring(self, layer: int, positions: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Banded layer: return each row's ring as it was before this call followed by k, v
        [B, H, T, D] (a chunk longer than the band overwrites ring slots its own first queries
        still need), then keep the newest ring length of them in the ring, position p at p % length."""
        k_ring, v_ring, rows = self._layer(layer, k.shape[0])
        length = k_ring.shape[2]
        keys = torch.cat([self._read(k_ring, length).to(k.dtype), k], dim=2)
        values = torch.cat([self._read(v_ring, length).to(v.dtype), v], dim=2)
        newest = slice(-length, None)
        self._write(k_ring, v_ring, rows, positions[:, newest] % length, k[:, :, newest], v[:, :, newest])
        return keys, values

    def _layer(self, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's keys and values as this batch addresses them, and each batch row's index there."""
        if isinstance(self.rows, torch.Tensor):
            return self.k[layer], self.v[layer], self.rows
        span = self.rows or slice(0, batch)
        return self.k[layer][span], self.v[layer][span], torch.arange(batch, device=self.k[layer].device)

    @staticmethod
    def _write(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, index: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor) -> None:
        k_cache.transpose(1, 2)[rows[:, None], index] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache.transpose(1, 2)[rows[:, None], index] = v.transpose(1, 2).to(v_cache.dtype)

    def _read(self, layer_cache: torch.Tensor, length: int) -> torch.Tensor:
        """The first ``length`` positions of this batch's rows: a view, or a gather for scattered slots."""
        if isinstance(self.rows, torch.Tensor):
            return layer_cache[self.rows, :, :length]
        return layer_cache[:, :, :length]


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, band_width: int | None) -> torch.Tensor:
    """Whether a query at q_pos sees a key at k_pos (broadcast): k <= q, and k > q - band_width in
    a locally banded layer."""
    allowed = k_pos <= q_pos
    if band_width is not None:
        allowed = allowed & (k_pos > q_pos - band_width)
    return allowed


def attention_mask(q_pos: torch.Tensor, k_len: int, band_width: int | None) -> torch.Tensor:
    """Boolean [B, 1, Tq, k_len] mask over keys at positions 0 .. k_len - 1 (a dense layer's cache)."""
    return visible(q_pos[:, None, :, None], torch.arange(k_len, device=q_pos.device), band_width)


def ring_attention_mask(q_pos: torch.Tensor, ring_len: int, band_width: int) -> torch.Tensor:
    """Boolean [B, 1, Tq, ring_len + Tq] mask over a banded layer's keys as
    :meth:`KVCache.update_ring` returns them: the ring, then the call's own keys. Ring slot j holds
    the newest position before the row's first query that is j modulo ring_len, if the row has one."""
    start = q_pos[:, :1]
    held = start - 1 - (start - 1 - torch.arange(ring_len, device=q_pos.device)) % ring_len   # [B, ring_len]
    q = q_pos[:, None, :, None]
    ring = visible(q, held[:, None, None, :], band_width) & (held >= 0)[:, None, None, :]
    own = visible(q, q_pos[:, None, None, :], band_width)
    return torch.cat([ring, own], dim=-1)


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

    def mask(self, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
        """This layer's attention mask over the keys the cache returns; None without a cache (plain
        causal attention, or block-local attention for a banded layer, needs none)."""
        if cache is None:
            return None
        if self.band_width is not None:
            return ring_attention_mask(positions, cache.ring_len(self.layer), self.band_width)
        return attention_mask(positions, int(positions.max()) + 1, None)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` as made by :meth:`mask` (GPT builds it once per forward, not per layer);
        built here when not given."""
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.project_qkv(x))
        dropout = self.attn_pdrop if self.training else 0.0
        if mask is None and cache is not None:
            mask = self.mask(positions, cache)

        if cache is None and self.band_width is not None and self.band_width < T:
            y = local_attention(q, k, v, self.band_width, dropout)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            # Write this step's keys/values at their positions, then attend over what the cache
            # holds for each row (the mask hides what is not theirs).
            if self.band_width is not None:
                keys, values = cache.update_ring(self.layer, positions, k, v)
            else:
                keys, values = cache.update(self.layer, positions, k, v, mask.shape[-1])
            y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, dropout_p=dropout)
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, cache, mask)
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
                masks[kind] = block.attn.mask(positions, cache)
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
