"""`gptstack serve --replicas N`: engine replicas on Ray Serve behind one OpenAI-compatible endpoint.

The layout is vLLM's on Ray Serve: Ray's HTTP proxy hands every request to an ``Ingress`` replica,
which runs the same FastAPI app as the one-process server (keys, validation, rate limits, SSE)
over a ``ReplicaBackend``; that sends each request to one of the ``EngineReplica`` deployment's
replicas (each an Engine in its own process, on its own cores) and streams the events back.

- Rate limits are one set of buckets per key in a ``SharedState`` actor, so N ingress replicas do
  not grant N times the limit; engine replicas report their load there too, for /metrics.
- Bounds: a replica takes ``max_batch_size + max_queue`` requests, the router queues ``max_queue``
  more, and beyond that the request is refused at once (503, Retry-After).
- Faults: when an engine replica dies, Ray starts another; a request it held that had sent no
  token yet is retried on another replica, one that had is ended with a clear error (503 or an SSE
  error event): a replica dying is never an HTTP 500. A fault inside one request (its sampling,
  grammar, text or stops) is a 500 for that request alone, as on one process.

Ray is an optional extra (``pip install gptstack[ray]``): nothing here is imported by the rest of
the package. ``application(args)`` is the Ray Serve application builder that `serve --replicas`
deploys and that a KubeRay RayService names in its ``import_path``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..checkpoint import describe
from ..inference.engine import EngineStopped, QueueFull, TokenEvent, check_request
from ..inference.sampling import SamplingParams
from ..runtime import tune_allocator
from .app import create_app
from .backend import LocalBackend, ReplicaLost
from .run import ReplicaOptions, ServeOptions, announce, build_engine, freeze_loaded_objects, serve_config
from .security import RateLimiter

log = logging.getLogger("gptstack.serve")

NAMESPACE = "gptstack"
LOAD_REPORT_SECONDS = 0.5        # an engine replica's load reaches /metrics this often
LOAD_STALE_SECONDS = 3.0         # a replica silent this long is gone from /metrics (dead or stopped)


@ray.remote(num_cpus=0)
class SharedState:
    """What every replica of one application shares: the per-key rate limits, and each engine
    replica's last reported load."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int):
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self.loads: dict[str, tuple[float, dict]] = {}

    def configure(self, requests_per_minute: int, tokens_per_minute: int) -> None:
        """A redeploy with new limits finds this actor alive (detached): take the new ones."""
        if (requests_per_minute, tokens_per_minute) != (self.limiter.limits["requests"], self.limiter.limits["tokens"]):
            self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)

    def acquire(self, key_id: str, tokens: int) -> float:
        return self.limiter.acquire(key_id, tokens)

    def report(self, replica: str, load: dict) -> None:
        self.loads[replica] = (time.monotonic(), load)

    def forget(self, replica: str) -> None:
        self.loads.pop(replica, None)

    def current_loads(self) -> dict[str, dict]:
        now = time.monotonic()
        return {r: load for r, (at, load) in self.loads.items() if now - at < LOAD_STALE_SECONDS}


def shared_state(options: ServeOptions) -> ray.actor.ActorHandle:
    """This replica's application's SharedState, created by whichever replica asks first. Detached,
    so that it outlives the task that builds the application (KubeRay); `serve --replicas` kills it
    on exit. Ray restarts it if its process dies (the buckets start full again)."""
    limits = options.requests_per_minute, options.tokens_per_minute
    state = SharedState.options(name=f"{serve.get_replica_context().app_name}-shared", namespace=NAMESPACE,
                                lifetime="detached", get_if_exists=True, max_restarts=-1,
                                max_task_retries=-1).remote(*limits)
    state.configure.remote(*limits)
    return state


class SharedRateLimiter(RateLimiter):
    """The app's rate limiter with its buckets in the SharedState actor."""

    def __init__(self, state, requests_per_minute: int, tokens_per_minute: int):
        super().__init__(requests_per_minute, tokens_per_minute)
        self.state = state

    async def take(self, key_id: str, tokens: int) -> float:
        if not any(self.limits.values()):
            return 0.0
        try:
            return await self.state.acquire.remote(key_id, tokens)
        except RayError as exc:     # restarting: refuse for now (503) rather than serve unlimited
            raise EngineStopped(f"the rate-limit state is unavailable ({type(exc).__name__})") from None


