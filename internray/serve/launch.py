"""`internray serve MODEL_DIR`: the Serve application on the current (or an embedded) Ray cluster,
like `lmdeploy serve api_server`, with the same code path as `serve run serve_apps/...`."""
from __future__ import annotations

import time

from internray.config import validate_config
from internray.serve.config import ServeConfig


def serve_config(model_dirs: list[str], config_dict: dict | None = None, **flags) -> ServeConfig:
    """A ServeConfig from a config dict and/or model directories and command-line flags."""
    data = dict(config_dict or {})
    engine_keys = ("tensor_parallel_size", "kv_cache_gib", "kv_cache_dtype", "served_name", "max_model_len", "dtype",
                   "device")
    engine_flags = {k: v for k, v in flags.items() if k in engine_keys and v is not None}
    server_flags = {k: v for k, v in flags.items() if k in ("host", "port", "api_keys", "max_replicas",
                                                              "min_replicas") and v}
    if model_dirs:
        data["models"] = [{"model": m} for m in model_dirs]
    data["models"] = [m | engine_flags for m in data.get("models", [])]
    data["server"] = data.get("server", {}) | server_flags
    return validate_config(ServeConfig, data)


def start(config: ServeConfig, name: str = "internray") -> str:
    """Deploy the app on the connected Ray cluster; return its base URL once it answers."""
    from ray import serve

    from internray.serve.app import build_app

    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_app(config), name=name, route_prefix="/")
    return f"http://{config.server.host}:{config.server.port}"


def serve_forever(config: ServeConfig) -> None:
    url = start(config)
    print(f"[internray serve] OpenAI API at {url}/v1 (chat page at {url}/, metrics at {url}/metrics); "
          "Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
