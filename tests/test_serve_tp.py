"""Tensor parallelism on this machine: two ranks (this process + one Ray actor) in a gloo group."""
from __future__ import annotations

import os
import signal
import time

import pytest
from transformers import AutoTokenizer

from internray.serve.config import EngineConfig
from internray.serve.engine.llm_engine import LLMEngine, generate
from internray.serve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("kv_cache_dtype,step_ring", [("auto", True), ("int8", True), ("auto", False)])
def test_tp2_gives_the_same_tokens_and_logprobs_as_tp1(ray_cluster, tiny_llama_dir, kv_cache_dtype, step_ring,
                                                       monkeypatch):
    """Each rank caches its own heads; an int8 cache quantizes per head, so the split changes nothing.
    Steps reach rank 1 through the shared-memory ring, or (step_ring=False) through Ray calls, the
    path ranks on other nodes take."""
    from internray.serve.engine.tp_workers import TensorParallelGroup

    monkeypatch.setattr(TensorParallelGroup, "step_ring", step_ring)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [tokenizer(p)["input_ids"] for p in ("def f(x):\n    return", "import os\nimport sys\n" * 4, "x")]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1, ignore_eos=True)
    outputs = {}
    for tp in (1, 2):
        config = EngineConfig(model=str(tiny_llama_dir), tensor_parallel_size=tp, kv_cache_gib=0.01,
                              block_size=4, max_num_batched_tokens=16, threads_per_rank=1,
                              kv_cache_dtype=kv_cache_dtype, dtype="float32")
        engine = LLMEngine(config, cpus_per_rank=0.5, verbose=False)
        try:
            if tp == 2:  # and the log says which path the steps take
                assert ("a shared-memory ring" if step_ring else "Ray calls") in engine.runner.describe()
            outputs[tp] = generate(engine, prompts, params)
        finally:
            engine.shutdown()
    for one, two in zip(outputs[1], outputs[2]):
        assert one.token_ids == two.token_ids
        for a, b in zip(one.logprobs, two.logprobs):
            assert abs(a["logprob"] - b["logprob"]) < 1e-4  # row-parallel sums differ only in rounding


def test_a_tp2_serve_replica_reserves_its_ranks_and_answers_like_tp1(openai_server, tiny_llama_dir):
    from openai import OpenAI
    from ray import serve
    from ray.util import placement_group_table
    from ray.util.state import list_actors

    from internray.serve.app import build_app
    from internray.serve.launch import serve_config

    config = serve_config([str(tiny_llama_dir)], {"server": {"cpus_per_replica": 0.5, "cpus_per_rank": 0.5}},
                          served_name="tiny-tp2", tensor_parallel_size=2, kv_cache_gib=0.01,
                          dtype="float32")  # as the TP=1 app it is compared with
    serve.run(build_app(config), name="tp2", route_prefix="/tp2")
    try:
        request = dict(messages=[{"role": "user", "content": "Count with me."}], max_tokens=12, temperature=0)
        tp2 = OpenAI(base_url=openai_server.url + "/tp2/v1", api_key="-", max_retries=0)
        tp1 = OpenAI(base_url=openai_server.url + "/v1", api_key="-", max_retries=0)
        answer = tp2.chat.completions.create(model="tiny-tp2", **request).choices[0].message.content
        assert answer == tp1.chat.completions.create(model="tiny", **request).choices[0].message.content
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        assert any(len(g["bundles"]) == 2 for g in groups)  # the replica's bundle + its second rank's

        # a killed rank fails the replica's health check; Serve replaces it and the app answers again
        (rank,) = list_actors(filters=[("class_name", "=", "RankWorker"), ("state", "=", "ALIVE")])
        os.kill(rank.pid, signal.SIGKILL)
        deadline, again = time.time() + 240, None
        while again is None and time.time() < deadline:
            try:
                again = tp2.chat.completions.create(model="tiny-tp2", timeout=30, **request).choices[0].message.content
            except Exception:  # noqa: BLE001 - the replica is down or restarting
                time.sleep(2)
        assert again == answer
    finally:
        serve.delete("tp2")


def test_tp2_ranks_in_fresh_processes_all_reduce_through_shared_memory_and_agree_with_tp1(ray_cluster, tiny_llama_dir):
    """The kernel joins once per process, so rank 0 runs in a fresh actor here (this test process
    may have joined it already, in the test above)."""
    import ray

    from internray.serve.engine import cpu_allreduce

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [tokenizer(p)["input_ids"] for p in ("def f(x):\n    return", "import os\nimport sys\n" * 4)]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1, ignore_eos=True)

    def run(tp: int) -> tuple[int, list]:
        config = EngineConfig(model=str(tiny_llama_dir), tensor_parallel_size=tp, kv_cache_gib=0.01, block_size=4,
                              max_num_batched_tokens=16, threads_per_rank=1, dtype="float32")
        engine = LLMEngine(config, cpus_per_rank=0.5, verbose=False)
        try:
            level = engine.runner.runner.tp.shared_memory_level if tp > 1 else 0
            outputs = generate(engine, prompts, params)
            return level, [(o.token_ids, [lp["logprob"] for lp in o.logprobs]) for o in outputs]
        finally:
            engine.shutdown()

    kernel_available = ray.get(ray.remote(num_cpus=0)(lambda: cpu_allreduce._kernel() is not None).remote())
    level, tp2 = ray.get(ray.remote(num_cpus=0.5)(run).remote(2))
    _, tp1 = run(1)
    if not kernel_available:
        pytest.skip("DeepSpeed's shared-memory kernel is not available on this machine: TP stays on gloo")
    assert level >= 1
    for (tokens1, logprobs1), (tokens2, logprobs2) in zip(tp1, tp2):
        assert tokens1 == tokens2
        assert max(abs(a - b) for a, b in zip(logprobs1, logprobs2)) < 1e-4
