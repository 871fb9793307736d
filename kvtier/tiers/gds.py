"""GPUDirect Storage for the disk tier: a record's payload read from its file straight into GPU
memory by kvikio, where kvikio is installed and its GDS driver is present, and checked there before
it is served.

`disk.gds` selects it: `auto` (the default) where usable, `on` (an error naming the key where not),
`off`. Stats report it (`tiers.disk.gds`: enabled, and why or why not). A retrieve into a CUDA tensor
reads the chunks only the disk tier holds this way (kvtier.storage, kvtier.slab_io): the payload of
each into a device staging buffer, the record's own XXH3-64 checksum computed on the device
(kvtier.device_checksum), then one device copy into its tokens. A record that fails any check is a
miss, counted, and deleted, as on the host path (the O_DIRECT read into a slab), which every other
read still takes. These reads are not promoted into the CPU tier: the bytes never pass through host
memory.

The file is opened the disk tier's way (below the namespace directory's fd, never through a
symlink) and must be a regular file; kvikio, which opens by path, is handed /proc/self/fd/N, the
file already opened, so a path swapped meanwhile cannot redirect it.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import stat
from dataclasses import dataclass
from types import ModuleType

import torch

from kvtier import device_checksum
from kvtier.errors import ConfigError, CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.record import CODEC_RAW, FIELDS_SIZE, HEADER_SIZE, RecordHeader, decode_header
from kvtier.record_files import BLOCK, RecordDir

logger = logging.getLogger(__name__)

DEVICE_TYPES = ("cuda",)  # the devices whose retrieves read this way


@dataclass(frozen=True, slots=True)
class GdsStatus:
    enabled: bool
    detail: str  # the library in use, or why it is not used


def probe(mode: str, source: str = "disk.gds") -> tuple[GdsStatus, ModuleType | None]:
    """Whether GDS reads can be used here, and kvikio where they can. ConfigError (naming `source`)
    for `on` where they cannot."""
    status, kvikio = _probe(mode)
    if mode == "on" and not status.enabled:
        raise ConfigError(f"{source}: 'on' but GPUDirect Storage is not usable here: {status.detail}")
    logger.debug("disk tier GPUDirect Storage: %s (%s)", status.enabled, status.detail)
    return status, kvikio


def _probe(mode: str) -> tuple[GdsStatus, ModuleType | None]:
    if mode == "off":
        return GdsStatus(False, "off (disk.gds)"), None
    try:
        kvikio = importlib.import_module("kvikio")
    except ImportError:
        return GdsStatus(False, "kvikio is not installed"), None
    if not torch.cuda.is_available():
        return GdsStatus(False, "no CUDA device"), None
    try:  # newer kvikio resolves its AUTO mode here; older ones return a bool from compat_mode()
        preferred = getattr(kvikio.defaults, "is_compat_mode_preferred", None)
        compat = bool(preferred() if preferred is not None else kvikio.defaults.compat_mode())
    except Exception as exc:  # an old or broken kvikio
        return GdsStatus(False, f"kvikio cannot say whether GDS is present: {exc}"), None
    if compat:
        return GdsStatus(False, "kvikio runs in compatibility mode (no GDS driver): POSIX reads"), None
    return GdsStatus(True, f"kvikio {getattr(kvikio, '__version__', '?')}"), kvikio


class GdsReader:
    """Reads one record's payload into device memory and checks it there."""

    def __init__(self, kvikio: ModuleType, status: GdsStatus):
        self._kvikio, self.status = kvikio, status

    def read(self, files: RecordDir, key: ChunkKey, dest: torch.Tensor) -> RecordHeader:
        """`key`'s record read into `dest` (a 1-D uint8 tensor, at least the payload), verified
        (key, raw codec, length, checksum). FileNotFoundError: no file; CorruptRecord: not a whole,
        valid record of `key`; OSError: the read failed."""
        fd = files.open_record(key)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CorruptRecord(f"{files.path(key)} is not a regular file")
            head = os.pread(fd, BLOCK, 0)
            if len(head) < HEADER_SIZE:
                raise CorruptRecord(f"{files.path(key)} is truncated: {len(head)} header bytes")
            header = decode_header(head)
            end = header.payload_len
            if header.key != key:
                raise CorruptRecord(f"record holds key {header.key} where {key} was expected")
            if header.codec != CODEC_RAW or end > dest.numel():
                raise CorruptRecord(f"{files.path(key)}: codec {header.codec}, {end} payload bytes: not a "
                                    f"raw record of at most {dest.numel()}")
            if info.st_size < BLOCK + end:
                raise CorruptRecord(f"{files.path(key)} is truncated: {info.st_size} bytes")
            payload = dest[:end]
            got = self._read_payload(fd, payload, end)
            if got != end:
                raise CorruptRecord(f"{files.path(key)}: read {got} of {end} payload bytes")
            if device_checksum.xxh3_64(head[:FIELDS_SIZE], payload) != header.checksum:
                raise CorruptRecord(f"checksum mismatch for {key}")
            return header
        finally:
            os.close(fd)

    def _read_payload(self, fd: int, payload: torch.Tensor, nbytes: int) -> int:
        """kvikio's read of the payload (after the header block) into `payload`: the bytes read. Any
        failure of kvikio or cuFile is an OSError, as a failed read is on the host path."""
        try:
            with self._kvikio.CuFile(f"/proc/self/fd/{fd}", "r") as f:
                return f.read(payload, nbytes, BLOCK)
        except OSError:
            raise
        except Exception as exc:  # cuFile's errors come as RuntimeError
            raise OSError(errno.EIO, f"GPUDirect Storage read failed: {exc}") from exc
