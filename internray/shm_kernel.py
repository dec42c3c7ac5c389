"""DeepSpeed's shared-memory all-reduce kernel (`deepspeed_shm_comm_op`), as both of its CPU users
see it: gradient collectives in training (train/cpu_collectives.py) and the row-parallel
all-reduces of tensor-parallel serving (serve/engine/cpu_allreduce.py).

The kernel checks nothing itself: a CPU without the instructions a dtype's path was compiled for
faults, and a /dev/shm too small for its segments surfaces later as SIGBUS (Docker's default
/dev/shm is 64 MiB, less than one rank's segment). Both users ask here first.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

KERNEL_LEVEL_NEEDED = {torch.bfloat16: 2, torch.float32: 1}
"""The kernel's bf16 path is compiled for avx512bw (level 2), its fp32 path for avx2 (level 1);
on a CPU without them it faults and the other ranks hang, so those dtypes stay on gloo."""
SEGMENT_BYTES = 70 * 2**20
"""One rank's /dev/shm segment (two 32 MiB halves and two 1 MiB ones)."""


def room_for(world_size: int) -> bool:
    """Whether /dev/shm can hold every rank's segment, with as much again to spare."""
    return Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free >= 2 * world_size * SEGMENT_BYTES


def unlink_segment(rank: int, address: str, port: str) -> None:
    """Remove this rank's /dev/shm name (the kernel names it after the group's address and port);
    the memory stays mapped until every rank has exited."""
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)
