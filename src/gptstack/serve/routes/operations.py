"""The routes around the model API: liveness, readiness, Prometheus metrics, the model list and
the browser playground. All but /v1/models (and /metrics unless configured) are public."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.responses import HTMLResponse, PlainTextResponse

from ..errors import error_response
from ..state import StateDep

PLAYGROUND = Path(__file__).parents[1] / "playground.html"


async def health():
    return {"status": "ok"}


async def ready(state: StateDep):
    """503 until the lifespan has started the engine (and, behind replicas, one has reported in):
    load balancers wait for this."""
    if not state.ready or not state.backend.loads():
        return error_response(503, "the model is still loading", "server_error", code="not_ready")
    return {"status": "ready", "model": state.config.model_name}


async def prometheus(state: StateDep):
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def playground(state: StateDep):
    page = PLAYGROUND.read_text().replace("{{MODEL}}", state.config.model_name)
    page = page.replace("{{CLASSIFIER}}", "true" if state.backend.labels else "false")
    return HTMLResponse(page.replace("{{TAGGER}}", "true" if state.backend.tagger else "false"))


async def models(state: StateDep):
    return {"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": int(time.time()),
                                        "owned_by": "gptstack", "max_model_len": state.backend.max_seq_len}]}
