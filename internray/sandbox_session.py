"""A persistent, sandboxed Python interpreter for an agent's "python" and "data analysis" tools.

Why: an agent works like a notebook user -- load a table, look at it, compute, plot -- so its code
needs variables that survive between calls, which a one-shot `run_program` cannot give. The
session is one long-lived child inside every layer of `internray.sandbox` (its working directory
is the caller's `workdir`, which may hold the conversation's files), running a small REPL: it
reads a length-prefixed JSON cell from one pipe, executes it in a persistent namespace, shows the
last expression's value like a notebook, saves the matplotlib figures the cell left open as PNGs
in the working directory, and answers with a length-prefixed JSON reply on another pipe.

Limits per cell: the wall clock (the whole process group is killed, the next cell starts a fresh
interpreter, and the model is told its variables are gone); memory (MemoryError is caught and the
session keeps its variables; a process killed at the limit is restarted); output (printing stops
with status "output" at `max_output_bytes` rather than running into the timeout; the text comes
back tail-truncated). The parent trusts nothing from the child: a reply that is too long,
malformed, for another cell or naming a file that is not a plain file in the working directory
ends the interpreter as "crashed".
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import stat
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from internray.sandbox import (
    GUARD_PRELUDE,
    SandboxLimits,
    cpu_backstop,
    kill_sandboxed,
    killed_by_limit,
    signal_name,
    start_sandboxed,
)

_HEADER = struct.Struct(">I")
_MAX_REPLY_BYTES = 1 << 20
_MAX_ERROR_CHARS = 2000
_CELL_STATUSES = frozenset({"ok", "error", "memory", "output", "network", "denied"})
_READY = frozenset({"ready"})
_START_TIMEOUT_S = 10.0
"""For the interpreter to come up (about 0.1 s), however short the cell timeout."""
_LOST = "the session was restarted and its variables are lost"

_REPL = GUARD_PRELUDE + r'''
import ast, builtins, io, linecache, math, resource, struct, traceback, types

HEADER = struct.Struct(">I")


class OutputLimitExceeded(BaseException):
    """Raised by print() once a cell has used its output budget: a BaseException, so that the
    cell's own `except Exception` does not swallow it and keep printing."""


class Budget:
    """One cell's allowance for stdout and stderr together, in characters."""

    def __init__(self, limit):
        self.limit, self.used, self.exceeded = limit, 0, False


class LimitedStream(io.TextIOBase):
    """Passes text through to the real stream (fd 1 or 2: the parent's output file, in order with
    output from C code) until the budget is spent, then raises OutputLimitExceeded."""

    def __init__(self, raw, budget):
        self.raw, self.budget = raw, budget

    def writable(self):
        return True

    def fileno(self):
        return self.raw.fileno()

    @property
    def encoding(self):
        return self.raw.encoding

    def write(self, text):
        budget = self.budget
        room = budget.limit - budget.used
        if len(text) > room:
            budget.exceeded = True
            budget.used = budget.limit
            self.raw.write(text[:max(room, 0)])
            raise OutputLimitExceeded()
        budget.used += len(text)
        return self.raw.write(text)

    def flush(self):
        self.raw.flush()


