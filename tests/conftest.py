"""Shared fixtures: tiny KV geometries, seeded tokens and KV, engines built from the real configs.

Sizes are kept small on purpose (a 16-token chunk of the default layout is exactly one 4 KiB slab),
so eviction, restart and corruption stories run in milliseconds with real files under `tmp_path`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from redis_servers import _redis_cluster_session, _redis_session, redis_cluster, redis_server  # noqa: F401

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.keys import Namespace, TokenDatabase
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.pins import PinTable
from kvtier.storage import StorageManager
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.wrapped import WrappedTier

REPO = Path(__file__).parents[1]
CHUNK = 16  # tokens per chunk in every engine these fixtures build (KVTIER_CHUNK_SIZE)


def small_layout(dtype: torch.dtype = torch.float16) -> KVLayout:
    """2 layers x 2 kv heads x 16 head dim: 128 bytes of K+V per token per layer in fp16."""
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=dtype)


def seeded_tokens(num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (num_tokens,), generator=g)


def seeded_kv(layout: KVLayout, num_tokens: int, seed: int) -> torch.Tensor:
    """`[2, L, T, H*D]` normal noise in the layout's dtype (finite, so `torch.equal` is bitwise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.chunk_shape(num_tokens), generator=g).to(layout.dtype)


def on_disk_only(engine: CacheEngine, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded prompt stored through `engine` (whole chunks), flushed, and cleared from its CPU
    tier: (tokens, kv), held by the tiers below only."""
    tokens, kv = seeded_tokens(num_tokens, seed), seeded_kv(engine.layout, num_tokens, seed)
    assert engine.store(tokens, kv) == num_tokens // CHUNK and engine.flush()
    engine.clear("cpu")
    return tokens, kv


def record_path(engine: CacheEngine, tokens, chunk: int) -> str:
    """The disk tier's file for chunk `chunk` of `tokens` (the first lower tier is the disk)."""
    return str(engine.storage.lower[0].path_for(engine.db.keys(tokens)[chunk]))


def stored_below(manager: StorageManager, db: TokenDatabase, layout: KVLayout, chunks: int,
                 seed: int) -> tuple[list, torch.Tensor]:
    """A seeded `chunks`-chunk prompt stored through `manager`, flushed, and cleared from its CPU
    tier, so that only the tiers below hold it: (its spans, its KV)."""
    spans = db.spans(seeded_tokens(chunks * CHUNK, seed))
    kv = seeded_kv(layout, chunks * CHUNK, seed)
    manager.put(spans, kv)
    assert manager.flush()
    manager.clear(manager.cpu)
    return spans, kv


class FakeClock:
    """A monotonic clock the test moves by hand (`clock.now += 5`): time-based behaviour (back-off,
    log limits) tested without sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Throttled(WrappedTier):
    """A tier whose reads take payload bytes / `bandwidth` seconds on a FakeClock (no sleeping):
    a link of known bandwidth for the adaptive-level tests, deterministic."""

    def __init__(self, inner, clock: FakeClock, bandwidth: float):
        super().__init__(inner)
        self.clock, self.bandwidth = clock, bandwidth

    def get(self, keys, dests):
        headers = self.inner.get(keys, dests)
        self.clock.now += sum(h.payload_len for h in headers if h is not None) / self.bandwidth
        return headers


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    """A disk tier left at its default path (`$XDG_CACHE_HOME/kvtier`) lands in a folder of this test
    session, never in the user's ~/.cache, and never shared with another run (processes the tests
    start inherit it)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()


@pytest.fixture
def layout() -> KVLayout:
    return small_layout()


@pytest.fixture
def make_engine(tmp_path):
    """Build a CacheEngine from `configs/<config>.yaml` plus `KVTIER_*` overrides given as keywords
    (`cpu__capacity="64KiB"` is `KVTIER_CPU__CAPACITY=64KiB`). The disk tier, when the config has
    one, lives in `disk_path` (default `tmp_path/disk`). Every engine is closed at teardown."""
    engines: list[CacheEngine] = []

    def make(config: str = "cpu_disk", layout: KVLayout | None = None, model_id: str = "test-model",
             disk_path: Path | None = None, **overrides: object) -> CacheEngine:
        env = {"KVTIER_CHUNK_SIZE": str(CHUNK), "KVTIER_CPU__CAPACITY": "1MiB",
               "KVTIER_CPU__PIN_MEMORY": "off"}
        if config == "cpu_disk":
            env["KVTIER_DISK__PATH"] = str(disk_path or tmp_path / "disk")
        env.update({f"KVTIER_{key.upper()}": str(value) for key, value in overrides.items()})
        cfg = load_config(REPO / "configs" / f"{config}.yaml", env=env)
        engine = CacheEngine(cfg, layout or small_layout(), model_id)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


from kvtier_servers import kvtier_server, start_kvtier_server  # noqa: E402, F401

# -- StorageManager stories (tests/test_storage*.py): real pool, CPU tier, a DiskTier in tmp_path --

NAMESPACE_MODEL = "storage-test"


@pytest.fixture
def make_manager(tmp_path, layout):
    """StorageManager over `slabs` one-chunk slabs, with a disk tier in tmp_path unless `disk=False`."""
    managers: list[StorageManager] = []

    def make(slabs: int = 16, disk: bool = True, tier_class=DiskTier, disk_bytes: int = 1 << 24,
             **options) -> StorageManager:
        metrics = Metrics(["cpu", "disk"] if disk else ["cpu"])
        pool = MemoryPool(slabs * layout.chunk_bytes(CHUNK), layout.chunk_bytes(CHUNK), pin=False)
        pins = PinTable()
        namespace = Namespace.for_layout(NAMESPACE_MODEL, layout).digest()  # the `db` fixture's
        lower = [tier_class(tmp_path / "disk", namespace, disk_bytes, pins.__contains__, metrics)
                 ] if disk else []
        manager = StorageManager(layout, pool, lower, metrics, pins=pins, io_threads=2, **options)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.close()


@pytest.fixture
def db(layout) -> TokenDatabase:
    return TokenDatabase(Namespace.for_layout(NAMESPACE_MODEL, layout), CHUNK)


def tier_counter(manager: StorageManager, tier: str, name: str) -> int:
    return int(manager.metrics.value(f"kvtier_tier_{name}_total", {"tier": tier}))
