"""Tests for integrations/vllm/kvtier_vllm/kv_events.py: the chunks kvtier's local tiers gain and lose,
heard through the storage's key listener, with the parent and tokens vLLM's `BlockStored` carries.
vLLM is not imported (the events it publishes are checked in test_vllm.py); a real CacheEngine (CPU +
disk tiers) stores the KV."""

from __future__ import annotations

from conftest import CHUNK, seeded_kv, seeded_tokens

from kvtier import storage_admin
from kvtier.connector import ConnectorMetadata, LoadSpec, SaveSpec
from kvtier_vllm.kv_events import EventRecorder


def save_meta(tokens: list[int], start: int = 0) -> ConnectorMetadata:
    return ConnectorMetadata(step=1, saves=[SaveSpec("r", tokens, [], start, len(tokens))])


def stored(changes, tier: str) -> dict[bytes, tuple]:
    return {c.digest: (c.parent, c.tokens) for c in changes if c.op == "stored" and c.tier == tier}


def test_a_saved_prompts_chunks_are_reported_stored_in_memory_and_on_disk_with_parents_tokens(make_engine):
    engine = make_engine()
    recorder = EventRecorder(engine)
    tokens = seeded_tokens(3 * CHUNK, 1).tolist()
    recorder.expect(save_meta(tokens))
    engine.store(tokens, seeded_kv(engine.layout, 3 * CHUNK, 1))
    assert engine.flush(timeout=10)

    changes = recorder.take()
    digests = [key.digest for key in engine.db.keys(tokens)]
    want = {digests[i]: (digests[i - 1] if i else None, tokens[i * CHUNK:(i + 1) * CHUNK]) for i in range(3)}
    assert stored(changes, "cpu") == want and stored(changes, "disk") == want
    assert all(type(t) is int for c in changes for t in c.tokens)
    assert recorder.take() == []  # taken once

    engine.storage.clear(engine.storage.cpu)
    assert {(c.op, c.tier, c.digest) for c in recorder.take()} == {("evicted", "cpu", d) for d in digests}
    assert recorder.unknown == 0 and recorder.dropped == 0
    recorder.close()


def test_a_load_expects_its_chunks_so_a_read_that_promotes_them_to_memory_is_reported(make_engine):
    engine = make_engine()
    tokens = seeded_tokens(2 * CHUNK, 2).tolist()
    engine.store(tokens, seeded_kv(engine.layout, 2 * CHUNK, 2))
    assert engine.flush(timeout=10)
    engine.storage.clear(engine.storage.cpu)
    recorder = EventRecorder(engine)
    recorder.expect(ConnectorMetadata(step=2, loads=[LoadSpec("r", tokens, [], 0, 2 * CHUNK)]))
    assert engine.retrieve(tokens)[1] == 2 * CHUNK  # read from disk, promoted into host memory
    assert set(stored(recorder.take(), "cpu")) == {key.digest for key in engine.db.keys(tokens)}
    recorder.close()


def test_a_chunk_stored_without_its_tokens_known_is_counted_not_reported(make_engine):
    engine = make_engine()
    recorder = EventRecorder(engine)
    engine.store(seeded_tokens(CHUNK, 3), seeded_kv(engine.layout, CHUNK, 3))
    assert engine.flush(timeout=10)
    assert recorder.take() == [] and recorder.unknown == 2  # memory and disk
    recorder.close()


def test_what_the_recorder_remembers_and_holds_is_bounded_and_the_overflow_counted(make_engine):
    engine = make_engine(disk__capacity="64MiB")
    recorder = EventRecorder(engine, max_expected=2, max_pending=3)
    tokens = seeded_tokens(4 * CHUNK, 4).tolist()
    recorder.expect(save_meta(tokens))  # only the last two chunks' tokens are kept
    engine.store(tokens, seeded_kv(engine.layout, 4 * CHUNK, 4))
    assert engine.flush(timeout=10)
    changes = recorder.take()
    keys = engine.db.keys(tokens)
    assert recorder.unknown == 4  # chunks 0 and 1, in memory and on disk
    assert len(changes) == 3 and recorder.dropped == 1  # four heard, the oldest dropped
    assert {c.digest for c in changes} <= {keys[2].digest, keys[3].digest}
    recorder.close()


def test_closing_stops_the_reports_and_leaves_a_fleet_agents_listener_in_place(make_engine):
    engine = make_engine()
    fleet_heard = []
    storage_admin.add_key_listener(engine.storage, lambda op, tier, key: fleet_heard.append(key))
    recorder = EventRecorder(engine)
    recorder.close()
    tokens = seeded_tokens(CHUNK, 5).tolist()
    recorder.expect(save_meta(tokens))
    engine.store(tokens, seeded_kv(engine.layout, CHUNK, 5))
    assert engine.flush(timeout=10)
    assert recorder.take() == [] and len(fleet_heard) == 2
