"""The tests' fork server runs a script as a fresh interpreter would: same output, exit status and exit."""

import os
import textwrap

import pytest
from forked_cli import SERVER, run_python

SCRIPT = """
import atexit, os, sys, threading, time
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread ended", flush=True))).start()
print("args", sys.argv[1:], "env", os.environ.get("FORKED_CLI_TEST"), "cwd", os.getcwd(), "path0", sys.path[0] == os.path.dirname(os.path.abspath(sys.argv[0])))
print("parent", os.getppid(), file=sys.stderr)
end = sys.argv[1]
if end == "exit":
    sys.exit(3)
if end == "message":
    sys.exit("stopped: why")
if end == "error":
    raise ValueError("bad")
if end == "ctrl-c":
    raise KeyboardInterrupt
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(SCRIPT))
    return str(path)


@pytest.mark.parametrize("end, status", [("off-the-end", 0), ("exit", 3), ("message", 1), ("error", 1), ("ctrl-c", -2)])
def test_a_forked_run_ends_as_a_fresh_interpreter_does(script, monkeypatch, end, status):
    monkeypatch.setenv("COLUMNS", "123")  # read as a command runs: still forked
    forked, fresh = run_python(script, end), run_python(script, end, fresh=True)
    assert int(forked.stderr.split()[1]) == SERVER.process.pid and int(fresh.stderr.split()[1]) == os.getpid()
    assert forked.returncode == fresh.returncode == status
    assert forked.stdout == fresh.stdout and forked.stdout.endswith("thread ended\natexit ran\n")
    assert forked.stderr.splitlines()[1:] == fresh.stderr.splitlines()[1:]  # the message, or the traceback
    assert ("stopped: why" in forked.stderr) == (end == "message") and ("ValueError: bad" in forked.stderr) == (end == "error")


def test_an_environment_the_server_did_not_import_in_starts_a_fresh_interpreter(script, monkeypatch):
    monkeypatch.setenv("FORKED_CLI_TEST", "set")
    result = run_python(script, "exit")
    assert "env set" in result.stdout and int(result.stderr.split()[1]) == os.getpid()