def pin_threads(threads: int, local_rank: int) -> list[int]:
    """Use ``threads`` threads on cores of this replica's own (by its rank on this node), so that N
    replicas on N cores do not fight over them. Returns the cores."""
    cores = sorted(os.sched_getaffinity(0))
    mine = [cores[(local_rank * threads + i) % len(cores)] for i in range(min(threads, len(cores)))]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return mine


def local_error(exc: RayTaskError) -> Exception:
    """What a replica raised, as it raised it (Ray's wrapper reads as the remote traceback)."""
    cause = exc.cause
    return cause if isinstance(cause, Exception) else EngineStopped(f"a replica failed: {type(cause).__name__}")


class EngineReplica:
    """One engine in its own Ray actor process: decodes what the ingress sends it."""

    def __init__(self, options: ServeOptions, threads: int):
        context = serve.get_replica_context()
        self.name = f"{context.replica_tag}"
        cores = pin_threads(threads, getattr(context.rank, "local_rank", context.rank))   # an int before Ray 2.5x
        tune_allocator()
        torch.set_grad_enabled(False)
        engine, _, classifier = build_engine(options)
        self.backend = LocalBackend(engine, classifier)
        self.backend.start()
        self.shared = shared_state(options)
        self._reporting = threading.Event()
        threading.Thread(target=self._report_load, name="load-report", daemon=True).start()
        freeze_loaded_objects()
        log.info("engine replica %s (pid %d) on cores %s, %d threads", self.name, os.getpid(), cores, threads)

    def _report_load(self) -> None:
        while not self._reporting.wait(LOAD_REPORT_SECONDS):
            try:
                self.shared.report.remote(self.name, {**self.backend.loads()[None], "pid": os.getpid()})
            except Exception:     # the shared actor restarting: report next time
                log.debug("load report failed", exc_info=True)

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        """The request's events; the first item, sent once the engine has taken the request, names
        this replica (so the router knows it was admitted)."""
        handle = await self.backend.submit(prompt_ids, params)
        try:
            yield self.name
            async for event in handle:
                yield event
        finally:    # the router cancelled (client gone): free the engine's row
            if not handle.finished:
                handle.cancel()

    async def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        return await self.backend.embed(token_lists)

    async def classify(self, token_lists: list[list[int]]) -> torch.Tensor:
        return await self.backend.classify(token_lists)

    async def tag(self, sentences: list) -> list:
        return await self.backend.tag(sentences)

    async def score(self, token_lists: list[list[int]], top: int) -> list:
        return await self.backend.score(token_lists, top)

    def check_health(self) -> None:
        """Ray restarts a replica whose engine loop has died."""
        engine = self.backend.engine
        if not engine.alive:
            raise RuntimeError(f"the engine loop is not running: {engine.failure or 'stopped'}")

    def __del__(self):    # Ray drains the replica's requests first (graceful_shutdown_timeout_s)
        if self._reporting.is_set():
            return
        self._reporting.set()
        self.backend.shutdown()
        try:
            self.shared.forget.remote(self.name)
        except Exception:     # the shared actor is gone already (the app is being deleted)
            pass


