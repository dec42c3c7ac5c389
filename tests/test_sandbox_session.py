"""The persistent Python session, with real processes: each attack ends with a clear status and
error line, and the same session answers the next cell (after a restart where the process had to
die)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from internray.sandbox import SandboxLimits
from internray.sandbox_session import PythonSession

LIMITS = SandboxLimits(timeout_s=2, memory_mb=512)
SLOW_IMPORTS = SandboxLimits(timeout_s=20, memory_mb=1024)  # pandas + matplotlib, first font cache
LOST = "the session was restarted and its variables are lost"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def session(workdir: Path):
    with PythonSession(workdir, LIMITS) as session:
        yield session


def around_the_hook(code: str) -> str:
    """A cell that runs `code` in a second interpreter started with `_posixsubprocess.fork_exec`
    (Python 3.11's signature), which raises no audit event: only the kernel's layers guard it."""
    return ("import _posixsubprocess, os, sys\n"
            f"args = [sys.executable, '-c', {code!r}]\n"
            "pid = _posixsubprocess.fork_exec(args, [os.fsencode(sys.executable)], True, (), None, None,"
            " -1, -1, -1, -1, -1, -1, *os.pipe(), False, False, -1, None, None, None, -1, None, False)\n"
            "os.waitpid(pid, 0)\n")


def still_answers(session: PythonSession) -> None:
    r = session.run("1+1")
    assert (r.status, r.output, r.error) == ("ok", "2\n", "")


def test_variables_persist_and_the_last_expression_is_shown(session):
    assert session.run("x = 41\nprint('set')").output == "set\n"
    r = session.run("x + 1")
    assert (r.status, r.output, r.error, r.images) == ("ok", "42\n", "", [])
    assert session.run("None").output == ""  # like a notebook: None is not shown


def test_exception_is_an_error_with_a_traceback_of_the_cell(session):
    r = session.run("def f():\n    return 1 / 0\nf()")
    assert (r.status, r.error) == ("error", "ZeroDivisionError: division by zero")
    assert 'File "<cell 1>", line 2, in f' in r.output and "return 1 / 0" in r.output
    assert session.run("def f(:").error == "SyntaxError: invalid syntax"
    still_answers(session)


@pytest.mark.parametrize("code", ["open('/etc/passwd').read()", "import pathlib\npathlib.Path('/etc/passwd').read_text()"])
def test_reading_etc_passwd_is_denied(session, code):
    r = session.run(code)
    assert (r.status, r.error) == ("denied", "PermissionError: reading /etc/passwd is outside the sandbox")
    assert "root:" not in r.output
    still_answers(session)


def test_reading_a_file_outside_the_workdir_is_denied_even_around_the_hook(session, tmp_path):
    secret = tmp_path / "secret.txt"  # a sibling of the working directory
    secret.write_text("s3cret")
    r = session.run(f"open({str(secret)!r}).read()")
    assert (r.status, r.error) == ("denied", f"PermissionError: reading {secret} is outside the sandbox")
    r = session.run(around_the_hook(f"print(open({str(secret)!r}).read())"))  # Landlock's turn
    assert "PermissionError: [Errno 13] Permission denied" in r.output and "s3cret" not in r.output
    still_answers(session)


def test_writing_outside_the_workdir_is_denied_and_inside_allowed(session, workdir, tmp_path):
    outside = tmp_path / "out.txt"
    r = session.run(f"open({str(outside)!r}, 'w').write('x')")
    assert (r.status, r.error) == ("denied", f"PermissionError: writing {outside} is outside the sandbox")
    assert not outside.exists()
    assert session.run("open('notes.txt', 'w').write('kept')").status == "ok"
    assert (workdir / "notes.txt").read_text() == "kept"
    still_answers(session)


@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket()",
    "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
])
def test_network_is_refused(session, code):
    r = session.run(code)
    assert r.status == "network" and "network access is disabled in the sandbox" in r.error
    still_answers(session)


def test_infinite_loop_times_out_and_the_session_restarts_empty(session):
    session.run("x = 1")
    r = session.run("while True:\n    pass")
    assert (r.status, r.error) == ("timeout", f"killed after 2 s wall clock; {LOST}")
    assert LIMITS.timeout_s <= r.duration_s < LIMITS.timeout_s + 1
    still_answers(session)
    assert session.run("x").error == "NameError: name 'x' is not defined"


def test_cpu_limit_applies_per_cell(workdir):
    burn = "import time\nend = time.process_time() + 0.7\nwhile time.process_time() < end:\n    pass"
    with PythonSession(workdir, SandboxLimits(timeout_s=5, memory_mb=512, cpu_s=1)) as session:
        assert [session.run(burn).status for _ in range(2)] == ["ok", "ok"]  # 1.4 s in all, 0.7 s per cell
        r = session.run("while True:\n    pass")
        assert (r.status, r.error) == ("timeout", f"CPU time limit exceeded; {LOST}") and r.duration_s < 3
        still_answers(session)


@pytest.mark.parametrize("code, error", [
    ("import os\nwhile True:\n    os.fork()", "os.fork is disabled in the sandbox"),
    ("import posix\nwhile True:\n    posix.fork()", "os.fork is disabled in the sandbox"),
    ("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()", "ctypes.dlsym is disabled in the sandbox"),
    ("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", "subprocess.Popen is disabled in the sandbox"),
])
def test_fork_bomb_is_refused(session, code, error):
    r = session.run(code)
    assert (r.status, r.error) == ("denied", f"PermissionError: {error}")
    still_answers(session)


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC binds the sandbox only when its caller is root")
def test_fork_bomb_around_the_hook_hits_the_process_limit_and_dies_with_the_session(workdir):
    bomb = ("import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
            "            import time; time.sleep(60)\n        n += 1\nexcept OSError as e:\n    print('forks', n, e)\n")
    with PythonSession(workdir, LIMITS) as session:
        r = session.run(around_the_hook(bomb))
        assert r.status == "ok" and "Resource temporarily unavailable" in r.output
        assert int(r.output.split("forks ")[1].split()[0]) < LIMITS.max_processes
        still_answers(session)
        uid = int(session.run("import os\nos.getuid()").output)
    assert not [pid for pid in _pids() if _real_uid(pid) == uid]  # closing killed all of them


@pytest.mark.parametrize("code", ["x = bytearray(10**11)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"])
def test_memory_bomb_ends_as_memory_and_the_session_survives(session, code):
    session.run("kept = 'yes'")
    r = session.run(code)
    assert r.status == "memory" and r.error.startswith("MemoryError")
    assert "the memory limit is 512 MB" in r.error
    still_answers(session)
    assert session.run("x = None\nkept").output == "'yes'\n"  # memory given back, variables kept


@pytest.mark.parametrize("code", [
    "while True:\n    print('spam' * 100)",
    "print('x' * 10**8)",
    "for i in range(10**6):\n    try:\n        print(i)\n    except Exception:\n        pass",  # cannot swallow it
])
def test_huge_output_stops_at_the_limit_without_waiting_for_the_timeout(session, code):
    r = session.run(code)
    assert (r.status, r.error.split(":")[0]) == ("output", "output limit exceeded")
    assert r.duration_s < 1 and len(r.output) <= LIMITS.max_output_bytes
    still_answers(session)


def test_huge_output_caught_by_the_cell_is_still_reported(session):
    r = session.run("for i in range(10**5):\n    try:\n        print(i)\n    except BaseException:\n        pass")
    assert (r.status, r.error.split(":")[0]) == ("output", "output limit exceeded")
    still_answers(session)


def test_matplotlib_chart_comes_back_as_a_png(workdir):
    with PythonSession(workdir, SLOW_IMPORTS) as session:
        r = session.run("import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nplt.title('sales');")
        assert (r.status, r.error, r.images) == ("ok", "", ["figure-1-1.png"])
        assert (workdir / "figure-1-1.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert session.run("plt.get_fignums()").output == "[]\n"  # saved figures are closed
        still_answers(session)


def test_pandas_reads_a_csv_the_caller_put_in_the_workdir(workdir):
    workdir.mkdir()
    (workdir / "sales.csv").write_text("city,amount\nParis,3\nLyon,4\nParis,5\n")
    with PythonSession(workdir, SLOW_IMPORTS) as session:
        r = session.run("import pandas as pd\ndf = pd.read_csv('sales.csv')\ndf.groupby('city')['amount'].sum().to_dict()")
        assert (r.status, r.output) == ("ok", "{'Lyon': 4, 'Paris': 8}\n"), r.error
        still_answers(session)


def test_forged_reply_crashes_the_interpreter_not_the_parent(session):
    session.run("x = 1")
    garbage = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\xff' * 16)\n    except OSError:\n        pass"
    r = session.run(garbage)
    assert r.status == "crashed" and r.error.startswith("the interpreter sent a malformed reply")
    assert r.error.endswith(LOST)
    still_answers(session)


def test_exiting_interpreter_is_crashed_and_restarted(session):
    r = session.run("import os\nos._exit(3)")
    assert (r.status, r.error) == ("crashed", f"the interpreter exited with code 3; {LOST}")
    still_answers(session)
    assert session.run("raise SystemExit(1)").status == "error"  # caught: the session goes on
    still_answers(session)


def test_close_kills_the_interpreter_and_is_idempotent(workdir):
    session = PythonSession(workdir, LIMITS)
    still_answers(session)
    process = session._interpreter.process
    session.close()
    session.close()
    assert process.returncode is not None
    still_answers(session)  # a later cell starts a fresh interpreter
    session.close()


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _real_uid(pid: int) -> int | None:
    """The real uid of a live process, None when it is gone or a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return None if fields["State"].split()[0] == "Z" else int(fields["Uid"].split()[0])
