"""GPUDirect Storage reads of the disk tier (kvtier/tiers/gds.py, with kvtier/slab_io.py and
kvtier/storage.py): a retrieve into a device tensor reads the chunks only the disk holds straight
into it, each checked by the record's own checksum computed where the bytes are.

GDS (kvikio and its driver, a GPU) cannot run here, so two things are stood in, and only these
(tests/fake_kvikio.py): a fake `kvikio` module whose `CuFile.read` is a plain pread into the tensor
(what kvikio's API does, minus the DMA), and CPU tensors taking the place of CUDA ones
(`gds.DEVICE_TYPES`). Everything else is real: the record files, the engine, the checks, the
accounting.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import CHUNK, on_disk_only, record_path
from fake_kvikio import FakeCuFile, fake_kvikio, use_fake_gds

from kvtier.config import DiskConfig
from kvtier.errors import ConfigError
from kvtier.layout import KVLayout
from kvtier.record_files import BLOCK
from kvtier.tiers import build, gds

CHUNKS = 6
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16)  # 16 KiB chunks


@pytest.fixture
def gds_engine(make_engine, monkeypatch):
    """An engine whose disk tier reads by (fake) GDS, retrieving into CPU tensors as if they were GPU
    memory, with a 6-chunk prompt on disk only."""
    use_fake_gds(monkeypatch)
    engine = make_engine("cpu_disk", layout=LAYOUT, write_through="true")
    return engine, *on_disk_only(engine, CHUNKS * CHUNK, 3)


def out_for(n: int) -> torch.Tensor:
    return torch.full(LAYOUT.chunk_shape(n), 7.0, dtype=LAYOUT.dtype)


def test_a_retrieve_reads_disk_chunks_straight_into_the_tensor_and_keeps_no_host_copy(gds_engine):
    engine, tokens, kv = gds_engine
    got, n = engine.retrieve(tokens, out=out_for(len(tokens)))
    assert n == len(tokens) and torch.equal(got, kv)
    assert len(FakeCuFile.opened) == CHUNKS and all(p.startswith("/proc/self/fd/") for p in FakeCuFile.opened)
    stats = engine.stats()
    assert stats["tiers"]["disk"]["gds"] == {"enabled": True, "detail": "kvikio fake"}
    assert stats["tiers"]["disk"]["hits"] == CHUNKS
    assert stats["tiers"]["cpu"]["chunks"] == 0 and stats["promotions"] == 0  # never in host memory
    engine.storage.check_invariants()


def test_a_retrieve_into_host_memory_takes_the_slab_path(gds_engine, monkeypatch):
    engine, tokens, kv = gds_engine
    monkeypatch.setattr(gds, "DEVICE_TYPES", ("cuda",))  # a CPU `out` is host memory again
    got, n = engine.retrieve(tokens, out=out_for(len(tokens)))
    assert n == len(tokens) and torch.equal(got, kv) and FakeCuFile.opened == []
    assert engine.stats()["tiers"]["cpu"]["chunks"] == CHUNKS  # promoted, as host reads are


def flip_payload_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(BLOCK + 5000)
        byte = f.read(1)
        f.seek(BLOCK + 5000)
        f.write(bytes([byte[0] ^ 0x01]))


def truncate(path: str) -> None:
    os.truncate(path, BLOCK + 100)


def replace_with_symlink(path: str) -> None:
    target = path + ".elsewhere"
    os.rename(path, target)
    os.symlink(target, path)


@pytest.mark.parametrize("damage", [flip_payload_byte, truncate, replace_with_symlink])
def test_a_bad_record_is_a_miss_that_ends_the_prefix_and_is_dropped(gds_engine, damage):
    engine, tokens, kv = gds_engine
    bad = 3
    path = record_path(engine, tokens, bad)
    damage(path)
    got, n = engine.retrieve(tokens, out=out_for(len(tokens)))
    assert n == bad * CHUNK and torch.equal(got, kv[:, :, :n])
    assert not os.path.lexists(path)  # deleted (the symlink itself, never its target)
    assert engine.storage.contains_prefix(engine.db.keys(tokens)) == bad
    disk = engine.stats()["tiers"]["disk"]
    assert disk["hits"] == bad and disk["misses"] == 1
    assert disk["corrupt"] + disk["errors"] == 1
    engine.storage.check_invariants()


def test_another_keys_record_under_this_keys_name_is_refused(gds_engine):
    engine, tokens, kv = gds_engine
    os.replace(record_path(engine, tokens, 4), record_path(engine, tokens, 1))  # valid, but not chunk 1's
    _, n = engine.retrieve(tokens, out=out_for(len(tokens)))
    assert n == CHUNK and engine.stats()["tiers"]["disk"]["corrupt"] == 1


@pytest.mark.parametrize("failure", [OSError(5, "EIO"), RuntimeError("cuFile error 5011")])
def test_a_failing_gds_read_is_a_counted_miss_not_an_exception(gds_engine, failure):
    engine, tokens, kv = gds_engine
    FakeCuFile.fail = failure
    _, n = engine.retrieve(tokens, out=out_for(len(tokens)))
    assert n == 0 and engine.stats()["tiers"]["disk"]["errors"] == 1


def test_probe_says_why_gds_is_not_used_and_on_is_an_error_where_it_cannot_be(monkeypatch):
    assert gds.probe("off")[0] == gds.GdsStatus(False, "off (disk.gds)")
    monkeypatch.setitem(sys.modules, "kvikio", None)  # not installed
    assert gds.probe("auto") == (gds.GdsStatus(False, "kvikio is not installed"), None)
    with pytest.raises(ConfigError, match="disk.gds: 'on' but .*kvikio is not installed"):
        gds.probe("on")
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio(compat=True))
    monkeypatch.setattr(gds.torch.cuda, "is_available", lambda: True)
    assert "compatibility mode" in gds.probe("auto")[0].detail
    newer = fake_kvikio(compat=False)  # kvikio 25: compat_mode() is an enum, this says what it resolves to
    newer.defaults.is_compat_mode_preferred, newer.defaults.compat_mode = (lambda: True), None
    monkeypatch.setitem(sys.modules, "kvikio", newer)
    assert "compatibility mode" in gds.probe("auto")[0].detail
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio(compat=False))
    status, module = gds.probe("on")
    assert status == gds.GdsStatus(True, "kvikio fake") and module is sys.modules["kvikio"]
    monkeypatch.setattr(gds.torch.cuda, "is_available", lambda: False)
    assert gds.probe("auto")[0] == gds.GdsStatus(False, "no CUDA device")


def test_a_coded_disk_tier_reads_on_the_host_and_on_is_an_error_there(make_engine):
    with pytest.raises(ConfigError, match="disk.gds: 'on' needs disk.codec 'raw'"):
        build.gds_reader("on", "cachegen-2")
    engine = make_engine("cpu_disk", disk__codec="cachegen-2", layout=LAYOUT)
    assert engine.stats()["tiers"]["disk"]["gds"]["enabled"] is False
    assert DiskConfig().gds == "auto"


def test_no_device_memory_to_stage_in_makes_the_disk_chunks_misses(gds_engine, monkeypatch):
    engine, tokens, kv = gds_engine
    real_empty = torch.empty

    def out_of_memory(*args, **kwargs):
        if kwargs.get("device") is not None:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", out_of_memory)
    _, n = engine.retrieve(tokens, out=out_for(len(tokens)))
    monkeypatch.undo()
    assert n == 0 and FakeCuFile.opened == []
    engine.storage.check_invariants()