class RemoteRequest:
    """A request decoded on an engine replica, its events through a Ray stream. If the replica
    dies before the first token, the request goes to another one (nothing was sent, nothing is
    repeated); after that it ends with ReplicaLost.

    A stream from a SIGKILLed replica may never raise (measured: still silent after 120 s), so
    while no event comes the request also watches its replica's load reports: a replica that has
    stopped reporting is dead."""

    def __init__(self, backend: "ReplicaBackend", prompt_ids: list[int], params: SamplingParams):
        self.backend, self.prompt_ids, self.params = backend, prompt_ids, params
        self.retries = backend.retries
        self.finished = False
        self.submitted_at = time.perf_counter()
        self.replica: str | None = None
        self.tokens_sent = 0
        self._stream = None
        self._started_at = 0.0

    async def start(self) -> "RemoteRequest":
        for attempt in range(self.retries + 1):
            self._stream = self.backend.engines.options(stream=True).generate.remote(self.prompt_ids, self.params)
            try:
                self.replica = await self._stream.__anext__()
                self._started_at = time.monotonic()
                return self
            except BackPressureError as exc:
                raise QueueFull(f"every replica is busy and {exc.message}") from None
            except RayTaskError as exc:      # the replica refused it (its engine is stopping, ...)
                raise local_error(exc) from None
            except RayActorError:
                log.warning("an engine replica died before taking a request; trying another (%d)", attempt + 1)
            except asyncio.CancelledError:   # the client left while we waited: free the replica's row
                self._stream.cancel()
                raise
        raise EngineStopped("no engine replica could take the request")

    async def _next_event(self) -> TokenEvent:
        """The stream's next event; RayActorError if the replica died (raised by Ray, or seen as
        silence in the load reports)."""
        pending = asyncio.ensure_future(self._stream.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=LOAD_REPORT_SECONDS)
                if done:
                    return pending.result()
                reporting = self.replica in self.backend.loads()
                if not reporting and time.monotonic() - self._started_at > 2 * LOAD_STALE_SECONDS:
                    self._stream.cancel()
                    raise RayActorError()
        finally:
            pending.cancel()

    async def __aiter__(self):
        while True:
            try:
                event = await self._next_event()
            except StopAsyncIteration:
                return
            except RayTaskError as exc:     # the replica's engine failed under this request
                raise local_error(exc) from None
            except RayActorError:
                if self.tokens_sent or self.retries == 0:
                    raise ReplicaLost(f"engine replica {self.replica} stopped (its process died) after sending "
                                      f"{self.tokens_sent} tokens of this request") from None
                self.retries -= 1
                await self.start()       # nothing was sent yet: the same request on another replica
                continue
            self.tokens_sent += event.token_id is not None
            self.finished = event.finish_reason is not None
            yield event
            if self.finished:
                return

    def cancel(self) -> None:
        if not self.finished and self._stream is not None:
            self._stream.cancel()


class ReplicaBackend:
    """The Backend of the ingress: checks requests itself (it has the tokenizer and the model's
    config, not its weights) and hands them to the engine replicas."""

    def __init__(self, engines: DeploymentHandle, shared, checkpoint: str, max_seq_len: int, retries: int = 1):
        self.model_config, self.tokenizer, config = describe(checkpoint)
        self.max_seq_len = min(max_seq_len or self.model_config.block_size, self.model_config.block_size)
        head = config.get("head") or {}
        self.labels = head.get("labels") if head.get("kind") == "classification" else None
        self.tagger = head if head.get("kind") == "token_classification" else None
        self.engines, self.shared, self.retries = engines, shared, retries
        self._loads: dict[str, dict] = {}
        self._poll: asyncio.Task | None = None

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_request(prompt_ids, params, self.tokenizer, self.model_config.vocab_size, self.max_seq_len)

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> RemoteRequest:
        return await RemoteRequest(self, prompt_ids, params).start()

    async def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        return await self._call("embed", token_lists)

    async def classify(self, token_lists: list[list[int]]) -> torch.Tensor:
        return await self._call("classify", token_lists)

    async def tag(self, sentences: list) -> list:
        return await self._call("tag", sentences)

    async def score(self, token_lists: list[list[int]], top: int) -> list:
        return await self._call("score", token_lists, top)

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.engines, method).remote(*args)
        except BackPressureError as exc:
            raise QueueFull(exc.message) from None
        except RayTaskError as exc:
            raise local_error(exc) from None
        except RayActorError:
            raise EngineStopped("the replica running this request stopped") from None

    def loads(self) -> dict[str, dict[str, float]]:
        return self._loads

    async def _poll_loads(self) -> None:
        while True:
            try:
                self._loads = await self.shared.current_loads.remote()
            except Exception:      # restarting, or a network hiccup: try again next time
                log.warning("the shared state actor is unreachable; /metrics shows the last loads", exc_info=True)
            await asyncio.sleep(LOAD_REPORT_SECONDS)

    def start(self) -> None:
        self._poll = asyncio.get_running_loop().create_task(self._poll_loads())

    def shutdown(self) -> None:
        if self._poll is not None:
            self._poll.cancel()


@serve.ingress()
class Ingress:
    """The HTTP side: the server's FastAPI app over the engine replicas."""

    def __init__(self, engines: DeploymentHandle, options: ServeOptions):
        self.engines, self.options = engines, options

    def __serve_build_asgi_app__(self):
        shared = shared_state(self.options)
        limiter = SharedRateLimiter(shared, self.options.requests_per_minute, self.options.tokens_per_minute)
        backend = ReplicaBackend(self.engines, shared, self.options.checkpoint, self.options.max_seq_len)
        config = dataclasses.replace(serve_config(self.options, stored_template(self.options.checkpoint)), limiter=limiter)
        app = create_app(backend, config)
        freeze_loaded_objects()
        return app


