"""A byte ring in anonymous shared memory: the scheduler process hands finished requests to the recorder process.

    ring = Ring.create(capacity)                   # the scheduler (writer); ring.fd goes to the recorder
    view = ring.reserve(n)                          # writable memoryview of n bytes inside the ring, or None
    ...fill view...; ring.commit()                  # the entry becomes visible to the reader
    reader = Ring.attach(fd)                        # the recorder
    payload = reader.get()                          # a copy of the oldest entry (bytes), or None

One writer and one reader, each in its own process, no lock: the writer owns `head` (bytes ever written), the
reader `tail` (bytes ever consumed), both in the shared header. The ring is bounded: when an entry does not fit,
the writer drops the oldest entries the reader has not consumed yet (counted in `dropped`) by moving
`lost_upto` past them, so a stalled or dead reader never blocks serving nor grows its memory. A reader copying an
entry while the writer overwrites it notices (the entry starts before `lost_upto` once the copy is done) and
discards the copy; the writer counted it. The memory is an anonymous memfd inherited by the recorder (nothing in
/dev/shm to leak), so the ring and what it holds outlive a recorder that is killed and restarted.

Entry layout (8-byte aligned): u64 position (bytes written before it), u32 payload length, u32 kind (1: an
entry; 2: skip to the start of the buffer, the rest of it is unused), payload. Plain standard library.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections import deque

MAGIC = 0x53474C52494E4701          # "SGLRING" + version 1
_HEADER = struct.Struct("<QQQQQQ")   # magic, capacity, head, tail, lost_upto, dropped
HEADER_BYTES = 64
_ENTRY = struct.Struct("<QII")       # position, payload length, kind
ENTRY, SKIP = 1, 2
_HEAD, _TAIL, _LOST, _DROPPED = 16, 24, 32, 40        # byte offsets of the header fields


def _align(n: int) -> int:
    return (n + 7) & ~7


class Ring:
    def __init__(self, fd: int, writer: bool):
        self.fd = fd
        self.writer = writer
        size = os.fstat(fd).st_size
        self.mem = mmap.mmap(fd, size)
        magic, capacity = struct.unpack_from("<QQ", self.mem, 0)
        if magic != MAGIC or capacity + HEADER_BYTES != size:
            raise ValueError(f"fd {fd} is not a ring (magic {magic:#x}, capacity {capacity}, {size} bytes)")
        self.capacity = capacity
        self.data = memoryview(self.mem)[HEADER_BYTES:]
        self.entries: deque[tuple[int, int, bool]] = deque()   # writer: (position, size, entry or skip) written
        self._reserved: tuple[int, int] | None = None     # writer: (position, size) of the entry being filled

    @classmethod
    def create(cls, capacity: int) -> "Ring":
        """The writer's ring of `capacity` bytes (at least 4 KiB)."""
        capacity = _align(max(4096, int(capacity)))
        fd = os.memfd_create("sglang-ext-ring", os.MFD_CLOEXEC)
        os.ftruncate(fd, HEADER_BYTES + capacity)
        with mmap.mmap(fd, HEADER_BYTES) as m:
            _HEADER.pack_into(m, 0, MAGIC, capacity, 0, 0, 0, 0)
        return cls(fd, writer=True)

    @classmethod
    def attach(cls, fd: int) -> "Ring":
        """The reader's view of a ring whose descriptor it inherited."""
        return cls(fd, writer=False)

    def _get(self, offset: int) -> int:
        return struct.unpack_from("<Q", self.mem, offset)[0]

    def _set(self, offset: int, value: int) -> None:
        struct.pack_into("<Q", self.mem, offset, value)

    @property
    def head(self) -> int:
        return self._get(_HEAD)

    @property
    def tail(self) -> int:
        return self._get(_TAIL)

    @property
    def dropped(self) -> int:
        """Entries the writer dropped (oldest first) to make room, ever (one the reader took at the instant the
        writer gave it up is counted too)."""
        return self._get(_DROPPED)

    def nbytes(self) -> int:
        """Bytes written and not consumed yet (nor dropped)."""
        return self.head - max(self.tail, self._get(_LOST))

    # -- writer ------------------------------------------------------------------------------------------------
    def reserve(self, n: int) -> memoryview | None:
        """A writable view of `n` payload bytes in the ring, dropping the oldest unconsumed entries if needed;
        None when one entry of that size can never fit (more than half the ring). Call `commit()` once it is
        filled."""
        if self._reserved is not None:
            raise RuntimeError("Ring.reserve: the previous entry was not committed")
        size = _align(_ENTRY.size + n)
        if size > self.capacity // 2:
            return None
        head = self.head
        offset = head % self.capacity
        skip = self.capacity - offset if offset + size > self.capacity else 0    # no room before the end: wrap
        self._make_room(head + skip + size)
        if skip:
            if skip >= _ENTRY.size:
                _ENTRY.pack_into(self.data, offset, head, 0, SKIP)
            self.entries.append((head, skip, False))
            head += skip
            offset = 0
            self._set(_HEAD, head)                        # the skip is visible before the entry is
        _ENTRY.pack_into(self.data, offset, head, n, ENTRY)
        self._reserved = (head, size)
        return self.data[offset + _ENTRY.size:offset + _ENTRY.size + n]

    def commit(self) -> None:
        position, size = self._reserved
        self._reserved = None
        self.entries.append((position, size, True))
        self._set(_HEAD, position + size)

    def put(self, payload: bytes | memoryview) -> bool:
        """One entry holding `payload`; False when it can never fit."""
        view = self.reserve(len(payload))
        if view is None:
            return False
        view[:] = payload
        self.commit()
        return True

    def _make_room(self, end: int) -> None:
        """Drop the oldest entries not consumed yet until [.., end) fits in the buffer. `lost_upto` moves past
        them before anything is overwritten, so a reader copying one of them discards the copy."""
        tail = self.tail
        while self.entries and sum(self.entries[0][:2]) <= tail:
            self.entries.popleft()                        # consumed by the reader
        lost = start = self._get(_LOST)
        dropped = 0
        while end - max(tail, lost) > self.capacity:
            position, size, is_entry = self.entries.popleft()
            lost = position + size
            dropped += is_entry
        if lost != start:
            self._set(_LOST, lost)
            self._set(_DROPPED, self.dropped + dropped)

    # -- reader ------------------------------------------------------------------------------------------------
    def get(self) -> bytes | None:
        """A copy of the oldest entry's payload, or None when there is none."""
        while True:
            tail = max(self.tail, self._get(_LOST))
            if tail >= self.head:
                self._set(_TAIL, tail)
                return None
            offset = tail % self.capacity
            if self.capacity - offset < _ENTRY.size:      # a skip too short to hold its own marker
                self._set(_TAIL, tail + self.capacity - offset)
                continue
            position, n, kind = _ENTRY.unpack_from(self.data, offset)
            if kind == SKIP and position == tail:
                self._set(_TAIL, tail + self.capacity - offset)
                continue
            if kind != ENTRY or position != tail:        # overwritten under us: start again from lost_upto
                if self._get(_LOST) <= tail:
                    raise RuntimeError(f"ring: damaged entry at {tail} (position {position}, kind {kind})")
                continue
            payload = bytes(self.data[offset + _ENTRY.size:offset + _ENTRY.size + n])
            if self._get(_LOST) > tail:                   # the writer dropped it while we copied: torn
                continue
            self._set(_TAIL, tail + _align(_ENTRY.size + n))
            return payload

    def close(self) -> None:
        self.data.release()
        self.mem.close()
        os.close(self.fd)
