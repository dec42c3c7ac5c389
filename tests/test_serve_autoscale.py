"""Replica autoscaling under load on loopback: 1 -> 2 replicas and back, with no request lost."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from internray.serve.app import build_app
from internray.serve.launch import serve_config

pytestmark = pytest.mark.slow
APP, MODEL = "autoscale", "tiny-auto"


def running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[f"LLMServer:{MODEL}"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_load_scales_replicas_up_and_back_down_without_losing_requests(openai_server, tiny_llama_dir):
    config = serve_config([str(tiny_llama_dir)], {"server": {"cpus_per_replica": 0, "target_ongoing_requests": 2}},
                          served_name=MODEL, min_replicas=1, max_replicas=2, kv_cache_gib=0.01)
    serve.run(build_app(config), name=APP, route_prefix="/" + APP)
    url = f"{openai_server.url}/{APP}/v1/completions"
    statuses: list[int] = []
    try:
        assert running_replicas() == 1

        async def load(stop: asyncio.Event):
            async with httpx.AsyncClient(timeout=120) as http:
                async def worker():
                    while not stop.is_set():
                        r = await http.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 48,
                                                       "ignore_eos": True})
                        statuses.append(r.status_code)

                workers = [asyncio.create_task(worker()) for _ in range(8)]
                scaled = await asyncio.to_thread(wait_for, lambda: running_replicas() == 2, 90)
                stop.set()
                await asyncio.gather(*workers)
                return scaled

        assert asyncio.run(load(asyncio.Event())), "never reached 2 replicas under 8 concurrent clients"
        assert wait_for(lambda: running_replicas() == 1, 90), "did not scale back to 1 replica when idle"
        assert statuses and set(statuses) == {200}, f"lost requests: {[s for s in statuses if s != 200][:5]}"
    finally:
        serve.delete(APP)
