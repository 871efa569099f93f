"""Paged keys and values: the KV cache as a pool of fixed-size blocks of positions.

Every layer's keys (and values) live in one tensor of ``num_blocks * block_size`` token slots; a
sequence owns a list of blocks (its block table), so position p of a sequence sits in slot
``table[p // block_size] * block_size + p % block_size``. Memory is then spent by tokens in flight,
not by reserving a whole context per request, and two sequences with the same prefix can point at
the same blocks (prefix caching; which blocks belong to whom is the engine's business).

One forward call runs a *flat batch*: the tokens of several sequences one after another
(``idx`` [1, N]), each sequence either one token (a decode step) or a chunk of its prompt. A
:class:`PagedBatch` is built once per call and says where each token's keys go and which keys each
query sees; attention then runs as two batched calls per layer (the one-token sequences together,
the chunks together), whatever the mix. This module is part of the model layer: it knows blocks and
positions, not requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .ops import paged_decode_attention


@dataclass
class PagedKVCache:
    k: list[torch.Tensor]          # per layer [num_blocks * block_size, n_head, head_dim]
    v: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "PagedKVCache":
        shape = (num_blocks * block_size, cfg.n_head, cfg.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)], block_size)

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block (keys and values of every layer), to size a pool before allocating it."""
        return 2 * cfg.n_layer * block_size * cfg.n_embd * dtype.itemsize

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0] // self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def batch(self, tables: torch.Tensor, starts: list[int], lengths: list[int]) -> "PagedBatch":
        """The view of one flat-batch forward: sequence i has its keys for positions < starts[i] in
        the blocks of ``tables[i]`` and brings ``lengths[i]`` new tokens. Sequences of one token
        come first (the engine orders them so)."""
        return PagedBatch(self, tables, starts, lengths)


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token slots of ``positions`` [S, L] for sequences with block tables ``tables`` [S, W]."""
    return tables.gather(1, positions // block_size) * block_size + positions % block_size


class PagedBatch:
    """Where one flat batch's keys go and what its queries see (built once, used by every layer)."""

    def __init__(self, cache: PagedKVCache, tables: torch.Tensor, starts: list[int], lengths: list[int]):
        self.cache = cache
        self.scale = cache.k[0].shape[-1] ** -0.5
        device, bs = tables.device, cache.block_size
        self.decodes = sum(1 for n in lengths if n == 1)
        if any(n != 1 for n in lengths[:self.decodes]):
            raise ValueError("one-token sequences must come first in a flat batch")
        self.tokens = sum(lengths)
        # built from Python lists in one go: a few small tensors per step, not a few per sequence
        positions = torch.tensor([p for s, n in zip(starts, lengths) for p in range(s, s + n)], device=device)
        owner = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)], device=device)
        self.positions = positions[None]                                           # [1, N], for the embeddings
        self.write_slots = tables[owner, positions // bs] * bs + positions % bs     # [N]
        self.groups = []
        if self.decodes:        # one query each, at position start
            self.groups.append(self._group(tables[:self.decodes], [s + 1 for s in starts[:self.decodes]]))
        if self.decodes < len(lengths):   # prompt chunks, queries padded to the longest chunk
            chunk_starts, chunk_lengths = starts[self.decodes:], lengths[self.decodes:]
            longest = max(chunk_lengths)
            offsets = torch.arange(longest, device=device)
            valid = offsets < torch.tensor(chunk_lengths, device=device)[:, None]                # [P, T]
            first_token = torch.tensor([self.decodes + sum(chunk_lengths[:i]) for i in range(len(chunk_lengths))],
                                       device=device)
            # a padded query repeats its chunk's last token: computed, then dropped with the padding
            token_index = torch.minimum(first_token[:, None] + offsets,
                                        (first_token + torch.tensor(chunk_lengths, device=device) - 1)[:, None])
            q_pos = torch.tensor(chunk_starts, device=device)[:, None] + offsets
            group = self._group(tables[self.decodes:], [s + n for s, n in zip(chunk_starts, chunk_lengths)])
            k_pos = torch.arange(group["key_slots"].shape[1], device=device)
            group.update(chunks=(token_index, valid.flatten().nonzero()[:, 0]), masks={},
                         gap=q_pos[:, None, :, None] - k_pos,         # [S, 1, T, L]: how far back each key is
                         in_sequence=(k_pos < group["key_lengths"][:, None])[:, None, None, :])
            self.groups.append(group)

    def _group(self, tables, key_lengths):
        """Keys every query of the group may read (positions < its sequence's length), as token
        slots [S, L], and those lengths. The chunk group adds the masks over the keys (the decode
        group needs none: paged_decode_attention takes the lengths)."""
        longest = max(key_lengths)
        k_pos = torch.arange(longest, device=tables.device)
        key_slots = _slots(tables, k_pos.expand(len(key_lengths), longest).clamp(max=tables.shape[1] *
                                                                                 self.cache.block_size - 1),
                           self.cache.block_size)
        return {"key_slots": key_slots, "key_lengths": torch.tensor(key_lengths, device=tables.device),
                "chunks": None}

    @staticmethod
    def _mask(group: dict, band_width: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (0 or -inf) over the group's keys, made once per forward for each kind of
        layer: a boolean mask would be converted by every attention call."""
        if (band_width, dtype) not in group["masks"]:
            seen = (group["gap"] >= 0) & group["in_sequence"]
            if band_width is not None:
                seen &= group["gap"] < band_width
            group["masks"][band_width, dtype] = torch.zeros(seen.shape, dtype=dtype,
                                                            device=seen.device).masked_fill_(~seen, float("-inf"))
        return group["masks"][band_width, dtype]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               band_width: int | None) -> torch.Tensor:
        """Store this call's keys and values [1, H, N, D], then attend: [1, H, N, D] out."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        k_pool[self.write_slots] = k[0].transpose(0, 1).to(k_pool.dtype)
        v_pool[self.write_slots] = v[0].transpose(0, 1).to(v_pool.dtype)
        queries = q[0].transpose(0, 1)                                   # [N, H, D]
        outputs = []
        for group in self.groups:
            if group["chunks"] is None:    # one query per sequence: the keys are read in place, not gathered
                outputs.append(paged_decode_attention(queries[:self.decodes], k_pool, v_pool, group["key_slots"],
                                                      group["key_lengths"], band_width or 0, self.scale))
                continue
            keys = k_pool[group["key_slots"]].transpose(1, 2).to(q.dtype)     # [S, H, L, D]
            values = v_pool[group["key_slots"]].transpose(1, 2).to(q.dtype)
            token_index, kept = group["chunks"]
            group_q = queries[token_index].transpose(1, 2)                    # [P, H, T, D]
            y = F.scaled_dot_product_attention(group_q, keys, values, attn_mask=self._mask(group, band_width, q.dtype))
            outputs.append(y.transpose(1, 2).flatten(0, 1)[kept])             # the real queries, in order
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).transpose(0, 1)[None]
