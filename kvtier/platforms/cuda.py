"""The CUDA platform: page-locked host memory, a copy stream of its own with one event per layer,
and the paged block operations as torch index copies (plain DMA of block-contiguous pieces)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from kvtier.platforms.base import torch_gather_blocks, torch_scatter_blocks


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


class CudaPlatform:
    name = "cuda"
    device_type = "cuda"

    def available(self) -> bool:
        return torch.cuda.is_available()

    def pin_by_default(self) -> bool:
        return self.available()  # page-locking needs the driver, and only speeds up device copies

    def host_buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def copy_stream(self) -> CudaStream:
        return CudaStream()

    def wait(self, event: object | None) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)  # type: ignore[arg-type]

    def synchronize(self, event: object | None) -> None:
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]

    def gather_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
        return torch_gather_blocks(cache, block_ids, num_tokens)

    def scatter_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                       layers: slice = slice(None)) -> None:
        torch_scatter_blocks(cache, block_ids, kv, layers)

    def capabilities(self) -> dict[str, bool]:
        gds = False
        try:
            import kvikio  # noqa: F401  (GPUDirect Storage through kvikio, where installed)

            gds = self.available()
        except ImportError:
            pass
        return {"pinned_memory": self.available(), "async_copies": self.available(), "gds": gds}
