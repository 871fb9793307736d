"""Review regressions for kvtier/connector/worker.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from kvtier.connector import ConnectorMetadata, LoadSpec, load_thread

from .test_worker import CHUNK, TABLE, leased, run_step, setup, worker_for  # noqa: F401 (fixture)


def test_a_layerwise_load_whose_thread_cannot_start_copies_in_line_instead_of_hanging(setup, monkeypatch):  # noqa: F811
    # The layers' events were only ever set by the load thread: when it could not start (the process
    # at its thread limit), start_load_kv raised with them unset, and the model runner's `finally`
    # (wait_for_save, which waits for every layer's copy) then hung the engine loop for good.
    engine, cache, tokens, kv = setup
    worker = worker_for(engine, cache, layerwise=True)

    class NoThreads(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")  # what CPython raises at the limit

    # Only the loader's view of `threading` changes (the fault injected); the test's own threads are real.
    monkeypatch.setattr(load_thread, "threading", SimpleNamespace(Thread=NoThreads, Event=threading.Event))
    spec = LoadSpec("r", tokens[:32], TABLE, start=CHUNK, end=31, lease=engine.lease(tokens, 32))
    step = threading.Thread(target=run_step, args=(worker, ConnectorMetadata(1, loads=[spec])), daemon=True)
    step.start()
    step.join(30)

    assert not step.is_alive(), "the step hung waiting for layers no thread would copy"
    assert worker.get_loaded_tokens() == {"r": 31}
    assert torch.equal(cache.gather(TABLE, 31)[:, :, CHUNK:], kv[:, :, CHUNK:31])
    assert leased(engine) == 0
