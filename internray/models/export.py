"""Writing the one checkpoint format every stage reads: a plain Hugging Face directory.

Train writes it, serve and eval load it, importers convert into it. Plain means transformers
loads it with no remote code: config.json, model.safetensors, the tokenizer files and a chat
template, so the serve stage can format conversations for any checkpoint it is given.
"""
from __future__ import annotations

import copy
from pathlib import Path

# InternLM2/3's conversation format. InternLM2's released template also puts `bos_token` first;
# this one leaves that to the tokenizer so packed training data and chat prompts agree.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_hf(model, tokenizer, out_dir: str | Path, chat_template: str | None = None) -> Path:
    """Save `model` and `tokenizer` to `out_dir`, which from_pretrained then loads as is.

    The chat template is `chat_template` if given, else the tokenizer's own, else
    DEFAULT_CHAT_TEMPLATE. The caller's tokenizer is left unchanged. transformers 5 always writes
    safetensors, so no pickle ever reaches a checkpoint.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out
