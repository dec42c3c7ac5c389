"""Finetuning: SFT formats and loss masks, QLoRA's refusal on CPU, and a LoRA run whose merged
export equals base + adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from internray.config import ConfigError, validate_config
from internray.models.export import DEFAULT_CHAT_TEMPLATE, save_hf
from internray.models.presets import model_config
from internray.runs import read_manifest
from internray.train.config import TrainConfig
from internray.train.finetune import run_finetune
from internray.train.sft import IGNORE, SFTFormatError, to_messages, tokenize_conversation

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And times three?"},
    {"role": "assistant", "content": "Twelve."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from internray.data.tokenize import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = [m["content"] for m in CONVERSATION] * 20 + ["The quick brown fox jumps over the lazy dog."] * 20
    train_tokenizer(texts, vocab_size=320, min_frequency=1, out=out)
    return AutoTokenizer.from_pretrained(str(out))


def test_only_assistant_replies_and_their_end_tokens_are_learned(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION, max_len=512)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    learned = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert learned == "Four.<|im_end|>\nTwelve.<|im_end|>\n"
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels))


def test_the_three_formats_become_the_same_messages():
    assert to_messages({"instruction": "Add", "input": "2+2", "output": "4"}, "auto") == [
        {"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "auto") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert to_messages({"messages": CONVERSATION}, "openai") == CONVERSATION
    assert to_messages({"text": "raw"}, "auto") == "raw"
    with pytest.raises(SFTFormatError, match="`output`"):
        to_messages({"instruction": "no answer"}, "alpaca")
    with pytest.raises(SFTFormatError, match="cannot tell the format"):
        to_messages({"prompt": "?"}, "auto")


def test_qlora_on_cpu_is_refused_up_front(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ConfigError, match="qlora needs CUDA GPUs and bitsandbytes"):
        validate_config(TrainConfig, {"model": {"preset": "tiny"}, "finetune": {"data": str(data), "method": "qlora"}})


def test_lora_finetune_exports_a_merged_model_equal_to_base_plus_adapter(ray_cluster, tokenizer, tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    shape = model_config("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    save_hf(AutoModelForCausalLM.from_config(shape), tokenizer, base_dir, chat_template=DEFAULT_CHAT_TEMPLATE)
    data = tmp_path / "sft.jsonl"
    records = [{"messages": CONVERSATION}, {"instruction": "Say hi", "output": "Hi."},
               {"conversations": [{"from": "human", "value": "Fox?"}, {"from": "gpt", "value": "The quick brown fox."}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records * 8) + "not json\n")
    config = validate_config(TrainConfig, {
        "run": {"root": str(tmp_path / "runs")},
        "model": {"path": str(base_dir), "preset": None},
        "finetune": {"data": str(data), "method": "lora", "max_len": 128, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
        "training": {"steps": 6, "micro_batch_size": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2},
        "checkpoint": {"every_steps": 6},
    })
    run = run_finetune(config)
    manifest = read_manifest(run.dir)
    assert manifest["counts"] == {"sft_records": 24, "sft_rejected": 1}
    assert "not json" in run.path("sft_rejects.jsonl").read_text()

    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(str(run.path("hf"))).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                        str(run.path("hf", "adapter"))).eval()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    with torch.no_grad():
        merged_logits, adapted_logits, base_logits = (m(input_ids=ids).logits for m in (merged, adapted, base))
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter learned something
    assert Path(run.path("hf", "chat_template.jinja")).exists()
