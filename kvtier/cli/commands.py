"""What each `kvtier` command sends: the controller's address and token, and one request.

The bodies are the controller's own pydantic models (kvtier.fleet.messages), built here first, so an
id or tier name the controller would refuse is a usage error (exit 2) naming the option, before
anything is sent. Side-effect free apart from reading the token file, the tokens file or stdin.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from kvtier.cli.exits import UsageError
from kvtier.cli.files import read_text
from kvtier.cli.parser import DEFAULT_URL, TOKEN_ENV, URL_ENV
from kvtier.cli.prompt import prompt_tokens
from kvtier.config import MAX_TOKEN_BYTES
from kvtier.fleet.messages import (
    AdminRequest,
    ClearRequest,
    CompressRequest,
    DecompressRequest,
    MoveRequest,
    PromptRequest,
)

_PATHS = {"instances": "/v1/instances", "stats": "/v1/stats", "lookup": "/v1/lookup", "route": "/v1/route",
          "pin": "/v1/pin", "unpin": "/v1/unpin", "move": "/v1/move", "compress": "/v1/compress",
          "decompress": "/v1/decompress", "clear": "/v1/clear"}
# A body field named in an error as the option that set it.
_OPTIONS = {"model_id": "--model", "instance_id": "--instance", "to": "--to", "tier": "--tier",
            "codec": "--codec", "tokens": "the prompt's tokens"}


@dataclass(frozen=True, slots=True)
class Request:
    path: str  # GET when there is no body, else POST
    body: BaseModel | None = None


@dataclass(frozen=True, slots=True)
class Controller:
    url: str
    url_from: str  # where the URL came from, for messages
    token: str | None


def controller(args: Namespace, env: Mapping[str, str]) -> Controller:
    if args.controller is not None:
        url, url_from = args.controller, "--controller"
    elif env.get(URL_ENV):
        url, url_from = env[URL_ENV], URL_ENV
    else:
        url, url_from = DEFAULT_URL, "the default"
    if args.token_file is not None:
        token = _read_token(args.token_file)
    else:
        token = env.get(TOKEN_ENV) or None
        if token is not None:
            _check_token(token, TOKEN_ENV)
    return Controller(url, url_from, token)


def _read_token(name: str) -> str:
    where = f"--token-file {'stdin' if name == '-' else name}"
    token = read_text(name, where, MAX_TOKEN_BYTES).strip()
    if not token:
        raise UsageError(f"{where}: the file is empty")
    _check_token(token, where)
    return token


def _check_token(token: str, where: str) -> None:
    # An HTTP header carries printable ASCII; anything else could never match (and a newline would
    # end the header). The message never shows the token.
    if not all(" " < c <= "~" for c in token):
        raise UsageError(f"{where}: the token must be one word of printable ASCII")


def request(args: Namespace) -> Request:
    return Request(_PATHS[args.command], _body(args))


def _body(args: Namespace) -> BaseModel | None:
    if args.command in ("instances", "stats"):
        return None
    if args.command == "clear":
        return _message(ClearRequest, instance_id=args.instance, tier=args.tier)
    _message(PromptRequest, model_id=args.model, tokens=[])  # a bad --model before any tokenizing
    tokens = prompt_tokens(args.tokens_file, args.text, args.tokenizer)
    if args.command in ("lookup", "route"):
        return _message(PromptRequest, model_id=args.model, tokens=tokens)
    if args.command == "move":
        return _message(MoveRequest, model_id=args.model, tokens=tokens, instance_id=args.instance,
                        to=args.to, copy=args.copy)
    if args.command == "compress":
        return _message(CompressRequest, model_id=args.model, tokens=tokens, instance_id=args.instance,
                        codec=args.codec, tier=args.tier)
    if args.command == "decompress":
        return _message(DecompressRequest, model_id=args.model, tokens=tokens, instance_id=args.instance,
                        tier=args.tier)
    return _message(AdminRequest, model_id=args.model, tokens=tokens, instance_id=args.instance)


def _message(model: type[BaseModel], **fields) -> BaseModel:
    try:
        return model(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        raise UsageError(f"{_OPTIONS.get(field, field)}: {error['msg']}") from None
