"""`internray plan`: the cheapest ZeRO / offload / batch layout that fits a model on N GPUs.

"Will 7B fit on my 8 GPUs, and how?" is answered here, on a laptop, in milliseconds, instead
of by an out-of-memory error an hour into a cluster job. `plan` estimates per-GPU memory for
every DeepSpeed layout (ZeRO stage 0-3, optimizer and parameter offload, activation
checkpointing on or off), picks the cheapest layout that fits, and returns the Ray
`ScalingConfig` and DeepSpeed config a training job would be submitted with.

Memory is counted in GiB (2**30 bytes), as DeepSpeed's estimators count it; an A100's "80 GB"
is 80 GiB. Per GPU it is

- model states: DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
  `estimate_zero3_model_states_mem_needs`) for stages 2 and 3; stages 0 and 1, for which
  DeepSpeed has none, use the same bytes per parameter with their own sharding (`model_states`);
- activations: Korthikanti et al. 2022 (`activation_bytes`);
- a reserve the estimators do not see: 10% of the GPU plus 1.5 GiB for the CUDA context, NCCL
  and DeepSpeed's communication buckets, and allocator fragmentation.
"""
from __future__ import annotations

import dataclasses
import json
import math

from transformers import PretrainedConfig

from internray.models.presets import model_config, parameter_count

GIB = 2**30
RESERVE_FRACTION, RESERVE_GIB = 0.10, 1.5
NF4_BYTES = (4 + 0.127) / 8
"""QLoRA's NormalFloat4 weights with double-quantized block constants: 4.127 bits per
parameter (Dettmers et al. 2023, section 3)."""

# (zero_stage, offload_optimizer, offload_params): every layout ScalingSection accepts.
LAYOUTS = [(0, False, False), (1, False, False), (2, False, False), (3, False, False),
           (1, True, False), (2, True, False), (3, True, False), (3, True, True)]


