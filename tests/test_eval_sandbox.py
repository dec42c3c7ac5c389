"""The code-execution sandbox, with real subprocesses: every way a completion can end is classified,
and nothing it starts or writes outlives the run."""
from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import pytest

from internray.eval.sandbox import SandboxLimits, check_program, run_program

LIMITS = SandboxLimits(timeout_s=2, memory_mb=256)
ADD_PROMPT = 'def add(a, b):\n    """Add."""\n'
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


def _gone(pid: int) -> bool:
    """Dead or a zombie: the container's init may not reap orphans, but a zombie runs nothing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _can_unshare_network() -> bool:
    """Whether this host lets a child enter a new network namespace (root, or user namespaces)."""
    unshare = ctypes.CDLL(None, use_errno=True).unshare
    pid = os.fork()
    if pid == 0:
        ok = unshare(0x40000000) == 0 or unshare(0x10000000 | 0x40000000) == 0
        os._exit(0 if ok else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_canonical_solution_passes():
    r = check_program(ADD_PROMPT, "    return a + b\n", ADD_TEST, "add", LIMITS)
    assert (r.passed, r.status) == (True, "passed")


def test_wrong_solution_fails_with_the_assertion_in_detail():
    r = check_program(ADD_PROMPT, "    return a - b\n", ADD_TEST, "add", LIMITS)
    assert (r.passed, r.status) == (False, "failed")
    assert "AssertionError" in r.detail


@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(60)"])
def test_hang_is_killed_at_the_wall_clock(code):
    r = run_program(code, LIMITS)
    assert (r.passed, r.status) == (False, "timeout")
    assert LIMITS.timeout_s <= r.duration_s < LIMITS.timeout_s + 2


def test_cpu_limit_backs_up_the_wall_clock():
    r = run_program("while True: pass", SandboxLimits(timeout_s=4, memory_mb=256, cpu_s=1))
    assert r.status == "timeout" and r.detail == "CPU time limit exceeded"
    assert r.duration_s < 3


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"])
def test_memory_bomb_hits_the_address_space_limit(code):
    r = run_program(code, LIMITS)
    assert (r.passed, r.status) == (False, "memory")
    assert r.duration_s < 3


@pytest.mark.parametrize("code", [
    'import socket\nsocket.create_connection(("1.1.1.1", 53), timeout=1)',
    'import urllib.request\nurllib.request.urlopen("http://example.com", timeout=1)',
    'import socket\ntry:\n    socket.socket()\nexcept OSError:\n    pass\n',  # caught: still an attempt
])
def test_network_access_is_refused_and_reported(code):
    r = run_program(code, LIMITS)
    assert (r.passed, r.status) == (False, "network")


@pytest.mark.skipif(not _can_unshare_network(), reason="no network namespaces on this host")
def test_network_namespace_stops_code_that_goes_around_the_guard():
    assert run_program("import socket\nprint(socket.if_nameindex())", LIMITS).output.strip() == "[(1, 'lo')]"
    raw = 'import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(("1.1.1.1", 53))'
    assert run_program(raw, LIMITS).status == "network"


@pytest.mark.parametrize("code, name", [
    ('import os\nos.system("echo hi")', "os.system"),
    ('import subprocess\nsubprocess.run(["sleep", "60"])', "subprocess.Popen"),
    ("import os\nos.fork()", "os.fork"),
    ('import os, shutil\nos.mkdir("d")\nshutil.rmtree("d")', "shutil.rmtree"),
])
def test_process_and_destructive_calls_are_disabled(code, name):
    r = run_program(code, LIMITS)
    assert (r.passed, r.status) == (False, "failed")
    assert f"PermissionError: {name} is disabled in the sandbox" in r.detail
    assert "hi" not in r.output.splitlines()  # the shell never ran


def test_runs_in_a_fresh_directory_with_a_minimal_environment_that_is_removed_after():
    code = 'import os\nopen("junk.txt", "w").write("x")\nprint(os.getcwd())\nprint(sorted(os.environ))'
    r = run_program(code, LIMITS)
    assert r.passed
    cwd, env = r.output.splitlines()
    assert Path(cwd) != Path.cwd() and not Path(cwd).exists()
    assert set(eval(env)) <= {"PATH", "LANG", "LC_CTYPE"}  # Python may add LC_CTYPE when coercing the C locale


@pytest.mark.parametrize("tail", ["while True: pass", "pass"], ids=["on-timeout", "on-exit"])
def test_whole_process_group_is_killed(tail):
    # posix.fork goes around the guard (which is only a tripwire); the group kill still gets the child.
    code = f"import posix, time\npid = posix.fork()\nif pid == 0:\n    time.sleep(60)\nprint(pid, flush=True)\n{tail}\n"
    grandchild = int(run_program(code, LIMITS).output.split()[0])
    deadline = time.monotonic() + 2
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild)


def test_output_keeps_only_its_tail():
    r = run_program('print("a" * 100_000 + "END")', SandboxLimits(timeout_s=2, memory_mb=256, max_output_bytes=1000))
    assert r.passed and len(r.output) == 1000 and r.output.endswith("END\n")


def test_interpreter_that_cannot_start_is_an_error_not_a_failure():
    r = run_program("pass", SandboxLimits(timeout_s=2, memory_mb=1))  # too little to map libpython
    assert (r.passed, r.status) == (False, "error")
    assert r.detail
