"""The OpenAI-compatible LLM application, for `serve run` / `serve deploy` / a KubeRay RayService.

    serve run serve_apps/serve.yaml          # or: serve deploy serve_apps/serve.yaml
    serve run serve_apps.openai_app:app_builder models='[{"model": "runs/.../hf"}]'

`args` is a ServeConfig (`internray/serve/config.py`): `models` (one engine config each) and
`server`; unknown keys are refused before anything starts. `internray serve MODEL_DIR` builds the
same application.
"""
from internray.config import validate_config
from internray.serve.app import build_app
from internray.serve.config import ServeConfig


def app_builder(args: dict):
    return build_app(validate_config(ServeConfig, dict(args), source="serve application args"))
