"""Running a test both ways: with a module's C path and with its Python fallback. The modules are
those with AVAILABLE and WHY_NOT: kvtier.native_keys, kvtier.checksum_copy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def without_native(module) -> Iterator[None]:
    """`module` off its C path inside the block (no fixture: hypothesis reuses fixtures)."""
    saved = module.AVAILABLE
    module.AVAILABLE = False
    try:
        yield
    finally:
        module.AVAILABLE = saved


def use_native(monkeypatch, module, native: bool) -> None:
    """`module` on its C path, which must be built (make test builds it), or off it for the rest of
    the test."""
    if native:
        assert module.AVAILABLE, module.WHY_NOT
    else:
        monkeypatch.setattr(module, "AVAILABLE", False)
