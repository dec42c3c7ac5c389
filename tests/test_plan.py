"""`internray plan` against published numbers: XTuner's 7B QLoRA on 8 GB, InternEvo-style 7B on
8 to 1024 A100-80GB, 20B on A100-40GB; and DeepSpeed's own estimators behind the model states.

Pure arithmetic: no model is built and Ray is not started.
"""
from __future__ import annotations

import json
import math

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import LlamaConfig

from internray.config import apply_override, validate_config
from internray.train.config import TrainConfig
from internray.train.engine import deepspeed_config
from internray.train.plan import GIB, plan, usable_gib

LLAMA2_7B = LlamaConfig()  # transformers' defaults are Llama-2-7B's shape: 6.74B parameters, 32k vocabulary


def tokens_per_step(p) -> int:
    return p.micro_batch * p.grad_accum * p.gpus * p.seq_len


# --- XTuner: "the minimum GPU memory required for 7B LLM fine-tuning is only 8GB" ----------------

def test_xtuner_7b_qlora_fits_one_8gb_gpu_at_seq_2048():
    # XTuner's llama2_7b_qlora configs: NF4 + double quant, LoRA r=64 on every linear layer,
    # activation checkpointing, batch 1, paged 32-bit AdamW (DeepSpeed's analogue: optimizer offload).
    p = plan(LLAMA2_7B, gpus=1, gpu_memory_gb=8, seq_len=2048, method="qlora", cpu_memory_gb=32)
    assert p.fits, p.verdict()
    assert round(p.shape.trainable / 1e6) == 160  # 64 x (in + out) over q,k,v,o,gate,up,down x 32 layers
    assert p.activation_checkpointing and p.micro_batch == 1
    assert p.offload_optimizer and not p.offload_params
    assert p.memory_gb["total"] <= usable_gib(8)


def test_full_finetuning_of_7b_does_not_fit_8gb_at_any_zero_stage_without_offload():
    p = plan(LLAMA2_7B, gpus=1, gpu_memory_gb=8, seq_len=2048)
    on_gpu = [c for c in p.candidates if not c.offload_optimizer]
    assert {c.zero_stage for c in on_gpu} == {0, 1, 2, 3}
    assert not any(c.fits for c in on_gpu)
    # bf16 weights alone are 12.6 GiB; only ZeRO-Infinity (everything on the host) gets under 8 GB ...
    assert p.fits and p.zero_stage == 3 and p.offload_params and p.offload_optimizer
    # ... and it needs more host RAM than a 64 GB desktop has.
    desktop = plan(LLAMA2_7B, gpus=1, gpu_memory_gb=8, seq_len=2048, cpu_memory_gb=64)
    assert not desktop.fits
    assert "host RAM" in desktop.verdict()


# --- InternEvo / common practice: 7B on 8 to 1024 A100-80GB, 4M-token batches --------------------

def test_7b_on_8_a100_80gb_at_seq_4096_fits_with_zero_1_or_2_and_no_offload():
    p = plan("7b", gpus=8, gpu_memory_gb=80, seq_len=4096)
    assert p.fits, p.verdict()
    assert p.zero_stage in (1, 2)
    assert not p.offload_optimizer and not p.offload_params
    assert tokens_per_step(p) == 4 * 2**20


def test_7b_on_1024_a100_80gb_keeps_the_4m_token_batch_without_accumulation():
    p = plan("7b", gpus=1024, gpu_memory_gb=80, seq_len=4096)
    assert p.fits and not p.offload_optimizer
    assert (p.micro_batch, p.grad_accum) == (1, 1)
    assert tokens_per_step(p) == 4 * 2**20  # 1024 GPUs x 4096 tokens
    assert p.scaling_config()["num_workers"] == 1024


# --- 20B on A100-40GB ------------------------------------------------------------------------

def test_20b_on_8_a100_40gb_needs_zero_3():
    p = plan("20b", gpus=8, gpu_memory_gb=40, seq_len=4096)
    params, usable = p.shape.params, usable_gib(40) * GIB
    # Stage 2 keeps every bf16 weight on every GPU: 2 bytes x 19.9B = 37 GiB, over 34.5 usable.
    assert 2 * params > usable
    assert not any(c.fits for c in p.candidates if c.zero_stage < 3)
    # Stage 3 without offload: 16 bytes x 19.9B / 8 = 37 GiB of model states (DeepSpeed counts 18): too much too,
    assert 16 * params / 8 > usable
    assert not any(c.fits for c in p.candidates if c.zero_stage == 3 and not c.offload_optimizer)
    # so the plan shards everything and moves the optimizer to the host.
    assert p.fits and p.zero_stage == 3 and p.offload_optimizer


def test_20b_on_16_a100_40gb_needs_zero_3_but_no_offload():
    p = plan("20b", gpus=16, gpu_memory_gb=40, seq_len=4096)
    assert p.fits and p.zero_stage == 3
    assert not p.offload_optimizer and not p.offload_params


