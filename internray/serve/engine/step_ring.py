"""A one-writer, many-reader message ring in shared memory: how rank 0 hands each step's input to
the other tensor-parallel ranks when they all share its node.

Why: a Ray actor call per step (ray.put, execute.remote, then ray.get) costs milliseconds, more
than a decode step's forward on a small model (tiny Llama, TP=2 on CPU: 10-13 ms a step at batch
1 through Ray calls, 3-4 ms through the ring; benchmarks/serve_tp.py). vLLM moves step inputs
through a shared-memory queue for the same reason. Otherwise the steps go through Ray
(tp_workers.py).

Layout: int64 counters (bytes written; bytes each reader has consumed), then the data area, used
as a ring. A message is its pickle's length (8 bytes) and the pickle, streamed through the ring in
pieces, so it may be larger than the ring; the writer waits only while the slowest reader is a
whole ring behind. Counters only grow, each is stored by one process only, and a counter is
stored after the data it publishes. That order is all the protocol needs, and only x86 (TSO)
guarantees it for plain stores; Python offers no memory fence, so elsewhere
`StepRing.supported()` is False and tp_workers keeps Ray calls. The file (mode 0600) is unlinked
as soon as every reader has mapped it (`unlink`): only a crash in that moment of start-up could
leave it behind.
"""
from __future__ import annotations

import mmap
import os
import pickle
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np


class _Backoff:
    """Waiting for the other side: yield the CPU while steps are flowing (the next one is usually
    a fraction of a millisecond away), then sleep, longer once idle, so an idle server costs ~nothing."""

    def __init__(self):
        self.since = time.monotonic()

    def wait(self) -> None:
        idle = time.monotonic() - self.since
        if idle < 0.05:
            os.sched_yield()
        else:
            time.sleep(0.001 if idle < 1.0 else 0.01)


class StepRing:
    @staticmethod
    def supported() -> bool:
        """Whether this CPU keeps plain stores in program order (x86's TSO), as the ring relies on."""
        return platform.machine().lower() in ("x86_64", "amd64")

    def __init__(self, path: Path, readers: int, reader: int | None):
        self.path, self.reader = path, reader
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 0)
        header = 8 * (1 + readers)
        self.counters = np.frombuffer(self._map, dtype=np.int64, count=1 + readers)
        self.data = memoryview(self._map)[header:]
        self.capacity = len(self.data)
        self.position = int(self.counters[0 if reader is None else 1 + reader])

    @classmethod
    def create(cls, readers: int, capacity: int = 4 << 20) -> StepRing:
        """The writer's end, in a new file under /dev/shm, or the temp dir where /dev/shm is missing
        or too full (a sparse file there would fault on first write instead of failing here)."""
        size = 8 * (1 + readers) + capacity
        shm = Path("/dev/shm")
        folder = shm if shm.is_dir() and shutil.disk_usage(shm).free >= 2 * size else Path(tempfile.gettempdir())
        path = folder / f"internray-steps-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # step inputs hold users' token ids
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return cls(path, readers, None)

    @classmethod
    def attach(cls, path: str | Path, readers: int, reader: int) -> StepRing:
        """Reader `reader`'s end (0-based, of `readers`) of the ring at `path`."""
        return cls(Path(path), readers, reader)

    def unlink(self) -> None:
        """Remove the file once every reader has attached; the mappings stay valid."""
        self.path.unlink(missing_ok=True)

    # -- writer ---------------------------------------------------------------------------
    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._write(memoryview(len(data).to_bytes(8, "little")))
        self._write(memoryview(data))

    def _write(self, view: memoryview) -> None:
        sent, backoff = 0, _Backoff()
        while sent < len(view):
            free = self.capacity - (self.position - int(self.counters[1:].min()))
            if free == 0:
                backoff.wait()
                continue
            offset = self.position % self.capacity
            n = min(free, len(view) - sent, self.capacity - offset)
            self.data[offset:offset + n] = view[sent:sent + n]
            self.position += n
            self.counters[0] = self.position
            sent, backoff = sent + n, _Backoff()

    # -- reader ---------------------------------------------------------------------------
    def receive(self):
        """The next message, waiting for it."""
        size = int.from_bytes(self._read(8), "little")
        return pickle.loads(self._read(size))

    def _read(self, size: int) -> bytearray:
        out, got, backoff = bytearray(size), 0, _Backoff()
        while got < size:
            available = int(self.counters[0]) - self.position
            if available == 0:
                backoff.wait()
                continue
            offset = self.position % self.capacity
            n = min(available, size - got, self.capacity - offset)
            out[got:got + n] = self.data[offset:offset + n]
            self.position += n
            self.counters[1 + self.reader] = self.position
            got, backoff = got + n, _Backoff()
        return out
