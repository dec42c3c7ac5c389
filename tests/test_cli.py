import subprocess
import sys

from conftest import REPO

CLI = [sys.executable, "-m", "internray.cli"]


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=120, **kw)


def test_help_lists_every_stage_and_tool():
    out = run("--help").stdout
    for command in ("data", "pretrain", "demo", "doctor"):
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
