"""`internray chat MODEL_DIR`: talk to a checkpoint in the terminal, to check it at a glance.

It loads the HF directory any stage exports, formats the conversation with the checkpoint's
own chat template, and streams the reply token by token. It is a smoke test, not a server:
serving is the serve stage's job.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TextIO


def chat(model_dir: str | Path, max_new_tokens: int = 256, temperature: float = 0.7,
         stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face checkpoint directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.chat_template is None:
        from internray.models.export import DEFAULT_CHAT_TEMPLATE

        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    messages: list[dict] = []
    stdout.write(f"chatting with {model_dir} (empty line or EOF to quit)\n")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line.strip():
            return
        messages.append({"role": "user", "content": line.strip()})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                      do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        with torch.no_grad():
            worker = threading.Thread(target=model.generate, kwargs=kwargs)
            worker.start()
            reply = ""
            for piece in streamer:
                stdout.write(piece)
                stdout.flush()
                reply += piece
            worker.join()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
