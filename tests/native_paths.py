"""Running a test both ways: with a module's C path and with its Python fallback."""

from __future__ import annotations


def use_native(monkeypatch, module, native: bool) -> None:
    """`module` (one with AVAILABLE and WHY_NOT: kvtier.native_keys, kvtier.checksum_copy) on its
    C path, which must be built (make test builds it), or off it for the rest of the test."""
    if native:
        assert module.AVAILABLE, module.WHY_NOT
    else:
        monkeypatch.setattr(module, "AVAILABLE", False)
