"""The hostile-input suite: small cases a hostile user tries against the options, the
calibration data, models, artifacts, the compile cache, numerics, the kernels and the CLI, each
with the outcome it must have, and the classifier that says what really happened.

    from edgepasses.bench.hostile import run_hostile
    summary = run_hostile()          # every case, each in a worker process; prints one line per case
    print(summary.to_markdown())     # cases, clear errors, correct, silently wrong, unclear, crashes

The cases live in `tests/hostile/` (a source checkout; `pytest tests/hostile` runs the same cases
in-process). A case is a name, an area, a callable doing the hostile thing, and what must happen:

- `clear_error(types, regex)`: it raises one of `types` (inside Dynamo's `BackendCompilerFailed`
  the first cause counts) whose message names what is wrong (`regex`) in one line of at most
  `MAX_LINE` characters (plus a trailing "; valid ...: a, b, c" list of the choices), followed by at
  most two more lines of at most `MAX_LINE` characters: where (the user's source line) and what to do
  (Dynamo's own appended hint paragraph is ignored);
- `correct(check)`: it returns, and `check(result)` holds (matches eager, the expected value);
- `warning(regex, check)`: it returns, `check(result)` holds, and exactly one WARNING record of the
  `edgepasses` loggers was logged, naming it.

What happened is one verdict: "clear error", "correct", "silently wrong" (returned, but wrong; or
accepted an input it had to refuse; or stayed silent where it had to warn), "unclear error" (an
exception that is not the expected clear one), "crash/hang" (the worker process died or the case
ran past its timeout). A case passes when its verdict is the expected one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

AREAS = ("options", "calibration", "model", "artifact", "cache", "numerics", "kernel", "cli")
VERDICTS = ("clear error", "correct", "silently wrong", "unclear error", "crash/hang")
MAX_LINE = 320       # a clear error's first line, at most ("about 300"; not counting a trailing list of what is valid)
MAX_LISTING = 1000   # and with that list
MAX_EXTRA_LINES = 2  # after the first line: the user's source line, what to do
DEFAULT_TIMEOUT = 120.0
_DYNAMO_HINTS = ("Set TORCHDYNAMO_VERBOSE=1", "For even more developer context", "from user code:")


# ---- what a case expects ------------------------------------------------------------------------

@dataclass(frozen=True)
class ClearError:
    types: tuple[type, ...]
    pattern: str
    kind = "clear error"

    def describe(self) -> str:
        return f"clear {'/'.join(t.__name__ for t in self.types)} matching {self.pattern!r}"


@dataclass(frozen=True)
class Correct:
    check: Callable[[Any], Any] | None = None
    kind = "correct"

    def describe(self) -> str:
        return "correct"


@dataclass(frozen=True)
class Warned:
    pattern: str
    check: Callable[[Any], Any] | None = None
    kind = "correct"

    def describe(self) -> str:
        return f"correct with one WARNING matching {self.pattern!r}"


def clear_error(types: type | tuple[type, ...], pattern: str = "") -> ClearError:
    return ClearError(types if isinstance(types, tuple) else (types,), pattern)


def correct(check: Callable[[Any], Any] | None = None) -> Correct:
    """`check(result)` fails by raising (an AssertionError) or returning False."""
    return Correct(check)


def warning(pattern: str, check: Callable[[Any], Any] | None = None) -> Warned:
    return Warned(pattern, check)


@dataclass(frozen=True)
class Case:
    name: str
    area: str
    run: Callable[[], Any]
    expect: ClearError | Correct | Warned
    xfail: str | None = None          # why this case is known to fail now (pytest marks it xfail, not strict)
    timeout: float = DEFAULT_TIMEOUT  # seconds, in the runner's worker process

    def __post_init__(self):
        if self.area not in AREAS:
            raise ValueError(f"case {self.name!r}: area {self.area!r} is not one of {', '.join(AREAS)}")


class Crash(Exception):
    """Raised by a case that ran something in a subprocess which died or hung."""


class _Hung(BaseException):
    """A case ran past its timeout (a BaseException, so that no `except Exception` on the way swallows it)."""


@contextlib.contextmanager
def _alarm(seconds: float):
    """Interrupt the case after `seconds` (SIGALRM; only in the main thread of a POSIX process). A hang in
    C code outlives it until control returns to Python: the runner's worker process is killed then."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def hung(signum, frame):
        raise _Hung(f"no result after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class SilentlyWrong(Exception):
    """Raised by a case that found harm whatever the outcome: a payload ran, a file outside an
    artifact was read, a previous artifact was lost."""


# ---- the classifier -------------------------------------------------------------------------------

@dataclass
class CaseResult:
    name: str
    area: str
    expected: str        # "clear error" | "correct"
    verdict: str         # one of VERDICTS
    detail: str = ""
    seconds: float = 0.0
    xfail: str | None = None

    @property
    def as_expected(self) -> bool:
        return self.verdict == self.expected


def first_cause(exc: BaseException) -> BaseException:
    """The exception the user's error really is: Dynamo's BackendCompilerFailed unwrapped."""
    from torch._dynamo.exc import BackendCompilerFailed

    seen = set()
    while isinstance(exc, BackendCompilerFailed) and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def message_lines(exc: BaseException) -> list[str]:
    """The message's non-empty lines, without the hint paragraphs Dynamo appends to every error."""
    lines = [line.rstrip() for line in str(exc).strip().splitlines()]
    for i, line in enumerate(lines):
        if line.startswith(_DYNAMO_HINTS):
            lines = lines[:i]
            break
    return [line for line in lines if line.strip()]


def is_clear(exc: BaseException) -> tuple[bool, str]:
    """(clear?, why not): a first line of at most MAX_LINE characters (not counting a trailing list of
    the valid choices), then at most MAX_EXTRA_LINES lines (where, what to do) of at most MAX_LINE."""
    lines = message_lines(exc)
    if not lines:
        return False, "an empty message"
    if len(lines) > 1 + MAX_EXTRA_LINES:
        return False, f"{len(lines)} lines"
    head = re.split(r";\s*valid\b", lines[0], maxsplit=1)[0]  # "...; valid options: a, b, c" lists choices
    if len(head) > MAX_LINE or len(lines[0]) > MAX_LISTING:
        return False, f"a first line of {len(lines[0])} characters"
    longest = max((len(line) for line in lines[1:]), default=0)
    if longest > MAX_LINE:
        return False, f"a line of {longest} characters after the first"
    return True, ""


def _describe(exc: BaseException) -> str:
    lines = message_lines(exc) or [""]
    return f"{type(exc).__name__}: {lines[0][:240]}" + (f" (+{len(lines) - 1} lines)" if len(lines) > 1 else "")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _check(check: Callable[[Any], Any] | None, value: Any) -> str | None:
    """None when `check(value)` holds, else why not."""
    if check is None:
        return None
    try:
        ok = check(value)
    except AssertionError as exc:
        return f"wrong: {str(exc).strip().splitlines()[0][:240] if str(exc).strip() else 'check failed'}"
    return None if ok is None or ok else "wrong: check returned False"


def classify(case: Case) -> CaseResult:
    """Run `case` in this process and say what happened."""
    import torch

    torch._dynamo.reset()
    records = _Records()
    logger = logging.getLogger("edgepasses")
    logger.addHandler(records)
    start = time.perf_counter()
    result = CaseResult(case.name, case.area, case.expect.kind, "", xfail=case.xfail)
    try:
        with _alarm(case.timeout):
            value = case.run()
    except _Hung as exc:
        result.verdict, result.detail = "crash/hang", str(exc)
    except Crash as exc:
        result.verdict, result.detail = "crash/hang", str(exc)[:400]
    except SilentlyWrong as exc:
        result.verdict, result.detail = "silently wrong", str(exc)[:400]
    except subprocess.TimeoutExpired as exc:
        result.verdict, result.detail = "crash/hang", f"timed out after {exc.timeout} s"
    except Exception as raised:  # noqa: BLE001 - classifying any failure is the point
        result.verdict, result.detail = _classify_error(case.expect, first_cause(raised))
    else:
        result.verdict, result.detail = _classify_value(case.expect, value, records.records)
    finally:
        logger.removeHandler(records)
        result.seconds = time.perf_counter() - start
        torch._dynamo.reset()
    return result


def _classify_error(expect, exc: BaseException) -> tuple[str, str]:
    if isinstance(expect, ClearError):
        if not isinstance(exc, expect.types):
            return "unclear error", f"{_describe(exc)}; expected {expect.describe()}"
        clear, why = is_clear(exc)
        if not clear:
            return "unclear error", f"{_describe(exc)}: {why}"
        text = "\n".join(message_lines(exc))
        if not re.search(expect.pattern, text):
            return "unclear error", f"{_describe(exc)}: does not match {expect.pattern!r}"
        return "clear error", _describe(exc)
    return "unclear error", _describe(exc)


def _classify_value(expect, value: Any, records: list[logging.LogRecord]) -> tuple[str, str]:
    warnings = [r for r in records if r.name.startswith("edgepasses")]
    if isinstance(expect, ClearError):
        return "silently wrong", f"no error: accepted (expected {expect.describe()})"
    wrong = _check(expect.check, value)
    if wrong:
        return "silently wrong", wrong
    if isinstance(expect, Warned):
        naming = [r for r in warnings if re.search(expect.pattern, r.getMessage())]
        if not naming:
            got = "; ".join(r.getMessage().splitlines()[0][:120] for r in warnings) or "none"
            return "silently wrong", f"no WARNING matching {expect.pattern!r} (warnings: {got})"
        if len(warnings) != 1:
            return "unclear error", f"{len(warnings)} WARNING records, one expected"
        return "correct", "warned: " + naming[0].getMessage().splitlines()[0][:200]
    return "correct", f"{len(warnings)} warning(s)" if warnings else ""


# ---- the cases --------------------------------------------------------------------------------------

def suite_dir() -> Path:
    """tests/hostile of the source checkout this module belongs to."""
    here = Path(__file__).resolve().parent          # bench/ (an editable install maps edgepasses.bench here)
    folder = here.parent / "tests" / "hostile"
    if not (folder / "hostile_cases.py").is_file():
        raise FileNotFoundError(f"the hostile suite runs from a source checkout: {folder} has no hostile_cases.py "
                                "(install edgepasses editable, pip install -e .)")
    return folder


def load_cases(areas: Iterable[str] | None = None) -> list[Case]:
    """Every case of tests/hostile, in a fixed order (names unique), optionally of some areas only."""
    folder = str(suite_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    cases = importlib.import_module("hostile_cases").all_cases()
    names = Counter(c.name for c in cases)
    twice = [n for n, k in names.items() if k > 1]
    if twice:
        raise ValueError(f"hostile case names must be unique; repeated: {', '.join(twice)}")
    if areas is not None:
        wanted = set(areas)
        unknown = wanted - set(AREAS)
        if unknown:
            raise ValueError(f"unknown area(s) {', '.join(sorted(unknown))}; areas: {', '.join(AREAS)}")
        cases = [c for c in cases if c.area in wanted]
    return cases


# ---- the summary ------------------------------------------------------------------------------------

@dataclass
class HostileSummary:
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, verdict: str) -> int:
        return sum(r.verdict == verdict for r in self.results)

    @property
    def cases(self) -> int:
        return len(self.results)

    @property
    def failures(self) -> list[CaseResult]:
        """Cases whose verdict is not the expected one."""
        return [r for r in self.results if not r.as_expected]

    @property
    def ok(self) -> bool:
        """No case silently wrong, none crashed, and every case had its expected outcome."""
        return not self.failures

    def counts(self) -> dict[str, int]:
        return {"cases": self.cases, **{v: self.count(v) for v in VERDICTS}, "not as expected": len(self.failures)}

    def headline(self) -> str:
        c = self.counts()
        return (f"{c['cases']} cases: {c['clear error']} clear errors, {c['correct']} correct, "
                f"{c['silently wrong']} silently wrong, {c['unclear error']} unclear errors, "
                f"{c['crash/hang']} crashes/hangs ({c['not as expected']} not as expected, {self.seconds:.0f} s)")

    def __str__(self) -> str:
        return self.headline()

    def to_markdown(self) -> str:
        lines = ["# Hostile-input suite", "", self.headline(), "",
                 "| area | cases | expect clear error | expect correct | " + " | ".join(VERDICTS) + " |",
                 "|---|---:|---:|---:|" + "---:|" * len(VERDICTS)]
        for area in AREAS + ("all",):
            rows = [r for r in self.results if area in ("all", r.area)]
            if not rows:
                continue
            verdicts = Counter(r.verdict for r in rows)
            expected = Counter(r.expected for r in rows)
            name = f"**{area}**" if area == "all" else area
            lines.append(f"| {name} | {len(rows)} | {expected['clear error']} | {expected['correct']} | "
                         + " | ".join(str(verdicts[v]) for v in VERDICTS) + " |")
        if self.failures:
            lines += ["", "## Not as expected", "", "| case | area | expected | verdict | detail | known |",
                      "|---|---|---|---|---|---|"]
            for r in self.failures:
                lines.append(f"| {r.name} | {r.area} | {r.expected} | {r.verdict} | {_cell(r.detail)} | "
                             f"{_cell(r.xfail or '')} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({"counts": self.counts(), "seconds": round(self.seconds, 1),
                           "results": [dataclasses.asdict(r) for r in self.results]}, indent=2)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


