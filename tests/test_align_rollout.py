"""The rollout side of GRPO on its own: the serve engine takes new weights in memory and then
behaves exactly like an engine loaded from a checkpoint of those weights (its prefix cache
from the old weights dropped), and the reward-model actor scores like a plain transformers
forward."""
from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from internray.align.rollout import RewardModelWorker
from internray.serve.config import EngineConfig
from internray.serve.engine.llm_engine import LLMEngine, generate
from internray.serve.engine.sampling_params import SamplingParams


def test_update_weights_equals_loading_a_checkpoint_of_the_same_weights(tiny_llama_dir, tmp_path):
    config = lambda model: EngineConfig(model=str(model), kv_cache_gib=0.01, block_size=4)  # noqa: E731
    engine = LLMEngine(config(tiny_llama_dir), verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tokenizer("def update(self, weights):\n    for name in")["input_ids"]
    greedy = SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=0)
    before = generate(engine, [prompt], greedy)[0]
    generate(engine, [prompt], SamplingParams(max_tokens=12, temperature=0))  # fills the prefix cache

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    engine.update_weights(weights)
    after = generate(engine, [prompt], greedy)[0]
    cached = generate(engine, [prompt], SamplingParams(max_tokens=12, temperature=0))[0]

    model.save_pretrained(tmp_path / "perturbed")
    tokenizer.save_pretrained(tmp_path / "perturbed")
    fresh = generate(LLMEngine(config(tmp_path / "perturbed"), verbose=False), [prompt], greedy)[0]
    assert after.token_ids == fresh.token_ids == cached.token_ids
    assert after.token_ids != before.token_ids  # the perturbation is large enough to show
    assert [e["logprob"] for e in after.prompt_logprobs[1:]] == pytest.approx(
        [e["logprob"] for e in fresh.prompt_logprobs[1:]], abs=1e-5)


def test_update_weights_refuses_a_busy_engine_and_a_wrong_checkpoint(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), kv_cache_gib=0.01), verbose=False)
    weights = LlamaForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    with pytest.raises(ValueError, match="unexpected tensor 'extra.weight'"):
        engine.update_weights(weights | {"extra.weight": torch.zeros(1)})
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.update_weights(weights)


def test_reward_model_actor_scores_like_transformers(ray_cluster, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "rm")
    sequences = [[5, 6, 7, 8, 9], [5, 6, 7], [10, 11, 12, 13]]
    actor = RewardModelWorker.options(num_cpus=0).remote(str(tmp_path / "rm"), 1)
    scores = ray.get(actor.score.remote(sequences))
    with torch.no_grad():
        expected = [float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in sequences]
    assert scores == pytest.approx(expected, abs=1e-5)
    ray.kill(actor)
