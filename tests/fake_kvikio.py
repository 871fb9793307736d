"""A stand-in for kvikio (GPUDirect Storage), which cannot run on a machine without a GPU and its
driver: `CuFile.read` is a plain pread into the tensor, which is what kvikio's API does minus the
DMA. `use_fake_gds` gives every engine built afterwards a disk tier that reads through it, and
lets CPU tensors stand for GPU memory (kvtier.tiers.gds.DEVICE_TYPES)."""

from __future__ import annotations

import os
import types

import torch

from kvtier.tiers import build, gds


class FakeCuFile:
    """kvikio.CuFile's read, as a pread (the stand-in for GDS's DMA)."""

    opened: list[str] = []
    fail: OSError | None = None

    def __init__(self, path: str, flags: str = "r"):
        assert flags == "r"
        FakeCuFile.opened.append(path)
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, buf: torch.Tensor, size: int, file_offset: int) -> int:
        if FakeCuFile.fail is not None:
            raise FakeCuFile.fail
        data = os.pread(self._fd, size, file_offset)
        if data:
            buf[:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return len(data)

    def __enter__(self) -> FakeCuFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def fake_kvikio(compat: bool = False) -> types.ModuleType:
    module = types.ModuleType("kvikio")
    module.CuFile = FakeCuFile
    module.defaults = types.SimpleNamespace(compat_mode=lambda: compat)
    module.__version__ = "fake"
    return module


def use_fake_gds(monkeypatch) -> gds.GdsStatus:
    FakeCuFile.opened, FakeCuFile.fail = [], None
    status = gds.GdsStatus(True, "kvikio fake")
    reader = gds.GdsReader(fake_kvikio(), status)
    monkeypatch.setattr(build, "gds_reader", lambda mode, codec: (status, reader))
    monkeypatch.setattr(gds, "DEVICE_TYPES", ("cpu",))
    return status
