"""A fake accelerator for kvtier's platform tests: the "meta" device type, host memory that records
what was asked of it, and the CPU's paged block copies (so a platform chosen by name is observable)."""

from kvtier.platforms.base import SyncStream, torch_gather_blocks, torch_scatter_blocks

ASKED = []


class FakePlatform:
    name = "fake"
    device_type = "meta"

    def available(self):
        return True

    def pin_by_default(self):
        return False

    def host_buffer(self, nbytes, pinned):
        import torch

        ASKED.append(("host_buffer", nbytes, pinned))
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_stream(self):
        return SyncStream()

    def wait(self, event):
        return None

    def synchronize(self, event):
        return None

    def gather_blocks(self, cache, block_ids, num_tokens):
        return torch_gather_blocks(cache, block_ids, num_tokens)

    def scatter_blocks(self, cache, block_ids, kv, layers=slice(None)):
        torch_scatter_blocks(cache, block_ids, kv, layers)

    def capabilities(self):
        return {"pinned_memory": False, "async_copies": False, "gds": False}


def make():
    return FakePlatform()


class DriverlessPlatform(FakePlatform):
    name = "driverless"
    device_type = "xpu-fake"

    def available(self):
        raise OSError("libdriver.so: cannot open shared object file")


def driverless():
    return DriverlessPlatform()


def fails():
    raise RuntimeError("this accelerator's driver is missing")
