"""Tests for kvtier/key_memo.py through TokenDatabase.keys: a prompt seen again hashes only what is
new, and the memo never hands back a stale key: every answer equals a fresh TokenDatabase's."""

from __future__ import annotations

import random
import threading

import pytest
import torch
import xxhash

from kvtier import key_memo
from kvtier import keys as keys_module
from kvtier.key_memo import KeyMemo, common_tokens
from kvtier.keys import MEMO_PROMPTS, Namespace, TokenDatabase
from kvtier.layout import KVLayout

NS = Namespace.for_layout("test/model", KVLayout(2, 2, 8, torch.float16))
SIZE = 16


def fresh(toks, save_partial=False):
    return TokenDatabase(NS, chunk_size=SIZE, save_partial=save_partial).keys(toks)


def prompt(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(50_000), k=n)


@pytest.fixture
def hashed(monkeypatch):
    """How many chunks TokenDatabase.keys hashed, call by call."""
    counts: list[int] = []
    real = keys_module.chunk_keys

    def counting(*args):
        keys = real(*args)
        counts.append(len(keys))
        return keys

    monkeypatch.setattr(keys_module, "chunk_keys", counting)
    return counts


def keyed(db, toks, hashed):
    """`db.keys(toks)` and how many chunks that call hashed (0 when none)."""
    before = len(hashed)
    got = db.keys(toks)
    return got, sum(hashed[before:])


def test_a_repeated_prompt_hashes_nothing_and_an_extended_one_only_its_new_chunks(hashed):
    db = TokenDatabase(NS, chunk_size=SIZE)
    toks = prompt(10 * SIZE, 1)
    longer = toks + prompt(2 * SIZE + 3, 2)  # the next turn
    want, want_longer = fresh(toks), fresh(longer)
    assert keyed(db, toks, hashed) == (want, 10)
    assert keyed(db, toks, hashed) == (want, 0)
    assert keyed(db, longer, hashed) == (want_longer, 2)


def test_a_prompt_changed_in_its_middle_with_the_same_length_gets_fresh_keys_from_there(hashed):
    db = TokenDatabase(NS, chunk_size=SIZE)
    toks = prompt(10 * SIZE, 3)
    changed = list(toks)
    changed[4 * SIZE + 5] += 1
    want, want_changed = fresh(toks), fresh(changed)
    db.keys(toks)
    got, n = keyed(db, changed, hashed)
    assert got == want_changed and n == 6  # chunks 4..9 hashed again
    assert got[:4] == want[:4] and got[4] != want[4]
    assert db.keys(toks) == want  # and back: nothing of the changed prompt leaks


@pytest.mark.parametrize("save_partial", [False, True])
def test_random_edits_always_match_a_fresh_database(save_partial):
    rng = random.Random(5)
    db = TokenDatabase(NS, chunk_size=SIZE, save_partial=save_partial)
    base = [prompt(rng.randrange(SIZE, 8 * SIZE), s) for s in range(3)]
    for _ in range(300):
        toks = list(rng.choice(base))
        edit = rng.randrange(5)
        if edit == 0 and toks:  # one token changed anywhere, the last included
            toks[rng.randrange(len(toks))] ^= 1 + rng.randrange(7)
        elif edit == 1:
            toks = toks[:rng.randrange(len(toks) + 1)]
        elif edit == 2:
            toks += prompt(rng.randrange(2 * SIZE), rng.randrange(10**6))
        elif edit == 3:  # same length, different tail token: a partial tail must not be reused
            toks[-1] = (toks[-1] + 1) % 50_000
        form = rng.choice([list, torch.tensor])
        assert db.keys(form(toks)) == fresh(toks, save_partial)


def test_the_keys_returned_can_be_changed_without_changing_the_memo():
    db = TokenDatabase(NS, chunk_size=SIZE)
    toks = prompt(4 * SIZE, 9)
    db.keys(toks).clear()
    assert db.keys(toks) == fresh(toks)


def test_the_memo_holds_a_bounded_number_of_prompts(hashed):
    db = TokenDatabase(NS, chunk_size=SIZE)
    prompts = [prompt(3 * SIZE, 100 + i) for i in range(MEMO_PROMPTS + 1)]
    for toks in prompts:
        db.keys(toks)
    assert len(db._memo._entries) == MEMO_PROMPTS
    assert keyed(db, prompts[-1], hashed)[1] == 0  # the newest is remembered
    assert keyed(db, prompts[0], hashed)[1] == 3  # the oldest was let go


