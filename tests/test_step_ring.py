"""The shared-memory ring that carries tensor-parallel steps: readers in other processes get every
message, whole and in order, however the messages straddle the ring's end or exceed its size."""
from __future__ import annotations

import multiprocessing
import time

import numpy as np

from internray.serve.engine.step_ring import StepRing


def _follow(path: str, reader: int, readers: int, results, delay: float) -> None:
    ring = StepRing.attach(path, readers, reader)
    received = []
    while (message := ring.receive()) is not None:
        received.append(message)
        time.sleep(delay)  # a slow reader: the writer must wait for it, not overwrite what it has not read
    results.put((reader, received))


def test_readers_in_other_processes_get_every_message_whole_and_in_order():
    context = multiprocessing.get_context("spawn")
    ring = StepRing.create(readers=2, capacity=4096)
    results = context.Queue()
    processes = [context.Process(target=_follow, args=(str(ring.path), reader, 2, results, delay))
                 for reader, delay in ((0, 0.0), (1, 0.002))]
    for process in processes:
        process.start()
    try:
        rng = np.random.default_rng(0)
        messages = [rng.integers(0, 1 << 40, size) for size in (1, 3000, 511, 0, 5000, 2)]  # 24-40 KB ones too
        messages += [{"step": k, "ids": np.arange(k)} for k in range(200)]
        for message in messages:
            ring.send(message)
        ring.send(None)
        received = dict(results.get(timeout=120) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        ring.unlink()
    assert ring.position > 10 * ring.capacity  # the ring wrapped around many times
    for reader in (0, 1):
        assert len(received[reader]) == len(messages)
        for sent, got in zip(messages, received[reader]):
            if isinstance(sent, dict):
                assert got["step"] == sent["step"] and np.array_equal(got["ids"], sent["ids"])
            else:
                assert np.array_equal(got, sent)


def test_the_ring_file_can_go_once_readers_have_attached():
    """Unlinked right after the readers map it (tp_workers does so), a crash leaves nothing in /dev/shm."""
    ring = StepRing.create(readers=1, capacity=1024)
    reader = StepRing.attach(ring.path, 1, 0)
    ring.unlink()
    assert not ring.path.exists()
    ring.send({"still": "delivered"})
    assert reader.receive() == {"still": "delivered"}
