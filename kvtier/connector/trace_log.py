"""Request trace log: one line per finished request in the Mooncake JSONL format (kvtier.sim.trace),
chunk hashes and lengths only, so that users can replay their own traffic through kvtier's simulator
and share the file: no token ids, no text, no request ids.

    {"timestamp":0,"input_length":600,"output_length":8,"block_size":256,"hash_ids":[...3 ids]}

`hash_ids` has one id per `block_size` (= chunk_size) tokens of the prompt, the partial last chunk
included: the first 8 bytes of the chunk key's prefix-chained digest (kvtier.keys; the partial
chunk's digest chained the same way, as `save_partial_chunks` would key it), big-endian, shifted
right by 11: 53 bits, exact in a JSON reader that uses doubles. Equal ids mean equal prefixes up to
that chunk, as in Mooncake's traces. Two different prefixes share an id with odds about n^2 / 2^54
over n distinct chunks (birthday bound): 6e-5 for a million, 0.5% for ten million; a collision only
makes the simulator count one wrong hit. `timestamp`: milliseconds from the first request this log
saw to the request's first contact with the connector; `output_length`: the tokens it generated,
an aborted request's included. Lines are written in the order requests finish, so timestamps are not
sorted: sort by them for arrival order. A restart appends to the same file, timestamps from 0 again.

Where it runs: owned by the scheduler-side connector (kvtier.connector.scheduler), on the scheduler's
thread, which calls `arrived` at each contact with a request (the first one counts) and `finished`
from `request_finished`; `stats` and `close` may come from any thread (one lock, taken once per
finished request, never per chunk). Only the scheduler side writes: one file per serving process
(with vLLM's tensor parallelism the scheduler runs once; data-parallel engine cores need one path each).

Never raises into serving. The file is opened once, at start, with O_NOFOLLOW (a symbolic link is
refused) and O_NONBLOCK (a FIFO with no reader is refused instead of blocking; anything but a regular
file is refused), created 0600 and appended to. A refused or failed open, and each failed write, count
in `trace_errors`; write failures are logged at most once a minute (kvtier.log_limit) and the lines
of a failed write are lost (`trace_lines_dropped`); a later write starts on a new line, so a torn line
stays one malformed line. Once the file would pass `max_bytes` (its size at open included), logging
stops with one warning and every later request counts in `trace_lines_dropped`; serving goes on.

Memory: per live request, its arrival time, prompt length and ids (8 bytes a chunk); lines wait in a
buffer of at most FLUSH_LINES lines or FLUSH_BYTES, flushed when either is reached, at the first line
finished FLUSH_S after the last flush, and at `close`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvtier.config_connector import TraceLogConfig
from kvtier.keys import TokenDatabase, chunk_keys, u32_bytes
from kvtier.log_limit import LogLimiter
from kvtier.packed_keys import packed_keys

logger = logging.getLogger(__name__)

COUNTERS = ("trace_lines", "trace_lines_dropped", "trace_errors")
FLUSH_LINES = 64
FLUSH_BYTES = 64 << 10
FLUSH_S = 1.0
ID_SHIFT = 11  # 64 - 53: ids fit a double's mantissa
# One key as kvtier.keys lays it out (namespace digest, then the 16-byte chained digest), for reading
# the ids of a prompt's packed keys in one numpy pass, with no key object per chunk.
_KEY = np.dtype([("namespace", "V8"), ("head", ">u8"), ("rest", "V8")])
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def hash_ids(tokens, namespace_digest: bytes, chunk_size: int) -> np.ndarray:
    """The 53-bit trace id of each chunk of `tokens`, the partial last one included (uint64).

    Hashed here, once per request: the lookup's keys are packed and dropped inside
    `CacheEngine.lookup` (on another thread with background lookups), and its keys leave out the
    partial chunk unless `save_partial_chunks`. One native pass over a 32K-token prompt, ids included,
    takes 59 us (2-core VM); at the end the prompt would first have to be sliced out of the request's
    tokens (51 us), then keyed (75 us, from the key memo). So the ids are made at the first contact,
    when the request's tokens are its prompt. ValueError for ids kvtier.keys refuses (the lookup too)."""
    packed = packed_keys(tokens, namespace_digest, chunk_size, True)
    raw = packed.packed if packed is not None else b"".join(
        chunk_keys(u32_bytes(tokens), 0, namespace_digest, namespace_digest, chunk_size, True))
    return np.frombuffer(raw, _KEY)["head"] >> ID_SHIFT


@dataclass(slots=True)
class _Live:
    arrival: float  # the clock's reading at the first contact
    input_length: int
    ids: np.ndarray


