"""Serve configs are checked before anything starts: `serve run` files, the RayService, the CLI."""
from __future__ import annotations

import importlib

import pytest
import yaml

from conftest import REPO
from internray.cli import main
from internray.config import ConfigError

SERVE_FILES = {
    "serve_apps/serve.yaml": lambda doc: doc,
    "cluster/kuberay/rayservice.yaml": lambda doc: yaml.safe_load(doc["spec"]["serveConfigV2"]),
}


@pytest.mark.parametrize("path", SERVE_FILES)
def test_serve_configs_name_a_real_builder_whose_args_validate(path):
    config = SERVE_FILES[path](yaml.safe_load((REPO / path).read_text()))
    for app in config["applications"]:
        module, _, name = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), name)
        application = builder(app["args"])  # validates ServeConfig and binds the deployments
        assert type(application).__name__ == "Application"


def test_builder_refuses_unknown_keys_by_name():
    from serve_apps.openai_app import app_builder

    with pytest.raises(ConfigError, match="kv_cache_gb"):
        app_builder({"models": [{"model": "m", "kv_cache_gb": 2}]})


def test_two_models_need_distinct_served_names():
    from serve_apps.openai_app import app_builder

    with pytest.raises(ValueError, match="served name"):
        app_builder({"models": [{"model": "a/hf"}, {"model": "b/hf"}]})


def test_cli_serve_refuses_a_directory_without_a_checkpoint(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not an HF checkpoint directory" in capsys.readouterr().err


def test_cli_serve_rejects_a_bad_tp_before_starting_ray(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--tp", "0"]) == 2
    assert "tensor_parallel_size" in capsys.readouterr().err
