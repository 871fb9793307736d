"""Turning sampled tokens into text, and deciding when a request stops.

A request stops on EOS (unless `ignore_eos`), on a stop string (cut from the text, as OpenAI does),
at `max_tokens`, or at the model's context length. Streamed text holds back a tail that could be
the start of a stop string, so a client never receives text that is later cut.
"""

from __future__ import annotations

from kvtier_engine.request import Request, RequestStatus
from kvtier_engine.tokenizer import Tokenizer


def append_token(request: Request, token: int, tokenizer: Tokenizer,
                 max_model_len: int) -> RequestStatus | None:
    """Add a sampled token to the request and its text. Returns the finish status, if it finished."""
    request.token_ids.append(token)
    params = request.params
    if token == tokenizer.eos_token_id and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED
    # A trailing U+FFFD may be a character cut between tokens (the byte-level tokenizer cuts every
    # non-ASCII one) that this token completes: the search starts before it, or a stop string
    # holding that character is never found. Its first bytes give at most 3 of them.
    tail = request.output_text[-3:]
    previous = len(request.output_text) - (len(tail) - len(tail.rstrip("\ufffd")))
    request.output_text = tokenizer.decode(request.output_token_ids)
    if params.stop:
        # A stop string can straddle the previous text and the new token's text.
        longest = max(len(s) for s in params.stop)
        window_start = max(0, previous - longest + 1)
        found = [i for s in params.stop if (i := request.output_text.find(s, window_start)) >= 0]
        if found:
            request.output_text = request.output_text[:min(found)]
            return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= params.max_tokens or len(request.token_ids) >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def stream_delta(request: Request) -> str:
    """The text not yet streamed, less a tail that might still turn out to begin a stop string."""
    text = request.output_text
    end = len(text)
    if not request.status.finished:
        # A character cut between tokens decodes as U+FFFD until its last byte arrives.
        end = len(text.rstrip("\ufffd"))
        for stop in request.params.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    end = min(end, len(text) - k)
                    break
    delta = text[request.num_text_sent:end]
    request.num_text_sent = max(request.num_text_sent, end)
    return delta
