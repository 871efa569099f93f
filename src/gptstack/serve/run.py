"""`gptstack serve`: load a checkpoint into an Engine and run the app under uvicorn."""

from __future__ import annotations

import gc
import logging
import secrets
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import attach_head, load_model
from ..heads import SequenceClassifier, TokenClassifier
from ..inference.engine import Engine, EngineConfig
from ..inference.quantize import prepare_for_decoding
from ..runtime import resolve_device, resolve_dtype, tune_allocator
from ..chat import DEFAULT_CHAT_TEMPLATE
from .app import ServeConfig, create_app
from .security import KeyStore

log = logging.getLogger("gptstack.serve")


@dataclass
class ServeOptions:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: str | None = None
    insecure_no_auth: bool = False
    device: str = "auto"
    dtype: str = "fp32"                  # weights: fp32 | bf16
    quantize: str = "none"               # none | int8 | int4 (weight-only)
    max_batch_size: int = 16
    max_queue: int = 64
    max_seq_len: int = 0
    step_tokens: int = 256
    block_size: int = 16
    kv_cache_memory: int = 0
    prefix_caching: bool = True
    fused_decode: bool = True            # decode-only steps as one C++ call (inference/decode_stack.py)
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_body_bytes: int = 1 << 20
    metrics_public: bool = False
    log_prompts: bool = False            # write prompts to the log, scrubbed of personal and secret data
    redact_output: bool = False          # replace personal and secret data in completions (data/pii.py)
    chat_template: str | None = None     # a file holding a Jinja template
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    graceful_shutdown_seconds: float = 30.0


