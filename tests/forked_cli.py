"""The command-line scripts run as real processes, forked from one that has imported torch, transformers and the
pipeline once: each run has its own stdio, environment, exit status and interpreter exit, without the ~10 s of
imports a fresh interpreter repeats. A run whose environment differs from the server's in more than
RUN_TIME_VARIABLES is started as a fresh interpreter, as are tests of what a command does while it imports.

Run as a script, this file is the server: one request per line on stdin, the child's pid and then its exit status
on stdout.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_TIME_VARIABLES = {"COLUMNS", "PYTEST_CURRENT_TEST"}  # read as a command runs, not as it imports


def serve() -> None:
    import gc
    import runpy

    import datasets  # noqa: F401
    import typer  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import pipeline.cache  # noqa: F401
    import pipeline.cli  # noqa: F401
    import pipeline.evaluate  # noqa: F401
    import pipeline.features  # noqa: F401
    import pipeline.train  # noqa: F401

    gc.freeze()  # the imported objects stay out of every collection: a child does not copy their pages to scan them
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, runpy)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    os._exit(0)  # the tests ended; the imports need no teardown


def run_child(request: dict, runpy) -> None:
    """Becomes `python script args...` in the server's folder (the repository's) and the request's environment;
    never returns."""
    os.setpgid(0, 0)  # like a fresh process started by the test: Ctrl-C at the server's terminal is not its
    written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], written), (2, request["stderr"], written)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if request["argv"][0] == "-m":  # python -m module: sys.path[0] is the folder it runs in
            sys.argv, sys.path[0] = request["argv"][1:], os.getcwd()
            runpy.run_module(request["argv"][1], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[0] = request["argv"], str(Path(request["argv"][0]).resolve().parent)
            runpy.run_path(request["argv"][0], run_name="__main__")
        status = 0
    except SystemExit as stop:
        status = exit_status(stop.code)
    except BaseException as error:
        raised_in = error.__traceback__  # from the script's frame on, as a fresh interpreter shows it
        while raised_in is not None and raised_in.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
            raised_in = raised_in.tb_next
        sys.excepthook(type(error), error.with_traceback(raised_in), raised_in)
        status = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    exit_as_the_interpreter_does(status)


def exit_status(code) -> int:
    """The status Python exits with for SystemExit(code)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def exit_as_the_interpreter_does(status: int) -> None:
    """What Python does at exit that a user sees: it waits for non-daemon threads, runs the atexit functions, flushes
    stdio and exits (an unhandled Ctrl-C by SIGINT). Only the teardown of every module is left out: in a forked child
    it writes to every page the server's imports hold, which takes longer than the command."""
    import atexit

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if status == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


class ForkServer:
    """A server process started on first use; one run at a time."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.env = dict(os.environ)  # as the test session starts, before any test changes it
        self.lock = threading.Lock()

    def _start(self) -> None:
        self.process = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=self.env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the fork server did not start; see its stderr above")

    def forks(self, env: dict[str, str]) -> bool:
        """Whether a run in env can be forked from the server (started now if it is not yet)."""
        differing = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        if not differing <= RUN_TIME_VARIABLES:
            return False
        if self.process is None or self.process.poll() is not None:
            self._start()
        return True

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as scratch:  # the child's stdout and stderr
            return self._run(argv, env, timeout, Path(scratch) / "stdout", Path(scratch) / "stderr")

    def _run(self, argv: list[str], env: dict[str, str], timeout: float, stdout: Path, stderr: Path) -> subprocess.CompletedProcess:
        request = {"argv": argv, "env": env, "stdout": str(stdout), "stderr": str(stderr)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = int(self.process.stdout.readline().split()[1])
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):  # it ended as the time ran out
                os.killpg(pid, signal.SIGKILL)

        killer = threading.Timer(timeout, kill)
        killer.start()
        returncode = int(self.process.stdout.readline().split()[1])
        killer.cancel()
        if timed_out.is_set():
            raise subprocess.TimeoutExpired(argv, timeout, stdout.read_text(), stderr.read_text())
        return subprocess.CompletedProcess(["python", *argv], returncode, stdout.read_text(), stderr.read_text())


SERVER = ForkServer()


def run_python(*argv: str, env: dict[str, str] | None = None, timeout: float = 600,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """`python argv...` (a script or -m module) in the repository root, output captured as text; fresh: a new
    interpreter."""
    env = dict(os.environ if env is None else env)
    argv = list(argv)
    with SERVER.lock:
        if not fresh and SERVER.forks(env):
            return SERVER.run(argv, env, timeout)
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    serve()
