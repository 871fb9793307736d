"""The client side of benchmarks/disagg.py: streamed completions timed chunk by chunk, the workload
(short requests decoding while long prompts arrive among them) and its latency statistics.

Each request is one thread with its own `http.client` connection; a thread only appends to its own
`Stream` record, which the main thread reads after joining it (and, while it runs, only counts).
Times are `time.perf_counter()` in this process: client-side, so the proxy's hop and the SSE
relay are inside every number, as a user would see them.

Inter-token latency follows vLLM's benchmark_serving: one sample per streamed chunk, the time since
the request's previous chunk. The server merges the tokens of a client that has not read its socket
yet into one chunk; `logprobs: 0` makes each chunk list its tokens, so such merges are counted
(`merged_chunks`) and never hidden.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

READ_TIMEOUT_S = 300.0  # a long prompt queued behind others on one core takes tens of seconds
SHORTS_START_S = 120.0  # every short request has its first token within this, or the run fails


@dataclass(frozen=True, slots=True)
class Workload:
    shorts: int  # requests decoding through the whole run
    short_prompt: int  # their prompt tokens
    short_max_tokens: int  # a bound only: they are stopped (the client leaves) once the longs are done
    longs: tuple[int, ...]  # prompt tokens of each long request, in arrival order
    long_every_s: float  # between two long arrivals; the first comes `settle_s` after all shorts decode
    long_max_tokens: int
    settle_s: float
    tail_s: float  # shorts decode on this long after the last long request finished
    vocab: int
    seed: int = 0

    def cache_bytes(self, kv_bytes_per_token: int) -> int:
        """For the paged cache and each CPU tier: every token the run could hold at once (the longs,
        the shorts to their bound) and a quarter more, so that nothing is evicted mid-run."""
        tokens = sum(self.longs) + self.shorts * (self.short_prompt + self.short_max_tokens)
        return max(64 << 20, int(tokens * kv_bytes_per_token * 1.25) >> 20 << 20)

    def prompts(self) -> tuple[list[list[int]], list[list[int]]]:
        """Random token ids (no tokenizer), different for every request: no prefix is shared, so
        neither the device prefix cache nor kvtier finds anything but what disaggregation moves."""
        rng = random.Random(self.seed)
        draw = lambda n: [rng.randrange(self.vocab) for _ in range(n)]  # noqa: E731
        return [draw(self.short_prompt) for _ in range(self.shorts)], [draw(n) for n in self.longs]


@dataclass(slots=True)
class Stream:
    """One request as the client saw it."""

    kind: str  # "short" or "long"
    prompt_tokens: int
    sent: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the chunk)
    done: float = 0.0  # the stream ended or the client left
    finished: bool = False  # the server ended it ([DONE]); False for a short the client stopped
    routed: str = ""  # the proxy's x-kvtier-disagg header; "" from an instance directly
    kvtier: dict | None = None  # the last chunk's `kvtier` extension
    error: str | None = None


def body(prompt: list[int], max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}


def stream_completion(port: int, request: dict, record: Stream, stop: threading.Event | None = None) -> None:
    """POST /v1/completions and read its SSE stream into `record`, until [DONE] or `stop`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=READ_TIMEOUT_S)
    try:
        record.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(request), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        record.routed = resp.getheader("x-kvtier-disagg", "")
        if resp.status != 200:
            record.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return
        while stop is None or not stop.is_set():
            line = resp.readline()
            now = time.perf_counter()
            if not line or line.startswith(b"data: [DONE]"):
                record.finished = bool(line)
                break
            if line.startswith(b"data: {"):
                _take(json.loads(line[6:]), now, record)
    except (OSError, http.client.HTTPException) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.done = time.perf_counter()
        conn.close()  # a stopped short: the server (or the proxy, then the decode) aborts it


def _take(event: dict, now: float, record: Stream) -> None:
    if "error" in event:
        record.error = str(event["error"])
    if event.get("kvtier") is not None:
        record.kvtier = event["kvtier"]
    for choice in event.get("choices", ()):
        tokens = len((choice.get("logprobs") or {}).get("tokens", ())) if choice.get("logprobs") else 1
        if tokens:
            record.chunks.append((now, tokens))


def run_workload(port: int, work: Workload,
                 tick: Callable[[int, int], None]) -> tuple[list[Stream], list[Stream], float]:
    """The shorts, then the longs at their offsets, then the tail; `tick(longs done, short tokens)`
    about 4 times a second. Returns (shorts, longs, the time every short had its first token)."""
    short_prompts, long_prompts = work.prompts()
    stop = threading.Event()
    shorts = [Stream("short", len(p)) for p in short_prompts]
    longs = [Stream("long", len(p)) for p in long_prompts]
    short_threads = [_start(port, body(p, work.short_max_tokens), s, stop)
                     for p, s in zip(short_prompts, shorts)]
    progress = lambda: tick(sum(s.done > 0 for s in longs),  # noqa: E731
                            sum(n for s in shorts for _, n in s.chunks))
    try:
        if not _wait(lambda: all(s.chunks or s.error for s in shorts), SHORTS_START_S, progress):
            raise RuntimeError(f"the short requests had no first token within {SHORTS_START_S} s")
        steady = time.perf_counter()
        long_threads = []
        for i, (prompt, record) in enumerate(zip(long_prompts, longs)):
            _sleep_until(steady + work.settle_s + i * work.long_every_s, progress)
            long_threads.append(_start(port, body(prompt, work.long_max_tokens), record))
        _wait(lambda: not any(t.is_alive() for t in long_threads), READ_TIMEOUT_S, progress)
        _sleep_until(time.perf_counter() + work.tail_s, progress)
    finally:
        stop.set()
        for t in short_threads:
            t.join(READ_TIMEOUT_S)
    return shorts, longs, steady