# ---- the runner ---------------------------------------------------------------------------------------

def run_hostile(progress: Callable[[str], None] | None = print, *, areas: Iterable[str] | None = None,
                isolate: bool = True) -> HostileSummary:
    """Run the hostile suite and return its summary (`.to_markdown()`, `.headline()`, `.ok`).

    `progress` hears one line per case. `isolate=True` runs the cases in a worker process, so that
    a case which kills the process or hangs past its timeout is a "crash/hang" and the rest go on
    in a fresh worker; `isolate=False` runs them here (no crash or hang detection)."""
    progress = progress or (lambda line: None)
    cases = load_cases(areas)
    start = time.perf_counter()
    summary = HostileSummary()
    results = _run_isolated(cases, progress) if isolate else _run_here(cases, progress)
    summary.results = results
    summary.seconds = time.perf_counter() - start
    progress(summary.headline())
    return summary


def _report(progress, index: int, total: int, result: CaseResult) -> None:
    mark = "ok  " if result.as_expected else ("XFAIL" if result.xfail else "FAIL")
    progress(f"[{index:3d}/{total}] {mark} {result.area:<11} {result.name}: {result.verdict}"
             + (f" ({result.detail})" if result.detail and not result.as_expected else ""))


def _run_here(cases: list[Case], progress) -> list[CaseResult]:
    results = []
    for i, case in enumerate(cases, start=1):
        results.append(classify(case))
        _report(progress, i, len(cases), results[-1])
    return results