def test_threads_sharing_a_database_each_get_their_own_keys():
    db = TokenDatabase(NS, chunk_size=SIZE)
    prompts = [prompt(6 * SIZE, 200 + i) for i in range(4)]
    expected = [fresh(p) for p in prompts]
    wrong: list[int] = []

    def work(i: int) -> None:
        rng = random.Random(i)
        for _ in range(200):
            j = rng.randrange(len(prompts))
            if db.keys(prompts[j]) != expected[j]:
                wrong.append(j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_common_tokens_counts_whole_tokens_only():
    a = bytes(range(16))
    assert common_tokens(a, a) == 4
    assert common_tokens(a, a[:8]) == 2
    assert common_tokens(a, a[:7] + b"\xff" + a[8:]) == 1  # the byte differs in token 1
    assert common_tokens(a, b"\xff" + a[1:]) == 0


def test_slots_must_be_positive():
    with pytest.raises(ValueError, match="slots"):
        KeyMemo(SIZE, 0)


def test_a_prefix_of_a_remembered_prompt_does_not_replace_it(hashed):
    # The connector looks up the whole prompt, then retrieves only up to its hit: the next lookup of
    # the whole prompt must still hash nothing.
    db = TokenDatabase(NS, chunk_size=SIZE, save_partial=True)
    toks = prompt(10 * SIZE + 5, 11)
    assert keyed(db, toks, hashed) == (fresh(toks, True), 11)
    assert keyed(db, toks[:4 * SIZE + 3], hashed) == (fresh(toks[:4 * SIZE + 3], True), 1)  # its tail
    assert keyed(db, toks, hashed) == (fresh(toks, True), 0)


def test_the_memo_holds_a_bounded_number_of_token_bytes():
    memo = KeyMemo(SIZE, slots=10, max_bytes=4 * 5 * SIZE)  # room for 5 chunks of tokens
    db = TokenDatabase(NS, chunk_size=SIZE)
    db._memo = memo
    small = [prompt(2 * SIZE, 300 + i) for i in range(3)]
    for toks in small:
        db.keys(toks)
    assert len(memo._entries) == 2 and memo._bytes == 4 * 4 * SIZE  # the oldest went for the third
    db.keys(prompt(6 * SIZE, 310))  # larger than the whole bound: hashed, never kept
    assert len(memo._entries) == 2 and memo._bytes == 4 * 4 * SIZE
    longer = small[2] + prompt(SIZE, 311)  # replaces its own shorter entry: its bytes counted once
    db.keys(longer)
    assert len(memo._entries) == 2 and memo._bytes == 4 * 5 * SIZE  # 2 + 3 chunks: just fits
    assert db.keys(longer) == fresh(longer)


class _Names:
    """Stands in for the memo's xxhash: counts the names computed, and names every prompt `value`
    if given (every first chunk collides)."""

    def __init__(self, value=None):
        self.calls, self.value = 0, value

    def xxh3_64_intdigest(self, data):
        self.calls += 1
        return self.value if self.value is not None else xxhash.xxh3_64_intdigest(data)


@pytest.mark.parametrize("save_partial", [False, True])
def test_first_chunks_whose_names_collide_share_no_keys(monkeypatch, hashed, save_partial):
    monkeypatch.setattr(key_memo, "xxhash", _Names(value=7))
    db = TokenDatabase(NS, chunk_size=SIZE, save_partial=save_partial)
    a, b = prompt(6 * SIZE + 3, 20), prompt(6 * SIZE + 3, 21)
    b[:SIZE - 1] = a[:SIZE - 1]  # even the first chunk's tokens but its last are the same
    count = 6 + save_partial
    assert keyed(db, a, hashed) == (fresh(a, save_partial), count)
    assert keyed(db, b, hashed) == (fresh(b, save_partial), count)  # a's entry found: nothing of it used
    assert keyed(db, b, hashed) == (fresh(b, save_partial), 0)  # b took the entry
    assert keyed(db, a, hashed) == (fresh(a, save_partial), count)
    assert len(db._memo._entries) == 1


def test_random_prompts_all_under_one_name_always_match_a_fresh_database(monkeypatch):
    monkeypatch.setattr(key_memo, "xxhash", _Names(value=0))
    rng = random.Random(8)
    db = TokenDatabase(NS, chunk_size=SIZE, save_partial=True)
    base = prompt(5 * SIZE, 30)
    for _ in range(200):
        toks = list(base[:rng.randrange(6 * SIZE)]) + prompt(rng.randrange(2 * SIZE), rng.randrange(10**6))
        if toks and rng.random() < 0.5:
            toks[rng.randrange(len(toks))] += 1
        assert db.keys(toks) == fresh(toks, True)


def test_a_lookup_names_its_prompt_once_and_a_short_prompt_never(monkeypatch):
    toks = prompt(4 * SIZE, 40)
    calls = [(1, toks), (2, toks), (3, toks + [1, 2]), (3, toks[:SIZE - 1])]
    want = [fresh(t, True) for _, t in calls]
    names = _Names()
    monkeypatch.setattr(key_memo, "xxhash", names)
    db = TokenDatabase(NS, chunk_size=SIZE, save_partial=True)
    for (want_calls, toks_now), want_keys in zip(calls, want):
        assert db.keys(toks_now) == want_keys
        assert names.calls == want_calls
    assert len(db._memo._entries) == 1  # the extended prompt replaced the first; the short one is not kept


def test_a_miss_makes_room_before_hashing_and_a_prompt_too_large_to_keep_evicts_nothing(monkeypatch):
    a, b, c = (prompt(3 * SIZE, 50 + i) for i in range(3))
    huge = prompt(9 * SIZE, 60)  # over max_bytes: hashed, never kept, and nothing let go for it
    want = {id(t): fresh(t) for t in (a, b, c, huge)}
    db = TokenDatabase(NS, chunk_size=SIZE)
    db._memo = KeyMemo(SIZE, slots=2, max_bytes=4 * 8 * SIZE)
    held_while_hashing: list[int] = []
    real = keys_module.chunk_keys

    def watching(*args):
        held_while_hashing.append(len(db._memo._entries))
        return real(*args)

    monkeypatch.setattr(keys_module, "chunk_keys", watching)
    for toks in (a, b, c):
        assert db.keys(toks) == want[id(toks)]
    assert held_while_hashing == [0, 1, 1]  # c's miss let a go before c was hashed
    assert len(db._memo._entries) == 2 and db._memo._bytes == 4 * 6 * SIZE
    assert db.keys(huge) == want[id(huge)]
    assert held_while_hashing[-1] == 2 and len(db._memo._entries) == 2
    assert db.keys(b) == want[id(b)] and db.keys(c) == want[id(c)]
    assert len(held_while_hashing) == 4  # both kept: nothing hashed
    assert db.keys(a) == want[id(a)] and held_while_hashing[-1] == 1  # a was the one let go
