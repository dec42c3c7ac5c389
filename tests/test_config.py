from pathlib import Path

import pytest
import yaml

from internray.config import ConfigError, apply_override, config_hash, load_config
from internray.data.config import DataConfig


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def valid(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    return {"sources": [{"name": "c", "type": "jsonl", "path": str(corpus)}]}


def test_a_valid_config_loads_with_defaults_filled_in(tmp_path, valid):
    config = load_config(DataConfig, write(tmp_path, valid))
    assert config.fuzzy_dedup.num_perm == 128 and config.pack.seq_len == 512


def test_unknown_key_is_named_with_file_and_suggestion(tmp_path, valid):
    valid["pack"] = {"seq_length": 128}
    path = write(tmp_path, valid)
    with pytest.raises(ConfigError) as err:
        load_config(DataConfig, path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "`pack.seq_length`" in message and "did you mean `pack.seq_len`" in message


def test_unknown_top_level_section_suggests_the_right_section(tmp_path, valid):
    valid["tokeniser"] = {"vocab_size": 1000}
    with pytest.raises(ConfigError, match=r"unknown key `tokeniser`.*did you mean `tokenizer`"):
        load_config(DataConfig, write(tmp_path, valid))


def test_wrong_type_is_named(tmp_path, valid):
    valid["pack"] = {"seq_len": "long"}
    with pytest.raises(ConfigError, match=r"`pack.seq_len`: .*integer.*'long'"):
        load_config(DataConfig, write(tmp_path, valid))


def test_missing_input_path_is_named(tmp_path, valid):
    valid["sources"][0]["path"] = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(ConfigError, match=r"`sources.0.path`: path does not exist: .*nowhere.jsonl"):
        load_config(DataConfig, write(tmp_path, valid))


def test_missing_config_file_and_bad_yaml_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(DataConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DataConfig, bad)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path, valid):
    path = write(tmp_path, valid)
    config = load_config(DataConfig, path, ["pack.seq_len=64", "clean.languages=[en]", "sources.0.weight=0.5"])
    assert config.pack.seq_len == 64 and config.clean.languages == ["en"] and config.sources[0].weight == 0.5
    with pytest.raises(ConfigError, match="unknown key `pack.seqlen`"):
        load_config(DataConfig, path, ["pack.seqlen=64"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(DataConfig, path, ["pack.seq_len"])


def test_cross_field_rules_are_checked_up_front(tmp_path, valid):
    valid["fuzzy_dedup"] = {"num_perm": 128, "bands": 10, "rows": 8}
    with pytest.raises(ConfigError, match=r"bands \* rows must equal num_perm"):
        load_config(DataConfig, write(tmp_path, valid))


def test_config_hash_changes_with_content_only(tmp_path, valid):
    a = load_config(DataConfig, write(tmp_path, valid))
    b = load_config(DataConfig, write(tmp_path, valid))
    c = load_config(DataConfig, write(tmp_path, valid), ["pack.seq_len=64"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_override_into_a_list_needs_a_valid_index():
    data = {"sources": [{"name": "a"}]}
    apply_override(data, "sources.0.name=b")
    assert data["sources"][0]["name"] == "b"
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(data, "sources.3.name=c")


def test_train_config_needs_shards_and_resolves_a_data_run(tmp_path):
    from internray.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"set `data.train` \(packed shards\) or `data.from_run`"):
        load_config(TrainConfig, write(tmp_path, {"data": {}}))
    with pytest.raises(ConfigError, match="no complete data run under"):
        load_config(TrainConfig, write(tmp_path, {"run": {"root": str(tmp_path)}, "data": {"from_run": "latest"}}))
    run = tmp_path / "data-20260101-000000-abcdef"
    (run / "stages" / "train").mkdir(parents=True)
    (run / "manifest.json").write_text('{"status": "complete"}')
    config = load_config(TrainConfig, write(tmp_path, {"run": {"root": str(tmp_path)}, "data": {"from_run": "latest"}}))
    assert config.data.train == (run / "stages" / "train").resolve() and config.data.validation is None
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        load_config(TrainConfig, write(tmp_path, {"data": {"train": str(run)}, "scaling": {"offload_params": True}}))
