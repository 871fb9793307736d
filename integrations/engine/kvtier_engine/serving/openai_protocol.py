"""The OpenAI completions wire format, sans IO: request bodies in, response and chunk bodies out.

Pure functions over already-decoded JSON (dicts); the HTTP server (`server.py`) does the I/O. Every
rejected body raises `InvalidRequest` naming the offending field, which the server turns into a 400.

What is accepted (https://platform.openai.com/docs/api-reference/completions):
- `prompt`: a string, a list of token ids, or a list of those (a batch: one engine request each).
- `n`: choices per prompt (choice `i` of prompt `p` has index `p * n + i`; with a `seed`, choice `i`
  draws from `seed + i`, so choices differ). At most MAX_CHOICES choices per call in all.
- `max_tokens` (default 16), `temperature` (default 1), `top_p`, `seed`, `stop` (a string or a list),
  `stream`, `stream_options.include_usage`, `user` (ignored), and two extensions: `top_k`, `ignore_eos`.
  Their ranges are `SamplingParams`' (`sampling.py`): finite numbers only, temperature 0 or within
  [MIN_TEMPERATURE, MAX_TEMPERATURE], at most MAX_STOP_STRINGS stop strings of MAX_STOP_CHARS each.
- `logprobs` (an int): each token's log-probability and the top `logprobs` tokens' (the model's own
  distribution, before temperature and filtering), in the legacy completions shape.
- OpenAI fields this engine does not implement (`best_of`, `echo`, penalties, ...) are accepted
  only at their neutral value, so a client never silently gets something other than what it asked for.
  Any other key is rejected, as OpenAI does.
A `null` field means its default, as in OpenAI's API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtier_engine.llm_engine import RequestOutput
from kvtier_engine.request import RequestMetrics
from kvtier_engine.sampling import InvalidSamplingParams, SamplingParams, TokenLogprobs

# Choices one call may ask for (prompts times `n`): each is a request in the engine.
MAX_CHOICES = 64
_FIELDS = frozenset({"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                     "stream", "stream_options", "ignore_eos", "user", "logprobs", "n", "kv_transfer_params"})
# Fields we do not implement, with the values that ask for nothing beyond what we do.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "echo": (False,), "suffix": ("",),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
}


class InvalidRequest(ValueError):
    """A request body the server cannot serve; `param` names the field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str | None  # None: the client left it out; the served model answers
    prompt: str | tuple[int, ...]  # the first (or only) prompt
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # streaming: a last chunk with `usage` and no choices
    n: int = 1  # choices per prompt
    more_prompts: tuple[str | tuple[int, ...], ...] = ()  # a batch's prompts after the first
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated prefill (kvtier_engine.disagg)

    @property
    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        return (self.prompt, *self.more_prompts)


@dataclass(frozen=True, slots=True)
class CompletionHead:
    """What every body and chunk of one completion repeats."""

    id: str
    created: int  # unix seconds
    model: str
    logprobs: bool = False  # whether the choices carry log-probabilities (else `"logprobs": null`)
    n: int = 1  # choices per prompt: usage counts each prompt once


def parse_completion_request(body: object, max_model_len: int | None = None) -> CompletionRequest:
    """Validate a decoded `POST /v1/completions` body. Raises `InvalidRequest` (-> 400), also for a
    list of token ids that leaves no room in `max_model_len` (found by its length alone)."""
    check_fields(body, _FIELDS, _NEUTRAL)
    model, stream, include_usage = request_head(body)
    prompts = _prompts(body.get("prompt"), max_model_len)
    params = sampling_params(body, logprobs=_int(body, "logprobs", None))
    n = choices_per_prompt(body, len(prompts))
    return CompletionRequest(model, prompts[0], params, stream, include_usage, n, prompts[1:],
                             transfer_params(body, n * len(prompts)))


def transfer_params(body: dict[str, Any], num_choices: int) -> dict[str, Any] | None:
    """`kv_transfer_params`: an object, for a request of one choice (the engine checks its fields
    against this instance's --kv-role: kvtier_engine.disagg)."""
    params = body.get("kv_transfer_params")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InvalidRequest("'kv_transfer_params' must be an object", "kv_transfer_params")
    if num_choices != 1:
        raise InvalidRequest("'kv_transfer_params' needs a request of one prompt and n=1",
                             "kv_transfer_params")
    return params


