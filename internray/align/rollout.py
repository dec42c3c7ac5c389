"""Rollouts for online RL: the policy's completions, sampled by internray's engine in Ray actors.

Generation is most of an RL step, so it runs on an inference engine (paged KV cache, continuous
batching, prefix caching: a prompt's group of samples shares its prompt blocks) in actors of
their own placement group, not in the trainer. After each optimizer step rank 0 puts the
policy's weights in the object store and publishes a new version on a `WeightBroker`; every
`generate` call names the version it needs, and an actor that is behind pulls it first. So a
rollout actor that died and was restarted (`max_restarts=-1`, `max_task_retries=-1`: a lost
call is re-sent, sampling is safe to repeat) catches up by itself, and weights never go
through files.
"""
from __future__ import annotations

import asyncio
import os
import uuid

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from internray.align.config import RLSection

PLACEMENT_TIMEOUT_S = 120


@ray.remote(num_cpus=0)
class WeightBroker:
    """The latest policy weights: a version id and a boxed object ref (boxed, so that Ray passes
    the reference around instead of the tensors)."""

    def __init__(self):
        self.version, self.boxed = None, None

    def publish(self, version: str, boxed: list) -> None:
        self.version, self.boxed = version, boxed

    def latest(self) -> tuple[str | None, list | None]:
        return self.version, self.boxed


@ray.remote(max_restarts=-1, max_task_retries=-1)
class RolloutWorker:
    """One inference engine (or, as the baseline, a transformers model) holding the policy.

    An asyncio actor: with the engine, concurrent `generate` calls (one per training worker) join
    one continuous batch on the engine's thread instead of queueing behind each other. The
    `generate` baseline runs one call at a time, as transformers batches only what it is given.
    """

    def __init__(self, model_dir: str, rl: RLSection, broker, threads: int):
        from transformers import AutoTokenizer

        torch.set_num_threads(threads)
        self.backend, self.broker, self.version = rl.rollout_backend, broker, None
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.lock = asyncio.Lock()
        if self.backend == "engine":
            from internray.serve.config import EngineConfig
            from internray.serve.engine.async_engine import AsyncLLMEngine

            self.engine = AsyncLLMEngine(EngineConfig(model=model_dir, kv_cache_gib=rl.kv_cache_gib, dtype=rl.rollout_dtype,
                                                      threads_per_rank=threads), verbose=False)
        else:
            from transformers import AutoModelForCausalLM

            from internray.serve.model.loader import resolve_dtype

            dtype = resolve_dtype(rl.rollout_dtype, torch.device("cpu"))  # "auto" as the engine reads it
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    async def pid(self) -> int:
        return os.getpid()

    async def sync(self, version: str) -> None:
        """Make sure this actor holds weights `version` (pulling them from the broker if behind).
        The engine swaps them between batches; by the trainer's protocol none is running then."""
        async with self.lock:
            if version == self.version:
                return
            latest, boxed = await self.broker.latest.remote()
            if latest != version:
                raise RuntimeError(f"rollout asked for weights {version}, but the broker has {latest}")
            weights = await boxed[0]
            if self.backend == "engine":
                await self.engine.call_when_idle(lambda engine: engine.update_weights(weights))
            else:
                self.model.load_state_dict(weights, strict=False)
            self.version = version

    async def generate(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float, top_p: float,
                       version: str, seed: int) -> list[dict]:
        """`n` sampled completions per prompt, prompt-major: token ids (end-of-sequence token
        included when generated) and text. Completion i samples with seed `seed + i`, so a run
        (and a call re-sent after a restart) draws the same samples from the same weights."""
        await self.sync(version)
        if self.backend == "engine":
            from internray.serve.engine.sampling_params import SamplingParams

            requests = [(p, SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + i))
                        for i, p in enumerate(p for p in prompts for _ in range(n))]
            outputs = await asyncio.gather(*(self._finish(prompt, params) for prompt, params in requests))
            return [{"token_ids": o.token_ids, "text": o.text} for o in outputs]
        torch.manual_seed(seed)  # one batch, one generator: transformers has no per-sequence seeds
        return self._hf_generate(prompts, n, max_tokens, temperature, top_p)

    async def _finish(self, prompt: list[int], params):
        async for out in self.engine.generate(uuid.uuid4().hex, prompt, params):
            last = out
        return last

    async def logprobs(self, token_ids: list[int], version: str) -> list[float]:
        """log p(token_i | tokens before it) for i >= 1, as this actor's weights see them."""
        await self.sync(version)
        if self.backend == "engine":
            from internray.serve.engine.sampling_params import SamplingParams

            out = await self._finish(token_ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
            return [entry["logprob"] for entry in out.prompt_logprobs[1:]]
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([token_ids])).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0].tolist()

    @torch.no_grad()
    def _hf_generate(self, prompts, n, max_tokens, temperature, top_p) -> list[dict]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                  top_p=top_p, max_new_tokens=max_tokens, num_return_sequences=n, pad_token_id=pad)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        completions = []
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            tokens = row[:end]
            text_tokens = tokens[:-1] if tokens and tokens[-1] in eos else tokens
            completions.append({"token_ids": tokens, "text": self.tokenizer.decode(text_tokens, skip_special_tokens=True)})
        return completions


