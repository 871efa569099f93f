"""API keys, per-key rate limits and the request-body bound."""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class KeyStore:
    """The accepted API keys. Keys are kept only as SHA-256 digests and compared in constant
    time against every key, so neither timing nor an early exit tells which key nearly matched."""

    def __init__(self, keys: list[str]):
        self._digests = [(self.key_id(k), hashlib.sha256(k.encode()).digest()) for k in keys if k]

    @staticmethod
    def key_id(key: str) -> str:
        """A name for logs and metrics that does not reveal the key."""
        return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]

    @classmethod
    def from_sources(cls, keys: list[str] | None = None, keys_file: str | None = None,
                     env_var: str = "GPTSTACK_API_KEYS") -> "KeyStore":
        collected = list(keys or [])
        collected += [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
        if keys_file:
            path = Path(keys_file)
            if not path.is_file():
                raise FileNotFoundError(f"API keys file {path} does not exist")
            collected += [line.strip() for line in path.read_text().splitlines()
                          if line.strip() and not line.lstrip().startswith("#")]
        return cls(collected)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, presented: str | None) -> str | None:
        """The key id of ``presented`` if it is a valid key, else None."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key_id, expected in self._digests:
            if hmac.compare_digest(digest, expected):
                found = key_id
        return found


@dataclass
class Bucket:
    capacity: float
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets per key: one for requests per minute, one for tokens per minute.
    A limit of 0 means unlimited."""

    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0):
        self.limits = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key_id: str, tokens: int) -> float:
        """Take 1 request and ``tokens`` tokens from the key's buckets. Returns 0 on success, else
        the seconds to wait before the same request would fit (nothing is taken then)."""
        now = time.monotonic()
        wants = {"requests": 1, "tokens": tokens}
        with self._lock:
            buckets = {}
            for kind, limit in self.limits.items():
                if not limit:
                    continue
                bucket = self._buckets.setdefault((key_id, kind), Bucket(limit, limit, now))
                bucket.tokens = min(bucket.capacity, bucket.tokens + (now - bucket.updated) * limit / 60.0)
                bucket.updated = now
                buckets[kind] = bucket
            waits = [(wants[k] - b.tokens) * 60.0 / self.limits[k] for k, b in buckets.items() if b.tokens < wants[k]]
            if waits:
                return max(1.0, math.ceil(max(waits)))
            for kind, bucket in buckets.items():
                bucket.tokens -= wants[kind]
            return 0.0

    async def take(self, key_id: str, tokens: int) -> float:
        """``acquire`` as a limiter shared between processes offers it (awaited: replicas.py)."""
        return self.acquire(key_id, tokens)

    def exceeds_capacity(self, tokens: int) -> bool:
        """A request bigger than a whole minute's token budget can never pass."""
        return bool(self.limits["tokens"]) and tokens > self.limits["tokens"]


class BodyLimitMiddleware:
    """Answer 413 to request bodies over ``max_bytes`` (by Content-Length, or while streaming)."""

    def __init__(self, app, max_bytes: int, reject):
        self.app, self.max_bytes, self.reject = app, max_bytes, reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.reject(scope, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, counted_receive, send)
        except BodyTooLarge:
            await self.reject(scope, send)


class BodyTooLarge(Exception):
    pass
