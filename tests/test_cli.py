import subprocess
import sys

from conftest import REPO

CLI = [sys.executable, "-m", "internray.cli"]


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=120, **kw)


def test_help_lists_every_stage_and_tool():
    out = run("--help").stdout
    for command in ("data", "pretrain", "finetune", "serve", "eval", "leaderboard", "chat", "demo", "doctor"):
        assert command in out


def test_doctor_reports_versions_and_devices():
    done = run("doctor")
    assert done.returncode == 0, done.stderr
    for name in ("ray", "torch", "deepspeed", "transformers", "devices", "ray cluster"):
        assert name in done.stdout


def test_doctor_says_when_the_cluster_is_unreachable():
    done = run("doctor", "--address", "127.0.0.1:1")
    assert done.returncode == 1 and "NOT reachable" in done.stdout


def test_a_bad_config_fails_in_one_line_before_ray_starts(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("sources: [{name: a, type: jsonl, path: /nonexistent/corpus.jsonl}]\n")
    done = run("data", str(config))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "sources.0.path" in done.stderr and "/nonexistent/corpus.jsonl" in done.stderr
    assert "ray at" not in done.stdout


def test_eval_flags_and_overrides_are_validated_before_ray_starts():
    done = run("eval", "--model", "/some/checkpoint", "--datasets", "mmlu", "shard_sise=8")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "shard_sise" in done.stderr and "shard_size" in done.stderr  # names the key it probably meant
    assert "ray at" not in done.stdout


def test_chat_streams_a_reply_from_a_checkpoint(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from internray.data.tokenize import train_tokenizer
    from internray.models.export import save_hf
    from internray.models.presets import model_config

    train_tokenizer(["hello there, how are you today?"] * 10, vocab_size=300, min_frequency=1, out=tmp_path / "tok")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config("tiny", vocab_size=len(tokenizer)))
    save_hf(model, tokenizer, tmp_path / "hf")
    done = run("chat", str(tmp_path / "hf"), "--max-new-tokens", "5", "--temperature", "0", input="hello\n\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "chatting with" in done.stdout and done.stdout.count("> ") == 2
    refused = run("chat", str(tmp_path))
    assert refused.returncode == 2 and "not a Hugging Face checkpoint directory" in refused.stderr
