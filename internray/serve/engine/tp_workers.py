"""Tensor parallelism across Ray actors: rank 0 runs in the engine's own process, ranks 1..N-1 are
actors, and all N join one torch.distributed group (gloo on CPU, NCCL on GPU).

Each step the engine sends the same `StepInput` to every rank and runs rank 0 itself; the ranks
meet only inside the row-parallel all-reduces. When every rank shares rank 0's node, the steps go
through a shared-memory ring (step_ring.py, x86) that the ranks follow in a loop; otherwise through
one Ray actor call per rank and step. Under Ray Serve the actors are placed in the replica's own
placement group (`placement_group_bundles`), so a replica and its ranks come and go together.
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from internray.runtime import free_port
from internray.serve.config import EngineConfig
from internray.serve.engine import cpu_allreduce
from internray.serve.engine.model_runner import ModelRunner, StepInput, resolve_device
from internray.serve.engine.step_ring import StepRing
from internray.serve.model.layers import TPInfo


def init_group(rank: int, world: int, address: str, backend: str) -> TPInfo:
    """Join the ranks' process group; CPU ranks on one node also join the shared-memory all-reduce."""
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    return TPInfo(rank, world, cpu_allreduce.join(rank, world, address) if backend == "gloo" else 0)


@ray.remote(max_concurrency=2)  # `ready` answers while `follow` runs
class RankWorker:
    """Rank >= 1: its model shard and KV-cache slice."""

    def __init__(self, engine: EngineConfig, rank: int, address: str, backend: str, num_blocks: int):
        self.rank = rank
        self.runner = ModelRunner(engine, init_group(rank, engine.tensor_parallel_size, address, backend), num_blocks)
        self.ring: StepRing | None = None

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def attach(self, path: str, readers: int) -> None:
        self.ring = StepRing.attach(path, readers, self.rank - 1)

    def follow(self) -> None:
        """Run each step rank 0 writes to the ring, until the actor is killed. A step that fails
        (or fails to arrive whole) ends this process: rank 0 would wait for this rank in the next
        all-reduce anyway, and a dead rank is what the replica's health check looks for."""
        while True:
            try:
                self.runner.execute(self.ring.receive())
            except BaseException:  # noqa: BLE001 - whatever it was, this rank can no longer keep step
                traceback.print_exc()
                os._exit(1)

    def execute(self, step: StepInput) -> None:
        self.runner.execute(step)

    def load_weights(self, weights: dict) -> None:
        self.runner.load_weights(weights)


class TensorParallelGroup:
    """The engine's handle on all ranks: `execute(step)` returns rank 0's logits."""

    step_ring = True
    """Send steps through shared memory when every rank shares this node; False: always through
    Ray calls (benchmarks and tests compare the two)."""

    def __init__(self, engine: EngineConfig, num_blocks: int, cpus_per_rank: float = 1.0, gpus_per_rank: float = 0.0):
        world = engine.tensor_parallel_size
        backend = "nccl" if resolve_device(engine.device).type == "cuda" else "gloo"
        address = f"{ray.util.get_node_ip_address()}:{free_port('')}"
        pg = get_current_placement_group()
        self.workers = []
        for rank in range(1, world):
            options = {"num_cpus": cpus_per_rank, "num_gpus": gpus_per_rank}
            if pg is not None:  # a Serve replica: bundle 0 is the replica itself
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            self.workers.append(RankWorker.options(**options).remote(engine, rank, address, backend, num_blocks))
        tp = init_group(0, world, address, backend)  # returns once every rank has joined
        self.runner = ModelRunner(engine, tp, num_blocks)
        nodes = ray.get([w.node_id.remote() for w in self.workers])
        local = all(node == ray.get_runtime_context().get_node_id() for node in nodes)
        self.ring = self._start_ring() if local and self.step_ring and StepRing.supported() else None

    def _start_ring(self) -> StepRing:
        ring = StepRing.create(readers=len(self.workers))
        try:
            ray.get([w.attach.remote(str(ring.path), len(self.workers)) for w in self.workers])
        finally:
            ring.unlink()
        for w in self.workers:
            w.follow.remote()
        return ring

    def execute(self, step: StepInput):
        if self.ring is not None:
            self.ring.send(step)
            return self.runner.execute(step)
        ref = ray.put(step)
        pending = [w.execute.remote(ref) for w in self.workers]
        logits = self.runner.execute(step)
        ray.get(pending)  # surfaces a failed rank instead of hanging on the next all-reduce
        return logits

    def describe(self) -> str:
        """How the ranks get their steps and sum their partial products, for the engine's log."""
        level = self.runner.tp.shared_memory_level
        return (f"tensor parallel {len(self.workers) + 1}: steps through "
                f"{'a shared-memory ring' if self.ring is not None else 'Ray calls'}, all-reduce through "
                f"{f'shared memory (level {level})' if level else 'the process group'}")

    def check_ranks(self) -> None:
        """Raise if a rank's actor died. Rank 0 would not notice by itself: in the shared-memory
        kernel it waits for a dead peer forever. A rank busy in a long step is not dead."""
        try:
            ray.get([w.ready.remote() for w in self.workers], timeout=5)
        except ray.exceptions.GetTimeoutError:
            pass

    def load_weights(self, weights: dict) -> None:
        ref = ray.put(weights)
        pending = [w.load_weights.remote(ref) for w in self.workers]
        self.runner.load_weights(weights)
        ray.get(pending)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if dist.is_initialized():
            dist.destroy_process_group()
