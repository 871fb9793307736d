"""Tests for kvtier_engine/detokenize.py: when a request stops, what text it keeps, and what streams.

`WordTokenizer` has multi-character tokens, so a stop string can straddle tokens; the byte-level
tokenizer shows characters cut between tokens.
"""

from __future__ import annotations

import pytest

from kvtier_engine.detokenize import append_token, stream_delta
from kvtier_engine.request import Request, RequestStatus
from kvtier_engine.sampling import SamplingParams
from kvtier_engine.tokenizer import ByteTokenizer

MAX_MODEL_LEN = 1000


class WordTokenizer:
    """Token i is VOCAB[i]; the last one is EOS."""

    VOCAB = ["Hel", "lo wo", "rld", "!", " ", "S", "TOP", "x", "<eos>"]
    eos_token_id = len(VOCAB) - 1

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self.VOCAB[t] for t in token_ids if t != self.eos_token_id)


WORDS = WordTokenizer()
EOS = WordTokenizer.eos_token_id


def make_request(**params) -> Request:
    return Request("r", [1, 2, 3], SamplingParams(**params))


def feed(request: Request, tokens: list[int],
         tokenizer=WORDS) -> tuple[list[RequestStatus | None], list[str]]:
    """Append tokens as the engine does (stopping at the first finish); the status and the streamed
    delta after each."""
    statuses, deltas = [], []
    for token in tokens:
        status = append_token(request, token, tokenizer, MAX_MODEL_LEN)
        if status is not None:
            request.status = status  # the scheduler's finish()
        statuses.append(status)
        deltas.append(stream_delta(request))
        if status is not None:
            break
    return statuses, deltas


# -- stop strings --------------------------------------------------------------------------------


def test_a_stop_string_straddling_tokens_is_found_and_cut():
    request = make_request(stop=("lo wor",))  # "Hel" + "lo wo" + "rld": the stop spans the last two

    statuses, _ = feed(request, [0, 1, 2, 3])

    assert statuses == [None, None, RequestStatus.FINISHED_STOPPED]
    assert request.output_text == "Hel"
    assert request.output_token_ids == [0, 1, 2]  # the tokens stay; only the text is cut


def test_the_earliest_of_several_stop_strings_wins():
    request = make_request(stop=("rld", "o wor"))  # both complete with the third token
    statuses, _ = feed(request, [0, 1, 2])
    assert statuses == [None, None, RequestStatus.FINISHED_STOPPED]
    assert request.output_text == "Hell"  # cut where "o wor" begins, before "rld"


def test_a_stop_string_inside_one_token_cuts_before_it():
    request = make_request(stop=("o",))
    assert feed(request, [0, 1])[0] == [None, RequestStatus.FINISHED_STOPPED]
    assert request.output_text == "Hell"


# -- EOS and length ------------------------------------------------------------------------------


def test_eos_stops_unless_ignore_eos():
    stopped = make_request()
    assert feed(stopped, [0, EOS, 1])[0] == [None, RequestStatus.FINISHED_STOPPED]
    assert stopped.output_token_ids == [0, EOS] and stopped.output_text == "Hel"

    ignored = make_request(ignore_eos=True, max_tokens=3)
    assert feed(ignored, [0, EOS, 1])[0] == [None, None, RequestStatus.FINISHED_LENGTH]
    assert ignored.output_text == "Hello wo"


def test_max_tokens_and_the_context_length_end_a_request():
    request = make_request(max_tokens=2)
    assert feed(request, [0, 1, 2])[0] == [None, RequestStatus.FINISHED_LENGTH]
    assert request.num_output_tokens == 2

    short = make_request(max_tokens=100)
    assert append_token(short, 0, WORDS, max_model_len=5) is None  # 4 tokens
    assert append_token(short, 1, WORDS, max_model_len=5) is RequestStatus.FINISHED_LENGTH


# -- streaming -----------------------------------------------------------------------------------


def test_stream_delta_holds_back_a_possible_stop_prefix_and_releases_it_when_it_is_not_one():
    request = make_request(stop=("STOPS",))
    _, deltas = feed(request, [0, 4, 5, 6, 7])  # "Hel" " " "S" "TOP" "x"
    assert deltas == ["Hel", " ", "", "", "STOPx"]
    assert "".join(deltas) == request.output_text


def test_stream_delta_never_sends_text_that_a_stop_string_cuts():
    request = make_request(stop=("STOP",))
    _, deltas = feed(request, [0, 5, 6, 7])
    assert deltas == ["Hel", "", ""]
    assert request.output_text == "Hel" and "".join(deltas) == request.output_text


def test_stream_delta_releases_a_held_back_tail_at_finish():
    request = make_request(stop=("STOP",), max_tokens=2)
    statuses, deltas = feed(request, [0, 5])  # ends on "S" by length: not a stop after all
    assert statuses[-1] is RequestStatus.FINISHED_LENGTH
    assert deltas == ["Hel", "S"]


def test_stream_delta_holds_back_a_character_cut_between_tokens():
    """Regression: the byte-level tokenizer decodes a UTF-8 character's first bytes as U+FFFD; the
    delta sent it, and the real character, decoded once its last byte arrived, was never sent."""
    request = make_request(max_tokens=10)
    tokens = list("aé€b".encode())  # 1 + 2 + 3 + 1 bytes
    _, deltas = feed(request, tokens, ByteTokenizer())
    assert deltas == ["a", "", "é", "", "", "€", "b"]
    assert "".join(deltas) == request.output_text == "aé€b"


def test_stream_delta_at_finish_sends_whatever_is_left_even_a_broken_character():
    request = make_request(max_tokens=2)
    _, deltas = feed(request, list("aé".encode())[:2], ByteTokenizer())
    assert deltas == ["a", "\ufffd"]


@pytest.mark.parametrize("stop", [(), ("rld",), ("zzz",)])
def test_stream_deltas_add_up_to_the_final_text(stop):
    request = make_request(stop=stop, max_tokens=6)
    _, deltas = feed(request, [0, 1, 5, 2, 6, 3])
    assert "".join(deltas) == request.output_text


def test_a_stop_string_whose_character_is_cut_between_tokens_is_found():
    """Regression: the search for stop strings started after the previous text, whose last character
    was a U+FFFD standing for the first byte of "é"; once the next byte turned it into "é", the stop
    string "é" lay before the search window and never stopped the request."""
    request = make_request(stop=("é",), max_tokens=10)
    statuses, deltas = feed(request, list("aéb".encode()), ByteTokenizer())
    assert statuses == [None, None, RequestStatus.FINISHED_STOPPED]
    assert request.output_text == "a" and "".join(deltas) == "a"
    request = make_request(stop=("b€",), max_tokens=10)  # the stop string straddles 4 byte tokens
    statuses, _ = feed(request, list("ab€c".encode()), ByteTokenizer())
    assert statuses[-1] is RequestStatus.FINISHED_STOPPED and request.output_text == "a"
