"""The Ray connection every stage runs on.

With no address, internray starts an embedded single-machine cluster (dashboard on
127.0.0.1:8265), so a laptop needs nothing running. With `--address` or `RAY_ADDRESS`
(which `ray job submit` sets for its entrypoint) it joins that cluster instead: the same code
runs on 2 cores or 1000 GPUs.

Authentication (Ray 2.60 turns token authentication on by default):
- embedded cluster: `ray.init()` generates a token and uses it itself; nothing to do.
- existing cluster: the client must present the cluster's token. Ray reads it from
  `RAY_AUTH_TOKEN`, then the file named by `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`
  (`ray get-auth-token` prints it). internray does not invent or weaken this: it only checks
  up front that a token is present when `RAY_AUTH_MODE=token`, and says what to set.
- a loopback head started for tests may run with `RAY_AUTH_MODE=disabled`; never expose one.
"""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import ray

DASHBOARD_HOST = "127.0.0.1"


_dashboard_url: str | None = None


SERVING_CLUSTER_ENV = {
    # engines are latency-bound: see raise_thread_priority
    "RAY_worker_niceness": "0",
    # Ray Serve's throughput mode (Ray >= 2.56): direct ingress (ingress replicas run their own
    # HTTP servers), gRPC between proxy and replicas, user code on the replica's event loop, a frozen
    # GC and buffered request logs. Every streamed token crosses that path, and on a CPU host its
    # work is taken from the engine's threads: SmolLM2 online TPOT p50 fell from 50-54 to 38-39 ms
    # (benchmarks/serve.py load, 2 CPUs). The loop and gRPC flags alone gave nothing.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # that mode holds a stopping ingress replica open 30 s so an external load balancer can
    # deregister it; an embedded cluster has none in front, and Ctrl-C should not wait that long
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
"""Environment for an embedded cluster that serves models; set it on a real cluster's nodes too
(cluster/ does) since Ray reads it when its processes start."""


def connect(address: str | None = None, *, num_cpus: int | None = None, env: dict[str, str] | None = None) -> dict:
    """Join `address` (or `RAY_ADDRESS`), else start an embedded cluster; return where it is.
    `env` (embedded cluster only) is set, where not already set, before the cluster starts: the
    raylet reads it and its workers inherit it (`SERVING_CLUSTER_ENV` for `internray serve`)."""
    global _dashboard_url
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            for key, value in (env or {}).items():
                os.environ.setdefault(key, value)
            context = ray.init(
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host=DASHBOARD_HOST,
                _node_ip_address="127.0.0.1",
                configure_logging=False,
            )
        else:
            check_token_available()
            check_reachable(address)
            context = ray.init(address=address, configure_logging=False)
        _dashboard_url = f"http://{context.dashboard_url}" if context.dashboard_url else None
    return cluster_info()


def raise_thread_priority(why: str) -> None:
    """Bring the calling thread (and the threads it starts later) back to niceness 0.

    Ray starts worker processes at niceness 15 (`RAY_worker_niceness`) so that its own daemons
    stay responsive. A CPU inference engine cannot live with that: every step is hundreds of
    OpenMP parallel regions, and each stalls when any niceness-0 process (the proxy's host, GCS,
    a load generator) preempts one of its threads; on 2 cores that more than doubled TTFT and added
    half to TPOT (benchmarks/serve.py, online). Lowering niceness needs privilege; without it, say
    how to start the cluster instead."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # on Linux: this thread only
    except OSError:
        warnings.warn(f"{why} runs at niceness {current} (Ray's worker default) and may not lower it: "
                      "start the Ray cluster with RAY_worker_niceness=0 for steady latency", stacklevel=2)


def cluster_info() -> dict:
    return {
        "address": ray.get_runtime_context().gcs_address,
        "dashboard": _dashboard_url,
        "resources": ray.cluster_resources(),
        "auth_mode": auth_mode(),
    }


def auth_mode() -> str:
    return os.environ.get("RAY_AUTH_MODE", "default (token on Ray >= 2.60)")


def check_token_available() -> None:
    """Fail early, naming the fix, when token auth is requested but no token can be found."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(token_path)] if token_path else [Path.home() / ".ray" / "auth_token"]
    if os.environ.get("RAY_AUTH_TOKEN") or any(p.is_file() for p in candidates):
        return
    raise RuntimeError(
        "RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, "
        "or copy the cluster's token to ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
    )


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at `host:port` (ray.init retries long)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.removeprefix("http://").removeprefix("https://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise ConnectionError(f"no Ray cluster answers at {address} ({err}); check --address / RAY_ADDRESS") from None


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a server or rendezvous started just after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
