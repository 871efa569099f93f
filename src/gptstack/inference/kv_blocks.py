"""Who owns which block of the paged KV cache, and the prefix cache over them.

A block holds ``block_size`` consecutive positions of one sequence (kv_cache.py, in the model layer). Blocks are
reference-counted: a full block is named by a hash of its tokens and of every token before it (a
chain, as in vLLM), so a new request whose prompt starts with the same tokens takes the same blocks
instead of computing them again: a shared system prompt is prefilled once. A block nobody uses any
more keeps its contents and its name, and is reused for other tokens only when no never-named block
is free, least recently released first.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block: its tokens and (through ``parent``) all the tokens before them.
    A cryptographic hash, since a collision would hand one user's cached keys to another's text."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self.free: collections.deque[int] = collections.deque(range(num_blocks))   # unnamed, unused
        self.evictable: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # named, unused: LRU first
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def match(self, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks holding the longest run of ``tokens``' full blocks from the start (now
        referenced by the caller), and their names."""
        blocks, names = [], []
        if not self.prefix_caching:
            return blocks, names
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            name = chain_hash(names[-1] if names else b"", tokens[start:start + self.block_size])
            block = self.by_hash.get(name)
            if block is None:
                break
            self._take(block)
            blocks.append(block)
            names.append(name)
        return blocks, names

    def allocate(self) -> int | None:
        """A block for new tokens (None: the pool is exhausted)."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, name = self.evictable.popitem(last=False)
            del self.by_hash[name], self.hash_of[block]
        else:
            return None
        self.refs[block] = 1
        return block

    def name(self, block: int, parent: bytes, tokens: list[int]) -> bytes:
        """Record that ``block`` now holds these (full) ``tokens`` after ``parent``; returns its name.
        If an equal block is already named, the first keeps the name."""
        digest = chain_hash(parent, tokens)
        if self.prefix_caching and digest not in self.by_hash and block not in self.hash_of:
            self.by_hash[digest], self.hash_of[block] = block, digest
        return digest

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block (a finished or preempted sequence), newest first so the
        oldest tokens, the likeliest to be shared, are evicted last."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = self.hash_of[block]
                else:
                    self.free.append(block)

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1
