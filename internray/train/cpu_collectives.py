"""Shared-memory collectives for CPU workers that all run on one machine.

On CPU, DeepSpeed's ZeRO reduces gradients and gathers the updated parameters through the gloo
process group Ray Train builds, and gloo moves every byte over TCP loopback. For the train
benchmark's 10M-parameter model on a 2-core machine, a 20 MB bf16 all-reduce took 19-42 ms through
gloo and 7 ms through DeepSpeed's own shared-memory all-reduce kernel (`deepspeed_shm_comm_op`,
which DeepSpeed uses for CPU tensor-parallel inference). Two ranks that compute, then all-reduce
and all-gather those 20 MB, spent a median 64 ms per step in the pair through gloo and 20 ms
through the kernel; benchmarks/train.py went from 0.81-0.89x the plain loop to 0.82-1.04x.

`use_shared_memory_collectives` routes the world group's blocking SUM all-reduces and all-gathers
of bf16/fp32 tensors on DeepSpeed's communication backend through that kernel. An all-gather
becomes an all-reduce of a zeroed buffer holding each rank's part (adding zeros is exact). Every
other call (sub-groups, other ops or dtypes, async handles) goes to gloo as before. The kernel
needs every rank on this node (it maps the other ranks' buffers) and says so through LOCAL_SIZE,
which must be set before DeepSpeed builds its backend: call `prepare` before `deepspeed.initialize`
and `use_shared_memory_collectives` after it. The kernel never removes the ~66 MB /dev/shm segment
each rank creates; once every rank has mapped the others', `use_shared_memory_collectives` unlinks
its own, so the memory goes back when the workers exit instead of staying in /dev/shm.
"""
from __future__ import annotations

import os

import torch
import torch.distributed

from internray.shm_kernel import KERNEL_LEVEL_NEEDED, room_for, unlink_segment


def prepare(world_size: int, local_world_size: int) -> bool:
    """Tell DeepSpeed's kernel that all ranks are local (it reads LOCAL_SIZE when it initializes).
    Returns whether they are: on several nodes, gloo it is."""
    if world_size < 2 or local_world_size != world_size or not room_for(world_size):
        return False
    os.environ["LOCAL_SIZE"] = str(world_size)
    return True


def use_shared_memory_collectives() -> bool:
    """Route DeepSpeed's world-group all-reduce and all-gather through shared memory; returns
    whether it could (DeepSpeed built its kernel and this CPU runs it)."""
    from deepspeed import comm

    backend = comm.comm.cdb
    if getattr(backend, "shm_comm_op", None) is None or not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        return False
    torch.distributed.barrier()  # every rank has mapped every rank's segment: the names can go
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    unlink_segment(rank, os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    level = backend.shm_vector_kernel_level
    if level < min(KERNEL_LEVEL_NEEDED.values()):
        return False
    gloo_all_reduce, gloo_all_gather = backend.all_reduce, backend.all_gather_into_tensor

    def eligible(tensor: torch.Tensor, group, async_op: bool) -> bool:
        return (not async_op and tensor.device.type == "cpu" and tensor.is_contiguous()
                and KERNEL_LEVEL_NEEDED.get(tensor.dtype, 99) <= level
                and (group is None or torch.distributed.get_world_size(group) == world))

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if backend._reduce_op(op) != torch.distributed.ReduceOp.SUM or not eligible(tensor, group, async_op):
            return gloo_all_reduce(tensor, op=op, group=group, async_op=async_op)
        torch.ops.deepspeed.inference_all_reduce_(tensor)

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if not eligible(output_tensor, group, async_op) or output_tensor.numel() != world * input_tensor.numel():
            return gloo_all_gather(output_tensor, input_tensor, group=group, async_op=async_op)
        part, flat = input_tensor.numel(), output_tensor.view(-1)
        flat[:rank * part].zero_()  # not all of it: ZeRO's input is often this rank's slice of the output
        flat[(rank + 1) * part:].zero_()
        flat[rank * part:(rank + 1) * part].copy_(input_tensor.view(-1))
        torch.ops.deepspeed.inference_all_reduce_(output_tensor)

    backend.all_reduce, backend.all_gather_into_tensor = all_reduce, all_gather_into_tensor
    return True
