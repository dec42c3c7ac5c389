"""A small client for OpenAI-compatible HTTP APIs (internray serve, vLLM, LMDeploy, hosted APIs).

Shared by the stages that call a served model (eval's backend and judge, the agent's LLM
client): one place that knows the retry policy, so a busy server slows a run down instead of
failing it, and a wrong request fails at once with the server's own message.
"""
from __future__ import annotations

import os
import time


def resolve_backend(backend: str, path_or_url: str) -> str:
    """`auto` -> `openai` for an http(s) URL, else `hf` (a checkpoint directory)."""
    if backend != "auto":
        return backend
    return "openai" if path_or_url.startswith(("http://", "https://")) else "hf"


class OpenAIClient:
    """Calls with a timeout each, retried with backoff on connection errors, 429 and 5xx."""

    def __init__(self, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120,
                 max_retries: int = 3):
        import requests

        self.session = requests.Session()
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.timeout, self.retries = timeout_s, max_retries
        key = os.environ.get(api_key_env)
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def first_model(self) -> str:
        """The id of the endpoint's first model: the name to send when the user gave none."""
        return self.request("GET", "/v1/models")["data"][0]["id"]

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One API call, retried on connection errors, 429 and 5xx; the parsed JSON reply."""
        import requests

        for attempt in range(self.retries + 1):
            try:
                r = self.session.request(method, self.base + path, json=body, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if r.status_code < 400:
                    return r.json()
                problem = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code != 429 and r.status_code < 500:
                    break  # our request is wrong: retrying cannot help
            if attempt < self.retries:
                time.sleep(min(2 ** attempt, 30))
        raise RuntimeError(f"{self.base}{path}: {problem}")
