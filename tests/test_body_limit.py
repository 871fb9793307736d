"""kvtier/body_limit.py: a body over the bound is a 413 (declared or counted), one within it reaches
the app whole, the refusal takes the app's error shape, and a nonsense bound is refused."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.responses import JSONResponse

from kvtier.body_limit import BodyLimit, BodyTooLarge

LIMIT = 1000


def app_with_limit(**options) -> TestClient:
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=LIMIT, **options)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"received": len(await request.body())}

    return TestClient(app)


def chunks(total: int, size: int = 100):
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def test_a_body_within_the_bound_reaches_the_app_whole():
    client = app_with_limit()
    assert client.post("/echo", content=b"x" * LIMIT).json() == {"received": LIMIT}
    assert client.post("/echo", content=chunks(LIMIT)).json() == {"received": LIMIT}


def test_a_declared_body_over_the_bound_is_413():
    reply = app_with_limit().post("/echo", content=b"x" * (LIMIT + 1))
    assert reply.status_code == 413
    assert reply.json() == {"detail": f"the request body is over the limit of {LIMIT} bytes"}
    assert reply.headers["connection"] == "close"


def test_a_streamed_body_over_the_bound_is_413_once_counted():
    reply = app_with_limit().post("/echo", content=chunks(LIMIT * 3))
    assert reply.status_code == 413 and str(LIMIT) in reply.json()["detail"]


def test_the_refusal_takes_the_apps_error_shape():
    def refusal(exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.detail}}, status_code=413)

    reply = app_with_limit(refusal=refusal).post("/echo", content=b"x" * (LIMIT * 10))
    assert reply.status_code == 413 and "over the limit" in reply.json()["error"]["message"]


def test_a_bound_below_one_byte_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        BodyLimit(FastAPI(), 0)
