"""The CUDA platform: page-locked host memory, a copy stream of its own with one event per layer,
and the paged block operations by `kvtier.platforms.cuda_ops` (a kernel that moves every row of a
request in one launch, reading or writing page-locked host chunks across PCIe itself, where it was
built; else torch index copies on the device, after which a chunk crosses PCIe as one contiguous
piece per run of slabs: `kvtier.memory.MemoryPool.copy_chunks`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from kvtier.platforms import cuda_ops
from kvtier.platforms.generic import TorchPlatform


class CudaStream:
    def __init__(self) -> None:
        self._stream = torch.cuda.Stream()

    def active(self) -> AbstractContextManager:
        return torch.cuda.stream(self._stream)

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def synchronize(self) -> None:
        self._stream.synchronize()


class CudaPlatform(TorchPlatform):
    def __init__(self) -> None:
        super().__init__("cuda")

    def available(self) -> bool:
        return torch.cuda.is_available()

    def pin_by_default(self) -> bool:
        return self.available()  # page-locking needs the driver, and only speeds up device copies

    def copy_stream(self) -> CudaStream:  # type: ignore[override]
        return CudaStream()

    def wait(self, event: object | None) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)  # type: ignore[arg-type]

    def synchronize(self, event: object | None) -> None:
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]

    def gather_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
        return cuda_ops.gather_blocks(cache, block_ids, num_tokens)

    def scatter_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                       layers: slice = slice(None)) -> None:
        cuda_ops.scatter_blocks(cache, block_ids, kv, layers)

    def capabilities(self) -> dict[str, bool]:
        gds = False
        try:
            import kvikio  # noqa: F401  (GPUDirect Storage through kvikio, where installed)

            gds = self.available()
        except ImportError:
            pass
        kernel = self.available() and cuda_ops.kernel_ready(torch.device("cuda", torch.cuda.current_device()))
        return {"pinned_memory": self.available(), "async_copies": self.available(), "gds": gds,
                "paged_copy_kernel": kernel}
