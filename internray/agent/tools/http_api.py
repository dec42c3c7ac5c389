"""Call HTTP APIs, but only on hosts the operator allowed.

`HTTPAPI` is the template: subclass it, give `run` the typed parameters of one API, and call
`self.fetch(...)`; the model then sees that API's schema, not a raw URL field. `HTTPGet` is the
generic instance (any URL on an allowed host). Every hop is checked, redirects included, so an
allowed host cannot bounce the call elsewhere; replies are cut at `max_bytes`.

    class Weather(HTTPAPI):
        name = "weather"
        def run(self, context, city: str) -> str:
            '''Current weather for a city.

            Args:
                city: the city's name
            '''
            return self.fetch("https://api.example.com/weather", params={"q": city})
"""
from __future__ import annotations

import fnmatch
from urllib.parse import urljoin, urlsplit

from internray.agent.tools.base import Tool, ToolContext, ToolError

_REDIRECTS = (301, 302, 303, 307, 308)


class HTTPAPI(Tool):
    def __init__(self, allowed_hosts: list[str], timeout_s: float = 10.0, max_bytes: int = 20_000,
                 max_redirects: int = 3):
        if not allowed_hosts:
            raise ValueError(f"{type(self).__name__}: allowed_hosts is empty, so every call would be refused")
        self.allowed_hosts, self.timeout_s = list(allowed_hosts), timeout_s
        self.max_bytes, self.max_redirects = max_bytes, max_redirects

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ToolError(f"{url!r} is not an http(s) URL")
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        if not any(fnmatch.fnmatch(host, pattern) or fnmatch.fnmatch(parts.hostname, pattern)
                   for pattern in self.allowed_hosts):
            raise ToolError(f"host {host!r} is not allowed (allowed: {', '.join(self.allowed_hosts)})")

    def fetch(self, url: str, method: str = "GET", params: dict | None = None, json_body: dict | None = None) -> str:
        """The reply body as text (cut at max_bytes); HTTP errors become tool errors."""
        import requests

        for _ in range(self.max_redirects + 1):
            self.check_url(url)
            try:
                with requests.request(method, url, params=params, json=json_body, timeout=self.timeout_s,
                                      allow_redirects=False, stream=True) as reply:
                    if reply.status_code in _REDIRECTS and "location" in reply.headers:
                        url, params = urljoin(url, reply.headers["location"]), None
                        method = "GET" if reply.status_code == 303 else method
                        continue
                    body = reply.raw.read(self.max_bytes + 1, decode_content=True)
                    status = reply.status_code
            except requests.RequestException as err:
                raise ToolError(f"{method} {url} failed: {type(err).__name__}: {err}") from None
            text = body[:self.max_bytes].decode("utf-8", errors="replace")
            if len(body) > self.max_bytes:
                text += f"\n[reply cut at {self.max_bytes} bytes]"
            if status >= 400:
                raise ToolError(f"{method} {url} answered HTTP {status}: {text[:500]}")
            return text
        raise ToolError(f"{url}: more than {self.max_redirects} redirects")


class HTTPGet(HTTPAPI):
    name = "http_get"

    def run(self, context: ToolContext, url: str, params: dict[str, str] | None = None) -> str:
        """Fetch a URL with HTTP GET and return the reply body as text (allowed hosts only).

        Args:
            url: the http(s) URL
            params: query parameters to add to the URL
        """
        return self.fetch(url, params=params)