def _start(port: int, request: dict, record: Stream, stop: threading.Event | None = None) -> threading.Thread:
    thread = threading.Thread(target=stream_completion, args=(port, request, record, stop), daemon=True)
    thread.start()
    return thread


def _wait(condition: Callable[[], bool], timeout_s: float, progress: Callable[[], None]) -> bool:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if time.perf_counter() > deadline:
            return False
        progress()
        time.sleep(0.25)  # progress polling; the measured requests run on their own threads
    return True


def _sleep_until(when: float, progress: Callable[[], None]) -> None:
    while (left := when - time.perf_counter()) > 0:
        progress()
        time.sleep(min(left, 0.25))


# -- statistics ------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """p50 / p99 / max / mean of `values` (seconds in, milliseconds out) and their count."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    ms = np.asarray(values) * 1e3
    return {"n": len(values), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def gaps(shorts: list[Stream], since: float) -> list[tuple[float, float]]:
    """(arrival, seconds since the same request's previous chunk) of every short chunk after `since`."""
    return [(t, t - prev) for s in shorts for (prev, _), (t, _) in zip(s.chunks, s.chunks[1:]) if t >= since]


def in_flight(longs: list[Stream]) -> list[tuple[float, float]]:
    """The union of the long requests' [sent, done] intervals, as disjoint sorted intervals."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted((s.sent, s.done) for s in longs):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def summarise(shorts: list[Stream], longs: list[Stream], steady: float, disaggregated: bool) -> dict:
    """ITL of the shorts during long requests / outside them / overall, the shorts' token rate in
    each, and the long requests' TTFT and what their decode loaded."""
    windows = in_flight(longs)
    inside = lambda t: any(a <= t <= b for a, b in windows)  # noqa: E731
    samples = gaps(shorts, steady)
    end = max(s.done for s in shorts)
    busy = sum(b - a for a, b in windows)
    tokens_in = sum(n for s in shorts for t, n in s.chunks if t >= steady and inside(t))
    tokens_all = sum(n for s in shorts for t, n in s.chunks if t >= steady)
    return {"itl": {"during_long": spread([g for t, g in samples if inside(t)]),
                    "outside_long": spread([g for t, g in samples if not inside(t)]),
                    "overall": spread([g for _, g in samples])},
            "short_tokens_per_s": {"during_long": tokens_in / busy if busy else None,
                                   "outside_long": (tokens_all - tokens_in) / max(end - steady - busy, 1e-9)},
            "merged_chunks": sum(n > 1 for s in shorts for _, n in s.chunks),
            "long_ttft": spread([s.chunks[0][0] - s.sent for s in longs if s.chunks]),
            "longs": [long_row(s, disaggregated) for s in longs],
            "shorts_finished_early": sum(s.finished for s in shorts),
            "errors": [f"{s.kind}: {s.error}" for s in shorts + longs if s.error],
            "window_s": end - steady, "long_busy_s": busy}


def long_row(s: Stream, disaggregated: bool) -> dict:
    """One long request: client TTFT, the serving instance's own TTFT and where its prompt's KV came
    from; `loaded_ok`: a decode instance loaded all but the last prompt token (colocated: none)."""
    info = s.kvtier or {}
    want = s.prompt_tokens - 1 if disaggregated else 0
    return {"prompt_tokens": s.prompt_tokens, "ttft_s": s.chunks[0][0] - s.sent if s.chunks else None,
            "latency_s": s.done - s.sent, "tokens": sum(n for _, n in s.chunks), "routed": s.routed,
            "server_ttft_s": info.get("ttft_s"), "tokens_loaded": info.get("tokens_loaded"),
            "prefill_tokens_computed": info.get("prefill_tokens_computed"),
            "loaded_ok": info.get("tokens_loaded") == want}


def timeline(shorts: list[Stream], longs: list[Stream], steady: float) -> dict:
    """What the plot draws, in seconds since every short decoded: each short chunk's (arrival, ITL ms),
    and each long request's (prompt tokens, sent, first token, done)."""
    return {"itl": [[round(t - steady, 4), round(g * 1e3, 3)] for t, g in gaps(shorts, steady)],
            "longs": [[s.prompt_tokens, round(s.sent - steady, 4),
                       round(s.chunks[0][0] - steady, 4) if s.chunks else None, round(s.done - steady, 4)]
                      for s in longs]}