@dataclasses.dataclass(frozen=True)
class Shape:
    """What memory depends on: the model's size, what is trained, and how the rest is stored."""
    name: str
    params: int
    trainable: int
    frozen_bytes: float  # base weights that are not trained (LoRA: bf16; QLoRA: NF4 + bf16)
    largest_layer: int  # ZeRO-3 gathers one whole layer at a time
    hidden: int
    layers: int
    vocab: int
    lora_rank: int  # 0 for full training


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout at one micro-batch, with its per-GPU bytes and host RAM per node."""
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    micro_batch: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    model_states: float  # DeepSpeed's estimate where it has one, else weights + grads + optimizer
    cpu: float
    fits: bool = False

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    @property
    def name(self) -> str:
        ckpt = ", ckpt" if self.activation_checkpointing else ""
        return layout_name(self.zero_stage, self.offload_optimizer, self.offload_params) + ckpt

    def cost(self) -> tuple:
        """Cheapest first: offload (CPU Adam, PCIe traffic) costs most; then ZeRO-3 (1.5x the
        communication of data parallelism); then recomputing activations (~1/3 more compute).
        Stages 0-2 communicate the same volume (ZeRO paper, section 7), so lower merely wins ties."""
        return (self.offload_optimizer + self.offload_params, self.zero_stage == 3,
                self.activation_checkpointing, self.zero_stage)


@dataclasses.dataclass
class Plan:
    """The chosen layout (or, when nothing fits, the one needing least memory) and why."""
    shape: Shape
    method: str
    gpus: int
    gpus_per_node: int
    gpu_memory_gb: float
    seq_len: int
    global_batch_tokens: int
    fits: bool
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    micro_batch: int
    grad_accum: int
    memory_gb: dict[str, float]  # weights, grads, optimizer, activations, total, cpu_per_node
    required_gpu_memory_gb: float  # the smallest GPU this model, method and seq_len fit on here
    candidates: list[Candidate]
    host_note: str = ""  # when host RAM is what rules offload out

    def train_config(self):
        """The TrainConfig sections this plan sets; the rest (data, optimizer...) are the defaults.
        Built without validating `data`, which a plan has no paths for."""
        from internray.train.config import ScalingSection, TrainConfig, TrainingSection

        if not self.fits:
            raise ValueError(f"no config: {self.verdict()}")
        return TrainConfig.model_construct(
            training=TrainingSection(micro_batch_size=self.micro_batch, grad_accum_steps=self.grad_accum,
                                     activation_checkpointing=self.activation_checkpointing),
            scaling=ScalingSection(num_workers=self.gpus, use_gpu=True, zero_stage=self.zero_stage,
                                   offload_optimizer=self.offload_optimizer, offload_params=self.offload_params))

    def scaling_config(self) -> dict:
        """Exactly the `ray.train.ScalingConfig` kwargs `internray.train.pretrain` would submit."""
        from internray.train.engine import scaling_kwargs

        return scaling_kwargs(self.train_config())

    def deepspeed_config(self) -> dict:
        """Exactly what `internray.train.engine.deepspeed_config` hands DeepSpeed for this plan."""
        from internray.train.engine import deepspeed_config

        return deepspeed_config(self.train_config())

    def overrides(self) -> list[str]:
        """These settings as `key=value` overrides: for `internray pretrain CONFIG` (full), or for
        `internray finetune CONFIG` with a `finetune` section (LoRA, QLoRA)."""
        config = self.train_config()
        keys = [("scaling", key) for key in ("num_workers", "use_gpu", "zero_stage", "offload_optimizer",
                                            "offload_params")]
        keys += [("training", key) for key in ("micro_batch_size", "grad_accum_steps", "activation_checkpointing")]
        settings = [f"{section}.{key}={json.dumps(getattr(getattr(config, section), key))}" for section, key in keys]
        if self.method != "full":
            settings += [f"finetune.method={self.method}", f"finetune.lora.r={self.shape.lora_rank}",
                         f"finetune.max_len={self.seq_len}"]
        return settings

    def verdict(self) -> str:
        if self.fits:
            tokens = self.micro_batch * self.grad_accum * self.gpus * self.seq_len
            return (f"fits: {layout_name(self.zero_stage, self.offload_optimizer, self.offload_params)}, "
                    f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}, "
                    f"micro-batch {self.micro_batch} x grad accum {self.grad_accum} x {self.gpus} GPUs x "
                    f"{self.seq_len} = {tokens:,} tokens per step; "
                    f"{self.memory_gb['total']:.1f} of {usable_gib(self.gpu_memory_gb):.1f} usable GiB per GPU")
        return (f"does not fit: {self.shape.name} ({self.method}) at seq_len {self.seq_len} needs at least "
                f"{self.required_gpu_memory_gb:.1f} GB per GPU (have {self.gpu_memory_gb:g}), even with "
                f"{layout_name(self.zero_stage, self.offload_optimizer, self.offload_params)}, "
                f"activation checkpointing and micro-batch 1" + self.host_note)

    def render(self) -> str:
        """A report for a person: inputs, every layout's memory, the choice, the configs."""
        s = self.shape
        lines = [f"model      {s.name}: {s.params / 1e9:.2f}B parameters, {self.method} "
                 f"({s.trainable / 1e9:.3f}B trainable)",
                 f"cluster    {self.gpus} GPUs x {self.gpu_memory_gb:g} GiB ({self.gpus_per_node} per node); "
                 f"{usable_gib(self.gpu_memory_gb):.1f} GiB usable after a {RESERVE_FRACTION:.0%} + {RESERVE_GIB} GiB reserve",
                 f"batch      seq_len {self.seq_len}, target {self.global_batch_tokens:,} tokens per step", "",
                 f"{'per GPU, GiB, at micro-batch 1':<44}weights  grads  optim  activ  total  host/node  fits"]
        for c in self.candidates:
            cells = [c.weights, c.grads, c.optimizer, c.activations, c.total]
            lines.append(f"  {c.name:<42}" + "".join(f"{v / GIB:7.1f}" for v in cells)
                         + f"{c.cpu / GIB:11.1f}  {'yes' if c.fits else 'no'}")
        lines += ["", self.verdict()]
        if self.fits:
            m = self.memory_gb
            lines += [f"  at micro-batch {self.micro_batch}: " + ", ".join(
                          f"{key} {m[key]:.1f}" for key in ("weights", "grads", "optimizer", "activations", "total"))
                      + f" GiB per GPU; host RAM {m['cpu_per_node']:.1f} GiB per node", "",
                      f"ray.train.ScalingConfig(**{json.dumps(self.scaling_config())})", "",
                      "DeepSpeed config:", json.dumps(self.deepspeed_config(), indent=2), "",
                      f"as overrides:  internray {'pretrain' if self.method == 'full' else 'finetune'} CONFIG "
                      + " ".join(self.overrides())]
        return "\n".join(lines)