def read_exactly(fd, size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def receive(fd):
    """The next request, or None when the parent closed the pipe (then the session ends)."""
    header = read_exactly(fd, HEADER.size)
    body = header and read_exactly(fd, HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def send(fd, message):
    data = json.dumps(message).encode()
    data = HEADER.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def arm_cpu_limit(seconds):
    """RLIMIT_CPU counts the whole process life, so each cell gets `seconds` more than so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def execute(code, filename, namespace):
    """Run a cell; print the value of a last expression that is not None, like a notebook."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # tracebacks show source
    tree = ast.parse(code, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
        if value is not None:
            print(repr(value))


def describe(error, budget, memory_mb):
    """(status, one line for the model) for an exception that ended a cell."""
    if budget.exceeded or isinstance(error, OutputLimitExceeded):
        return "output", (f"output limit exceeded: the cell printed more than {budget.limit} characters "
                          "and was stopped there; print less, e.g. df.head() or a summary")
    line = traceback.format_exception_only(type(error), error)[-1].strip()
    if isinstance(error, MemoryError):
        return "memory", f"{line} (the memory limit is {memory_mb} MB; variables are kept, del large ones)"
    kind = refusal(error)
    if kind is not None:
        return kind, line
    return ("denied" if isinstance(error, PermissionError) else "error"), line


def refusal(error):
    """"network" or "denied" if the audit hook's refusal is behind `error`, which may have wrapped
    it (urllib raises URLError from the PermissionError); else None."""
    for _ in range(8):  # a chain can be made circular
        if error is None:
            return None
        if hasattr(error, "sandbox"):
            return error.sandbox
        error = error.__cause__ or error.__context__
    return None


def print_traceback(error, filename, stream):
    """The traceback from the cell's own frame on (the REPL's and the audit hook's, whose source
    is "<string>", left out)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    frames = [f for f in traceback.extract_tb(tb) if f.filename != "<string>"]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(error), error)
    stream.write(("Traceback (most recent call last):\n" if frames else "") + "".join(lines))


def save_figures(cell):
    """Save the figures a cell left open as PNGs in the working directory, then close them."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    names = []
    for index, number in enumerate(pyplot.get_fignums(), 1):
        names.append(f"figure-{cell}-{index}.png")
        pyplot.figure(number).savefig(names[-1])
    pyplot.close("all")
    return names


def run_cell(request, namespace, streams, config):
    cell, filename = request["cell"], f"<cell {request['cell']}>"
    sys.stdout, sys.stderr = streams  # again, in case the last cell replaced them
    budget = streams[0].budget
    budget.used, budget.exceeded = 0, False
    arm_cpu_limit(config["cpu_s"])
    status, error, images = "ok", "", []
    try:
        execute(request["code"], filename, namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the session goes on
        status, error = describe(exc, budget, config["memory_mb"])
        if status != "output":
            try:
                print_traceback(exc, filename, streams[1].raw)
            except BaseException:
                pass  # e.g. no memory left to format it: the error line still goes back
    if budget.exceeded and status == "ok":  # the cell caught OutputLimitExceeded itself
        status, error = describe(None, budget, config["memory_mb"])
    try:
        images = save_figures(cell)
    except BaseException as exc:
        if status == "ok":
            status, error = "error", "saving the figures failed: " + describe(exc, budget, config["memory_mb"])[1]
    for stream in streams:
        try:
            stream.flush()
        except BaseException:
            pass  # e.g. RLIMIT_FSIZE reached: the parent reads what arrived
    return {"cell": cell, "status": status, "error": error, "images": images}


def serve(config):
    _install_guard(config["workdir"], config["readable"], None)
    budget = Budget(config["max_output_bytes"])
    streams = (LimitedStream(sys.stdout, budget), LimitedStream(sys.stderr, budget))
    main = types.ModuleType("__main__")  # the cells' namespace; the REPL's own globals stay out of reach
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    send(config["reply_fd"], {"cell": 0, "status": "ready", "error": "", "images": []})
    while (request := receive(config["code_fd"])) is not None:
        send(config["reply_fd"], run_cell(request, main.__dict__, streams, config))


serve(json.loads(sys.argv[1]))
'''
"""The child: `_install_guard` (shared with one-shot programs) plus the REPL loop."""


@dataclass(frozen=True)
class CellResult:
    status: str
    """ok; error (the cell raised: its traceback ends `output`); timeout; memory; output (the
    output limit was exceeded); network; denied (file or process access refused); crashed (the
    interpreter died otherwise, or could not start)."""
    output: str
    """stdout and stderr as printed, then the last expression's repr or the traceback; the tail,
    at most `max_output_bytes`, with a note when cut."""
    error: str
    """One line for the model saying what went wrong; empty when ok."""
    images: list[str] = field(default_factory=list)
    """PNG files saved from the figures the cell left open, relative to the working directory."""
    duration_s: float = 0.0


class PythonSession:
    """Variables survive across `run` calls until a timeout or crash restarts the interpreter.
    Not for concurrent use from several threads at once (calls are serialized)."""

    def __init__(self, workdir: Path, limits: SandboxLimits = SandboxLimits(), readable: Sequence[Path] = ()):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.readable = tuple(readable)
        self._interpreter: _Interpreter | None = None  # started by the first cell after (re)start
        self._cells = 0
        self._lock = threading.Lock()

    def run(self, code: str) -> CellResult:
        """Execute `code` in the session's namespace and report how it ended."""
        with self._lock:
            start = time.monotonic()
            result = self._run(code)
            return replace(result, duration_s=time.monotonic() - start)

    def close(self) -> None:
        """Kill the interpreter and everything it started; idempotent."""
        with self._lock:
            if self._interpreter is not None:
                self._interpreter.close()
                self._interpreter = None

    def __enter__(self) -> PythonSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, code: str) -> CellResult:
        if self._interpreter is None:
            try:
                self._interpreter = _Interpreter(self.workdir, self.limits, self.readable)
            except _Lost as lost:
                return CellResult("crashed", lost.output, f"the sandboxed interpreter could not start: {lost.reason}")
        self._cells += 1
        try:
            reply = self._interpreter.ask({"cell": self._cells, "code": code})
        except _Lost as lost:
            self._interpreter = None
            return CellResult(lost.status, lost.output, f"{lost.reason}; {_LOST}")
        output = self._interpreter.take_output()
        images = [name for name in reply["images"] if _is_plain_file(self.workdir / name)]
        return CellResult(reply["status"], output, reply["error"][:_MAX_ERROR_CHARS], images)


class _Lost(Exception):
    """The interpreter is gone (killed, crashed, or untrustworthy), with why and its last output."""

    def __init__(self, status: str, reason: str, output: str):
        super().__init__(reason)
        self.status, self.reason, self.output = status, reason, output


class _Interpreter:
    """One sandboxed REPL process with its two pipes and its output file. The output file lies
    outside the working directory and is opened by the parent, so the child can neither replace
    it nor make it grow past RLIMIT_FSIZE; it is emptied after every cell."""

    def __init__(self, workdir: Path, limits: SandboxLimits, readable: Sequence[Path]):
        self.limits = limits
        self.output = tempfile.TemporaryFile()
        # Appending: after the parent empties the file, the child's next write starts at 0 again.
        fcntl.fcntl(self.output, fcntl.F_SETFL, fcntl.fcntl(self.output, fcntl.F_GETFL) | os.O_APPEND)
        code_r, self.code_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        config = {"code_fd": code_r, "reply_fd": reply_w, "max_output_bytes": limits.max_output_bytes,
                  "cpu_s": cpu_backstop(limits), "memory_mb": limits.memory_mb}
        env = {"MPLBACKEND": "Agg", "MPLCONFIGDIR": str(workdir / ".matplotlib")}
        try:
            self.process = start_sandboxed(_REPL, config, workdir, limits, readable, stdout=self.output,
                                           stderr=self.output, pass_fds=(code_r, reply_w), cpu_s=None, env=env)
        except (OSError, subprocess.SubprocessError) as exc:
            self._close_files()
            raise _Lost("crashed", str(exc), "") from exc
        finally:
            os.close(code_r)
            os.close(reply_w)
        os.set_blocking(self.code_w, False)
        self._await_reply(0, _READY, _START_TIMEOUT_S)

    def ask(self, request: dict) -> dict:
        """Send one cell and return its validated reply; raises _Lost (the process then killed)."""
        return self._await_reply(request["cell"], _CELL_STATUSES, self.limits.timeout_s, _frame(request))

    def take_output(self) -> str:
        """What the cell printed (the tail, with a note when cut), then empty the file."""
        limit, fd = self.limits.max_output_bytes, self.output.fileno()
        size = os.fstat(fd).st_size
        text = os.pread(fd, limit, max(0, size - limit)).decode("utf-8", errors="replace")
        os.ftruncate(fd, 0)
        if size > limit:
            text = f"[output cut: showing the last {limit} of {size} bytes]\n" + text
        return text

    def close(self) -> None:
        """Kill the process group (and, as root, everything running as the sandbox uid)."""
        kill_sandboxed(self.process)
        self._close_files()

    def _await_reply(self, cell: int, statuses: frozenset[str], timeout_s: float, request: bytes = b"") -> dict:
        deadline = time.monotonic() + timeout_s
        try:
            _write_all(self.code_w, request, deadline)
            return _parse_reply(_read_frame(self.reply_r, deadline), cell, statuses)
        except TimeoutError:
            self._lose("timeout", f"killed after {timeout_s:g} s wall clock")
        except (EOFError, BrokenPipeError):  # the child closed its pipes, normally by exiting
            returncode = _exit_status(self.process.pid, deadline)
            if returncode is None:
                self._lose("crashed", "the interpreter closed its pipes")
            self._lose(*_exit_verdict(returncode))
        except ValueError as exc:
            self._lose("crashed", f"the interpreter sent a malformed reply ({exc})")

    def _lose(self, status: str, reason: str) -> None:
        kill_sandboxed(self.process)
        output = self.take_output()
        self._close_files()
        raise _Lost(status, reason, output)

    def _close_files(self) -> None:
        os.close(self.code_w)
        os.close(self.reply_r)
        self.output.close()


def _exit_status(pid: int, deadline: float) -> int | None:
    """The exit status (Popen's convention) of a child that has exited, without reaping it, so that
    its pid and uid stay reserved until kill_sandboxed; None if it still runs at the deadline."""
    while (result := os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)) is None:
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
    return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status


def _exit_verdict(returncode: int) -> tuple[str, str]:
    """(status, reason) for an interpreter that exited between or during cells."""
    verdict = killed_by_limit(returncode)
    if verdict is not None:
        return verdict
    if returncode < 0:
        return "crashed", f"the interpreter was killed by {signal_name(-returncode)}"
    return "crashed", f"the interpreter exited with code {returncode}"


def _frame(message: dict) -> bytes:
    data = json.dumps(message).encode()
    return _HEADER.pack(len(data)) + data


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    """Write to a non-blocking pipe, waiting for room until the deadline."""
    while data:
        if not _wait(fd, select.POLLOUT, deadline):
            raise TimeoutError
        data = data[os.write(fd, data):]


def _read_frame(fd: int, deadline: float) -> bytes:
    """One length-prefixed message. Raises TimeoutError, EOFError (the child closed the pipe), or
    ValueError (a length past _MAX_REPLY_BYTES)."""
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size, deadline))
    if size > _MAX_REPLY_BYTES:
        raise ValueError(f"{size} bytes announced")
    return _read_exactly(fd, size, deadline)


def _read_exactly(fd: int, size: int, deadline: float) -> bytes:
    chunks, remaining = [], size
    while remaining:
        if not _wait(fd, select.POLLIN, deadline):
            raise TimeoutError
        chunk = os.read(fd, remaining)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _wait(fd: int, event: int, deadline: float) -> bool:
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))


def _parse_reply(data: bytes, cell: int, statuses: frozenset[str]) -> dict:
    """The reply as a dict whose fields have the expected types; ValueError otherwise."""
    try:
        reply = json.loads(data)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(reply, dict) or reply.get("cell") != cell:
        raise ValueError(f"not a reply to cell {cell}")
    images = reply.get("images")
    if reply.get("status") not in statuses or not isinstance(reply.get("error"), str) \
            or not isinstance(images, list) or not all(_is_file_name(name) for name in images):
        raise ValueError("unexpected fields")
    return reply


def _is_file_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name


def _is_plain_file(path: Path) -> bool:
    """A regular file, not a symlink the child could point anywhere (it cannot create one, but the
    caller reads these paths)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
