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


def export_hf(checkpoint_dir: str | Path, model: torch.nn.Module, tokenizer, out: Path) -> Path:
    """Load the consolidated weights into `model` (a freshly built skeleton) and save it as HF."""
    from internray.models.export import save_hf

    missing, unexpected = model.load_state_dict(consolidated_state_dict(checkpoint_dir), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    save_hf(model, tokenizer, out)
    return out
