"""`internray finetune CONFIG`: SFT (full, LoRA, QLoRA) or incremental pretraining of a checkpoint.

The conversations are tokenized once on the driver into the run directory (with their loss
masks), then trained by the same Ray Train + DeepSpeed loop as pretraining. Records that are
not conversations in the configured format are written to `sft_rejects.jsonl` with the reason.
"""
from __future__ import annotations

from internray.runs import Run
from internray.train.config import TrainConfig
from internray.train.objective import LanguageModeling
from internray.train.pretrain import fit, load_tokenizer, open_stage_run
from internray.train.sft import prepare_sft


def run_finetune(config: TrainConfig) -> Run:
    if config.finetune is None:
        raise ValueError("internray finetune needs a `finetune` section (data, format, method)")
    run = open_stage_run("finetune", config)
    run.add_input(config.finetune.data, role="sft_data")
    tokenizer = load_tokenizer(config)
    if tokenizer.chat_template is None:
        from internray.models.export import DEFAULT_CHAT_TEMPLATE

        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # InternLM2/3's <|im_start|> format
    train = run.path("sft", "train.parquet")
    counts = prepare_sft(config.finetune.data, tokenizer, config.finetune.format, config.finetune.max_len,
                         train, run.path("sft_rejects.jsonl"))
    run.update(counts=counts)
    config.data.train = train.parent
    return fit(LanguageModeling(config), run, tokenizer)
