"""The CLI, run as a user runs it: bad paths, bad numbers, unknown names. Each must exit non-zero with
one clear error line and no traceback.

Every command runs in a process of its own, forked from a server process that imported the CLI once
(a fresh `edgepasses` process imports torch: 4-8 s on two loaded cores, times 20 commands). The
child does what the console script does, `sys.exit(main())` with the arguments, and an exception
that escapes is printed as the interpreter prints it: exit codes, stderr, tracebacks, crashes
and hangs are the real ones. One case runs the installed console script itself."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from hostile_common import scratch

from edgepasses.bench.hostile import Case, Crash, clear_error, correct

TIMEOUT = 120


class CliError(Exception):
    """The CLI exited non-zero without a traceback: its message is what it printed after any usage lines."""


class CliTraceback(Exception):
    """The CLI printed a Python traceback."""


def command() -> list[str]:
    """The console script pyproject.toml installs (`edgepasses = edgepasses.cli:main`), or the same call."""
    script = Path(sys.executable).with_name("edgepasses")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from edgepasses.cli import main; sys.exit(main())"]


def _error_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for i, line in enumerate(lines):  # skip argparse's usage block
        if "error" in line.lower() and not line.startswith(("usage:", " ")):
            return lines[i:]
    return lines


# The fork server: reads {"argv", "cwd", "timeout"} lines, answers {"rc", "stdout", "stderr"} lines.
SERVER = r"""
import json, os, signal, sys, tempfile, time, traceback
from edgepasses.cli import main

answer = os.fdopen(os.dup(1), "w", buffering=1)
for line in sys.stdin:
    request = json.loads(line)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the console script: sys.exit(main()) with the user's arguments
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        os.chdir(request["cwd"])
        sys.argv = ["edgepasses", *request["argv"]]
        try:
            code = main()
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = 1
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    deadline = time.monotonic() + request["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = "timeout"
            break
        time.sleep(0.01)
    out.seek(0); err.seek(0)
    answer.write(json.dumps({"rc": rc, "stdout": out.read().decode(errors="replace"),
                             "stderr": err.read().decode(errors="replace")}) + "\n")
"""


@functools.cache
def _server():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tempfile.gettempdir())
    return proc, threading.Lock()


def _forked(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc, lock = _server()
    with lock:
        try:
            proc.stdin.write(json.dumps({"argv": args, "cwd": str(scratch("cwd")), "timeout": timeout}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
    if not line:
        raise Crash(f"the CLI server process died (exit {proc.poll()}): cannot import edgepasses.cli?")
    reply = json.loads(line)
    if reply["rc"] == "timeout":
        raise subprocess.TimeoutExpired(["edgepasses", *args], timeout)
    return subprocess.CompletedProcess(["edgepasses", *args], reply["rc"], reply["stdout"], reply["stderr"])


def _console_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command() + args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=scratch("cwd"))


def cli(*args: str, timeout: float = TIMEOUT, script: bool = False) -> subprocess.CompletedProcess:
    """`edgepasses *args`: its CompletedProcess when it exits 0, else CliError (one message, usage lines
    dropped), CliTraceback, Crash (killed by a signal) or TimeoutExpired."""
    proc = (_console_script if script else _forked)(list(args), timeout)
    if proc.returncode < 0:
        raise Crash(f"edgepasses {' '.join(args)} was killed by signal {-proc.returncode}")
    if "Traceback (most recent call last)" in proc.stderr:
        last = proc.stderr.strip().splitlines()[-1]
        raise CliTraceback(f"exit {proc.returncode} with a traceback, ending: {last}")
    if proc.returncode != 0:
        lines = _error_lines(proc.stderr) or [f"(nothing on stderr; exit {proc.returncode})"]
        raise CliError("\n".join(lines))
    return proc


def _run(*args):
    return lambda: cli(*(a() if callable(a) else a for a in args))


def _empty_dir() -> str:
    return str(scratch("empty"))


def _run_dir(search_json: str):
    def make() -> str:
        folder = scratch("run")
        (folder / "search.json").write_text(search_json)
        return str(folder)
    return make


def _out_dir() -> str:
    return str(scratch("search") / "out")


# (label, arguments, regex of the error line)
BAD = [
    ("report of a path that does not exist", ("report", "/nope/run"), r"/nope/run"),
    ("report of an empty directory", ("report", _empty_dir), r"search run directory"),
    ("report of an unknown model", ("report", "--model", "nope"), r"unknown model nope"),
    ("report with --batches 0", ("report", "--model", "resnet18", "--batches", "0"), r"--batches"),
    ("bench with --rounds -1", ("bench", "--model", "resnet18", "--rounds", "-1"), r"--rounds"),
    ("bench with --warmup -1", ("bench", "--model", "resnet18", "--warmup", "-1"), r"--warmup"),
    ("bench with --batch 0", ("bench", "--model", "resnet18", "--batch", "0"), r"--batch"),
    ("bench of an unknown model", ("bench", "--model", "nope"), r"unknown model\(s\) nope"),
    ("bench with an unknown pass", ("bench", "--model", "resnet18", "--pipeline", "nope"), r"unknown pass 'nope'"),
    ("bench with a pipeline syntax error", ("bench", "--model", "resnet18", "--pipeline", "prune(ratio=0.3"),
     r"syntax error"),
    ("bench with an unknown target", ("bench", "--model", "resnet18", "--target", "nope"), r"unknown target 'nope'"),
    ("bench kernels with a zero shape", ("bench", "kernels", "--shape", "0,1,1"), r"--shape"),
    ("bench kernels with an unknown op", ("bench", "kernels", "--op", "nope"), r"unknown op\(s\) nope"),
    ("bench coverage of an unknown model", ("bench", "coverage", "--model", "nope"), r"unknown model\(s\) nope"),
    ("bench accuracy with an unknown pass", ("bench", "accuracy", "--pipeline", "nope"), r"unknown pass 'nope'"),
    ("compare of an unknown model", ("compare", "--model", "nope", "--pipeline", "quantize"), r"unknown model"),
    ("onnx of an unknown model", ("onnx", "--model", "nope"), r"unknown model"),
    ("prune-check with ratio 2", ("prune-check", "--ratio", "2"), r"ratio"),
    ("search of an unknown model", ("search", "--model", "nope", "--out", _out_dir), r"unknown model nope"),
    ("search with --trials -1", ("search", "--model", "digits_cnn", "--trials", "-1", "--out", _out_dir), r"--trials"),
    ("an unknown command", ("nonsense",), r"invalid choice: 'nonsense'"),
]
BAD += [
    ("report of a run directory with a corrupt search.json", ("report", _run_dir("{")), r"search\.json"),
    ("report of a run directory whose search.json lacks its keys", ("report", _run_dir('{"model": "digits_cnn"}')),
     r"search\.json"),
]


def cases() -> list[Case]:
    cases = [Case(f"cli {label}", "cli", _run(*args), clear_error(CliError, pattern), timeout=TIMEOUT + 30)
             for label, args, pattern in BAD]
    cases.append(Case("cli the installed console script: report of a path that does not exist", "cli",
                      lambda: cli("report", "/nope/run", script=True), clear_error(CliError, r"/nope/run"),
                      timeout=TIMEOUT + 30))
    cases.append(Case("cli passes lists the passes", "cli", _run("passes"),
                      correct(lambda proc: all(name in proc.stdout for name in ("quantize", "sparsify_24", "lowrank"))),
                      timeout=TIMEOUT + 30))
    return cases