def choices_per_prompt(body: dict[str, Any], num_prompts: int = 1) -> int:
    """`n`, checked: each choice is an engine request, so one call may not ask for too many."""
    n = _int(body, "n", 1)
    if n < 1 or n * num_prompts > MAX_CHOICES:
        raise InvalidRequest(f"'n' must be at least 1, and n times the number of prompts at most "
                             f"{MAX_CHOICES}, got n={n} for {num_prompts} prompt(s)", "n")
    return n


def check_fields(body: object, fields: frozenset[str], neutral: dict[str, tuple[Any, ...]]) -> None:
    """`body` is an object holding only `fields`, and `neutral` ones at a value that asks for nothing
    (or null); anything else is a 400 naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for key in body:
        if key in neutral:
            if body[key] is not None and body[key] not in neutral[key]:
                raise InvalidRequest(f"{key!r} is not supported by this server", key)
        elif key not in fields:
            raise InvalidRequest(f"Unrecognized request argument supplied: {key}", key)


def request_head(body: dict[str, Any]) -> tuple[str | None, bool, bool]:
    """(`model`, `stream`, `stream_options.include_usage`), checked: what every endpoint's body has."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", "model")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise InvalidRequest("'stream_options' must be an object with only 'include_usage'", "stream_options")
    include_usage = _bool(options or {}, "include_usage", False, "stream_options.include_usage")
    return model, stream, include_usage


def sampling_params(body: dict[str, Any], default_max_tokens: int = 16, max_tokens_field: str = "max_tokens",
                    logprobs: int | None = None) -> SamplingParams:
    """The `SamplingParams` a body asks for (OpenAI's defaults where a field is absent), its token
    limit read from `max_tokens_field`; `logprobs` as the endpoint reads it. Types are checked here;
    ranges (finite numbers, bounded stop strings) by `SamplingParams`."""
    try:
        return SamplingParams(temperature=_number(body, "temperature", 1.0), top_k=_int(body, "top_k", None),
                              top_p=_number(body, "top_p", 1.0),
                              max_tokens=_int(body, max_tokens_field, default_max_tokens),
                              seed=_int(body, "seed", None), stop=_stop(body.get("stop")),
                              ignore_eos=_bool(body, "ignore_eos", False), logprobs=logprobs)
    except InvalidSamplingParams as exc:
        param = max_tokens_field if exc.param == "max_tokens" else exc.param
        raise InvalidRequest(str(exc).replace("max_tokens", param), param) from None


# -- responses -----------------------------------------------------------------------------------


def completion_body(head: CompletionHead, outputs: list[RequestOutput]) -> dict[str, Any]:
    """The non-streamed response: every choice's whole text, usage, and the `kvtier` extension (of
    the first choice)."""
    choices = [_choice(out.text, out.finish_reason, _logprobs(head, out, out.logprobs), i)
               for i, out in enumerate(outputs)]
    return with_transfer({"id": head.id, "object": "text_completion", "created": head.created,
                          "model": head.model, "choices": choices, "usage": usage(outputs, head.n),
                          "kvtier": kvtier_info(outputs[0].metrics)}, outputs[0])


def with_transfer(body: dict[str, Any], output: RequestOutput) -> dict[str, Any]:
    """`body` with a prefill's `kv_transfer_params` (vLLM's top-level field), where it has some."""
    if output.kv_transfer_params is not None:
        body["kv_transfer_params"] = output.kv_transfer_params
    return body


def completion_chunk(head: CompletionHead, output: RequestOutput, index: int = 0) -> dict[str, Any]:
    """One streamed chunk of choice `index`: the text new since its previous chunk; the last one
    carries `kvtier` too."""
    chunk = {"id": head.id, "object": "text_completion", "created": head.created, "model": head.model,
             "choices": [_choice(output.new_text, output.finish_reason,
                                 _logprobs(head, output, output.new_logprobs), index)]}
    if output.finished:
        chunk["kvtier"] = kvtier_info(output.metrics)
        with_transfer(chunk, output)
    return chunk


