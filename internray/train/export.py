"""Turn a DeepSpeed checkpoint (any ZeRO stage) into a plain Hugging Face directory.

ZeRO shards parameters and optimizer state across ranks; DeepSpeed's own `zero_to_fp32`
reassembles the full fp32 weights from the shards, so the export works the same for stage 0 to
3 and needs no GPU and no running job: only the checkpoint files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from internray.train.loop import CHECKPOINT_TAG


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    checkpoint_dir = Path(checkpoint_dir)
    shards = list((checkpoint_dir / CHECKPOINT_TAG).glob("*optim_states.pt"))
    if shards:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CHECKPOINT_TAG)
    # ZeRO stage 0: rank 0's model states hold the whole module
    states = torch.load(checkpoint_dir / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_hf(checkpoint_dir: str | Path, model: torch.nn.Module, tokenizer, out: Path,
              adapter_only: bool = False, unwrap=None) -> Path:
    """Load the consolidated weights into `model` (a freshly built skeleton) and save it as HF.

    A LoRA model is saved twice: its adapter (`out/adapter`, for PEFT users) and merged into the
    base (`out`, a plain checkpoint for serving). `adapter_only` loads just the adapter weights,
    for QLoRA, whose 4-bit base in the checkpoint is replaced by the skeleton's full-precision one.
    `unwrap` picks the HF model out of a training wrapper (PPO's value head) before saving.
    """
    from internray.models.export import save_hf

    state = consolidated_state_dict(checkpoint_dir)
    if adapter_only:
        state = {k: v for k, v in state.items() if "lora_" in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied weight (lm_head = embeddings) is stored once, under one of its names
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = set(missing) - tied
    if adapter_only:
        missing = {k for k in missing if "lora_" in k}
    if unexpected or missing:
        raise RuntimeError(f"checkpoint does not match the model: missing {sorted(missing)}, unexpected {unexpected}")
    if unwrap is not None:
        model = unwrap(model)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    save_hf(model, tokenizer, out)
    return out