@dataclass
class ReplicaOptions:
    """Engine replicas on Ray Serve (serve/replicas.py, `pip install gptstack[ray]`): ``replicas``
    of them, or autoscaling between ``min_replicas`` and ``max_replicas``. All unset: one process."""
    replicas: int = 0                     # engine replicas on Ray Serve; 0 = one process, no Ray
    min_replicas: int = 1                 # autoscaling: fewest replicas (at least 1: /ready needs one)
    max_replicas: int = 0                 # autoscaling: most replicas; 0 = a fixed number
    threads_per_replica: int = 0          # 0 = the cores shared evenly (by max_replicas when autoscaling)
    target_ongoing_requests: float = 0    # autoscaling keeps about this many requests per replica; 0 = max_batch_size
    ray_address: str | None = None        # join this Ray cluster instead of starting one here

    @property
    def on_ray(self) -> bool:
        return bool(self.replicas or self.max_replicas or self.ray_address)

    @property
    def autoscaling(self) -> bool:
        return bool(self.max_replicas)

    def validate(self) -> "ReplicaOptions":
        if self.autoscaling and not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"autoscaling needs 1 <= min_replicas <= max_replicas, got {self.min_replicas} "
                             f"and {self.max_replicas}")
        if self.min_replicas != 1 and not self.autoscaling:
            raise ValueError("min_replicas needs max_replicas (autoscaling between the two)")
        if self.replicas < 0 or self.threads_per_replica < 0:
            raise ValueError("replicas and threads_per_replica must be >= 0")
        if self.replicas and self.autoscaling:
            raise ValueError("give either replicas (a fixed number) or min/max_replicas (autoscaling), not both")
        return self

    def threads(self, cpus: int) -> int:
        """Threads per replica: as given, else the cores shared by the most replicas there may be."""
        return self.threads_per_replica or max(1, cpus // (self.max_replicas or self.replicas or 1))


def build_engine(options: ServeOptions) -> tuple[Engine, dict, SequenceClassifier | TokenClassifier | None]:
    """The engine over the checkpoint's model, the checkpoint's config.json, and its task head
    (sequence or token classifier, sharing the engine's weights) when the checkpoint has one."""
    config = EngineConfig(max_batch_size=options.max_batch_size, max_queue=options.max_queue,
                          max_seq_len=options.max_seq_len, step_tokens=options.step_tokens,
                          block_size=options.block_size, kv_cache_memory=options.kv_cache_memory,
                          prefix_caching=options.prefix_caching,
                          fused_decode=options.fused_decode).validate()   # before the slow part
    device = resolve_device(options.device)
    if options.quantize not in ("none", "int8", "int4"):
        raise ValueError(f"quantize must be 'none', 'int8' or 'int4', got {options.quantize!r}")
    dtype = resolve_dtype(options.dtype, device)
    model, tokenizer, checkpoint_config = load_model(options.checkpoint, device=device, dtype=dtype)
    model = prepare_for_decoding(model, options.quantize)
    classifier = attach_head(model, options.checkpoint, checkpoint_config)
    return Engine(model, tokenizer, config, device=device), checkpoint_config, classifier


def serve_config(options: ServeOptions, stored_template: str | None = None) -> ServeConfig:
    """The app's config from the command line's options (keys as given: see build_app)."""
    keys = KeyStore.from_sources(options.api_keys, options.api_keys_file)
    name = options.model_name or Path(options.checkpoint).resolve().name
    # the template: --chat-template, else the one stored with the model, else a plain default
    template = Path(options.chat_template).read_text() if options.chat_template else stored_template or DEFAULT_CHAT_TEMPLATE
    return ServeConfig(model_name=name, keys=keys, auth=not options.insecure_no_auth,
                       requests_per_minute=options.requests_per_minute, tokens_per_minute=options.tokens_per_minute,
                       max_body_bytes=options.max_body_bytes, metrics_public=options.metrics_public,
                       log_prompts=options.log_prompts, redact_output=options.redact_output, chat_template=template,
                       chat_stops=[] if options.chat_template or stored_template else ServeConfig().chat_stops)


def announce(options: ServeOptions, shown_key: str, scheme: str) -> None:
    """How to reach the server, printed for the person who started it."""
    name = options.model_name or Path(options.checkpoint).resolve().name
    print(f"Try it:\n  curl {scheme}://{options.host}:{options.port}/v1/completions -H 'Authorization: Bearer {shown_key}' "
          f"-H 'Content-Type: application/json' -d '{{\"model\": \"{name}\", \"prompt\": \"ROMEO:\", \"max_tokens\": 40}}'\n"
          f"  or open {scheme}://{options.host}:{options.port}/ for the playground", flush=True)


def build_app(options: ServeOptions, engine: Engine, stored_template: str | None = None,
              classifier: SequenceClassifier | TokenClassifier | None = None):
    config = serve_config(options, stored_template)
    shown_key = "$GPTSTACK_API_KEY"
    if not len(config.keys) and not options.insecure_no_auth:
        shown_key = "sk-gptstack-" + secrets.token_urlsafe(24)
        config.keys = KeyStore([shown_key])
        print(f"No API key given: generated one for this run.\n  API key: {shown_key}\n"
              f"  (pass --api-key, GPTSTACK_API_KEYS or --api-keys-file to choose your own)", flush=True)
    announce(options, shown_key, "https" if options.ssl_certfile else "http")
    return create_app(engine, config, start_engine=False, classifier=classifier)


def freeze_loaded_objects() -> None:
    """Called once a server process (or a Ray replica) has loaded what it serves with: that (model,
    tokenizer, app: ~300k objects) lives as long as the process. Left to the collector, each full
    collection scans it all, ~0.5 s in which no request is answered (a 300 ms /health under a
    burst, measured: docs/benchmarks.md, "Fuzzing and overload"); frozen, never."""
    gc.collect()
    gc.freeze()


def serve(options: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, let in-flight requests finish for up to
    ``graceful_shutdown_seconds``, stop the engine and return (exit code 0).

    The engine loop runs on this (main) thread and uvicorn's event loop in a second thread: the
    main thread has run torch ops while loading, and torch work on any other thread would get a
    second OpenMP team and half the decode speed on a small CPU (see Engine).
    """
    import uvicorn

    tune_allocator()
    torch.set_grad_enabled(False)
    # The engine thread waits for the GIL after every forward (which runs without it) while the
    # HTTP thread holds it; CPython makes a waiting thread wait up to the switch interval, 5 ms by
    # default, half a token. At 1 ms, one stream of GPT-2 124M bf16 went from 96 to 107 tokens/s.
    sys.setswitchinterval(0.001)
    if bool(options.ssl_certfile) != bool(options.ssl_keyfile):
        raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine, checkpoint_config, classifier = build_engine(options)
    app = build_app(options, engine, checkpoint_config.get("meta", {}).get("chat_template"), classifier)
    freeze_loaded_objects()
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, ssl_certfile=options.ssl_certfile,
                                           ssl_keyfile=options.ssl_keyfile, access_log=False, log_level="info",
                                           timeout_graceful_shutdown=options.graceful_shutdown_seconds))

    def request_exit(signum, frame) -> None:
        server.should_exit = True   # uvicorn drains, then its lifespan shutdown stops the engine
    signal.signal(signal.SIGTERM, request_exit)
    signal.signal(signal.SIGINT, request_exit)

    http = threading.Thread(target=server.run, name="uvicorn")

    def watch_http() -> None:   # if uvicorn fails to start (port taken ...), stop the engine too
        http.join()
        engine.shutdown()
    scheme = "https" if options.ssl_certfile else "http"
    print(f"serving {options.checkpoint} at {scheme}://{options.host}:{options.port} "
          f"(OpenAI API under /v1, playground at /)", flush=True)
    http.start()
    threading.Thread(target=watch_http, name="http-watch", daemon=True).start()
    try:
        engine.run()
    finally:    # the engine stopped (or failed: then stop serving too, so a supervisor restarts us)
        server.should_exit = True
        http.join()
    if not server.started:
        raise ValueError(f"the server could not start on {options.host}:{options.port} (see the log above; "
                         "is the port in use? pass --port)")