def stored_template(checkpoint: str) -> str | None:
    return describe(checkpoint)[2].get("meta", {}).get("chat_template")


def application(args: dict) -> serve.Application:
    """The Ray Serve application: ``args`` are ServeOptions' fields and ReplicaOptions' (as a
    RayService's serveConfigV2 ``args`` give them, or `serve --replicas` does)."""
    replica_fields = {f.name for f in dataclasses.fields(ReplicaOptions)}
    serve_fields = {f.name for f in dataclasses.fields(ServeOptions)}
    unknown = set(args) - replica_fields - serve_fields
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; known: {sorted(replica_fields | serve_fields)}")
    replicas = ReplicaOptions(**{k: v for k, v in args.items() if k in replica_fields}).validate()
    options = ServeOptions(**{k: v for k, v in args.items() if k in serve_fields})
    threads = replicas.threads(int(ray.cluster_resources().get("CPU", os.cpu_count())) if ray.is_initialized()
                               else os.cpu_count())
    per_replica = options.max_batch_size + options.max_queue
    scaling = ({"autoscaling_config": {"min_replicas": replicas.min_replicas, "max_replicas": replicas.max_replicas,
                                       "target_ongoing_requests": replicas.target_ongoing_requests or options.max_batch_size,
                                       "upscale_delay_s": 5, "downscale_delay_s": 60}}
               if replicas.autoscaling else {"num_replicas": replicas.replicas or 1})
    most = replicas.max_replicas or replicas.replicas or 1
    engines = serve.deployment(EngineReplica).options(
        name="EngineReplica", ray_actor_options={"num_cpus": threads}, max_ongoing_requests=per_replica,
        max_queued_requests=options.max_queue, graceful_shutdown_timeout_s=options.graceful_shutdown_seconds,
        health_check_period_s=5, **scaling).bind(options, threads)
    return serve.deployment(Ingress).options(
        name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * per_replica * most,
        graceful_shutdown_timeout_s=options.graceful_shutdown_seconds).bind(engines, options)


def serve_replicas(options: ServeOptions, replicas: ReplicaOptions, app_name: str = "gptstack") -> None:
    """`gptstack serve --replicas N`: start Ray (or join ``ray_address``), deploy, serve until
    SIGINT/SIGTERM, then drain (in-flight requests finish, up to graceful_shutdown_seconds) and stop."""
    if options.ssl_certfile:
        raise ValueError("TLS with --replicas: terminate TLS in front of Ray's proxy (a load balancer or ingress)")
    replicas.validate()
    if not options.api_keys and not options.api_keys_file and not os.environ.get("GPTSTACK_API_KEYS") \
            and not options.insecure_no_auth:
        options = dataclasses.replace(options, api_keys=["sk-gptstack-" + secrets.token_urlsafe(24)])
        print(f"No API key given: generated one for this run.\n  API key: {options.api_keys[0]}", flush=True)
    options = dataclasses.replace(options, checkpoint=str(Path(options.checkpoint).resolve()))
    describe(options.checkpoint)       # a bad checkpoint fails here, before Ray starts
    ray.init(address=replicas.ray_address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"GPTSTACK_API_KEYS": os.environ.get("GPTSTACK_API_KEYS", "")}})
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(application({**dataclasses.asdict(options), **dataclasses.asdict(replicas)}),
                  name=app_name, route_prefix="/", blocking=False)
        announce(options, options.api_keys[0] if options.api_keys else "$GPTSTACK_API_KEY", "http")
        count = f"{replicas.min_replicas}-{replicas.max_replicas}" if replicas.autoscaling else replicas.replicas or 1
        print(f"serving {options.checkpoint} on Ray Serve, {count} engine replicas, at http://{options.host}:{options.port} "
              f"(OpenAI API under /v1, playground at /)", flush=True)
        stop.wait()
    finally:
        serve.delete(app_name)            # drains: replicas finish their requests first
        if not replicas.ray_address:      # Serve on a cluster we joined is not ours to stop
            serve.shutdown()
        try:
            ray.kill(ray.get_actor(f"{app_name}-shared", namespace=NAMESPACE))
        except ValueError:
            pass
        ray.shutdown()
