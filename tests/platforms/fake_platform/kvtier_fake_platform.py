"""A fake accelerator for kvtier's platform tests: the "meta" device type, host memory that records
what was asked of it (so a platform chosen by name is observable), and torch's paged block copies."""

from kvtier.platforms.generic import TorchPlatform

ASKED = []


class FakePlatform(TorchPlatform):
    def __init__(self):
        super().__init__("meta")
        self.name = "fake"

    def host_buffer(self, nbytes, pinned):
        ASKED.append(("host_buffer", nbytes, pinned))
        return super().host_buffer(nbytes, pinned)


def make():
    return FakePlatform()


class DriverlessPlatform(FakePlatform):
    def available(self):
        raise OSError("libdriver.so: cannot open shared object file")


def driverless():
    return DriverlessPlatform()


def fails():
    raise RuntimeError("this accelerator's driver is missing")
