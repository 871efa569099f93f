"""The inference engine: many requests at once with continuous batching. No HTTP in here.

One background thread owns the model and a paged KV cache: a pool of blocks of ``block_size``
positions that requests take as they grow (kv_blocks.py), so concurrency is bounded by tokens in
flight, not by whole contexts reserved per request, and a prompt prefix already in the cache (a
shared system prompt) is not computed again. Each iteration of its loop:

1. drops cancelled requests that are still waiting, then admits waiting requests, first come first
   served, while there are free rows and free blocks for their prompts, counting the blocks those
   admitted before them will take (the waiting queue is bounded: ``submit`` refuses at once when it
   is full, so callers can answer 429/503);
2. runs queued calls (a classifier's forward over the same weights) and drops cancelled running
   requests;
3. with ``context_shift``, sends a request whose context is full back to compute its newest half
   (otherwise such requests are refused at ``submit``);
4. schedules one forward of at most ``step_tokens`` tokens: one token for every request that is
   decoding, then prompt chunks, shortest remaining prompt first, in what is left of the budget
   (vLLM's chunked prefill), so a long prompt never stalls the decoding and a short running one
   never waits behind a long one; a request that finds no free block preempts the newest running
   request not scheduled yet this step, which will compute its context again later (its earlier
   blocks are likely still cached);
5. runs that one forward (kv_cache.py: decode rows and chunks side by side) and samples a token for
   every request whose context is now all computed.

Requests join and leave the batch between iterations. Outputs go to a per-request
:class:`RequestHandle`, iterable from threads (``for event in handle``) and from asyncio
(``async for event in handle``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..kv_cache import PagedKVCache
from ..model import GPT
from ..tokenizer import IncrementalDecoder, Tokenizer
from .decode_stack import DecodeStack
from .fused import fuse_qkv
from .kv_blocks import BlockPool
from .sampling import SamplingParams, apply_penalties, sample
from .stops import StopMatcher
from .structured import Constraint, check_grammar, mask_logits


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound; try again later."""


log = logging.getLogger("gptstack.engine")


class EngineStopped(RuntimeError):
    """The engine is shutting down (or its loop failed) and takes no new requests."""


class RequestFailed(RuntimeError):
    """One request failed in the engine (its sampling, grammar, text or stops met a fault); the
    engine ended it alone and serves the others."""


