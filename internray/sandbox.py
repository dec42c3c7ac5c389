"""Confined Python processes for untrusted code: one-shot programs for pass@k scoring (the eval
stage) and, through `internray.sandbox_session`, persistent interpreter sessions for agents.

Why: generated code is untrusted. A model can emit an infinite loop, allocate without bound, fill
the disk, call out to the network, read secrets or shell out and delete things -- by accident far
more often than by malice, but an evaluation runs hundreds of thousands of programs on shared
workers and an agent runs whatever a conversation asks for. Every sandboxed interpreter is a fresh
`python -I -B` (no PYTHON* variables, no user site-packages, no bytecode writes) with a minimal
environment, stdin from /dev/null and a working directory of its own, inside these layers, the
kernel-enforced ones first. Each says what it does NOT cover.

1. Landlock (Linux >= 5.13). Before the interpreter starts, the child restricts itself to: read
   and execute the Python installation (executable, stdlib, site-packages, libpython), the system
   libraries (/usr/lib, /lib*), the loader cache, time-zone data and the caller's `readable`
   paths; read and write, but not execute and not create symlinks, in its working directory;
   read and write /dev/null. Everything else, /etc/passwd included, fails with PermissionError.
   With ABI >= 4 every TCP bind and connect is refused too; with ABI >= 6 it cannot signal, or
   reach the abstract unix sockets of, processes outside the sandbox. Not covered: metadata
   (stat and path lookup work everywhere, so it can learn which files exist), mapping a readable
   file as code (a native extension written to the working directory can be imported), UDP.
   Without Landlock (older kernel, or disabled) a warning is logged once and files are guarded
   only by the uid's permissions and the audit hook.
2. A new, empty network namespace (for root, or where unprivileged user namespaces are allowed):
   only a loopback interface, so code that goes around the audit hook reaches nothing. Not
   covered: hosts that allow neither.
3. An identity of its own when the caller is root: the child switches to uid and gid
   2_000_000_000 + its pid (unique among running sandboxes) with RLIMIT_NPROC, which root is
   exempt from, so a fork bomb ends at `max_processes` per sandbox; the working directory is
   chowned to it. It keeps one capability, CAP_DAC_READ_SEARCH, because an interpreter or working
   directory below a root-only directory (/root/.pyenv, pytest's tmp_path) must stay reachable.
   Not covered: without Landlock that capability lets it read every file, as root could; for a
   non-root caller nothing changes and processes are bounded only by the wall clock and the kill
   (RLIMIT_NPROC would count the caller's own processes).
4. Resource limits: RLIMIT_AS (a memory bomb gets MemoryError rather than swap or the OOM
   killer), RLIMIT_CPU (busy loops, should the wall-clock kill be missed), RLIMIT_FSIZE (no file,
   stdout or stderr beyond 10 MB), RLIMIT_CORE 0. Not covered: disk use by many files.
5. Its own session and process group, SIGKILLed as a whole at the wall clock and after exit, and
   (as root) every process still running with its uid, which catches one that left the group
   with setsid(). Not covered: for a non-root caller, processes that left the group.
6. A Python audit hook (`sys.addaudithook`, which cannot be removed): the tripwire that turns
   attempts into clear PermissionErrors before the kernel is asked -- opening a file outside the
   readable set, writing, changing or deleting outside the working directory, symlinks, any
   socket, fork/exec/spawn/system/Popen/kill, and ctypes beyond `import ctypes` (which pandas
   needs): loading a library, looking up a symbol (so libc's fork, system or kill are out of
   reach by name), reading memory. Not covered: what raises no audit event -- a ctypes function
   pointer at a raw address (`ctypes.memmove` is one, so memory can be written and the hook
   itself undone), a second interpreter started with `_posixsubprocess.fork_exec` -- and native
   code generally. Layers 1-5 confine those. It is a tripwire, not a boundary.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import resource
import signal
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

log = logging.getLogger(__name__)

NETWORK_MARKER = "__SANDBOX_NETWORK__"
"""Written to stderr by the audit hook of a one-shot program right before it refuses a socket."""

_NETWORK_SIGNS = (NETWORK_MARKER, "Network is unreachable", "Temporary failure in name resolution")
"""Stderr text that means the program tried the network: the hook's marker, or what a raw socket
gets inside the empty network namespace when code went around the hook."""

_FILE_SIZE_LIMIT = 10 * 2**20
_DETAIL_LINES = 5
_SANDBOX_UID_BASE = 2_000_000_000
_KILL_SWEEPS = 20
_SYSTEM_READABLE = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/usr/share/zoneinfo")
"""What the interpreter and numpy/pandas/matplotlib need outside Python's own files: shared
libraries and their loader (/lib* link into /usr/lib on merged-/usr systems), the loader's cache,
and time zones for pandas. Found by running their imports and a plot under Landlock."""

_LIBC = ctypes.CDLL(None, use_errno=True)
"""Resolved here, in the parent: loading a library after fork (in preexec_fn) is not safe."""
_LIBC.syscall.restype = ctypes.c_long
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 47, 2
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on x86_64 and arm64.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_MAKE_CHAR, _FS_MAKE_BLOCK, _FS_MAKE_SYM = 1 << 6, 1 << 11, 1 << 12
_FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 14, 1 << 15
_FS_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
"""The only rights a rule on a file, not a directory, may carry."""
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


GUARD_PRELUDE = r'''
import json, os, sys


def _install_guard(workdir, readable, network_marker):
    """Layer 6 of internray.sandbox: an audit hook that refuses, with a PermissionError naming the
    problem, what the kernel layers refuse less legibly or not at all. A refusal carries
    `.sandbox` = "network" or "denied" so that a session can report it as such."""
    realpath, fsdecode, fspath, write = os.path.realpath, os.fsdecode, os.fspath, os.write
    readable = (workdir, *readable)
    writable = (workdir, "/dev/null")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    # Events that change the filesystem, with the positions of their path arguments.
    changes = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
               "os.chown": (0,), "os.link": (0, 1), "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,)}
    disabled = {"os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.kill",
                "os.killpg", "subprocess.Popen", "os.symlink"}

    def refuse(message, kind="denied"):
        error = PermissionError(message)
        error.sandbox = kind
        raise error

    def check(path, roots, verb):
        if path is None or isinstance(path, int):
            return  # an open file descriptor, or the default "."
        full = realpath(fsdecode(fspath(path)))
        if not any(full == root or full.startswith(root + "/") for root in roots):
            refuse(f"{verb} {full} is outside the sandbox")

    def hook(event, args):
        if event == "open":
            path, _, flags = args
            if flags & write_flags:
                check(path, writable, "writing")
            else:
                check(path, readable, "reading")
        elif event in changes:
            for index in changes[event]:
                check(args[index], writable, "changing")
        elif event in ("os.listdir", "os.scandir"):
            check(args[0], readable, "listing")
        elif event.startswith("socket."):
            if network_marker:
                write(2, network_marker)
            refuse("network access is disabled in the sandbox", "network")
        elif event == "ctypes.dlopen" and args[0] is None:
            pass  # `import ctypes` opens the interpreter itself, and numpy imports ctypes
        elif event in disabled or event.startswith("ctypes."):
            refuse(f"{event} is disabled in the sandbox")

    sys.addaudithook(hook)
'''
"""Child-side source shared by one-shot programs and sessions: defines `_install_guard`. Child
code is plain source passed with -c, not imported, because the child may read only Python's own
files and the package may not be installed where they are."""

_ONE_SHOT_PRELUDE = GUARD_PRELUDE + r'''
_config = json.loads(sys.argv[1])
_install_guard(_config["workdir"], _config["readable"], (_config["network_marker"] + "\n").encode())
# Tell the parent the interpreter came up and the guard is in place, so a program that never ran
# is reported as "error", not "failed". Closed here: the program cannot hold or forge it.
os.write(_config["started_fd"], b"1")
os.close(_config["started_fd"])
sys.argv[:] = [_config["program"]]
import runpy
runpy.run_path(_config["program"], run_name="__main__")
'''
"""The program runs from its own file via runpy, so its tracebacks keep their own line numbers and
it gets a clean `__main__` module."""
_PROGRAM = "program.py"


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    """Wall clock: for a program from start to kill, for a session per cell."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS); virtual memory, so leave room above the real need."""
    cpu_s: int | None = None
    """CPU-time limit per program or cell; default ceil(timeout_s) + 1, a backstop for the wall clock."""
    max_output_bytes: int = 64_000
    """How much of stdout + stderr is kept (the tail); a session's cell stops printing past it."""
    max_processes: int = 64
    """RLIMIT_NPROC, processes and threads together, when the caller is root (layer 3)."""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str
    """One of: passed; failed (nonzero exit, exception, refused access); timeout (wall clock or CPU
    limit); memory (MemoryError, or killed the way RLIMIT_AS kills); network (attempted network
    access); error (the interpreter could not start or set up, so the program never ran)."""
    detail: str
    """The last lines of stderr, or a one-line reason."""
    duration_s: float
    output: str = ""
    """The tail of stdout followed by stderr, at most `max_output_bytes`, for debugging."""


