"""Model presets, checkpoint export and importers (InternLM2 fused-wqkv, GGUF)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, InternLM3Config, PreTrainedTokenizerFast

from internray.models.export import DEFAULT_CHAT_TEMPLATE, save_hf
from internray.models.importers import fetch_smollm2_gguf, import_internlm2
from internray.models.presets import PRESETS, model_config, parameter_count

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "user", "assistant", "system"]


def word_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A real (if tiny) fast tokenizer: whole words, no training needed."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_model(vocab_size: int):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config("tiny", vocab_size)).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --- presets ---------------------------------------------------------------------------------

def test_every_preset_is_an_internlm3_config_of_its_shape():
    for name, shape in PRESETS.items():
        config = model_config(name, vocab_size=32000, max_position_embeddings=2048)
        assert config.model_type == "internlm3"
        assert {key: getattr(config, key) for key in shape} == shape
        assert (config.vocab_size, config.max_position_embeddings) == (32000, 2048)


def test_7b_preset_has_internlm3_8b_shape():
    reference = InternLM3Config()  # transformers' defaults are internlm/internlm3-8b-instruct's
    config = model_config("7b", vocab_size=reference.vocab_size)
    for key in PRESETS["7b"]:
        assert getattr(config, key) == getattr(reference, key), key
    assert round(parameter_count(config) / 1e9, 1) == 8.8  # 7.75B outside the embeddings


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", {}),
    ("debug", {}),
    ("tiny", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
], ids=["tiny", "debug", "tiny-biases-tied"])
def test_parameter_count_equals_the_built_models(preset, overrides):
    config = model_config(preset, vocab_size=8192, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_debug_preset_is_about_ten_million_parameters_with_the_data_stage_vocabulary():
    assert 9e6 < parameter_count(model_config("debug", vocab_size=8192)) < 11e6


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model preset '3b'; valid presets: tiny, debug, 0.5b, 1.8b, 7b, 20b"):
        model_config("3b", vocab_size=100)


def test_misspelled_override_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown model config field 'num_hiden_layers' \(did you mean 'num_hidden_layers'\?\)"):
        model_config("tiny", vocab_size=100, num_hiden_layers=3)


def test_overrides_replace_preset_fields():
    config = model_config("tiny", vocab_size=100, num_hidden_layers=3, eos_token_id=2)
    assert (config.num_hidden_layers, config.eos_token_id, config.hidden_size) == (3, 2, 64)


# --- save_hf -------------------------------------------------------------------------------------

def test_save_hf_round_trips_weights_and_adds_the_internlm_chat_template(tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_model(len(tokenizer))
    ids = torch.tensor([tokenizer("hello world the cat sat")["input_ids"]])

    out = save_hf(model, tokenizer, tmp_path / "ckpt")

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(model, ids))
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = reloaded.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                          tokenize=False)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template is None  # the caller's tokenizer is not modified


def test_save_hf_keeps_the_tokenizers_own_template_unless_one_is_given(tmp_path):
    own = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer = word_tokenizer(chat_template=own)
    model = tiny_model(len(tokenizer))

    kept = AutoTokenizer.from_pretrained(save_hf(model, tokenizer, tmp_path / "kept"))
    given = AutoTokenizer.from_pretrained(save_hf(model, tokenizer, tmp_path / "given", chat_template="GIVEN"))

    assert (kept.chat_template, given.chat_template) == (own, "GIVEN")


# --- InternLM2 import ------------------------------------------------------------------------------

def internlm2_checkpoint(bias: bool, rope_scaling: dict | None):
    """A random InternLM2 config + state dict with 4 query heads sharing 2 kv heads."""
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
              "vocab_size": len(SPECIALS + WORDS), "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
              "rope_theta": 10000, "rope_scaling": rope_scaling, "bias": bias, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.2, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=generator)

    hidden, inter, vocab, qkv_rows = 32, 48, config["vocab_size"], (4 + 2 * 2) * 8
    state = {"model.tok_embeddings.weight": rand(vocab, hidden, scale=1.0),
             "model.norm.weight": rand(hidden, scale=0.1, offset=1.0),
             "output.weight": rand(vocab, hidden)}
    for i in range(2):
        p = f"model.layers.{i}."
        state |= {p + "attention.wqkv.weight": rand(qkv_rows, hidden), p + "attention.wo.weight": rand(hidden, hidden),
                  p + "feed_forward.w1.weight": rand(inter, hidden), p + "feed_forward.w3.weight": rand(inter, hidden),
                  p + "feed_forward.w2.weight": rand(hidden, inter),
                  p + "attention_norm.weight": rand(hidden, scale=0.1, offset=1.0),
                  p + "ffn_norm.weight": rand(hidden, scale=0.1, offset=1.0)}
        if bias:
            state |= {p + "attention.wqkv.bias": rand(qkv_rows), p + "attention.wo.bias": rand(hidden)}
    return config, state


def internlm2_reference_logits(config: dict, state: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward as modeling_internlm2.py computes it, in plain torch (one sequence)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, group = config["hidden_size"] // heads, heads // kv_heads
    seq = ids.shape[-1]

    def linear(x, name):
        bias = state.get(name + ".bias")
        return torch.nn.functional.linear(x, state[name + ".weight"], bias)

    def rms_norm(x, name):
        return state[name + ".weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"]))

    def rotate(x, cos, sin):  # x: (heads, seq, head_dim); rotate_half pairs dim i with i + head_dim/2
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    positions = torch.arange(seq).float()
    if config["rope_scaling"]:  # InternLM2LinearScalingRotaryEmbedding: t = t / scaling_factor
        positions = positions / config["rope_scaling"]["factor"]
    angles = torch.cat([torch.outer(positions, inv_freq)] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    causal = torch.full((seq, seq), float("-inf")).triu(1)

    x = state["model.tok_embeddings.weight"][ids[0]]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = linear(rms_norm(x, p + "attention_norm"), p + "attention.wqkv")
        qkv = qkv.view(seq, kv_heads, 2 + group, head_dim)  # 'b q (h gs d) -> b q h gs d'
        q = qkv[:, :, :group].reshape(seq, heads, head_dim).transpose(0, 1)
        k, v = qkv[:, :, -2].transpose(0, 1), qkv[:, :, -1].transpose(0, 1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # repeat_kv
        scores = q @ k.transpose(1, 2) / math.sqrt(head_dim) + causal
        attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, -1)
        x = x + linear(attended, p + "attention.wo")
        h = rms_norm(x, p + "ffn_norm")
        x = x + linear(torch.nn.functional.silu(linear(h, p + "feed_forward.w1")) * linear(h, p + "feed_forward.w3"),
                       p + "feed_forward.w2")
    return (rms_norm(x, "model.norm") @ state["output.weight"].T).unsqueeze(0)


def write_internlm2(src, config, state, layout):
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    word_tokenizer().save_pretrained(src)
    if layout == "safetensors":
        save_file(state, src / "model.safetensors")
    else:  # two pytorch .bin shards, as older InternLM2 releases ship
        names = sorted(state)
        for n, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
            torch.save({name: state[name] for name in part}, src / f"pytorch_model-0000{n}-of-00002.bin")


@pytest.mark.parametrize("layout, bias, rope_scaling", [
    ("safetensors", False, None),
    ("bin-shards", True, {"type": "linear", "factor": 2.0}),
], ids=["safetensors", "bin-shards-bias-linear-rope"])
def test_internlm2_import_reproduces_internlm2_logits(tmp_path, layout, bias, rope_scaling):
    config, state = internlm2_checkpoint(bias, rope_scaling)
    write_internlm2(tmp_path / "internlm2", config, state, layout)
    ids = torch.tensor([[1, 6, 7, 8, 9, 10, 11, 12, 4, 5]])
    expected = internlm2_reference_logits(config, state, ids)

    out = import_internlm2(tmp_path / "internlm2", tmp_path / "llama")

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.model_type == "llama"
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template == DEFAULT_CHAT_TEMPLATE


def test_internlm2_import_of_a_checkpoint_without_fused_wqkv_names_the_missing_tensor(tmp_path):
    config, state = internlm2_checkpoint(bias=False, rope_scaling=None)
    state["model.layers.0.attention.q_proj.weight"] = state.pop("model.layers.0.attention.wqkv.weight")
    write_internlm2(tmp_path / "src", config, state, "safetensors")

    with pytest.raises(ValueError, match=r"not an InternLM2 checkpoint: tensor 'model\.layers\.0\.attention\.wqkv\.weight' "
                                         r"is missing \(found model\.layers\.0\.attention\.q_proj\.weight, "
                                         r"model\.layers\.0\.attention\.wo\.weight\)"):
        import_internlm2(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed")
def test_internlm2_import_of_a_sentencepiece_tokenizer_without_the_package_names_it(tmp_path):
    config, state = internlm2_checkpoint(bias=False, rope_scaling=None)
    write_internlm2(tmp_path / "src", config, state, "safetensors")
    (tmp_path / "src" / "tokenizer.json").unlink()
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"a SentencePiece model")

    with pytest.raises(ImportError, match="needs the `sentencepiece` package"):
        import_internlm2(tmp_path / "src", tmp_path / "out")


# --- GGUF import -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf():
    pytest.importorskip("gguf", reason="GGUF import needs the optional `gguf` package (pip install gguf)")
    return fetch_smollm2_gguf()


def test_gguf_import_writes_a_plain_checkpoint_with_the_gguf_models_logits(smollm2_gguf, smollm2_dir):
    out = smollm2_dir  # the session's import_gguf(fetch_smollm2_gguf()), which other tests serve

    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    gguf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    torch.testing.assert_close(logits(saved, ids), logits(gguf, ids), atol=1e-5, rtol=1e-5)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert sum(p.numel() for p in saved.parameters()) == 134_515_008
    answer = saved.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(answer)