def plan(preset_or_config: str | PretrainedConfig, gpus: int, gpu_memory_gb: float, seq_len: int,
         global_batch_tokens: int = 4 * 2**20, gpus_per_node: int = 8, method: str = "full",
         lora_rank: int = 64, vocab_size: int = 92_544, cpu_memory_gb: float | None = None) -> Plan:
    """Choose ZeRO stage, offload, activation checkpointing, micro-batch and accumulation.

    Preference: no offload, then no ZeRO-3, then no checkpointing (see `Candidate.cost`); then
    the largest power-of-2 micro-batch that fits without overshooting the global batch; then
    accumulation to reach `global_batch_tokens`. Presets get `vocab_size` (InternLM2's by
    default). `cpu_memory_gb` (host RAM per node), when given, must also hold what is offloaded.
    """
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown method {method!r}; valid: full, lora, qlora")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs do not fill whole nodes of {gpus_per_node}: use a multiple of {gpus_per_node}, "
                         "or set gpus_per_node")
    shape = model_shape(preset_or_config, method, lora_rank, vocab_size)
    per_node, nodes = min(gpus, gpus_per_node), max(1, gpus // gpus_per_node)
    gpu_limit = usable_gib(gpu_memory_gb) * GIB
    host_limit = math.inf if cpu_memory_gb is None else cpu_memory_gb * GIB

    def estimate(stage, off_opt, off_par, ckpt, micro_batch):
        weights, grads, optimizer, states, cpu = model_states(shape, stage, off_opt, off_par, per_node, nodes)
        c = Candidate(stage, off_opt, off_par, ckpt, micro_batch, weights, grads, optimizer,
                      activation_bytes(shape, seq_len, micro_batch, ckpt), states, cpu)
        return dataclasses.replace(c, fits=c.total <= gpu_limit and cpu <= host_limit)

    # ZeRO-3 would have to partition bitsandbytes' packed 4-bit tensors: not offered for QLoRA.
    candidates = sorted((estimate(stage, off_opt, off_par, ckpt, 1) for stage, off_opt, off_par in LAYOUTS
                         for ckpt in (False, True) if not (method == "qlora" and stage == 3)),
                        key=Candidate.cost)
    smallest = min((c for c in candidates if c.cpu <= host_limit), key=lambda c: c.total)
    too_big_for_host = [c.cpu for c in candidates if c.cpu > host_limit]
    host_note = f"; offloading would need {min(too_big_for_host) / GIB:.0f} GiB of host RAM per node " \
        f"(have {cpu_memory_gb:g})" if too_big_for_host else ""
    chosen = next((c for c in candidates if c.fits), smallest)
    if chosen.fits:
        cap = max(1, global_batch_tokens // (seq_len * gpus))
        while chosen.micro_batch * 2 <= cap:
            bigger = estimate(chosen.zero_stage, chosen.offload_optimizer, chosen.offload_params,
                              chosen.activation_checkpointing, chosen.micro_batch * 2)
            if not bigger.fits:
                break
            chosen = bigger
    grad_accum = max(1, math.ceil(global_batch_tokens / (seq_len * chosen.micro_batch * gpus)))
    memory = {key: getattr(chosen, key) / GIB for key in ("weights", "grads", "optimizer", "activations", "total")}
    return Plan(shape, method, gpus, per_node, gpu_memory_gb, seq_len, global_batch_tokens, chosen.fits,
                chosen.zero_stage, chosen.offload_optimizer, chosen.offload_params,
                chosen.activation_checkpointing, chosen.micro_batch, grad_accum,
                memory | {"cpu_per_node": chosen.cpu / GIB},
                (smallest.total / GIB + RESERVE_GIB) / (1 - RESERVE_FRACTION), candidates, host_note)


def model_states(shape: Shape, stage: int, offload_optimizer: bool, offload_params: bool,
                 gpus_per_node: int, nodes: int) -> tuple[float, float, float, float, float]:
    """Per-GPU (weights, grads, optimizer, model-states total) bytes and host RAM per node.

    Each trainable parameter costs DeepSpeed's bf16 mixed precision 20 bytes: bf16 weight (2)
    and gradient (2), fp32 gradient (4), fp32 master weight (4), Adam moments (8) -- the
    "2 + 18" of DeepSpeed's stage-2 estimator. Stage 1 shards the fp32 parts, stage 2 also the
    bf16 gradients, stage 3 also the bf16 weights, plus one gathered layer (4 bytes a parameter).
    DeepSpeed's stage-3 estimator counts 18 bytes, not 20 (stage 3 makes the fp32 gradient copy
    one sub-group at a time); the split here follows it with 4 bytes of gradients. The total is
    DeepSpeed's own number for stages 2 and 3; frozen LoRA/QLoRA base weights, which its
    estimators do not model, are added on top (sharded by stage 3 only).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n, t = gpus_per_node * nodes, shape.trainable
    weights = 2 * t if stage < 3 else 4 * shape.largest_layer + (0 if offload_params else 2 * t / n)
    if offload_optimizer:  # fp32 gradients, master weights and Adam live on the host
        grads, optimizer = (2 * t if stage == 1 else 0), 0
    else:
        grads = {0: 6 * t, 1: 2 * t + 4 * t / n, 2: 6 * t / n, 3: 4 * t / n}[stage]
        optimizer = 12 * t / (n if stage else 1)
    if stage == 3:
        cpu, states, _ = estimate_zero3_model_states_mem_needs(
            t, shape.largest_layer, gpus_per_node, nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params)
    else:  # DeepSpeed's stage_1_and_2 estimator: its GPU number is stage 2's, its host number both's
        cpu, stage2 = estimate_zero2_model_states_mem_needs(t, gpus_per_node, nodes, cpu_offload=offload_optimizer)
        states = stage2 if stage == 2 else weights + grads + optimizer
    cpu = cpu if offload_optimizer else 0  # without offload nothing stays on the host once loaded
    frozen = 0 if offload_params else shape.frozen_bytes / (n if stage == 3 else 1)
    cpu += shape.frozen_bytes / nodes if offload_params else 0
    return weights + frozen, grads, optimizer, states + frozen, cpu


def activation_bytes(shape: Shape, seq_len: int, micro_batch: int, checkpointing: bool) -> float:
    """Activation memory per GPU for one micro-batch, forward plus backward peak.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    section 4.1: a transformer layer keeps s*b*h*(34 + 5*a*s/h) bytes of 16-bit activations. Flash /
    SDPA attention (what transformers uses on GPU) never stores the a*s*s scores, so the 5as/h
    term goes: 34*s*b*h. The 34 is counted for a GPT block; a SwiGLU block without dropout
    comes within ~10%. With full activation checkpointing a layer keeps only its input,
    2*s*b*h, and one layer at a time recomputes its 34*s*b*h in backward. The output layer adds
    bf16 logits and their fp32 copy for the loss: 6*s*b*V.
    """
    per_layer = 34 * seq_len * micro_batch * shape.hidden
    kept = 2 * seq_len * micro_batch * shape.hidden * shape.layers + per_layer if checkpointing \
        else per_layer * shape.layers
    return kept + 6 * seq_len * micro_batch * shape.vocab


def model_shape(preset_or_config: str | PretrainedConfig, method: str, lora_rank: int, vocab_size: int) -> Shape:
    """Counts from the config alone (no model is built): total, trainable, frozen bytes."""
    config = model_config(preset_or_config, vocab_size) if isinstance(preset_or_config, str) else preset_or_config
    name = preset_or_config if isinstance(preset_or_config, str) else \
        getattr(config, "name_or_path", "") or config.model_type
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    params = parameter_count(config)
    linear = layers * (2 * h * q + 2 * h * kv + 3 * h * i)  # the matrices LoRA adapts, QLoRA quantizes
    trainable = params if method == "full" else \
        layers * lora_rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    frozen = 0 if method == "full" else \
        2 * params if method == "lora" else NF4_BYTES * linear + 2 * (params - linear)
    return Shape(name, params, trainable, frozen, max(config.vocab_size * h, h * i, h * q),
                 h, layers, config.vocab_size, 0 if method == "full" else lora_rank)


def usable_gib(gpu_memory_gb: float) -> float:
    return gpu_memory_gb * (1 - RESERVE_FRACTION) - RESERVE_GIB


def layout_name(stage: int, offload_optimizer: bool, offload_params: bool) -> str:
    offload = "params + optimizer" if offload_params else "optimizer" if offload_optimizer else ""
    return f"ZeRO-{stage}" + (f" + offload {offload}" if offload else "")
