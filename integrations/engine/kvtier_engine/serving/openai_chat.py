"""The OpenAI chat completions wire format, sans IO: `POST /v1/chat/completions` bodies in, response
and chunk bodies out (https://platform.openai.com/docs/api-reference/chat).

Pure functions over decoded JSON, like `openai_protocol.py` (whose field checks and sampling
parameters they share); rendering the messages into a prompt is `chat_template.py`'s, on the server.

What is accepted: `messages` (checked by `chat_template.check_messages`), `max_completion_tokens` or
its older name `max_tokens` (default: as many as the context leaves), `temperature`, `top_p`, `seed`,
`stop`, `stream`, `stream_options.include_usage`, `logprobs` and `top_logprobs` (of the model's
distribution, before temperature and filtering), `user` (ignored), and the extensions `top_k` and
`ignore_eos`, and `n` choices (as completions'). Tools, structured output and penalties are accepted
only at their neutral value; anything else is a 400 naming the parameter.

A stream is: a chunk with the assistant role, chunks of new content, a chunk with `finish_reason`,
then (`include_usage`) one with `usage` and no choices; the server adds `data: [DONE]`.
`usage.prompt_tokens_details.cached_tokens` counts the prompt tokens whose KV was not computed for
this request: found in the device prefix cache or loaded from kvtier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtier_engine.chat_template import check_messages
from kvtier_engine.llm_engine import RequestOutput
from kvtier_engine.sampling import MAX_LOGPROBS, Logprob, SamplingParams, TokenLogprobs
from kvtier_engine.serving.openai_protocol import (
    CompletionHead,
    InvalidRequest,
    check_fields,
    choices_per_prompt,
    kvtier_info,
    request_head,
    sampling_params,
    transfer_params,
    usage,
    usage_chunk,
    with_transfer,
)

_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                     "top_k", "seed", "stop", "stream", "stream_options", "ignore_eos", "user", "logprobs",
                     "top_logprobs", "n", "kv_transfer_params"})
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
    "parallel_tool_calls": (True, False), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "store": (False,),
}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str | None  # None: the served model answers
    messages: list[dict[str, str]]  # checked: {role, content: str}
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated prefill (kvtier_engine.disagg)

    @property
    def prompts(self) -> tuple[list[dict[str, str]]]:
        return (self.messages,)


def parse_chat_request(body: object, max_model_len: int) -> ChatRequest:
    """Validate a decoded chat body. Raises `InvalidRequest` (-> 400) naming the field at fault."""
    check_fields(body, _FIELDS, _NEUTRAL)
    assert isinstance(body, dict)
    model, stream, include_usage = request_head(body)
    field = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None and body["max_tokens"] != body["max_completion_tokens"]:
            raise InvalidRequest("give 'max_completion_tokens' or 'max_tokens', not both", "max_tokens")
        field = "max_completion_tokens"
    # No limit asked: the context's end stops the reply (the engine finishes it with "length").
    params = sampling_params(body, max_model_len, field, _logprobs_asked(body))
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as exc:  # InvalidChat, with the field at fault
        raise InvalidRequest(str(exc), getattr(exc, "param", "messages")) from None
    n = choices_per_prompt(body)
    return ChatRequest(model, messages, params, stream, include_usage, n, transfer_params(body, n))


def _logprobs_asked(body: dict[str, Any]) -> int | None:
    """`logprobs: true` asks for the chosen tokens' log-probabilities, `top_logprobs` for the top ones'."""
    top = body.get("top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
        raise InvalidRequest("'logprobs' must be true or false", "logprobs")
    if not body.get("logprobs"):
        return None
    in_range = isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= MAX_LOGPROBS
    if top is not None and not in_range:
        raise InvalidRequest(f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs")
    return top or 0


def chat_body(head: CompletionHead, outputs: list[RequestOutput]) -> dict[str, Any]:
    """The non-streamed response: the assistant's message per choice, usage, and the `kvtier`
    extension (of the first choice)."""
    choices = [{"index": i, "message": {"role": "assistant", "content": out.text},
                "finish_reason": out.finish_reason, "logprobs": _logprobs(head, out.logprobs)}
               for i, out in enumerate(outputs)]
    return with_transfer({"id": head.id, "object": "chat.completion", "created": head.created,
                          "model": head.model, "choices": choices, "usage": chat_usage(outputs, head.n),
                          "kvtier": kvtier_info(outputs[0].metrics)}, outputs[0])


def chat_role_chunks(head: CompletionHead, num_choices: int) -> list[dict[str, Any]]:
    """A stream's first chunks: who speaks in each choice, before any content."""
    return [_chunk(head, {"role": "assistant", "content": ""}, None, None, i) for i in range(num_choices)]


def chat_chunk(head: CompletionHead, output: RequestOutput, index: int = 0) -> dict[str, Any]:
    """Choice `index`'s content new since its previous chunk; its last has `finish_reason` and `kvtier`."""
    chunk = _chunk(head, {"content": output.new_text} if output.new_text else {}, output.finish_reason,
                   _logprobs(head, output.new_logprobs), index)
    if output.finished:
        chunk["kvtier"] = kvtier_info(output.metrics)
        with_transfer(chunk, output)
    return chunk


def chat_usage_chunk(head: CompletionHead, outputs: list[RequestOutput]) -> dict[str, Any]:
    return usage_chunk(head, outputs, "chat.completion.chunk", chat_usage)


def chat_usage(outputs: list[RequestOutput], n: int = 1) -> dict[str, Any]:
    """`usage`, and the prompt tokens whose KV was found (device prefix cache) or loaded (kvtier)."""
    cached = sum(out.metrics.tokens_cached_on_device + out.metrics.tokens_loaded for out in outputs[::n])
    return {**usage(outputs, n), "prompt_tokens_details": {"cached_tokens": cached}}


def _chunk(head: CompletionHead, delta: dict[str, str], finish_reason: str | None,
           logprobs: dict[str, Any] | None, index: int) -> dict[str, Any]:
    return {"id": head.id, "object": "chat.completion.chunk", "created": head.created, "model": head.model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": logprobs}]}


def _logprobs(head: CompletionHead, tokens: tuple[TokenLogprobs, ...]) -> dict[str, Any] | None:
    """The chat API's shape: per token, its text, bytes, log-probability and the top tokens'."""
    if not head.logprobs:
        return None
    return {"content": [{**_token(t.chosen), "top_logprobs": [_token(lp) for lp in t.top]} for t in tokens],
            "refusal": None}


def _token(lp: Logprob) -> dict[str, Any]:
    return {"token": lp.text, "logprob": lp.logprob, "bytes": list(lp.text.encode())}