class TraceLog:
    def __init__(self, path: str, max_bytes: int, db: TokenDatabase,
                 clock: Callable[[], float] = time.monotonic):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.max_bytes = max_bytes
        self.block_size = db.chunk_size
        self._namespace = db.namespace_digest
        self._clock = clock
        self._lock = threading.Lock()
        self._limiter = LogLimiter(logger)
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._live: dict[str, _Live] = {}
        self._origin: float | None = None  # the first contact with the first request seen
        self._buffer: list[bytes] = []
        self._buffered = 0  # bytes in `_buffer`
        self._size = 0  # bytes in the file
        self._torn = False  # the file ends inside a line (a write failed part-way)
        self._full = False  # `max_bytes` reached: logging stopped
        self._flushed_at = clock()
        self._fd = self._open()

    @classmethod
    def from_config(cls, config: TraceLogConfig, db: TokenDatabase) -> TraceLog | None:
        """A log as `config` says, or None when it names no file (off: the default)."""
        return cls(config.path, config.max_bytes, db) if config.path else None

    def _open(self) -> int | None:
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        except (OSError, ValueError) as exc:  # (ValueError: a NUL in a path built in code)
            why = "it is a symbolic link" if getattr(exc, "errno", None) == errno.ELOOP \
                else getattr(exc, "strerror", None) or str(exc)
            return self._refuse(why)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                return self._refuse("not a regular file")
            os.set_blocking(fd, True)
        except OSError as exc:
            os.close(fd)
            return self._refuse(exc.strerror or str(exc))
        self._size = info.st_size
        logger.info("trace log: one line per finished request appended to %s", self.path)
        return fd

    def _refuse(self, why: str) -> None:
        self._counts["trace_errors"] += 1
        logger.warning("trace log: cannot write %s (%s); requests are not logged", self.path, why)
        return None

    def arrived(self, request) -> None:
        """A contact with `request` (anything with `request_id` and `all_token_ids`); the first one
        takes its arrival time and prompt, whose tokens are all it has then. Later ones: nothing."""
        if self._fd is None or self._full or request.request_id in self._live:
            return
        now, tokens = self._clock(), request.all_token_ids
        try:
            ids = hash_ids(tokens, self._namespace, self.block_size)
        except (ValueError, TypeError):  # ids the lookup refuses as well: nothing to log
            return
        if self._origin is None:
            self._origin = now
        self._live[request.request_id] = _Live(now, len(tokens), ids)

    def finished(self, request) -> None:
        """`request` is done (finished or aborted): its line goes into the buffer."""
        if request.request_id not in self._live:
            self.arrived(request)  # first seen at its end (aborted before its lookup): generated nothing
        live = self._live.pop(request.request_id, None)
        with self._lock:
            if self._fd is None:
                return
            if self._full:
                self._counts["trace_lines_dropped"] += 1
                return
            if live is not None:
                self._add(self._line(live, len(request.all_token_ids) - live.input_length))

    def _line(self, live: _Live, output_length: int) -> bytes:
        record = {"timestamp": int((live.arrival - self._origin) * 1000), "input_length": live.input_length,
                  "output_length": max(0, output_length), "block_size": self.block_size,
                  "hash_ids": live.ids.tolist()}
        return (json.dumps(record, separators=(",", ":")) + "\n").encode()

    def _add(self, line: bytes) -> None:
        if self._size + self._buffered + len(line) > self.max_bytes:
            self._full = True
            self._counts["trace_lines_dropped"] += 1
            self._live.clear()
            logger.warning("trace log: %s reached trace_log.max_bytes (%d bytes); no more requests are "
                           "logged (counted in trace_lines_dropped)", self.path, self.max_bytes)
            self._flush()
            return
        self._buffer.append(line)
        self._buffered += len(line)
        now = self._clock()
        if len(self._buffer) >= FLUSH_LINES or self._buffered >= FLUSH_BYTES \
                or now - self._flushed_at >= FLUSH_S:
            self._flush()
            self._flushed_at = now

    def _flush(self) -> None:
        """Write the buffered lines in one go (under the lock). A failure loses them, counted."""
        if not self._buffer:
            return
        lead = b"\n" if self._torn else b""  # the last write failed inside a line: end it first
        data, lines = lead + b"".join(self._buffer), len(self._buffer)
        self._buffer, self._buffered = [], 0
        written = 0
        try:
            while written < len(data):
                n = os.write(self._fd, memoryview(data)[written:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += n
        except OSError as exc:
            self._counts["trace_errors"] += 1
            done = data.count(b"\n", 0, written) - (len(lead) if written else 0)
            self._counts["trace_lines_dropped"] += lines - done
            self._counts["trace_lines"] += done
            self._torn = self._torn if not written else data[written - 1:written] != b"\n"
            self._limiter.warning("write", "trace log: writing %s failed (%s); %d requests not logged",
                                  self.path, exc.strerror or exc, lines - done)
        else:
            self._counts["trace_lines"] += lines
            self._torn = False
        self._size += written

    def stats(self) -> dict[str, int]:
        """Lines written, lines lost (max_bytes reached, failed writes) and errors (open, write)."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        """Write what is buffered and close the file; later calls do nothing."""
        with self._lock:
            if self._fd is None:
                return
            self._flush()
            fd, self._fd = self._fd, None
            self._live.clear()
            try:
                os.close(fd)
            except OSError as exc:  # (NFS reports a failed write-back at close)
                self._counts["trace_errors"] += 1
                logger.warning("trace log: closing %s failed: %s", self.path, exc.strerror or exc)
