"""Chat messages to prompt text, through the model's own chat template (jinja2, as Hugging Face does).

    text = render_chat(messages, template, bos_token="<s>", eos_token="</s>")
    ids = without_double_bos(tokenizer.encode(text), tokenizer.bos_token_id)

`messages` are OpenAI's ({role, content}); `check_messages` validates them first, naming the field
at fault, and `render_chat` renders them with `add_generation_prompt=True`, so the text ends where
the assistant's reply begins. Every failure is an `InvalidChat` (the server's 400), with `param`.

Templates come from model files, so they are untrusted code: they run in jinja2's immutable sandbox
(no attribute starting with `_`, no mutating the messages, `range` bounded), and whatever they raise
(their own `raise_exception`, a refused attribute, a type error) is that request's failure, never the
server's. Compiled templates are cached by their text.

Where it runs: anywhere; pure and thread-safe (the server renders on a worker thread).
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system role: rendered as "system", which every template knows.
_ALIASES = {"developer": "system"}
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_call_id"})


class InvalidChat(ValueError):
    """Messages that cannot be rendered; `param` names the field at fault (e.g. `messages[1].role`)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message)
        self.message = message
        self.param = param


def check_messages(messages: object) -> list[dict[str, str]]:
    """Validated messages as the template sees them: {role, content: str} (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidChat("'messages' must be a non-empty list of messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def render_chat(messages: list[dict[str, str]], template: str | None, bos_token: str | None = None,
                eos_token: str | None = None) -> str:
    """The prompt text for checked `messages`, ready for the assistant's turn. Raises InvalidChat."""
    if not template:
        raise InvalidChat("this model has no chat template: use /v1/completions with a prompt, or "
                          "start the server with --chat-template FILE", "messages")
    try:
        compiled = _compile(template)
        return compiled.render(messages=messages, add_generation_prompt=True, bos_token=bos_token or "",
                               eos_token=eos_token or "")
    except jinja2.exceptions.SecurityError as exc:
        raise InvalidChat(f"the chat template tried something the sandbox refuses: {exc}") from None
    except jinja2.TemplateError as exc:  # raise_exception's, an undefined name, a syntax error
        raise InvalidChat(f"the chat template refused the messages: {exc}") from None
    except Exception as exc:  # the template's own bug (e.g. adding a str to an int) fails this request only
        raise InvalidChat(f"the chat template failed on the messages: {type(exc).__name__}: {exc}") from None


def without_double_bos(token_ids: list[int], bos_token_id: int | None) -> list[int]:
    """The rendered prompt's ids with one BOS where there are two: a template that writes `bos_token`
    (Llama 3's do) encoded by a tokenizer that adds BOS itself gives two, which the model never saw."""
    if bos_token_id is not None and token_ids[:2] == [bos_token_id, bos_token_id]:
        return token_ids[1:]
    return token_ids


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # HF's settings: templates are written for trim_blocks/lstrip_blocks.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:  # some templates print today's date into the system prompt
    return datetime.datetime.now().strftime(fmt)


def _message(message: object, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise InvalidChat(f"'{where}' must be an object with 'role' and 'content'", where)
    for key in message:
        if key not in _MESSAGE_KEYS:
            raise InvalidChat(f"'{where}.{key}' is not supported by this server", f"{where}.{key}")
    role = _ALIASES.get(message.get("role"), message.get("role"))
    if role not in ROLES:
        raise InvalidChat(f"'{where}.role' must be one of {', '.join(ROLES)}, got {message.get('role')!r}",
                          f"{where}.role")
    out: dict[str, Any] = {"role": role, "content": _content(message.get("content"), f"{where}.content")}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise InvalidChat(f"'{where}.{key}' must be a string", f"{where}.{key}")
            out[key] = message[key]
    return out


def _content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for i, part in enumerate(content):
            is_text = isinstance(part, dict) and part.get("type") == "text" and set(part) <= {"type", "text"}
            if not (is_text and isinstance(part.get("text"), str)):
                raise InvalidChat(f"'{where}[{i}]' must be a text part ({{\"type\": \"text\", \"text\": "
                                  "...}): this server takes text only", f"{where}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidChat(f"'{where}' must be a string or a non-empty list of text parts", where)
