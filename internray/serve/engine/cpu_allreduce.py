"""The row-parallel all-reduce of CPU tensor-parallel ranks on one node, through DeepSpeed's
shared-memory kernel (internray/shm_kernel.py) instead of gloo.

Gloo goes through TCP loopback: on 2 cores a decode-sized bf16 all-reduce (1-64 rows of 576)
took 1.3-1.4 ms through gloo and 8-29 us through the kernel, and a Llama layer all-reduces twice
per step, so at TP=2 gloo alone cost a 30-layer model ~80 ms per decode step.

The kernel keeps one group per process (it initializes once), so a process that already joined
one (a test process building a second TP engine) leaves its next group on gloo; all ranks agree
on the choice before any of them maps a segment, since the kernel waits for every peer's.
"""
from __future__ import annotations

import functools
import os

import ray
import torch.distributed as dist

from internray.shm_kernel import KERNEL_LEVEL_NEEDED, room_for, unlink_segment

_joined = False


@functools.cache
def _kernel():
    from deepspeed.comm.torch import build_shm_op

    return build_shm_op()  # None where DeepSpeed cannot build it


def join(rank: int, world: int, address: str) -> int:
    """Collective over the gloo group just formed: the kernel's ISA level if every rank is on this
    node and can use it (the ranks have then mapped each other's segments), else 0 (gloo)."""
    global _joined
    level = 0 if _joined or not room_for(world) or _kernel() is None else _kernel().vector_kernel_level()
    views: list = [None] * world
    dist.all_gather_object(views, (ray.get_runtime_context().get_node_id(), level))
    level = min(v[1] for v in views)
    if len({v[0] for v in views}) > 1 or level < min(KERNEL_LEVEL_NEEDED.values()):
        return 0
    host, port = address.rsplit(":", 1)
    env = {"LOCAL_SIZE": str(world), "MASTER_ADDR": host, "MASTER_PORT": port}  # what the kernel reads
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _kernel().initialize(world, rank)
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    _joined = True
    dist.barrier()
    unlink_segment(rank, host, port)
    return level
