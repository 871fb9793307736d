"""What the `kvtier` command's exit statuses mean, and the one-line message of each failure.

Scripts branch on these, so they are a contract: the numbers never change meaning. `--help` and the
README print `MEANINGS`. Every expected failure becomes (status, one line) here; main() writes the
line as `kvtier: <message>` on stderr and never shows a traceback for them.
"""

from __future__ import annotations

from kvtier.errors import KvtierError
from kvtier.fleet.http_client import HttpError, Unreachable

OK = 0
CONTROLLER_ERROR = 1
USAGE = 2
UNREACHABLE = 3
UNAUTHORIZED = 4
NOT_FOUND = 5
CONFLICT = 6
INTERRUPTED = 130  # the shell's convention for SIGINT

MEANINGS = {
    OK: "ok",
    CONTROLLER_ERROR: "the controller answered an error (4xx/5xx other than those below)",
    USAGE: "usage error (bad arguments, an unreadable or invalid file)",
    UNREACHABLE: "the controller is unreachable (or did not answer in JSON within --timeout)",
    UNAUTHORIZED: "authentication failed (401: wrong or missing token)",
    NOT_FOUND: "not found (404: unknown instance)",
    CONFLICT: "conflict (409: the instance is down)",
}

_BY_STATUS = {401: UNAUTHORIZED, 404: NOT_FOUND, 409: CONFLICT}
MAX_MESSAGE_CHARS = 500
_TOKEN_HINT = " (give the token with --token-file or KVTIER_CONTROLLER_TOKEN)"


class UsageError(KvtierError):
    """The command line or a file it names is wrong: nothing was sent to the controller."""


class ReplyMismatch(KvtierError):
    """The controller's reply is not the body this kvtier expects (another version)."""


def failure(exc: BaseException, url: str) -> tuple[int, str]:
    """(exit status, one-line message) of an expected failure; raises `exc` again for any other."""
    if isinstance(exc, UsageError):
        return USAGE, str(exc)
    if isinstance(exc, ReplyMismatch):
        return CONTROLLER_ERROR, str(exc)
    if isinstance(exc, Unreachable):
        return UNREACHABLE, f"cannot reach the controller at {url}: {exc}"
    if isinstance(exc, HttpError):
        status = _BY_STATUS.get(exc.status, CONTROLLER_ERROR)
        hint = _TOKEN_HINT if status == UNAUTHORIZED else ""
        return status, f"the controller answered {exc.status}: {exc.detail}{hint}"
    raise exc


def one_line(message: str) -> str:
    """`message` on one line, bounded: a detail from the network may hold newlines or be long."""
    line = " ".join(message.split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS - 3] + "..."
