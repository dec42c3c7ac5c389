import json

from internray.config import Section
from internray.runs import content_hash, open_run, read_manifest


class Tiny(Section):
    value: int = 1


def test_a_new_run_writes_config_and_manifest(tmp_path):
    run = open_run("data", Tiny(), tmp_path)
    assert run.dir.parent == tmp_path and run.dir.name.startswith("data-")
    assert (run.dir / "config.yaml").read_text().strip() == "value: 1"
    manifest = read_manifest(run.dir)
    assert manifest["stage"] == "data" and manifest["status"] == "running" and manifest["code_version"]


def test_rerunning_the_same_config_resumes_the_unfinished_run(tmp_path):
    first = open_run("data", Tiny(), tmp_path)
    again = open_run("data", Tiny(), tmp_path)
    assert again.dir == first.dir and again.resumed
    other = open_run("data", Tiny(value=2), tmp_path)
    assert other.dir != first.dir
    first.finish()
    fresh = open_run("data", Tiny(), tmp_path)
    assert fresh.dir != first.dir and not fresh.resumed
    assert open_run("data", Tiny(), tmp_path, resume="never").dir != fresh.dir


def test_inputs_are_hashed_and_parent_runs_found(tmp_path):
    parent = open_run("data", Tiny(), tmp_path)
    shard = parent.path("stages", "train", "part-0.parquet")
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"tokens")
    child = open_run("pretrain", Tiny(), tmp_path)
    child.add_input(parent.path("stages", "train"))
    manifest = json.loads((child.dir / "manifest.json").read_text())
    assert manifest["parents"] == [parent.run_id]
    assert manifest["inputs"][0]["sha256"] == content_hash(parent.path("stages", "train"))
    shard.write_bytes(b"other tokens")
    assert content_hash(parent.path("stages", "train")) != manifest["inputs"][0]["sha256"]
