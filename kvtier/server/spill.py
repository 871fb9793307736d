"""kvtier_server's spill: records evicted from memory, as record files on disk (`kvtier.record_files`).

Where it runs: on the server's event-loop thread only, like the `RecordStore` that owns it, so
nothing here locks and the I/O is synchronous (see the store's docstring for what that costs).

One root directory, one record directory per namespace below it (the disk tier's layout, so the
files are the same), and ONE byte bound and eviction order over all of them (`spill.policy`, LRU by
default; a `kvtier.policy.BoundedIndex` keyed by the wire key). The root is walked once at start
(`kvtier.record_walk`): records a previous server left are adopted, oldest first, and served like
any other; stale temporary files and damaged records are deleted. Nothing in the spill is pinned: a
full spill evicts its policy's victims. Clients choose namespaces, so at most OPEN_DIRS namespace
directories are held open (a descriptor each); another is opened again when next used.

Failures are per key: a record that cannot be written is dropped, one that cannot be read is a
miss, and either is forgotten (unless the process, not the record, failed: out of file descriptors
or memory, the record stays, and a file it could not delete is deleted at the next put); each is
counted in `counters.spill_errors` and logged at most once a minute per kind (a broken disk fails
every eviction, thousands a second). A corrupt record is a miss counted in `metrics` as the disk
tier counts it (`kvtier_tier_corrupt_total{tier="disk"}`).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvtier.config import SpillConfig
from kvtier.errors import ConfigError, CorruptRecord, KvtierError
from kvtier.keys import NAMESPACE_BYTES, ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.policy import BoundedIndex, IndexListener
from kvtier.policy_registry import make_policy
from kvtier.record import encode_header
from kvtier.record_files import BLOCK, RecordDir, file_bytes
from kvtier.record_root import RESOURCE_ERRNOS
from kvtier.record_walk import Scan
from kvtier.wire.decoder import fresh_buffer

if TYPE_CHECKING:
    from kvtier.server.store import StoreCounters

logger = logging.getLogger(__name__)

RETRY_PER_PUT = 64  # leftover files (unlinks that failed for want of fds) retried at each put

_NAMESPACE_DIR = re.compile(f"[0-9a-f]{{{2 * NAMESPACE_BYTES}}}")
# Namespace directories held open at once, least recently used closed first: clients choose their
# namespaces, and each open one holds a file descriptor (a few thousand took all the server had).
OPEN_DIRS = 64


def _never(_key: bytes) -> bool:
    return False  # nothing in the spill is pinned


def _uint8(buf) -> np.ndarray:
    """A uint8 array over `buf` without a copy. numpy, not torch: the server moves records, never
    tensors, and a torch import alone costs ~250 MiB of RSS."""
    return np.frombuffer(buf, dtype=np.uint8)


class Spill:
    name = "spill"  # as a fleet agent's key listener hears it

    def __init__(self, config: SpillConfig, counters: StoreCounters):
        """ConfigError (naming `spill.path`) when the directory is not one, cannot be created or
        cannot be written: a bad path stops the server at start, not every eviction later."""
        self.root = Path(config.path)
        self.counters = counters
        _check_directory(self.root)
        self.o_direct = config.o_direct
        self.metrics = Metrics(["disk"])  # corrupt records and I/O errors, as the disk tier counts them
        self._dirs: OrderedDict[bytes, RecordDir] = OrderedDict()  # LRU first, at most OPEN_DIRS
        self._index: BoundedIndex[bytes] = BoundedIndex(config.capacity,
                                                        make_policy(config.policy, config.capacity))
        self._log = LogLimiter(logger)
        # Keys forgotten whose files could not be deleted for want of fds or memory: deleted at the
        # next put (else they stay on disk, over the bound, and a restart serves them again).
        self._undeleted: dict[bytes, None] = {}
        self._adopt()

    @property
    def capacity(self) -> int:
        return self._index.capacity_bytes

    def _dir(self, namespace: bytes) -> RecordDir:
        files = self._dirs.get(namespace)
        if files is not None:
            self._dirs.move_to_end(namespace)
            return files
        # ConfigError when its folder is a symlink, a file, not writable, ...
        files = self._dirs[namespace] = RecordDir(self.root, namespace, self.o_direct)
        if len(self._dirs) > OPEN_DIRS:
            self._dirs.popitem(last=False)[1].close()  # reopened (and probed again) when next used
        return files

    def path_for(self, key: ChunkKey) -> Path:
        return Path(self._dir(key.namespace).path(key))

    def _adopt(self) -> None:
        found, counts, unusual = [], Counter(), False
        with os.scandir(self.root) as entries:
            folders = sorted(e.name for e in entries if e.is_dir() and _NAMESPACE_DIR.fullmatch(e.name))
        for name in folders:
            try:
                files = self._dir(bytes.fromhex(name))
            except (OSError, KvtierError) as exc:  # one bad folder costs its records, not the server
                logger.warning("spill %s: skipping %s: %s", self.root, name, exc)
                continue
            scan = Scan(files.root_fd, files.namespace)
            found += scan.run()
            counts += scan.counts
            unusual = unusual or scan.unusual()
        for _, key, size in sorted(found, key=lambda f: (f[0], bytes(f[1]))):
            self._index.add(bytes(key), size)
        self._unlink(self._index.make_room(0, _never) or [])
        if found or counts:
            logger.log(logging.WARNING if unusual else logging.INFO,
                       "spill %s: adopted %d records, %d bytes%s", self.root, len(self._index), self.bytes,
                       "".join(f"; {n} {what}" for what, n in sorted(counts.items())))

    def put(self, key: bytes, head: bytes, payload: memoryview) -> bool:
        """Write one record (replacing any copy), evicting LRU records to make room. False when it
        cannot be stored (larger than the spill, or the write failed)."""
        size = file_bytes(payload.nbytes)
        if size > self.capacity:
            return False
        if self._undeleted:  # a bounded retry per put, not a copy of every leftover each time
            self._unlink(list(itertools.islice(self._undeleted, RETRY_PER_PUT)), retry=True)
        self.remove([key])
        ck = ChunkKey.from_bytes(key)
        try:
            self._dir(ck.namespace)  # first: a namespace folder it cannot use evicts nothing
            self._unlink(self._index.make_room(size, _never) or [])  # never None: size fits
            self._dir(ck.namespace).write(ck, head, _uint8(payload))  # (reopened if unlinks closed it)
        except (OSError, KvtierError) as exc:
            self._failed("write", key, exc)
            return False
        self._undeleted.pop(key, None)  # its old file is replaced: never delete this one
        self._index.add(key, size)
        return True

    def get(self, key: bytes) -> tuple[bytes, memoryview] | None:
        """Read and verify a spilled record (it stays spilled): (head, payload), or None when
        absent or bad (then forgotten)."""
        size = self._index.size(key)
        if size is None:
            return None
        ck = ChunkKey.from_bytes(key)
        buf = fresh_buffer(size - BLOCK)  # the padded payload, as the file holds it
        header = None
        try:
            header = self._dir(ck.namespace).read(ck, _uint8(buf))
        except FileNotFoundError:
            pass  # deleted behind our back: a plain miss
        except CorruptRecord as exc:
            self.metrics.tier_inc("disk", "corrupt")
            self._log.warning("corrupt", "spill %s: dropping corrupt record: %s", self.root, exc)
        except (OSError, KvtierError) as exc:
            self._failed("read", key, exc)
            if getattr(exc, "errno", None) in RESOURCE_ERRNOS:
                return None  # the process failed (out of fds, memory), not the record: it stays
        if header is None:
            self.remove([key])
            return None
        self._index.touch(key)
        payload = buf[:header.payload_len]
        if payload.nbytes < buf.nbytes // 2:  # mostly padding (a tiny record): a promoted record
            payload = memoryview(bytearray(payload))  # must hold no more memory than it costs
        # The read returns the parsed header, not its bytes; re-encoding gives an equivalent valid
        # header (reserved field zeroed, checksum recomputed).
        return encode_header(ck, header.shape, header.dtype_code, payload, header.codec), payload

    @property
    def records(self) -> int:
        return len(self._index)

    def contains(self, key: bytes) -> bool:
        return key in self._index

    @property
    def bytes(self) -> int:
        """Bytes on disk: each record's file, a header block and its padded payload."""
        return self._index.used_bytes

    def payload_bytes(self, key: bytes) -> int | None:
        size = self._index.size(key)
        return None if size is None else size - BLOCK  # the padded payload: an upper bound

    def remove(self, keys: Iterable[bytes]) -> int:
        gone = [key for key in keys if self._index.remove(key) is not None]
        self._unlink(gone)  # forgotten all the same if that fails: never served again
        return len(gone)

    def _unlink(self, keys: list[bytes], retry: bool = False) -> None:
        """Delete the files of `keys` (forgotten already). A file that cannot go for want of fds or
        memory is kept in `_undeleted`, retried at the next put (`retry`: until one fails again)."""
        for key in keys:
            ck = ChunkKey.from_bytes(key)
            try:
                self._dir(ck.namespace).unlink(ck)
            except (OSError, KvtierError) as exc:
                process_failed = getattr(exc, "errno", None) in RESOURCE_ERRNOS
                if process_failed and retry:
                    return  # still out of fds: counted already, tried again at a later put
                self._failed("remove", key, exc)
                if process_failed:
                    self._undeleted[key] = None
                    continue
            self._undeleted.pop(key, None)

    def _failed(self, what: str, key: bytes, exc: Exception) -> None:
        # Rate-limited: when the disk is full or the directory broken, every eviction fails, and a
        # line for each (thousands a second, driven by clients' PUTs) would fill the same disk.
        self.counters.spill_errors += 1
        self.metrics.tier_inc("disk", "errors")
        self._log.warning(what, "spill %s: cannot %s %s: %s", self.root, what, key.hex(), exc)

    def keys(self) -> list[bytes]:
        return list(self._index)

    def set_key_listener(self, listener: IndexListener | None) -> None:
        """Report every key stored into or evicted from the spill (`kvtier.policy`)."""
        self._index.set_listener(listener, self.name)

    def clear(self, namespaces: set[bytes]) -> int:
        return self.remove([k for k in self._index if k[:NAMESPACE_BYTES] in namespaces])

    def close(self) -> None:
        for files in self._dirs.values():
            files.close()


def _check_directory(root: Path) -> None:
    """`root` exists (created if need be) and takes new files; ConfigError naming it otherwise."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except FileExistsError:
        raise ConfigError(f"spill.path {str(root)!r} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"spill.path {str(root)!r} is not a usable directory: "
                          f"{exc.strerror or exc}") from None
