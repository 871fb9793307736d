"""What the proxy reads and writes in request bodies, sans IO: pure functions over decoded JSON.

The proxy checks as little as it can: a body must be a JSON object, and the rest is the engine's to
judge (a prefill instance's 400 reaches the client unchanged). It only decides whether a request
can be split (`colocated_reason`), what of it the prefix lookup needs (`prompt_query`), writes the
prefill's and the decode's bodies, and takes the prefill's `kv_transfer_params` from its reply,
which it never looks into beyond `transfer_id`.
"""

from __future__ import annotations

import json
from typing import Any

from kvtier_engine.serving.openai_protocol import error_body

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
# Every prefill reply carries this; the proxy keeps it to release the held KV.
TRANSFER_ID = "transfer_id"


class BadBody(ValueError):
    """A request body that is not a JSON object (a 400 for the client)."""


def parse_body(raw: bytes) -> dict[str, Any]:
    def reject_constant(name: str) -> None:  # NaN and Infinity are not JSON (as the engine says)
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadBody(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadBody("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadBody(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def colocated_reason(body: dict[str, Any], path: str) -> str | None:
    """Why this request goes to a decode instance whole, unsplit; None when it can be split.

    A transfer holds the KV of one sequence: `n` choices or a batch of prompts would need one each,
    and a body that already names a transfer was split by someone else."""
    if "kv_transfer_params" in body:
        return "kv_transfer_params given"
    if body.get("n") not in (None, 1):
        return "n > 1"
    prompt = body.get("prompt")
    # A list of token ids is one prompt; a list of strings or of id lists is a batch.
    if path == COMPLETIONS and isinstance(prompt, list) and len(prompt) > 1 \
            and any(isinstance(p, (str, list)) for p in prompt):
        return "a batch of prompts"
    return None


def prompt_query(body: dict[str, Any], path: str) -> list[int] | dict[str, Any] | None:
    """What the prefix lookup needs of a request that can be split: its token ids when the body gives
    them, else the body of a `POST /tokenize` that gives them (the `prompt` or the `messages` as
    sent); None when there is nothing to look up (the engine judges such a body)."""
    if path == CHAT:
        messages = body.get("messages")
        return {"messages": messages} if isinstance(messages, list) and messages else None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return {"prompt": prompt}
    # bool is an int to Python, not to JSON; the controller takes ids below 2**32.
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < 1 << 32 for t in prompt):
        return prompt
    return None


def prefill_body(body: dict[str, Any], path: str) -> bytes:
    """The request run to its first token, unstreamed, its KV kept for a decode instance."""
    prefill = dict(body, stream=False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    if path == CHAT and "max_completion_tokens" in body:
        prefill["max_completion_tokens"] = 1
    prefill.pop("stream_options", None)  # the engine refuses it without `stream`
    return json.dumps(prefill).encode()


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any]) -> bytes:
    return json.dumps(dict(body, kv_transfer_params=kv_transfer_params)).encode()


def transfer_params(reply: bytes) -> dict[str, Any] | None:
    """The `kv_transfer_params` of a prefill's 200 reply; None when it has no usable ones."""
    try:
        decoded = json.loads(reply)
    except (ValueError, RecursionError):
        return None
    params = decoded.get("kv_transfer_params") if isinstance(decoded, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get(TRANSFER_ID), str):
        return None
    return params


def error_event(message: str) -> bytes:
    """The SSE event that ends a stream cut short (as the engine's own streams end), then [DONE]."""
    return b"data: " + json.dumps(error_body(message, "server_error")).encode() + b"\n\ndata: [DONE]\n\n"