@ray.remote(max_restarts=-1, max_task_retries=-1)
class RewardModelWorker:
    """A trained reward model (sequence classification head) scoring prompt + completion."""

    def __init__(self, model_dir: str, threads: int):
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(threads)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.pad = self.model.config.pad_token_id or 0

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[float]:
        width = max(map(len, sequences))
        ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in sequences])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()


class RolloutPool:
    """The rollout actors (and the reward model's, if any) in one placement group, and the weight
    broker. Picklable: the training workers receive it and call their actor directly."""

    def __init__(self, run_id: str, model_dir: str, rl: RLSection):
        bundle = {"CPU": rl.rollout_cpus} | ({"GPU": rl.rollout_gpus} if rl.rollout_gpus else {})
        count = rl.rollout_workers + (rl.reward_model is not None)
        self.placement = placement_group([bundle] * count, strategy="PACK", name=f"{run_id}-rollout")
        ready, _ = ray.wait([self.placement.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.placement)
            raise RuntimeError(f"the cluster cannot place {count} rollout bundle(s) of {bundle} next to the "
                               f"training workers within {PLACEMENT_TIMEOUT_S} s: lower rl.rollout_workers / "
                               "rl.rollout_cpus or scaling.cpus_per_worker")
        threads = rl.rollout_threads or max(1, int(rl.rollout_cpus))
        self.broker = WeightBroker.remote()
        names = [f"{run_id}-rollout-{i}" for i in range(rl.rollout_workers)]  # findable: ray.get_actor(name)
        self.workers = [RolloutWorker.options(name=name, num_cpus=rl.rollout_cpus, num_gpus=rl.rollout_gpus,
                                              scheduling_strategy=self._bundle(i)).remote(model_dir, rl, self.broker, threads)
                        for i, name in enumerate(names)]
        self.scorer = None
        if rl.reward_model is not None:
            self.scorer = RewardModelWorker.options(num_cpus=rl.rollout_cpus, num_gpus=rl.rollout_gpus,
                                                    scheduling_strategy=self._bundle(rl.rollout_workers)
                                                    ).remote(str(rl.reward_model), threads)
        ray.get([w.pid.remote() for w in self.workers])  # started: model loaded, engine sized
        self._current = None

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=index)

    def worker(self, rank: int):
        return self.workers[rank % len(self.workers)]

    def publish(self, weights: dict[str, torch.Tensor]) -> str:
        """Put `weights` in the object store as a new version (the caller keeps the reference alive)."""
        version = uuid.uuid4().hex
        self._current = ray.put(weights)
        ray.get(self.broker.publish.remote(version, [self._current]))
        return version

    def shutdown(self) -> None:
        for actor in [*self.workers, self.broker] + ([self.scorer] if self.scorer is not None else []):
            ray.kill(actor)
        remove_placement_group(self.placement)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_current"} | {"_current": None}