def usage_chunk(head: CompletionHead, outputs: list[RequestOutput], object_: str = "text_completion",
                count: Callable[[list[RequestOutput], int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """`stream_options.include_usage`: the chunk after the last, with no choices (OpenAI's shape).
    Chat passes its own object name and usage (with cached tokens)."""
    return {"id": head.id, "object": object_, "created": head.created, "model": head.model,
            "choices": [], "usage": (count or usage)(outputs, head.n)}


def usage(outputs: list[RequestOutput], n: int = 1) -> dict[str, int]:
    """Tokens of a call's choices (`n` per prompt): each prompt counted once, every completion."""
    prompt = sum(len(out.prompt_token_ids) for out in outputs[::n])
    completion = sum(len(out.token_ids) for out in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def kvtier_info(metrics: RequestMetrics) -> dict[str, Any]:
    """Where the prompt's KV came from: computed here, the device prefix cache, or loaded from kvtier."""
    return {"ttft_s": metrics.ttft_s, "prefill_tokens_computed": metrics.prefill_tokens_computed,
            "tokens_loaded": metrics.tokens_loaded,
            "tokens_cached_on_device": metrics.tokens_cached_on_device}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- fields --------------------------------------------------------------------------------------


def _choice(text: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
            index: int) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def _logprobs(head: CompletionHead, output: RequestOutput,
              tokens: tuple[TokenLogprobs, ...]) -> dict[str, Any] | None:
    """The completions API's log-probabilities of `tokens` (the last of `output.logprobs`): each
    token's text, its log-probability, the most likely tokens' and where it starts in the text."""
    if not head.logprobs:
        return None
    offset = sum(len(t.chosen.text) for t in output.logprobs[:len(output.logprobs) - len(tokens)])
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.chosen.text)
    return {"tokens": [t.chosen.text for t in tokens], "token_logprobs": [t.chosen.logprob for t in tokens],
            "top_logprobs": [{lp.text: lp.logprob for lp in t.top} for t in tokens], "text_offset": offsets}


def check_prompt_length(num_tokens: int, max_model_len: int | None, param: str = "prompt") -> None:
    if max_model_len is not None and num_tokens >= max_model_len:
        raise InvalidRequest(f"prompt of {num_tokens} tokens leaves no room in the {max_model_len}-token "
                             "context", param)


def _prompts(value: object, max_model_len: int | None) -> tuple[str | tuple[int, ...], ...]:
    """A prompt, or a batch of them (a list of strings, or of lists of token ids)."""
    if isinstance(value, list) and value and isinstance(value[0], str | list):
        if len(value) > MAX_CHOICES:
            raise InvalidRequest(f"a batch of {len(value)} prompts is over the {MAX_CHOICES} one call may "
                                 "have", "prompt")
        return tuple(_prompt(v, max_model_len) for v in value)
    return (_prompt(value, max_model_len),)


def _prompt(value: object, max_model_len: int | None) -> str | tuple[int, ...]:
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'prompt' must not be empty", "prompt")
        return value
    if isinstance(value, list):
        check_prompt_length(len(value), max_model_len)  # before a pass over ids that may be millions
    if isinstance(value, list) and value and all(_is_int(t) and t >= 0 for t in value):
        return tuple(value)
    if value is None:
        raise InvalidRequest("'prompt' is required", "prompt")
    raise InvalidRequest("'prompt' must be a non-empty string or a non-empty list of token ids (ints >= 0)",
                         "prompt")


def _stop(value: object) -> tuple[str, ...]:
    stops = () if value is None else (value,) if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest("'stop' must be a non-empty string or a list of them", "stop")
    return tuple(stops)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise InvalidRequest(f"'{name}' must be an integer, got {value!r}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not (_is_int(value) or isinstance(value, float)):
        raise InvalidRequest(f"'{name}' must be a number, got {value!r}", name)
    return float(value)


def _bool(body: dict[str, Any], name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{param or name}' must be true or false, got {value!r}", param or name)
    return value
