"""The shared-memory collectives CPU training workers use (train/cpu_collectives.py), checked
against gloo inside a real 2-worker Ray Train group, the way the train loop sets them up."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def compare_with_gloo(config: dict) -> None:
    """Runs on each Ray Train worker: every routed call must give gloo's result, bit for bit."""
    import os

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from deepspeed import comm

    from internray.train import cpu_collectives

    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    assert cpu_collectives.prepare(world, context.get_local_world_size())
    deepspeed.init_distributed("gloo")
    backend = comm.comm.cdb
    gloo_all_reduce, gloo_all_gather = backend.all_reduce, backend.all_gather_into_tensor
    segment = Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                               f"{os.environ['MASTER_PORT']}_{rank}")
    created = segment.exists()
    routed = cpu_collectives.use_shared_memory_collectives()
    if rank == 0:
        Path(config["report"]).write_text(json.dumps({"routed": routed, "segment_created": created,
                                                      "segment_left": segment.exists()}))
    if not routed:
        return
    generator = torch.Generator().manual_seed(rank)
    for dtype in (torch.bfloat16, torch.float32):
        # the kernel's small-message path, its large one, and (fp32: 36 MB) its 32 MiB chunks
        for numel in (1000, 9_000_001):
            data = torch.randn(numel, generator=generator).to(dtype)
            ours, theirs = data.clone(), data.clone()
            comm.all_reduce(ours)
            gloo_all_reduce(theirs)
            assert torch.equal(ours, theirs), (dtype, numel)
        # ZeRO gathers each rank's partition out of a view into the output itself
        ours = torch.randn(2 * 500_000, generator=generator).to(dtype)
        theirs = ours.clone()
        part = ours.numel() // world
        comm.all_gather_into_tensor(ours, ours[rank * part:(rank + 1) * part])
        gloo_all_gather(theirs, theirs[rank * part:(rank + 1) * part].clone())
        assert torch.equal(ours, theirs), dtype
    # what the kernel cannot do still goes to gloo, and is still right
    wide = torch.full((4,), float(rank + 1), dtype=torch.float64)
    comm.all_reduce(wide)
    assert wide.tolist() == [3.0] * 4
    biggest = torch.full((4,), float(rank + 1))
    comm.all_reduce(biggest, op=comm.ReduceOp.MAX)
    assert biggest.tolist() == [2.0] * 4
    dist.barrier()


def test_shared_memory_collectives_equal_gloo_and_leave_no_segment(ray_cluster, tmp_path):
    import sys

    from ray import cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    report = tmp_path / "report.json"
    TorchTrainer(compare_with_gloo, train_loop_config={"report": str(report)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})).fit()
    facts = json.loads(report.read_text())
    if not facts["routed"]:
        pytest.skip("DeepSpeed's shared-memory kernel is not available on this machine: training stays on gloo")
    assert facts["segment_created"] and not facts["segment_left"]