def _run_isolated(cases: list[Case], progress) -> list[CaseResult]:
    by_name = {c.name: c for c in cases}
    pending = [c.name for c in cases]
    results: list[CaseResult] = []
    while pending:
        done = _worker(pending, by_name, lambda r: (results.append(r), _report(progress, len(results), len(cases), r)))
        pending = pending[done:]
    return results


def _worker(names: list[str], by_name: dict[str, Case], emit: Callable[[CaseResult], Any]) -> int:
    """Run `names` in one worker process until it finishes or one case crashes or hangs; returns how
    many cases have a result (the crashed or hung one included)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edgepasses.bench.hostile", "--worker", *names],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
        done, current, started = 0, None, time.monotonic()
        try:
            while done < len(names):
                case = by_name[names[done]]
                timeout = (case.timeout if current else case.timeout + 60) - (time.monotonic() - started)
                try:
                    line = lines.get(timeout=max(timeout, 0.1))
                except queue.Empty:
                    proc.kill()
                    emit(CaseResult(case.name, case.area, case.expect.kind, "crash/hang",
                                    f"no result after {case.timeout:.0f} s", case.timeout, case.xfail))
                    return done + 1
                if line is None:  # the worker died
                    rc = proc.wait()
                    log.seek(0)
                    tail = " / ".join(log.read().strip().splitlines()[-3:])[:300]
                    emit(CaseResult(case.name, case.area, case.expect.kind, "crash/hang",
                                    f"worker exited with {rc} during the case: {tail}",
                                    time.monotonic() - started, case.xfail))
                    return done + 1
                kind, _, payload = line.partition(" ")
                if kind == "start":
                    current, started = payload.strip(), time.monotonic()
                elif kind == "result":
                    emit(CaseResult(**json.loads(payload)))
                    done, current, started = done + 1, None, time.monotonic()
            return done
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _worker_main(names: list[str]) -> int:
    """In the worker: results on the real stdout, everything the cases print on stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    by_name = {c.name: c for c in load_cases()}
    for name in names:
        out.write(f"start {name}\n")
        result = classify(by_name[name])
        out.write("result " + json.dumps(dataclasses.asdict(result)) + "\n")
    out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    summary = run_hostile(lambda line: print(line, file=sys.stderr, flush=True), areas=argv or None)
    print(summary.to_markdown())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    # Run as the module the cases import (`python -m` loads this file as __main__, a second copy whose
    # ClearError/Correct classes would not be the cases' own).
    from edgepasses.bench import hostile

    sys.exit(hostile.main())
