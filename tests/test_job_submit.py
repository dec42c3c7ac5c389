"""`ray job submit` against a real Ray head on loopback, with the shipped data config.

The head runs with RAY_AUTH_MODE=disabled: it listens on 127.0.0.1 only and lives for this test
(Ray 2.60 would otherwise answer 401 to an unauthenticated `ray job submit`). It is started in
its own process group so stopping it cannot touch the test session's embedded cluster.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO
from internray.config import load_config
from internray.data.config import DataConfig
from internray.runs import read_manifest
from internray.runtime import free_port

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray-head")
    gcs, dashboard = free_port(), free_port()
    # every port this head opens is chosen here: defaults would collide with the session's cluster
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}",
         "--disable-usage-stats", *ports],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the Ray head did not answer within 120 s")
    yield url, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # the whole group may already be gone after SIGTERM
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(10)


def test_submitted_data_job_succeeds_on_the_shipped_config(ray_head, tmp_path, monkeypatch):
    """The job path only: the CLI path of the same `run_data` is covered in test_data_pipeline.py.
    What can go wrong here is the job's own: the working-directory upload, relative source paths
    resolved in the job's directory, overrides on the entrypoint's command line."""
    url, env = ray_head
    job_root = tmp_path / "job-runs"
    for _ in range(30):  # the head's job agent registers a few seconds after the dashboard answers
        done = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--",
             "python", "jobs/data.py", "jobs/configs/data.yaml", f"run.root={job_root}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    (job_run,) = job_root.glob("data-*")
    manifest = read_manifest(job_run)
    assert manifest["status"] == "complete" and manifest["counts"]["balanced"]
    for name in ("train", "validation", "tokenizer", "ngram_index", "rejects"):
        assert Path(manifest["outputs"][name]).is_dir()

    # every file the shipped config's globs match here was uploaded and read as one record
    monkeypatch.chdir(REPO)  # the config's source paths are relative to the job's working directory
    config = load_config(DataConfig, "jobs/configs/data.yaml")
    files = {f for source in config.sources for pattern in source.include
             for f in source.path.glob(pattern) if f.is_file()}
    assert manifest["counts"]["input_records"] == len(files)
    kept = manifest["counts"]["kept_documents"]
    assert 0 < kept <= len(files)
    for split in ("train", "validation"):
        rows = pq.read_table(job_run / "stages" / split)
        assert rows.num_rows == manifest["counts"][split]["sequences"] > 0
        assert sum(rows.column("num_tokens").to_pylist()) == manifest["counts"][split]["tokens"]
