"""`RemoteTools`: the tool server (`internray.agent.server`) used as if it were a local ToolExecutor.

An agent takes either: the methods and their results are the same, so tools can run on a cluster
while the agent runs on a laptop. As with the executor, a call's failure (a bad argument, the
server unreachable) comes back as a ToolResult the model can read, never as an exception; only
the setup calls (`schemas`, `add_files`, `close_session`) raise, naming the server and the problem.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import requests

from internray.agent.tools import ToolResult


class ToolServerError(RuntimeError):
    """The tool server refused a request or could not be reached."""


class RemoteTools:
    def __init__(self, base_url: str, timeout_s: float = 120.0, max_parallel: int = 8):
        """`base_url` is where the app is mounted, e.g. http://host:8000/tools; `timeout_s` should
        exceed the server's own call timeout, which is what reports a slow tool."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_parallel = max_parallel
        self.http = requests.Session()
        self._schemas: list[dict] | None = None

    def schemas(self) -> list[dict]:
        """The OpenAI `tools` list (fetched once)."""
        if self._schemas is None:
            self._schemas = self._request("GET", "/v1/tools").json()
        return self._schemas

    def names(self) -> list[str]:
        return [s["function"]["name"] for s in self.schemas()]

    def call(self, session_id: str, name: str, arguments: dict | str) -> ToolResult:
        try:
            response = self.http.post(f"{self.base_url}/v1/tools/{quote(name, safe='')}", timeout=self.timeout_s,
                                      json={"arguments": arguments, "session_id": session_id})
        except requests.RequestException as err:
            return ToolResult(name, False, f"the tool server {self.base_url} did not answer: {err}")
        if not response.ok:
            return ToolResult(name, False, _detail(response))
        return ToolResult.from_dict(response.json())

    def call_many(self, session_id: str, calls: list[tuple[str, dict | str]]) -> list[ToolResult]:
        """Run calls of one session concurrently, as the executor does; results in the calls' order."""
        if not calls:
            return []
        with ThreadPoolExecutor(min(len(calls), self.max_parallel)) as pool:
            return list(pool.map(lambda c: self.call(session_id, *c), calls))

    def add_files(self, session_id: str, files: dict[str, bytes]) -> list[str]:
        """Upload files into the session's directory; returns the names now there."""
        parts = [("files", (name, data)) for name, data in files.items()]
        return self._request("POST", f"/v1/sessions/{quote(session_id, safe='')}/files", files=parts).json()["files"]

    def close_session(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{quote(session_id, safe='')}")

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = self.http.request(method, self.base_url + path, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as err:
            raise ToolServerError(f"{method} {self.base_url}{path}: the tool server did not answer: {err}") from None
        if not response.ok:
            raise ToolServerError(f"{method} {self.base_url}{path}: {response.status_code}: {_detail(response)}")
        return response


def _detail(response: requests.Response) -> str:
    """The server's error message (FastAPI's `detail`), or the start of whatever it sent."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    return detail if isinstance(detail, str) else f"HTTP {response.status_code}: {response.text[:300]}"