@dataclass
class EngineConfig:
    max_batch_size: int = 8            # requests running at once (decoded together)
    max_seq_len: int = 0               # longest context of a request; 0 = the model's context
    max_queue: int = 64                # requests waiting to run before submit() refuses
    step_tokens: int = 256             # tokens per forward: a token per decoding request + prompt chunks
    block_size: int = 16               # positions per KV cache block
    kv_cache_memory: int = 0           # bytes for the KV cache; 0 = max_batch_size full contexts
    prefix_caching: bool = True        # reuse the cached blocks of a prompt prefix seen before
    context_shift: bool = False        # past max_seq_len, keep the newest half and go on (else refuse)
    fused_decode: bool = True          # run decode-only steps as one C++ call where the model allows (decode_stack.py)

    def validate(self) -> "EngineConfig":
        for name in ("max_batch_size", "max_queue", "step_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.step_tokens < self.max_batch_size:
            raise ValueError(f"step_tokens ({self.step_tokens}) must be at least max_batch_size "
                             f"({self.max_batch_size}): every running request decodes one token per step")
        return self


def check_request(prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, vocab_size: int,
                  max_seq_len: int, context_shift: bool = False) -> None:
    """Raise ValueError if a request can never run on a model of this vocabulary and context
    (empty, too long, ids outside the vocabulary, bad params or grammar); Engine.check, and the
    router of serve/replicas.py, which has no engine of its own."""
    params.validate()
    if params.grammar:
        check_grammar(tokenizer, params.grammar)
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    if not context_shift and len(prompt_ids) + params.max_new_tokens > max_seq_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_new_tokens}: "
                         f"together more than the context of {max_seq_len} tokens; shorten the prompt "
                         f"or lower max_tokens")
    for name, ids in (("prompt", prompt_ids), ("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} token ids {bad[:5]} are outside the vocabulary of {vocab_size}")


@dataclass
class TokenEvent:
    """One step of a request's output. ``text`` may be empty while bytes of a character or a
    possible stop string are held back; the last event has a ``finish_reason``."""

    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None      # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)


class RequestHandle:
    """The consumer's side of a request: iterate over its events, or cancel it."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._cond = threading.Condition()
        self._loop = loop
        self._ready = asyncio.Event() if loop is not None else None
        self.cancelled = False
        self.finished = False
        self.error: Exception | None = None     # set when the request or the engine loop failed
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating; its row and blocks are freed at the engine's next step."""
        self.cancelled = True

    def _push(self, event: TokenEvent | None) -> None:   # engine thread; None: only wake the consumer
        with self._cond:
            if event is not None:
                self._events.append(event)
            self._cond.notify_all()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._ready.set)

    def _fail(self, error: Exception) -> None:   # engine thread: the request cannot finish
        self.error = error
        self.finished = True
        self._push(None)

    def drain(self) -> list[TokenEvent]:
        """The events that have arrived, without waiting (for a caller that runs the loop itself);
        raises the engine's failure once they are consumed."""
        with self._cond:
            events = list(self._events)
            self._events.clear()
            if self._ready is not None:
                self._ready.clear()
        if not events and self.error is not None:
            raise self.error
        return events

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._cond:
                while not self._events:
                    if self.error is not None:
                        raise self.error
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self):
        if self._ready is None:
            raise RuntimeError("submit() was called outside an event loop; iterate with a plain for loop")
        while True:
            await self._ready.wait()
            for event in self.drain():
                yield event
                if event.finish_reason is not None:
                    return


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int]
    decoder: IncrementalDecoder
    stops: StopMatcher
    context: list[int]                       # the tokens at positions 0.. of its cache: prompt + output
    row: int = -1                            # its row of the penalty state and the block tables
    blocks: list[int] = field(default_factory=list)
    names: list[bytes] = field(default_factory=list)   # prefix-cache names of its full blocks
    computed: int = 0                        # positions of context already in the cache
    output: list[int] = field(default_factory=list)
    constraint: Constraint | None = None     # the grammar its output must follow (structured.py)

    def keep_newest(self, length: int) -> None:
        """Make the last ``length`` tokens of the context the whole context (a context shift)."""
        self.context = self.context[-length:]


