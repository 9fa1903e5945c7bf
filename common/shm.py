"""Same-host hand-offs through shared memory: the tensor bytes of a large message go into a segment
file in a tmpfs folder, and only the msgpack header crosses the ipc:// socket, carrying the reference
`shm = [name, capacity, generation, [[offset, length], ...]]` (one pair per buffer frame, numbered
like the frames of a framed message).

Why: on a host whose memory is handed back to the hypervisor when idle (this project's 2-core VM,
virtio-balloon free page reporting), a freshly allocated buffer costs ~0.4 GB/s to touch the first
time; ZeroMQ allocates one per received message, so a 312 MiB frame hand-off took 0.6-1.0 s, and
even on warm memory the two kernel copies through the socket cap it at ~1.3 GB/s. Segments are
kept and reused (their pages stay allocated in tmpfs, and both sides keep them mapped), so a hand-off
costs one memory copy on the sender and nothing on the receiver.

Segment layout: 64 bytes of header (`MAGIC`, state, generation), then the frames, each at a
64-byte aligned offset. Ownership:

- A sender (`SegmentPool`, one per destination) creates segments in the destination's folder
  `<root>/<destination>/`, named `<sender>-<pid>-<n>.seg`; it writes only into a FREE segment, marks
  it IN_USE with a new generation, and lets at most `pool_bytes` of segments exist per destination
  (past that a message goes framed). A restarted sender adopts the segments of its name it finds.
- The receiver (`SharedReceiver`) maps the segment a header names, checks it (a regular file of this
  user in its own folder, not a link, the declared size, magic, IN_USE, the declared generation, every
  frame inside it, the `Limits`), builds its tensors over the mapping, and marks the segment FREE
  when the last tensor over it is freed, or at once when it refuses the message. At start (before it
  binds) and at stop it removes its whole folder: nothing can be in flight to a process that is not
  bound, and what was queued to it died with it.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import stat
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from common.errors import FrameMismatch, MalformedHeader, MessageTooLarge

if TYPE_CHECKING:
    import numpy as np

    from common.wire import Limits

log = logging.getLogger(__name__)

MAGIC = b"WANSHM01"
HEADER_BYTES = 64
ALIGN = 64
FREE, IN_USE = 0, 1
KEY = "shm"  # the header key of the reference; no message may have a field of that name
SEGMENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}\.seg$")
_STATE = struct.Struct("<QQ")  # state, generation; at offset 8
MAX_CACHED = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(buf: Any) -> int:
    return int(buf.nbytes) if hasattr(buf, "nbytes") else len(buf)


def _state(mm: mmap.mmap) -> tuple[int, int]:
    state, generation = _STATE.unpack_from(mm, 8)
    return int(state), int(generation)


def remove_folder(folder: Path) -> int:
    """Remove every segment in `folder` and the folder; returns how many segments went."""
    removed = 0
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        if SEGMENT_NAME.match(entry.name) or entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    with contextlib.suppress(OSError):
        folder.rmdir()
    return removed


@dataclass
class Segment:
    path: Path
    inode: int
    capacity: int
    mm: mmap.mmap

    def free(self) -> bool:
        return _state(self.mm)[0] == FREE

    def release(self) -> None:
        """Mark the segment FREE again (a send that did not go out)."""
        _STATE.pack_into(self.mm, 8, FREE, _state(self.mm)[1])


@dataclass
class SegmentPool:
    """The segments one sender writes for one destination (`folder`)."""

    folder: Path
    sender: str
    pool_bytes: int
    min_bytes: int
    segments: list[Segment] = field(default_factory=list)
    _count: int = 0
    _adopted: bool = False

    def share(self, parts: list[Any]) -> tuple[list[Any], Segment | None]:
        """`parts` of a framed message (`wire.pack`) as a shared one: `([header], segment)`. Unchanged
        (`(parts, None)`) when its frames are fewer than `min_bytes` or the pool has no room."""
        buffers = parts[1:]
        sizes = [_nbytes(b) for b in buffers]
        if not buffers or sum(sizes) < self.min_bytes:
            return parts, None
        offsets, end = [], HEADER_BYTES
        for size in sizes:
            offsets.append(end)
            end = _align(end + size)
        segment = self._acquire(end)
        if segment is None:
            return parts, None
        mm = segment.mm
        generation = _state(mm)[1] + 1
        _STATE.pack_into(mm, 8, IN_USE, generation)
        for buf, offset, size in zip(buffers, offsets, sizes, strict=True):
            if size:
                mm[offset : offset + size] = buf if isinstance(buf, (bytes, memoryview)) else memoryview(buf)
        header = msgpack.unpackb(parts[0], raw=False, strict_map_key=True, ext_hook=msgpack.ExtType)
        pairs = [[offset, size] for offset, size in zip(offsets, sizes, strict=True)]
        header[KEY] = [segment.path.name, segment.capacity, generation, pairs]
        return [msgpack.packb(header, use_bin_type=True)], segment

    def _acquire(self, nbytes: int) -> Segment | None:
        self._refresh()
        free = [s for s in self.segments if s.capacity >= nbytes and s.free()]
        if free:
            return min(free, key=lambda s: s.capacity)
        capacity = _align(max(nbytes, 1 << 20))
        total = sum(s.capacity for s in self.segments)
        # Make room by dropping free segments (too small for this message), largest first.
        for s in sorted((s for s in self.segments if s.free()), key=lambda s: -s.capacity):
            if total + capacity <= self.pool_bytes:
                break
            self._drop(s, unlink=True)
            total -= s.capacity
        if total + capacity > self.pool_bytes:
            return None
        try:
            return self._create(capacity)
        except OSError as exc:  # the tmpfs is full (ENOSPC), or no /dev/shm: this message goes framed
            log.warning("no shared-memory segment of %d bytes in %s: %s", capacity, self.folder, exc.strerror or exc)
            return None

    def _refresh(self) -> None:
        """Forget segments the receiver removed (it does at its start and stop); adopt our own
        segments left by an earlier process of this sender once, at the first send."""
        for s in list(self.segments):
            try:
                st = os.stat(s.path)
            except FileNotFoundError:
                self._drop(s, unlink=False)
                continue
            if st.st_ino != s.inode:
                self._drop(s, unlink=False)
        if not self._adopted:
            self._adopted = True
            for path in sorted(self.folder.glob(f"{self.sender}-*.seg")):
                with contextlib.suppress(OSError, ValueError):
                    self.segments.append(self._map(path))

    def _map(self, path: Path) -> Segment:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER_BYTES:
                raise ValueError(f"{path} is not a segment")
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        if mm[:8] != MAGIC:
            mm.close()
            raise ValueError(f"{path} is not a segment")
        return Segment(path, st.st_ino, st.st_size, mm)

    def _create(self, capacity: int) -> Segment:
        self.folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.mkdir(mode=0o700, exist_ok=True)
        while True:
            self._count += 1
            path = self.folder / f"{self.sender}-{os.getpid()}-{self._count}.seg"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
                break
            except FileExistsError:
                continue
        try:
            # Allocate the pages now (once; they stay with the segment): a full tmpfs fails here
            # with ENOSPC rather than with SIGBUS at the first write into the mapping.
            os.posix_fallocate(fd, 0, capacity)
            mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            inode = os.fstat(fd).st_ino
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        mm[:8] = MAGIC
        _STATE.pack_into(mm, 8, FREE, 0)
        segment = Segment(path, inode, capacity, mm)
        self.segments.append(segment)
        return segment

    def _drop(self, segment: Segment, *, unlink: bool) -> None:
        self.segments.remove(segment)
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
        with contextlib.suppress(BufferError):
            segment.mm.close()

    def close(self) -> None:
        """At the sender's stop: remove its free segments (the receiver owns those in use)."""
        for s in list(self.segments):
            self._drop(s, unlink=s.free())


