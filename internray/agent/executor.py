"""Tools run in a pool of Ray actors, shared by every agent, evaluation and the tool server.

A conversation is a *session*: its working directory and its tools' state (a Python
interpreter's variables) live on one worker, chosen by a hash of the session id, so any process
holding the pool (an agent in a batch task, a Serve replica) reaches the same state without a
coordinator. A worker runs up to `max_concurrency` calls at once on threads; calls to a stateful
tool within one session take turns. Every failure comes back as a `ToolResult` the model can
read: a bad argument, a tool error, a call that outlives `call_timeout_s`, or a worker that died
(it is restarted; the sessions it held are gone, and the result says so).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import zlib
from pathlib import Path

import ray

from internray.agent.config import ExecutorSection, ToolsSection
from internray.agent.tools import ToolContext, ToolResult, build_tools

_MAX_FILE_BYTES = 50 * 2**20


@ray.remote(max_restarts=-1)
class ToolWorker:
    def __init__(self, tools: dict):
        self.tools = build_tools(ToolsSection.model_validate(tools))
        self.root = Path(tempfile.mkdtemp(prefix="internray-tools-"))
        # Searchable, not listable, by the sandbox uids: access(2) checks the real uid without
        # capabilities, so under a 0700 root matplotlib finds its (writable) config directory
        # "not writable", rebuilds its font cache in every session and warns into the output.
        # Each session directory stays 0700 and owned by its own sandbox uid.
        self.root.chmod(0o711)
        self.sessions: dict[str, ToolContext] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    def schemas(self) -> list[dict]:
        return [tool.schema() for tool in self.tools.values()]

    def call(self, session_id: str, name: str, arguments: dict) -> dict:
        tool = self.tools.get(name)
        if tool is None:
            return ToolResult(name, False, f"there is no tool named {name!r} (tools: {', '.join(self.tools)})").to_dict()
        context, lock = self._session(session_id)
        if tool.stateful:
            with lock:
                return tool.call(context, arguments).to_dict()
        return tool.call(context, arguments).to_dict()

    def add_files(self, session_id: str, files: dict[str, bytes]) -> list[str]:
        """Put files into the session's directory (a table to analyse); names only, no paths."""
        context, _ = self._session(session_id)
        for name, data in files.items():
            if Path(name).name != name or name.startswith("."):
                raise ValueError(f"file name {name!r}: plain names only")
            (context.workdir / name).write_bytes(data)
        return sorted(p.name for p in context.workdir.iterdir())

    def close_session(self, session_id: str) -> None:
        with self.guard:
            context = self.sessions.pop(session_id, None)
            self.locks.pop(session_id, None)
        if context is not None:
            for tool in self.tools.values():
                tool.close_session(context)
            shutil.rmtree(context.workdir, ignore_errors=True)

    def open_sessions(self) -> list[str]:
        return sorted(self.sessions)

    def _session(self, session_id: str) -> tuple[ToolContext, threading.Lock]:
        with self.guard:
            if session_id not in self.sessions:
                workdir = Path(tempfile.mkdtemp(prefix="session-", dir=self.root))
                self.sessions[session_id] = ToolContext(session_id, workdir)
                self.locks[session_id] = threading.Lock()
            return self.sessions[session_id], self.locks[session_id]


class ToolExecutor:
    """The client side of the pool: picklable, so it can be handed to Ray tasks and replicas."""

    def __init__(self, tools: ToolsSection, executor: ExecutorSection = ExecutorSection()):
        self.timeout_s = executor.call_timeout_s
        options = {"num_cpus": executor.cpus_per_worker, "max_concurrency": executor.max_concurrency}
        self.workers = [ToolWorker.options(**options).remote(tools.model_dump(mode="json"))
                        for _ in range(executor.num_workers)]
        self._schemas: list[dict] | None = None

    def schemas(self) -> list[dict]:
        """The OpenAI `tools` list (asks a worker once; also proves the pool came up)."""
        if self._schemas is None:
            self._schemas = ray.get(self.workers[0].schemas.remote())
        return self._schemas

    def names(self) -> list[str]:
        return [s["function"]["name"] for s in self.schemas()]

    def worker(self, session_id: str):
        return self.workers[zlib.crc32(session_id.encode()) % len(self.workers)]

    def call(self, session_id: str, name: str, arguments: dict | str) -> ToolResult:
        return self.call_many(session_id, [(name, arguments)])[0]

    def call_many(self, session_id: str, calls: list[tuple[str, dict | str]]) -> list[ToolResult]:
        """Run calls of one session concurrently; results in the calls' order."""
        pending: dict[int, ray.ObjectRef] = {}
        results: dict[int, ToolResult] = {}
        worker = self.worker(session_id)
        for i, (name, arguments) in enumerate(calls):
            parsed = _parse_arguments(arguments)
            if isinstance(parsed, str):
                results[i] = ToolResult(name, False, parsed)
            else:
                pending[i] = worker.call.remote(session_id, name, parsed)
        ready = []
        if pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=self.timeout_s)
        for i, ref in pending.items():
            name = calls[i][0]
            if ref not in ready:
                results[i] = ToolResult(name, False, f"the call did not finish within {self.timeout_s:g} s")
                continue
            try:
                results[i] = ToolResult.from_dict(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                # Died or unavailable (restarting): the call may or may not have run, so it is not
                # sent again (tools are not idempotent); the model is told, and may retry.
                self._wait_until_back(worker)
                results[i] = ToolResult(name, False, "the tool worker died during the call and was restarted; "
                                                     "the call may not have completed and this conversation's "
                                                     f"tool state is lost ({type(err).__name__})")
        return [results[i] for i in range(len(calls))]

    def _wait_until_back(self, worker) -> None:
        """Block (up to the call timeout) until a restarted worker answers, so the next call works."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(worker.open_sessions.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return
            except ray.exceptions.ActorUnavailableError:
                time.sleep(0.5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return

    def add_files(self, session_id: str, files: dict[str, bytes]) -> list[str]:
        too_big = [n for n, data in files.items() if len(data) > _MAX_FILE_BYTES]
        if too_big:
            raise ValueError(f"files larger than {_MAX_FILE_BYTES // 2**20} MB: {too_big}")
        return ray.get(self.worker(session_id).add_files.remote(session_id, files))

    def close_session(self, session_id: str) -> None:
        ray.get(self.worker(session_id).close_session.remote(session_id))

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)


def _parse_arguments(arguments: dict | str) -> dict | str:
    """A dict of arguments, or the error text for the model (it wrote invalid JSON)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as err:
        return f"the arguments are not valid JSON ({err.msg} at position {err.pos}): {arguments[:200]!r}"
    if not isinstance(parsed, dict):
        return f"the arguments must be a JSON object, not {type(parsed).__name__}"
    return parsed
