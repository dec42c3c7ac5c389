"""The engine against Hugging Face `generate` on the same checkpoint: scheduling, paging, prefix
caching, preemption and sampling must not change what the model says."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from internray.serve.config import EngineConfig
from internray.serve.engine.async_engine import AsyncLLMEngine
from internray.serve.engine.block_manager import BlockManager
from internray.serve.engine.detokenizer import IncrementalDetokenizer
from internray.serve.engine.llm_engine import LLM, LLMEngine, generate
from internray.serve.engine.sampler import draw, greedy_tokens
from internray.serve.engine.sampling_params import InvalidRequest, SamplingParams
from internray.serve.engine.sequence import Sequence
from internray.serve.model.loader import cpu_has_bf16_instructions

from conftest import generate_joining

PROMPTS = ["def f(x):\n    return", "import os", "class A:\n    def __init__(self, a, b):\n        self.a = a\n" * 3,
           "x", "for i in range(10):\n    print(i)\n" * 2]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(hf, prompts):
    """HF greedy continuations (stopping at EOS, as the engine does)."""
    outs = []
    for ids in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
        outs.append(out[0, len(ids):].tolist())
    return outs


def engine_config(model, **kw) -> EngineConfig:
    """fp32, as the HF reference computes ("auto" is bf16 on CPUs with bf16 instructions)."""
    return EngineConfig(model=str(model), kv_cache_gib=0.01, **{"dtype": "float32"} | kw)


def test_greedy_single_requests_equal_hf_generate(tiny_llama_dir, prompts, reference):
    llm = LLM(engine_config(tiny_llama_dir))
    for ids, expected in zip(prompts, reference):
        assert llm.generate([ids], GREEDY)[0].token_ids == expected


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-attention", "sdpa-attention"])
def test_mixed_batch_joining_at_different_steps_equals_hf(tiny_llama_dir, prompts, reference, compiled):
    # small blocks and a small token budget: prompts are chunked and mixed with running decodes
    config = engine_config(tiny_llama_dir, block_size=4, max_num_batched_tokens=16, compiled_cpu_kernels=compiled)
    assert generate_joining(LLMEngine(config, verbose=False), prompts, GREEDY, every=3) == reference


def test_prefix_cache_hits_give_the_same_tokens_as_misses(tiny_llama_dir, prompts, reference):
    engine = LLMEngine(engine_config(tiny_llama_dir, block_size=4), verbose=False)
    long_prompt = prompts[2]
    first = generate(engine, [long_prompt], GREEDY)[0]
    second = generate(engine, [long_prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= len(long_prompt) - 4  # every full prompt block was reused
    assert first.token_ids == second.token_ids == reference[2]


def test_a_tiny_kv_cache_preempts_and_still_matches_hf(tiny_llama_dir, prompts, reference):
    # room for ~3 sequences' worth of blocks: decodes must preempt others and recompute them
    engine = LLMEngine(engine_config(tiny_llama_dir, block_size=4), verbose=False)
    engine.blocks = BlockManager(24, 4, enable_prefix_caching=False)
    engine.scheduler.blocks = engine.blocks
    fitting = [i for i, p in enumerate(prompts) if len(p) + GREEDY.max_tokens <= 24 * 4]
    outs = generate(engine, [prompts[i] for i in fitting], GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [reference[i] for i in fitting]
    assert engine.blocks.num_free == 24  # everything returned


def test_a_long_prompt_waits_for_room_instead_of_forcing_preemptions(tiny_llama_dir, prompts, reference):
    """Admission by cost: the 69-token prompt needs 18 of the 23 blocks. With two short requests
    decoding it would leave them one free block, and their growth would preempt it mid-prefill; so
    it waits until they finish, and nothing is ever preempted."""
    engine = LLMEngine(engine_config(tiny_llama_dir, block_size=4, max_num_batched_tokens=16), verbose=False)
    engine.blocks = engine.scheduler.blocks = BlockManager(23, 4, enable_prefix_caching=False)
    engine.add_request("short-0", prompts[0], GREEDY)
    engine.add_request("short-1", prompts[1], GREEDY)
    done, step = {}, 0
    while engine.has_work:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (step, out.token_ids)
        if step == 0:
            engine.add_request("long", prompts[2], SamplingParams(max_tokens=1, temperature=0))
            assert engine.blocks.num_free == 19  # 18 would fit, but not with a block of headroom per decode
        step += 1
    assert engine.scheduler.num_preemptions == 0
    assert done["long"][0] > max(done["short-0"][0], done["short-1"][0])  # it waited its turn
    assert [done[k][1] for k in ("short-0", "short-1", "long")] == [reference[0], reference[1], reference[2][:1]]


def test_the_async_engine_builds_and_steps_on_its_own_thread(tiny_llama_dir, prompts, reference, tmp_path):
    """All torch work on one thread: the caller's OpenMP setting is left alone (a second thread
    team would make libgomp sleep at every barrier, see async_engine), and a failed build is
    raised to the caller instead of leaving it waiting."""
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = AsyncLLMEngine(engine_config(tiny_llama_dir, threads_per_rank=2), verbose=False)
        assert torch.get_num_threads() == 1

        async def complete(ids):
            return [out async for out in engine.generate("r", ids, GREEDY)][-1].token_ids

        assert asyncio.run(complete(prompts[0])) == reference[0]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(caller_threads)
    shutil.copytree(tiny_llama_dir, tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        AsyncLLMEngine(engine_config(tmp_path / "no-weights"), verbose=False)


def test_kv_cache_is_sized_from_the_memory_budget(tiny_llama_dir):
    engine = LLMEngine(engine_config(tiny_llama_dir), verbose=False)
    # 2 (k, v) x 2 layers x 16 tokens x 2 kv heads x 16 head dim x 4 bytes = 8 KiB per block
    assert engine.blocks.num_blocks == int(0.01 * 2**30) // 8192
    assert engine.max_model_len == 1024


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively(tiny_llama_dir):
    engine = LLMEngine(engine_config(tiny_llama_dir, dtype="auto"), verbose=False)
    native = cpu_has_bf16_instructions()
    assert engine.runner.dtype == (torch.bfloat16 if native else torch.float32)
    assert engine.blocks.num_blocks == int(0.01 * 2**30) // (4096 if native else 8192)  # the cache too


def test_requests_the_engine_cannot_serve_are_refused_by_name(tiny_llama_dir):
    engine = LLMEngine(engine_config(tiny_llama_dir, max_model_len=32), verbose=False)
    with pytest.raises(InvalidRequest, match="32 tokens"):
        engine.add_request("long", list(range(40)), GREEDY)
    with pytest.raises(InvalidRequest, match="token ids"):
        engine.add_request("bad", [1, 99999], GREEDY)
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams(temperature=-1)
    assert not engine.has_work


def test_completion_is_cut_at_max_model_len(tiny_llama_dir, prompts):
    llm = LLM(engine_config(tiny_llama_dir, max_model_len=len(prompts[0]) + 5))
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    """The sampler's inverse-CDF draw against the probabilities it was given: frequencies over
    20,000 draws within 4 standard errors, filtered-out (zero) tokens never drawn, one seed
    giving one sequence of draws, and no draw at all from a distribution without mass."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw(probs, generator) for _ in range(20_000)])
    counts = torch.bincount(draws, minlength=len(probs)).double() / len(draws)
    assert counts[probs == 0].sum() == 0
    assert ((counts - probs).abs() <= 4 * (probs * (1 - probs) / len(draws)).sqrt() + 1e-12).all(), counts
    again = torch.Generator().manual_seed(0)
    assert [draw(probs, again) for _ in range(50)] == draws[:50].tolist()
    with pytest.raises(ValueError, match="sums to nan"):
        draw(torch.full((4,), float("nan")), generator)


