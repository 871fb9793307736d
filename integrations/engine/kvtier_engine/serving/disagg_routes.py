"""The routes a disaggregated-prefill router (`kvtier_engine proxy`) calls on an instance:

    POST /v1/kv/release {"transfer_id": "<hex>"}  ->  {"released": true | false}
    GET  /v1/kvtier/instance  ->  {"instance_id": str | null, "model_id": str | null,
                                   "role": "prefill" | "decode" | "both"}

Release ends the lease that kept a request's chunks for the decode instance (on a prefill instance,
once the decode has its KV: kvtier.connector.handoffs); false for an id that is unknown, already
released or expired (every lease ends by itself after its TTL anyway). Safe from the HTTP thread:
the handoffs take their own lock.

The instance card maps the controller's /v1/route answers (instance ids) to this server's URL:
`instance_id` is the fleet id kvtier registered (null without a `controller:` section), `model_id`
the model id it registered under (null with kvtier off). Read-only: fixed once the engine is built.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kvtier_engine.llm_engine import LLMEngine
from kvtier_engine.serving.openai_protocol import InvalidRequest

MAX_TRANSFER_ID = 64


def add_transfer_routes(app: FastAPI, engine: LLMEngine) -> None:
    @app.post("/v1/kv/release")
    async def release(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("the request body must be JSON") from None
        transfer_id = body.get("transfer_id") if isinstance(body, dict) else None
        if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= MAX_TRANSFER_ID:
            raise InvalidRequest("'transfer_id' must be a non-empty string", "transfer_id")
        connector = engine.scheduler.connector  # (None: kvtier is off, nothing is ever held)
        released = connector is not None and connector.handoffs.release(transfer_id)
        return JSONResponse({"released": released})

    @app.get("/v1/kvtier/instance")
    async def instance() -> JSONResponse:
        cache = engine.kvtier
        return JSONResponse({"instance_id": cache.instance_id if cache is not None else None,
                             "model_id": cache.db.namespace.model_id if cache is not None else None,
                             "role": engine.options.kv_role})