# --- DeepSpeed's estimators ------------------------------------------------------------------

def test_model_states_are_deepspeeds_own_estimates():
    p = plan("7b", gpus=8, gpu_memory_gb=80, seq_len=4096)
    params, largest = p.shape.params, p.shape.largest_layer
    for c in p.candidates:
        if c.zero_stage == 3:
            _, expected, _ = estimate_zero3_model_states_mem_needs(
                params, largest, num_gpus_per_node=8, num_nodes=1, cpu_offload=c.offload_optimizer,
                cpu_offload_params=c.offload_params)
        elif c.zero_stage == 2:
            _, expected = estimate_zero2_model_states_mem_needs(
                params, num_gpus_per_node=8, num_nodes=1, cpu_offload=c.offload_optimizer)
        else:
            continue
        assert c.model_states == expected
        assert c.weights + c.grads + c.optimizer == pytest.approx(expected, abs=8)  # the breakdown adds up


def test_7b_on_8_32gb_gpus_picks_zero_3_with_deepspeeds_memory():
    p = plan("7b", gpus=8, gpu_memory_gb=32, seq_len=4096)
    assert p.fits and p.zero_stage == 3 and not p.offload_optimizer
    _, expected, _ = estimate_zero3_model_states_mem_needs(
        p.shape.params, p.shape.largest_layer, num_gpus_per_node=8, num_nodes=1, cpu_offload=False,
        cpu_offload_params=False)
    states = p.memory_gb["total"] - p.memory_gb["activations"]
    assert states == pytest.approx(expected / GIB, abs=1e-6)


# --- when nothing fits -----------------------------------------------------------------------

def test_too_small_gpus_get_a_clear_does_not_fit_with_the_memory_needed():
    p = plan("20b", gpus=8, gpu_memory_gb=8, seq_len=4096)
    assert not p.fits
    assert p.required_gpu_memory_gb > 8
    assert p.verdict().startswith("does not fit")
    assert f"needs at least {p.required_gpu_memory_gb:.1f} GB per GPU" in p.render()
    with pytest.raises(ValueError, match="does not fit"):
        p.deepspeed_config()
    assert plan("20b", gpus=8, gpu_memory_gb=math.ceil(p.required_gpu_memory_gb), seq_len=4096).fits


def test_unusable_inputs_fail_naming_the_fix():
    with pytest.raises(ValueError, match="valid: full, lora, qlora"):
        plan("7b", gpus=8, gpu_memory_gb=80, seq_len=4096, method="qlroa")
    with pytest.raises(ValueError, match="multiple"):
        plan("7b", gpus=12, gpu_memory_gb=80, seq_len=4096)
    with pytest.raises(ValueError, match="valid presets"):
        plan("7B", gpus=8, gpu_memory_gb=80, seq_len=4096)


# --- what would be submitted -----------------------------------------------------------------

def test_render_shows_the_scaling_config_and_a_deepspeed_config_with_the_chosen_stage():
    p = plan("7b", gpus=8, gpu_memory_gb=80, seq_len=4096)
    text = p.render()
    assert f"ray.train.ScalingConfig(**{json.dumps(p.scaling_config())})" in text
    assert p.scaling_config() == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 1.0}}
    assert json.dumps(p.deepspeed_config(), indent=2) in text
    assert p.deepspeed_config()["zero_optimization"]["stage"] == p.zero_stage
    assert p.deepspeed_config()["train_micro_batch_size_per_gpu"] == p.micro_batch
    assert p.deepspeed_config()["gradient_accumulation_steps"] == p.grad_accum
    assert f"activation checkpointing {'on' if p.activation_checkpointing else 'off'}" in text


def test_plan_overrides_give_a_pretrain_config_with_the_same_deepspeed_config(tmp_path):
    p = plan("20b", gpus=8, gpu_memory_gb=40, seq_len=4096)  # offloads: the richest DeepSpeed config
    data = {"data": {"train": str(tmp_path)}}
    for override in p.overrides():
        apply_override(data, override)
    config = validate_config(TrainConfig, data)
    assert deepspeed_config(config) == p.deepspeed_config()
    assert config.training.activation_checkpointing == p.activation_checkpointing
    assert "internray pretrain CONFIG scaling.num_workers=8" in p.render()


def test_qlora_plan_overrides_give_a_finetune_config_with_its_method_rank_and_length(tmp_path):
    p = plan(LLAMA2_7B, gpus=1, gpu_memory_gb=8, seq_len=2048, method="qlora")
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"instruction": "hi", "output": "hello"}\n')
    data = {"finetune": {"data": str(sft)}}
    for override in p.overrides():
        apply_override(data, override)
    config = validate_config(TrainConfig, data)
    assert deepspeed_config(config) == p.deepspeed_config()
    assert (config.finetune.method, config.finetune.lora.r, config.finetune.max_len) == ("qlora", 64, 2048)
    assert config.finetune.lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # what the plan counts
    assert "internray finetune CONFIG" in p.render()