@pytest.mark.parametrize("vocab", [49152, 151936, 32000, 50257, 256])
def test_greedy_tokens_equal_torch_argmax(vocab):
    """The chunked argmax against torch.argmax: random rows, ties between chunks and within one (the
    first index wins), a maximum in the last chunk, and NaN (counted as the maximum), for
    vocabularies that split into 256- and 128-wide chunks, one that does not split (50257), and one
    that is a single chunk."""
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[1, [5, vocab - 3]] = 100.0  # tie across chunks
    logits[2, [vocab - 2, vocab - 1]] = 100.0  # tie within the last chunk
    logits[3, vocab - 1] = 100.0
    logits[4, [7, vocab // 2]] = float("nan")
    logits[5] = 0.0  # all equal: index 0
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert greedy_tokens(logits)[[1, 2, 3, 4, 5]].tolist() == [5, vocab - 2, vocab - 1, 7, 0]


def test_sampling_controls(tiny_llama_dir, prompts, reference, hf):
    llm = LLM(engine_config(tiny_llama_dir))
    ids = prompts[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    a, b = llm.generate([ids, ids], seeded)
    assert a.token_ids == b.token_ids  # a seed fixes the draw, whatever else is in the batch
    other = llm.generate([ids], SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert other.token_ids != a.token_ids
    top1 = llm.generate([ids], SamplingParams(max_tokens=24, temperature=5.0, top_k=1))[0]
    assert top1.token_ids == reference[0]  # top_k=1 is greedy at any temperature
    tiny_p = llm.generate([ids], SamplingParams(max_tokens=24, temperature=5.0, top_p=1e-6))[0]
    assert tiny_p.token_ids == reference[0]
    stop_id = reference[0][3]
    stopped = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id]))[0]
    assert stopped.token_ids == reference[0][:reference[0].index(stop_id) + 1] and stopped.finish_reason == "stop"
    full = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    marker = full.text[len(full.text) // 2:][:3]
    cut = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[marker]))[0]
    assert cut.text == full.text[:full.text.index(marker)] and cut.finish_reason == "stop"
    penalised = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0, repetition_penalty=3.0,
                                                   ignore_eos=True))[0]
    assert len(set(penalised.token_ids)) > len(set(full.token_ids))  # repeats are pushed down