class Engine:
    """Serves ``model``, whose q, k and v projections it fuses in place (see fused.py)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 device: torch.device | str = "cpu"):
        self.model, self.tokenizer = fuse_qkv(model.eval()), tokenizer
        self.config = (config or EngineConfig()).validate()
        self.device = torch.device(device)
        cfg = model.config
        self.max_seq_len = min(self.config.max_seq_len or cfg.block_size, cfg.block_size)
        self._shift_keep = max(1, self.max_seq_len // 2)     # context kept by a context shift
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        block_size = self.config.block_size
        blocks_per_context = -(-self.max_seq_len // block_size)
        num_blocks = self.config.max_batch_size * blocks_per_context
        if self.config.kv_cache_memory:
            num_blocks = self.config.kv_cache_memory // PagedKVCache.block_bytes(cfg, block_size, dtype)
            if num_blocks < blocks_per_context:
                raise ValueError(f"kv_cache_memory {self.config.kv_cache_memory} bytes holds {num_blocks} blocks "
                                 f"of {block_size} positions, less than one context of {self.max_seq_len}; "
                                 f"raise it or lower max_seq_len")
        self.cache = PagedKVCache.allocate(cfg, num_blocks, block_size, device=self.device, dtype=dtype)
        self.blocks = BlockPool(num_blocks, block_size, self.config.prefix_caching)
        self._decode_stack = DecodeStack.of(self.model, self.cache) if self.config.fused_decode else None
        self.slots = self.config.max_batch_size
        # per running request (by row): its block table, and penalty state: generated-token counts
        # and a "seen" mask (prompt + output)
        self._tables = torch.zeros(self.slots, blocks_per_context, dtype=torch.long, device=self.device)
        self._counts = torch.zeros(self.slots, cfg.vocab_size, device=self.device)
        self._seen = torch.zeros(self.slots, cfg.vocab_size, dtype=torch.bool, device=self.device)
        self._free = list(range(self.slots))
        self._active: list[_Request] = []
        self._waiting: collections.deque[_Request] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._running = False
        self._inline = False        # a generate()/stream() is running the loop in its caller's thread
        self._thread: threading.Thread | None = None
        self.failure: EngineStopped | None = None    # why the loop died, if it did
        self.stats = collections.Counter()       # requests, tokens, cancelled, steps ...

    # --- lifecycle ------------------------------------------------------------------------------
    # The loop runs either in a background thread (start) or in the caller's thread (run). On CPU,
    # prefer run() on the main thread when the main thread has already run torch ops (loading the
    # model does): a second thread then gets its own OpenMP team and, measured here, decodes at
    # about half the speed. `gptstack serve` runs the engine on the main thread and uvicorn beside it.
    @property
    def running(self) -> bool:
        return self._running

    @property
    def alive(self) -> bool:
        """Running, and (when started in the background) its loop thread has not died."""
        return self._running and (self._thread is None or self._thread.is_alive())

    def start(self) -> "Engine":
        """Run the loop in a background thread (for asyncio callers and tests)."""
        self._refuse_while_inline()
        with self._lock:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._serve, name="gptstack-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop in this thread until shutdown() is called from another one; raises
        EngineStopped if the loop failed."""
        with self._lock:
            self._running = True
        self._serve()
        if self.failure is not None:
            raise self.failure

    def shutdown(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
            self._thread = None
        for request in list(self._active) + list(self._waiting):
            self._finish(request, "cancelled")
        while self._calls:
            self._calls.popleft()[1].set_exception(EngineStopped("the engine stopped"))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._active)

    @property
    def kv_cache_bytes(self) -> int:
        """Memory of the KV cache's block pool."""
        return self.cache.nbytes

    # --- API ------------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if this request can never run here (empty, too long, bad params)."""
        check_request(prompt_ids, params, self.tokenizer, self.model.config.vocab_size, self.max_seq_len,
                      self.config.context_shift)

    def submit(self, prompt_ids: list[int], params: SamplingParams, block: bool = False) -> RequestHandle:
        """Queue a request; returns its handle at once. Raises QueueFull when the waiting queue is
        at its bound (unless ``block``), ValueError when the request is invalid."""
        self.check(prompt_ids, params)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(next(self._ids), loop)
        generator = torch.Generator(device=self.device)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        generator.manual_seed(seed % 2**64)   # any integer: torch takes 64 bits, a negative one as its two's complement
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else {self.tokenizer.eot_id})
        prompt = list(prompt_ids)
        request = _Request(handle, prompt, params, generator, stop_ids, IncrementalDecoder(self.tokenizer),
                           StopMatcher(params.stop), context=list(prompt),
                           constraint=Constraint(self.tokenizer, params.grammar) if params.grammar else None)
        with self._lock:
            if not self._running:
                raise EngineStopped("the engine is not running")
            while len(self._waiting) >= self.config.max_queue:
                if not block:
                    raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue)")
                self._lock.wait(timeout=0.1)
            self._waiting.append(request)
            self.stats["requests"] += 1
            self._lock.notify_all()
        return handle

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine's thread between two steps (e.g. a classifier's forward pass
        over the same weights), so all model work stays on one thread; its Future has the result.
        Raises QueueFull / EngineStopped as submit() does."""
        future: Future = Future()
        with self._lock:
            if not self._running:
                raise EngineStopped("the engine is not running")
            if len(self._calls) >= self.config.max_queue:
                raise QueueFull(f"{len(self._calls)} calls are already waiting (max_queue)")
            self._calls.append((fn, future))
            self._lock.notify_all()
        return future

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> list[Completion]:
        """Complete every prompt (batch use). Without a running loop, runs it in this thread."""
        self._refuse_while_inline()
        ids = [self._token_ids(p) for p in prompts]
        if self._running:
            handles = [self.submit(p, params, block=True) for p in ids]
        else:
            for handles in self._run_inline(ids, params):
                pass
        results = []
        for prompt, handle in zip(ids, handles):
            events = list(handle)
            results.append(Completion(text="".join(e.text for e in events),
                                      token_ids=[e.token_id for e in events if e.token_id is not None],
                                      finish_reason=events[-1].finish_reason, prompt_tokens=len(prompt),
                                      logprobs=[e.logprob for e in events if e.logprob is not None]))
        return results

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """One request's events as they are made. Without a running loop, runs it in this thread
        between events (the fast place on a CPU, see above)."""
        self._refuse_while_inline()
        ids = self._token_ids(prompt)
        handle = None
        try:
            if self._running:
                handle = self.submit(ids, params, block=True)
                yield from handle
            else:
                for [handle] in self._run_inline([ids], params):
                    yield from handle.drain()
        finally:
            if handle is not None:
                handle.cancel()     # no-op when finished; frees the request's blocks when the caller stopped early

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt

    def _run_inline(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[RequestHandle]]:
        """Run the loop in this thread until every prompt is done, yielding their handles once all
        are submitted and again after each step (so the caller can stream)."""
        self._running = self._inline = True
        try:
            handles = []
            for prompt in prompts:
                while len(self._waiting) >= self.config.max_queue:
                    self._step_inline()
                handles.append(self.submit(prompt, params))
            yield handles
            while not all(h.finished for h in handles):
                self._step_inline()
                yield handles
        finally:
            self._running = self._inline = False

    def _refuse_while_inline(self) -> None:
        """A second caller would wait for a loop that only the paused first one drives."""
        if self._inline:
            raise RuntimeError("this engine is decoding for an unfinished stream() in this thread; finish it "
                               "first, or call engine.start() so that one loop serves every caller")

    def _step_inline(self) -> None:
        # inference mode only around the step: a generator must not leave it on in its caller's code
        with torch.inference_mode():
            self._wait_for_work()
            self._step()

    # --- the loop -------------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            with torch.inference_mode():
                while self._wait_for_work():
                    self._step()
        except Exception as exc:   # a bug or an out-of-memory: end every request with it, take no more
            log.exception("the engine loop failed; it takes no more requests")
            self.failure = EngineStopped(f"the engine failed ({type(exc).__name__}: {exc})")
            self._fail_all(self.failure)

    def _fail_all(self, error: EngineStopped) -> None:
        with self._lock:
            self._running = False
            requests = list(self._active) + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
            self._lock.notify_all()
        for request in requests:
            request.handle._fail(error)
        while self._calls:
            self._calls.popleft()[1].set_exception(error)

    def _wait_for_work(self) -> bool:
        """Block until there is something to do (False: shut down), then admit what fits."""
        with self._lock:
            while self._running and not self._waiting and not self._active and not self._calls:
                self._lock.wait(timeout=0.5)   # a timeout lets a main thread run its signal handlers
            if not self._running:
                return False
            for request in [r for r in self._waiting if r.handle.cancelled]:
                self._finish(request, "cancelled")
            promised = 0      # blocks the requests admitted in this pass will take for their prompts
            while self._waiting and self._free:
                missing = self._admit(self._waiting[0], self.blocks.available - promised)
                if missing is None:
                    break
                promised += missing
                self._waiting.popleft()
            self._lock.notify_all()     # room in the queue for blocked submitters
            return True

    def _step(self) -> None:
        """One iteration: queued calls, drop cancelled requests, then one forward for everyone."""
        while self._calls:
            fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:   # handed to the caller, who decides what it means
                    future.set_exception(exc)
        for request in [r for r in self._active if r.handle.cancelled]:
            self._finish(request, "cancelled")
        if self.config.context_shift:
            for request in self._active:
                if len(request.context) > self.max_seq_len:
                    self._shift(request)
        plan = self._schedule()
        if plan:
            self._forward(plan)
        self.stats["steps"] += 1

    def _shift(self, request: _Request) -> None:
        """Keep the newest half of a full context and compute it again (its next token is sampled
        from that); the old blocks stay in the prefix cache for whoever shares them."""
        self.blocks.release(request.blocks)
        request.keep_newest(self._shift_keep)
        self._attach_cached_prefix(request)
        self.stats["prefix_cache_hit_tokens"] += request.computed
        self.stats["context_shifts"] += 1

    def _attach_cached_prefix(self, request: _Request) -> None:
        """Give the request the cached blocks of its context's longest cached prefix (at least its
        last token is left to compute: its logits give the next token)."""
        request.blocks, request.names = self.blocks.match(request.context[:-1])
        request.computed = len(request.blocks) * self.blocks.block_size
        self._tables[request.row, :len(request.blocks)] = torch.tensor(request.blocks, dtype=torch.long)

    def _admit(self, request: _Request, free_blocks: int) -> int | None:
        """Start a waiting request if a row and the blocks for its context are free; returns how
        many blocks it still has to take (None: it stays first in line, so admission is first come,
        first served)."""
        if len(request.context) > self.max_seq_len:     # only with context_shift: check() refuses it otherwise
            request.keep_newest(self._shift_keep)
            self.stats["context_shifts"] += 1
        request.row = self._free[0]
        self._attach_cached_prefix(request)
        missing = -(-len(request.context) // self.blocks.block_size) - len(request.blocks)
        if missing > free_blocks:
            self.blocks.release(request.blocks)
            request.blocks, request.names, request.computed = [], [], 0
            return None
        self._free.pop(0)
        if request.params.has_penalties:
            self._counts[request.row].zero_()
            self._seen[request.row].zero_()
            self._seen[request.row, torch.tensor(request.prompt + request.output, device=self.device)] = True
            if request.output:   # a preempted request: its counts so far
                self._counts[request.row].index_add_(0, torch.tensor(request.output, device=self.device),
                                                     torch.ones(len(request.output), device=self.device))
        self._active.append(request)
        self.stats["prefix_cache_hit_tokens"] += request.computed
        return missing

    def _schedule(self) -> list[tuple[_Request, int]]:
        """This step's work, as (request, tokens to compute) within ``step_tokens``: one token for
        each decoding request, then prompt chunks, shortest remaining first. One-token entries
        come first (the order kv_cache.PagedBatch wants)."""
        budget = self.config.step_tokens
        pending = sorted(self._active, key=lambda r: len(r.context) - r.computed > 1 and len(r.context) - r.computed)
        plan: list[tuple[_Request, int]] = []
        for request in pending:
            if budget == 0:
                break
            if request not in self._active:    # preempted for a request planned before it
                continue
            count = min(len(request.context) - request.computed, budget)
            if self._reserve(request, request.computed + count, planned=[r for r, _ in plan]):
                plan.append((request, count))
                budget -= count
        plan.sort(key=lambda entry: entry[1] != 1)
        return plan

    def _reserve(self, request: _Request, positions: int, planned: list[_Request]) -> bool:
        """Blocks for the request's first ``positions`` positions, preempting the newest running
        requests not planned this step if the pool runs dry; False if even that is not enough."""
        while len(request.blocks) * self.blocks.block_size < positions:
            block = self.blocks.allocate()
            if block is None:
                victims = [r for r in self._active if r is not request and r not in planned]
                if not victims:
                    return False
                self._preempt(victims[-1])
                continue
            self._tables[request.row, len(request.blocks)] = block
            request.blocks.append(block)
        return True

    def _preempt(self, request: _Request) -> None:
        """Send a running request back to the head of the queue; it keeps its output and computes its
        context again when readmitted (through the prefix cache, mostly)."""
        self._active.remove(request)
        self.blocks.release(request.blocks)
        self._free.append(request.row)
        self._free.sort()
        request.blocks, request.names, request.computed = [], [], 0
        with self._lock:
            self._waiting.appendleft(request)
        self.stats["preempted"] += 1

    def _forward(self, plan: list[tuple[_Request, int]]) -> None:
        """One forward over every planned token; then a token for each request now fully computed."""
        tokens = [t for request, count in plan for t in request.context[request.computed:request.computed + count]]
        rows = torch.tensor([request.row for request, _ in plan], device=self.device)
        batch = self.cache.batch(self._tables[rows], [r.computed for r, _ in plan], [n for _, n in plan])
        stack = self._decode_stack
        if stack is not None and batch.decodes == len(plan) <= stack.max_rows:
            hidden = stack(torch.tensor(tokens, device=self.device), batch)
            self.stats["fused_decode_steps"] += 1
        else:
            hidden = self.model.hidden_states(torch.tensor([tokens], device=self.device), batch)[0]
        done, last_tokens, end = [], [], 0
        for request, count in plan:
            end += count
            if not request.output or count > 1:
                self.stats["prompt_tokens"] += count
            request.computed += count
            self._name_full_blocks(request)
            if request.computed == len(request.context):
                done.append(request)
                last_tokens.append(end - 1)
        self.stats["decode_steps"] += 1
        if done:
            self._emit(done, self.model.lm_head(hidden[torch.tensor(last_tokens, device=self.device)]))

    def _name_full_blocks(self, request: _Request) -> None:
        """Put the request's newly filled blocks into the prefix cache under their chain names."""
        if not self.blocks.prefix_caching:
            return
        size = self.blocks.block_size
        while len(request.names) < request.computed // size:
            i = len(request.names)
            parent = request.names[-1] if request.names else b""
            request.names.append(self.blocks.name(request.blocks[i], parent, request.context[i * size:(i + 1) * size]))

    def _emit(self, batch: list[_Request], logits: torch.Tensor) -> None:
        """Sample one token for each request of the batch and hand it to its consumer. A fault that
        one request's own code meets (its sampling settings, grammar, detokenizer or stops) fails that
        request alone: if sampling the batch fails, each request is sampled on its own to find which.
        A fault that every request of a batch meets alone (out of memory, a bug in sampling) is no
        request's own: it stops the loop, as a fault in the bookkeeping (freeing rows and blocks) does,
        so that the server answers 503 and fails its health check instead of looking healthy.

        Retrying must not change the other requests' seeded tokens: each request's generator is drawn
        from only as the very last step of sampling (sampling.draw), after every check that can fail for
        one request (penalties, logit_bias, the grammar's mask), so a fault that one request meets there
        leaves the others' generators where they were for their retry. Keep it so: a check added after
        the draw would make a retry draw again, and change the others' seeded tokens."""
        try:
            tokens, raw_logprobs = self._sample(batch, logits)
            outcomes = [(token, None if raw_logprobs is None else raw_logprobs[i])
                        for i, token in enumerate(tokens.tolist())]
        except Exception as exc:
            outcomes = [exc] if len(batch) == 1 else [self._sample_alone(batch, logits, i) for i in range(len(batch))]
            if len(batch) > 1 and all(isinstance(outcome, Exception) for outcome in outcomes):
                raise
        for request, outcome in zip(batch, outcomes):
            if isinstance(outcome, Exception):
                self._fail_request(request, outcome)
                continue
            self.stats["generated_tokens"] += 1
            token, row_logprobs = outcome
            try:
                logprob = top = None
                if row_logprobs is not None and request.params.logprobs is not None:
                    logprob = float(row_logprobs[token])
                    if request.params.logprobs:
                        values, ids = row_logprobs.topk(request.params.logprobs)
                        top = list(zip(ids.tolist(), values.tolist()))
                text, reason, shown = self._advance(request, token)
            except Exception as exc:
                self._fail_request(request, exc)
                continue
            if reason is None:
                request.handle._push(TokenEvent(text, token, logprob, top))
            elif shown:
                self._finish(request, reason, text, token, logprob, top)
            else:
                self._finish(request, reason, text)

    def _sample_alone(self, batch: list[_Request], logits: torch.Tensor, i: int):
        """Request i's token and log-probabilities sampled on its own, or the fault it meets."""
        try:
            tokens, raw_logprobs = self._sample(batch[i:i + 1], logits[i:i + 1])
        except Exception as exc:
            return exc
        return tokens.item(), None if raw_logprobs is None else raw_logprobs[0]

    def _sample(self, batch: list[_Request], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A token for each request of the batch, and the model's log-probabilities when a request wants them."""
        # lm_head's fresh output (or its float copy), which nothing else reads: the padding is set in
        # place, not copied into a new [B, V] tensor each step (a retry's logits[i:i + 1] is a view of
        # the batch's, whose padding is then set twice, to the same)
        logits, vocab = logits.float(), self.tokenizer.vocab_size
        if logits.shape[-1] > vocab:   # the model's padding rows: tokens without text, never drawn
            logits[:, vocab:] = float("-inf")
        params = [r.params for r in batch]
        raw_logprobs = logits.log_softmax(dim=-1) if any(p.logprobs is not None for p in params) else None
        # Penalty state is kept (and paid for in the decode loop) only for requests that use it.
        penalised = torch.tensor([i for i, p in enumerate(params) if p.has_penalties], dtype=torch.long,
                                 device=self.device)
        if len(penalised):
            rows = torch.tensor([r.row for r in batch], device=self.device)
            f = lambda name: torch.tensor([getattr(p, name) for p in params], device=self.device)
            logits = apply_penalties(logits, self._counts[rows], self._seen[rows], f("presence_penalty"),
                                     f("frequency_penalty"), f("repetition_penalty"))
        biased = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
        if biased:   # after the logprobs, which report the model's own distribution (as vLLM's do)
            where = (torch.tensor([i for i, bias in biased for _ in bias], device=self.device),
                     torch.tensor([t for _, bias in biased for t in bias], device=self.device))
            logits = logits.index_put(where, torch.tensor([v for _, bias in biased for v in bias.values()],
                                                          device=self.device), accumulate=True)
        constrained = [(i, r.constraint) for i, r in enumerate(batch) if r.constraint is not None]
        if constrained:   # like the bias, after the logprobs
            logits = mask_logits(logits, [i for i, _ in constrained], [c for _, c in constrained])
        tokens = sample(logits,
                        torch.tensor([p.temperature for p in params], device=self.device),
                        torch.tensor([min(p.top_k, vocab) for p in params], device=self.device),   # more is all
                        torch.tensor([p.top_p for p in params], device=self.device),
                        [r.generator for r in batch],
                        torch.tensor([p.min_p for p in params], device=self.device))
        if len(penalised):
            self._counts[rows[penalised], tokens[penalised]] += 1
            self._seen[rows[penalised], tokens[penalised]] = True
        return tokens, raw_logprobs

    def _advance(self, request: _Request, token: int) -> tuple[str, str | None, bool]:
        """Take the token into the request's state (grammar, text, stops): the text it adds, why the
        request ends (None: it goes on) and whether the token is shown (a stop token is not). Only
        the request's own code runs here, so that a fault in it is the request's alone (see _emit)."""
        request.output.append(token)
        request.context.append(token)
        if request.constraint is not None:
            request.constraint.consume(token)
        if token in request.stop_ids or (request.constraint is not None and token == self.tokenizer.eot_id):
            return self._drain(request), "stop", False
        text, stopped = request.stops.push(request.decoder.push(token))
        if stopped:
            return text, "stop", True
        if request.constraint is not None and request.constraint.done:   # the document is complete
            return text + self._drain(request), "stop", True
        if len(request.output) >= request.params.max_new_tokens:
            return text + self._drain(request), "length", True
        return text, None, True

    @staticmethod
    def _drain(request: _Request) -> str:
        """Text still held back at the end of a stream (partial characters, partial stop strings)."""
        piece, stopped = request.stops.push(request.decoder.flush())
        return piece if stopped else piece + request.stops.flush()

    def _release(self, request: _Request) -> None:
        """Free the request's row and blocks, or take it out of the queue; a second call does nothing.
        The row goes back to the free list even if freeing the blocks raises (the loop then stops): a
        row lost there would never serve again."""
        if request in self._active:
            self._active.remove(request)
            try:
                self.blocks.release(request.blocks)
            finally:
                request.blocks = []
                self._free.append(request.row)
                self._free.sort()
        elif request in self._waiting:
            self._waiting.remove(request)

    def _fail_request(self, request: _Request, exc: Exception) -> None:
        """End one request with the fault it met; the engine goes on with the others."""
        log.error("the request failed in the engine (request %d); the others go on", request.handle.id, exc_info=exc)
        self._release(request)
        self.stats["failed"] += 1
        request.handle._fail(RequestFailed(f"the request failed in the engine (request {request.handle.id}); "
                                           "the server log has the details"))

    def _finish(self, request: _Request, reason: str, text: str = "", token=None, logprob=None, top=None) -> None:
        """Send the last event and free the request's row and blocks."""
        self._release(request)
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        stopped_by_token = bool(request.output) and request.output[-1] in request.stop_ids
        request.handle.finished = True
        request.handle._push(TokenEvent(text, token, logprob, top, finish_reason=reason,
                                        prompt_tokens=len(request.prompt),
                                        completion_tokens=len(request.output) - stopped_by_token))