def check_program(prompt: str, completion: str, test: str, entry_point: str,
                  limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run a HumanEval-style problem: the completion passes if `check(entry_point)` returns."""
    return run_program(prompt + completion + "\n\n" + test + f"\n\ncheck({entry_point})\n", limits)


def run_program(code: str, limits: SandboxLimits = SandboxLimits(), readable: Sequence[Path] = ()) -> SandboxResult:
    """Run `code` in a fresh, confined subprocess and classify how it ended; `readable` adds
    paths (files or directories) the program may read besides Python's own."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="internray-sandbox-", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        # Output goes to files outside the working directory, not pipes: RLIMIT_FSIZE bounds them,
        # and a chatty program can neither fill the caller's memory nor block on a full pipe.
        Path(workdir, _PROGRAM).write_text(code, encoding="utf-8")
        started_r, started_w = os.pipe()
        config = {"started_fd": started_w, "network_marker": NETWORK_MARKER, "program": _PROGRAM}
        try:
            proc = start_sandboxed(_ONE_SHOT_PRELUDE, config, Path(workdir), limits, readable, stdout=stdout,
                                   stderr=stderr, pass_fds=(started_w,), cpu_s=cpu_backstop(limits))
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
            kill_sandboxed(proc)
        duration = time.monotonic() - start
        started = _was_written(started_r)
        out, err = _read(stdout), _read(stderr)
    status, detail = _classify(proc.returncode, err, started, timed_out, limits)
    output = (out + err)[-limits.max_output_bytes:].decode("utf-8", errors="replace")
    return SandboxResult(status == "passed", status, detail, duration, output)


def start_sandboxed(prelude: str, config: dict, workdir: Path, limits: SandboxLimits, readable: Sequence[Path], *,
                    stdout: IO[bytes] | int, stderr: IO[bytes] | int, pass_fds: tuple[int, ...],
                    cpu_s: int | None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -I -B -c prelude CONFIG` inside every layer of this module, with `workdir` as
    its working directory. CONFIG is `config` plus "workdir" and "readable" (the real paths the
    audit hook allows), as JSON in sys.argv[1]; `prelude` must call `_install_guard` with them
    before it runs anything untrusted. `cpu_s` None leaves CPU time to the prelude (a session
    arms it per cell). Raises OSError or SubprocessError if the process cannot be started."""
    workdir = Path(os.path.realpath(workdir))
    roots = readable_roots(readable)
    argv = [sys.executable, "-I", "-B", "-c", prelude,
            json.dumps({**config, "workdir": str(workdir), "readable": roots})]
    abi = landlock_abi()
    ruleset = _landlock_ruleset(abi, str(workdir), roots) if abi else None
    try:
        return subprocess.Popen(
            argv, cwd=workdir, env={**_minimal_env(), **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=stderr, pass_fds=pass_fds, start_new_session=True,
            preexec_fn=_child_setup(limits, cpu_s, ruleset))
    finally:
        if ruleset is not None:
            os.close(ruleset)


def kill_sandboxed(proc: subprocess.Popen) -> None:
    """SIGKILL everything a sandbox started (layer 5), then reap it. The uid sweep comes before the
    wait: until the child is reaped its pid, and so its uid, cannot be given to another sandbox."""
    _kill_group(proc.pid)
    if os.geteuid() == 0:
        _kill_user(_SANDBOX_UID_BASE + proc.pid)
    proc.wait()


def cpu_backstop(limits: SandboxLimits) -> int:
    return limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1


def killed_by_limit(returncode: int) -> tuple[str, str] | None:
    """(status, detail) when a process died the way the CPU or memory limit kills, else None."""
    if returncode == -signal.SIGXCPU:
        return "timeout", "CPU time limit exceeded"
    if returncode in (-signal.SIGKILL, -signal.SIGSEGV):
        # Besides the kernel's OOM killer, this is how allocations that cannot raise MemoryError
        # (C extensions, the interpreter's own stack) end at RLIMIT_AS.
        return "memory", f"killed by {signal_name(-returncode)} (likely out of memory)"
    return None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name
        return f"signal {number}"


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where it has none (then a warning, once)."""
    try:
        return _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    except OSError as exc:  # ENOSYS: kernel too old; EOPNOTSUPP: built in but disabled
        log.warning("Landlock is unavailable (%s): sandboxed code can read every file its uid can; "
                    "only the audit hook refuses paths outside the sandbox", exc.strerror)
        return 0


def readable_roots(extra: Sequence[Path] = ()) -> list[str]:
    """The real paths a sandbox may read and execute (layer 1): Python's own files (the executable,
    the venv marker, the stdlib, site-packages, libpython's directory), the system paths in
    `_SYSTEM_READABLE`, and `extra`; each once, missing ones dropped."""
    paths = sysconfig.get_paths()
    python = [sys.executable, os.path.join(sys.prefix, "pyvenv.cfg"), sysconfig.get_config_var("LIBDIR"),
              *(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")), *site.getsitepackages()]
    candidates = [p for p in (*python, *_SYSTEM_READABLE, *map(str, extra)) if p]
    return [p for p in dict.fromkeys(map(os.path.realpath, candidates)) if os.path.exists(p)]


def _minimal_env() -> dict[str, str]:
    """PATH and LANG only, plus single-threaded BLAS/OpenMP pools: a pool sized to the machine
    would run into RLIMIT_NPROC, and one sandbox should not take every core."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _child_setup(limits: SandboxLimits, cpu_s: int | None, ruleset: int | None) -> Callable[[], None]:
    """The preexec_fn: runs in the forked child before exec, so everything binds only the sandbox.
    The order matters: namespaces and the identity need root, Landlock needs no_new_privs, and the
    address-space limit comes last so that the setup itself is not squeezed by it."""
    memory = limits.memory_mb * 2**20
    as_root = os.geteuid() == 0

    def setup() -> None:
        _enter_empty_network_namespace()
        _lower(resource.RLIMIT_CORE, 0)
        _lower(resource.RLIMIT_FSIZE, _FILE_SIZE_LIMIT)
        if cpu_s is not None:
            _lower(resource.RLIMIT_CPU, cpu_s, hard=cpu_s + 1)  # SIGXCPU at the soft limit, SIGKILL at the hard
        if as_root:
            _become_sandbox_user(limits.max_processes)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        if ruleset is not None:
            _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
        _lower(resource.RLIMIT_AS, memory)

    return setup


def _enter_empty_network_namespace() -> None:
    """Root may create a network namespace directly; anyone else needs a user namespace first.
    If neither is allowed the sandbox keeps the host network, behind the other layers."""
    if _LIBC.unshare(_CLONE_NEWNET) != 0:
        _LIBC.unshare(_CLONE_NEWUSER | _CLONE_NEWNET)


def _become_sandbox_user(max_processes: int) -> None:
    """Layer 3, in the child while it is still root (cwd is already the working directory)."""
    uid = _SANDBOX_UID_BASE + os.getpid()
    _chown_tree(".", uid)
    _lower(resource.RLIMIT_NPROC, max_processes)
    _prctl(_PR_SET_KEEPCAPS, 1)  # keep the permitted capabilities through setresuid, to keep one of them
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _keep_only_capability(_CAP_DAC_READ_SEARCH)


def _chown_tree(top: str, uid: int) -> None:
    """Hand the working directory over, symlinks themselves rather than their targets."""
    os.chown(top, uid, uid)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def _keep_only_capability(cap: int) -> None:
    """Reduce every capability set to `cap` and make it ambient, so it survives exec as a non-root user."""
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = 1 << cap
    if _LIBC.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        _raise_errno("capset")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap)


def _landlock_ruleset(abi: int, workdir: str, readable: Sequence[str]) -> int:
    """A ruleset fd with layer 1's rules, built in the parent (where errors are readable); the
    child enforces it with landlock_restrict_self. Every right this ABI knows is handled, so
    whatever no rule allows is refused."""
    handled = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1
    attr = _RulesetAttr(handled, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    try:
        for path in readable:
            _landlock_allow(ruleset, path, _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR)
        _landlock_allow(ruleset, "/dev/null", _FS_READ_FILE | _FS_WRITE_FILE)
        _landlock_allow(ruleset, workdir, handled & ~(_FS_EXECUTE | _FS_MAKE_CHAR | _FS_MAKE_BLOCK | _FS_MAKE_SYM))
    except BaseException:
        os.close(ruleset)
        raise
    return ruleset


def _landlock_allow(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FS_FILE_RIGHTS
        _syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH,
                 ctypes.byref(_PathBeneathAttr(access, fd)), 0)
    finally:
        os.close(fd)


def _syscall(number: int, *args: object) -> int:
    """libc's syscall(2) with ints widened to long, as its variadic arguments are read."""
    result = _LIBC.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if result < 0:
        _raise_errno(f"syscall {number}")
    return result


def _prctl(option: int, *args: int) -> None:
    padded = [ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:4]]
    if _LIBC.prctl(ctypes.c_int(option), *padded) != 0:
        _raise_errno(f"prctl {option}")


def _raise_errno(what: str) -> None:
    errno = ctypes.get_errno()
    raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _lower(which: int, soft: int, hard: int | None = None) -> None:
    """Set a limit, never above the current hard limit (raising it would fail for non-root)."""
    ceiling = resource.getrlimit(which)[1]
    values = (soft, soft if hard is None else hard)
    if ceiling != resource.RLIM_INFINITY:
        values = (min(values[0], ceiling), min(values[1], ceiling))
    resource.setrlimit(which, values)


def _kill_group(pgid: int) -> None:
    """SIGKILL everything left in the sandbox's process group (it may already be gone)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_user(uid: int) -> None:
    """SIGKILL every live process whose real uid is `uid`, sweeping again while some are found (a
    fork bomb can race one sweep; RLIMIT_NPROC keeps each sweep short)."""
    for _ in range(_KILL_SWEEPS):
        pids = _live_pids_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _live_pids_of(uid: int) -> list[int]:
    """Processes running as `uid`, zombies (already dead) left out."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] != "Z":
            pids.append(int(entry.name))
    return pids


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
    if "MemoryError" in text:
        return "memory", tail
    if (verdict := killed_by_limit(returncode)) is not None:
        return verdict
    if returncode < 0:
        return "failed", f"killed by {signal_name(-returncode)}"
    return "failed", tail or f"exit code {returncode}"