def sentencepiece_style_tokenizer(texts: list[str]):
    """A Llama-2-style tokenizer built here: Metaspace pieces, byte fallback for characters outside
    its vocabulary, and a decoder that strips the first leading space, so a token's text depends
    on whether it starts the decoded span."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    trained = json.loads(tok.to_str())["model"]
    vocab = trained["vocab"] | {f"<0x{b:02X}>": len(trained["vocab"]) + b for b in range(256)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level BPE", "SentencePiece-style"])
def test_incremental_detokenization_equals_decoding_the_whole_completion(tiny_llama_dir, kind):
    """The engine extends a completion's text token by token (detokenizer.py) instead of decoding
    it all again each step; the text must be what one full decode gives, with partial characters
    held back until they complete."""
    texts = ["def add(a, b):\n    return a + b  # sum", "  two  spaces, then: 你好, 世界! \u00e9t\u00e9 \U0001F600 ok",
             "tabs\tand\nnew lines \u2581 and \u00a0 odd spaces"]
    tokenizer = (AutoTokenizer.from_pretrained(tiny_llama_dir) if kind == "byte-level BPE"
                 else sentencepiece_style_tokenizer(texts[:1] * 20))
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 10
        with_special = ids[:3] + [special] + ids[3:]
        for sequence, skip in ((ids, True), (with_special, True), (with_special, False)):
            detokenizer, streamed = IncrementalDetokenizer(tokenizer, skip), ""
            expected = tokenizer.decode(sequence, skip_special_tokens=skip)
            for n in range(1, len(sequence) + 1):
                streamed += detokenizer.step(sequence[:n])
                assert expected.startswith(streamed) and not streamed.endswith("\ufffd")
            assert streamed + detokenizer.step(sequence, final=True) == expected
    cut = tokenizer("ok \U0001F600", add_special_tokens=False)["input_ids"][:-1]  # ends inside the emoji's bytes
    detokenizer = IncrementalDetokenizer(tokenizer, True)
    held = "".join(detokenizer.step(cut[:n]) for n in range(1, len(cut) + 1))
    assert held + detokenizer.step(cut, final=True) == tokenizer.decode(cut) and tokenizer.decode(cut).endswith("\ufffd")


def test_logprobs_are_the_models_log_softmax(tiny_llama_dir, prompts, hf):
    llm = LLM(engine_config(tiny_llama_dir))
    ids = prompts[1]
    out = llm.generate([ids], SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True))[0]
    with torch.no_grad():
        logits = hf(torch.tensor([ids + out.token_ids])).logits[0, len(ids) - 1:-1]
    expected = logits.log_softmax(-1)
    for step, info in enumerate(out.logprobs):
        assert info["token"] == out.token_ids[step]
        assert info["logprob"] == pytest.approx(float(expected[step, info["token"]]), abs=1e-4)
        top = expected[step].topk(2)
        assert [t for t, _ in info["top"]] == top.indices.tolist()


def test_prompt_logprobs_score_every_prompt_token_even_across_chunks_and_cache(tiny_llama_dir, prompts, hf):
    # a token budget of 16 splits the prompt into chunks; the prompt is cached by an earlier request
    engine = LLMEngine(engine_config(tiny_llama_dir, block_size=4, max_num_batched_tokens=16), verbose=False)
    ids = prompts[2]
    generate(engine, [ids], SamplingParams(max_tokens=1, temperature=0))
    out = generate(engine, [ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for position, info in enumerate(out.prompt_logprobs[1:], start=1):
        assert info["token"] == ids[position]
        assert info["logprob"] == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)
        assert [t for t, _ in info["top"]] == expected[position - 1].topk(2).indices.tolist()


def test_block_manager_shares_prefix_blocks_and_frees_them():
    blocks = BlockManager(8, 4)
    a = Sequence(list(range(10)), GREEDY)
    blocks.allocate(a)
    assert len(a.block_table) == 3 and a.num_cached_tokens == 0
    a.num_computed_tokens = 10
    blocks.publish_computed(a)  # two full blocks enter the prefix cache
    b = Sequence(list(range(9)) + [99], GREEDY)
    blocks.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert blocks.blocks[a.block_table[0]].ref_count == 2
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_free == 8
    c = Sequence(list(range(8)), GREEDY)  # still found after both owners left
    blocks.allocate(c)
    assert c.num_cached_tokens == 8 and c.num_computed_tokens == 7  # the last token is recomputed


def internlm3(**kw):
    from internray.models.presets import model_config

    return model_config("tiny", vocab_size=512, max_position_embeddings=1024, **kw)


def qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True)


@pytest.mark.parametrize("make_config", [
    lambda: internlm3(),
    lambda: internlm3(qkv_bias=True, bias=True),
    qwen2,
], ids=["internlm3", "internlm3-bias", "qwen2-tied"])
def test_other_llama_family_checkpoints_match_hf(tmp_path, tiny_llama_dir, prompts, make_config):
    import shutil

    from transformers import AutoModelForCausalLM as Auto

    torch.manual_seed(1)
    config = make_config()
    model = Auto.from_config(config).eval()
    for p in model.parameters():  # non-zero biases, so that a bias mapped wrong shows
        if p.dim() == 1:
            p.data.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, tmp_path / name)
    llm = LLM(engine_config(tmp_path, block_size=4, max_num_batched_tokens=16), verbose=False)
    for ids in prompts[:3]:
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert llm.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].token_ids == expected


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 80},
    {"rope_type": "dynamic", "factor": 2.0},
], ids=lambda rope: rope["rope_type"])
def test_scaled_rope_matches_hf_up_to_the_scaled_limit_and_refuses_beyond_it(tiny_llama_dir, tmp_path, rope):
    """Long context as the checkpoint declares it: RoPE scaling comes from the config (positions
    past the original 80 are where the variants differ), and a prompt over the scaled limit (160:
    max_position_embeddings, or 80 x factor for dynamic NTK) is refused by name rather than run
    with positions never trained. HF runs 160 tokens at once, where dynamic NTK takes exactly the
    base the engine keeps for every sequence (model/llama.py, `rotary_embedding`); its first 158
    scores are those of the engine's 159-token prompt."""
    import json
    import shutil

    model_dir = Path(shutil.copytree(tiny_llama_dir, tmp_path / "scaled"))
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"max_position_embeddings": 80 if rope["rope_type"] == "dynamic" else 160,
               "rope_parameters": {"rope_theta": 10000.0, **rope}}
    (model_dir / "config.json").write_text(json.dumps(config))
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPTS[2] * 6)["input_ids"][:160]

    def hf_logprobs(directory) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0, :-2].log_softmax(-1)
        return logprobs.gather(1, torch.tensor(ids[1:-1])[:, None])[:, 0]

    engine = LLMEngine(engine_config(model_dir), verbose=False)
    assert engine.max_model_len == 160
    out = generate(engine, [ids[:-1]], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    got = torch.tensor([p["logprob"] for p in out.prompt_logprobs[1:]])
    error = (got - hf_logprobs(model_dir)).abs().max()
    unscaled = (got - hf_logprobs(tiny_llama_dir)).abs().max()
    assert error < 1e-4 and unscaled > 10 * error  # the scaling changed the outputs, and as HF does
    with pytest.raises(InvalidRequest, match="160 tokens"):
        engine.add_request("too-long", ids + ids[:30], GREEDY)
    with pytest.raises(ValueError, match="max_model_len=161 exceeds this checkpoint's context of 160 tokens"):
        LLMEngine(engine_config(model_dir, max_model_len=161), verbose=False)
