"""`POST /tokenize`, the subset of vLLM's route that a router needs: a prompt's token ids as the
completions and chat routes would hand them to the engine, without running anything.

    {"prompt": str | [int]}  or  {"messages": [...]}
        ->  {"tokens": [...], "count": n, "max_model_len": m}

`model` is accepted and ignored, `add_generation_prompt` only at true (the chat route always adds
the assistant's turn); any other key is a 400 naming it, as on the completion routes, so a client
never gets ids other than the ones it asked for. A prompt longer than the context is still
tokenized: the count says so, and the caller decides.

Where it runs: the handler on uvicorn's event loop; text is encoded and messages rendered on a worker
thread, as in the completion routes (tokenizers are thread-safe, and an 8 MiB prompt must not stall
every stream on the loop). The body is bounded by the server's BodyLimit (413) and read within its
read timeout (`read_body`: server.py's own reader, passed in). Touches no engine state.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvtier_engine.chat_template import InvalidChat, check_messages, render_chat, without_double_bos
from kvtier_engine.llm_engine import LLMEngine
from kvtier_engine.serving.openai_protocol import InvalidRequest, check_fields
from kvtier_engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # server.py imports this module
    from kvtier_engine.serving.server import ServedModel

ReadBody = Callable[[Request], Awaitable[bytes | None]]  # None: the client left mid-body
_FIELDS = frozenset({"model", "prompt", "messages"})
_NEUTRAL: dict[str, tuple[Any, ...]] = {"add_generation_prompt": (True,)}


def add_tokenize_route(app: FastAPI, engine: LLMEngine, model: ServedModel, read_body: ReadBody) -> None:
    tokenizer = engine.tokenizer
    # The chat route's rendering: the same template and special tokens give the same ids.
    render = functools.partial(render_chat, template=model.chat_template,
                               bos_token=getattr(tokenizer, "bos_token", None),
                               eos_token=getattr(tokenizer, "eos_token", None))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        raw = await read_body(request)
        if raw is None:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        body = _body(raw)
        if "messages" in body:
            if "prompt" in body:
                raise InvalidRequest("give 'prompt' or 'messages', not both", "prompt")
            tokens = await _chat_tokens(body["messages"], render, tokenizer)
        else:
            tokens = await _prompt_tokens(body.get("prompt"), tokenizer)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": model.max_model_len})


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequest("the request body must be a JSON object") from None
    check_fields(body, _FIELDS, _NEUTRAL)
    return body


async def _prompt_tokens(prompt: object, tokenizer: Tokenizer, param: str = "prompt") -> list[int]:
    if isinstance(prompt, str):
        try:
            return await asyncio.to_thread(tokenizer.encode, prompt)
        except ValueError as exc:  # e.g. a lone surrogate (JSON's "\ud800") cannot be encoded
            raise InvalidRequest(f"the prompt cannot be tokenized: {exc}", param) from None
    # bool is an int to Python, not to JSON: `true` is no token id.
    if isinstance(prompt, list) and all(type(t) is int and t >= 0 for t in prompt):
        return prompt
    raise InvalidRequest("give 'prompt' (a string or a list of token ids, ints >= 0) or 'messages'", param)


async def _chat_tokens(messages: object, render: Callable[[list[dict[str, str]]], str],
                       tokenizer: Tokenizer) -> list[int]:
    try:
        text = await asyncio.to_thread(render, check_messages(messages))
    except InvalidChat as exc:
        raise InvalidRequest(exc.message, exc.param) from None
    ids = await _prompt_tokens(text, tokenizer, "messages")
    return without_double_bos(ids, getattr(tokenizer, "bos_token_id", None))
