"""The route a router calls on a prefill instance once the decode instance has its KV:

    POST /v1/kv/release {"transfer_id": "<hex>"}  ->  {"released": true | false}

It ends the lease that kept the request's chunks for the decode instance (kvtier.connector.handoffs);
false for an id that is unknown, already released or expired (every lease ends by itself after its
TTL anyway). Safe from the HTTP thread: the handoffs take their own lock.
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