class SharedReceiver:
    """Resolves the shared-memory reference of a message received on this process's own socket."""

    def __init__(self, folder: Path):
        self.folder = folder
        # name -> (inode, capacity, mapping): the segments a sender reuses stay mapped here.
        self._maps: dict[str, tuple[int, int, mmap.mmap]] = {}

    def start(self) -> int:
        """Before binding: remove what an earlier process of this stage left; returns how many."""
        removed = remove_folder(self.folder)
        self.folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.mkdir(mode=0o700, exist_ok=True)
        return removed

    def stop(self) -> None:
        self._maps.clear()
        remove_folder(self.folder)
        with contextlib.suppress(OSError):  # the deployment's folder, once its last stage is gone
            self.folder.parent.rmdir()

    def frames(
        self, ref: Any, header_bytes: int, limits: Limits
    ) -> tuple[list[np.ndarray[Any, Any]], Callable[[], Any]]:
        """The frames `ref` names, as uint8 arrays over the mapped segment, and a function that
        hands the segment back to its sender (FREE) at once (for a refused message). Otherwise it
        goes back when the last array, or tensor built over one, is freed."""
        import numpy as np

        if not (isinstance(ref, list) and len(ref) == 4):
            raise MalformedHeader("bad shared-memory reference")
        name, capacity, generation, pairs = ref
        if not isinstance(name, str) or not SEGMENT_NAME.match(name):
            raise MalformedHeader("bad shared-memory segment name", {"name": repr(name)[:64]})
        for x in (capacity, generation):
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise MalformedHeader("bad shared-memory reference")
        mm = self._mapping(name, capacity)
        state, current = _state(mm)
        if mm[:8] != MAGIC or state != IN_USE or current != generation:
            raise FrameMismatch("shared-memory segment is stale or not a segment", {"name": name})
        # From here on the segment is this message's: a refusal hands it back to its sender.
        try:
            spans = _spans(pairs, capacity, limits)
            total = header_bytes + sum(length for _, length in spans)
            if total > limits.max_message_bytes:
                raise MessageTooLarge(f"message of {total} bytes exceeds {limits.max_message_bytes}",
                                      {"size": total, "limit": limits.max_message_bytes})
        except Exception:
            _release(mm, generation)
            raise
        base = np.frombuffer(mm, dtype=np.uint8, count=capacity)
        finalizer = weakref.finalize(base, _release, mm, generation)
        return [base[offset : offset + length] for offset, length in spans], finalizer

    def _mapping(self, name: str, capacity: int) -> mmap.mmap:
        path = self.folder / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise FrameMismatch("shared-memory segment cannot be opened",
                                {"name": name, "reason": type(exc).__name__}) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != capacity:
                raise FrameMismatch("shared-memory segment is not the one referenced", {"name": name})
            cached = self._maps.get(name)
            if cached is not None and cached[0] == st.st_ino and cached[1] == capacity:
                return cached[2]
            mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        self._maps[name] = (st.st_ino, capacity, mm)
        self._forget_stale()
        return mm

    def _forget_stale(self) -> None:
        """Drop mappings of segments their sender removed, so they do not pin its memory."""
        for name, (inode, _, _) in list(self._maps.items()):
            try:
                alive = os.stat(self.folder / name).st_ino == inode
            except FileNotFoundError:
                alive = False
            if not alive:
                del self._maps[name]  # closed by the GC once no tensor uses it
        while len(self._maps) > MAX_CACHED:
            self._maps.pop(next(iter(self._maps)))


def _spans(pairs: Any, capacity: int, limits: Limits) -> list[tuple[int, int]]:
    """The (offset, length) of each frame, checked to lie in the segment's data."""
    if not isinstance(pairs, list) or len(pairs) > limits.max_frames:
        raise MessageTooLarge(f"more than {limits.max_frames} frames or no frame list", {"limit": limits.max_frames})
    spans: list[tuple[int, int]] = []
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise MalformedHeader("bad shared-memory frame")
        offset, length = pair
        if offset < HEADER_BYTES or length < 0 or offset + length > capacity:
            raise FrameMismatch("shared-memory frame outside its segment",
                                {"offset": offset, "length": length, "capacity": capacity})
        spans.append((offset, length))
    return spans


def _release(mm: mmap.mmap, generation: int) -> None:
    """Hand the segment back to its sender, unless it has already moved on to a later message."""
    with contextlib.suppress(ValueError):  # the mapping was closed
        state, current = _state(mm)
        if state == IN_USE and current == generation:
            _STATE.pack_into(mm, 8, FREE, generation)

