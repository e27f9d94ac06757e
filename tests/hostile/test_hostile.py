"""The hostile-input suite: each case of tests/hostile/ has its expected outcome
(a clear error, a correct result, or one clear warning), never silently wrong, never a crash.
`edgepasses.bench.hostile.run_hostile` runs the same cases in a worker process and counts them."""
import pytest

from edgepasses.bench.hostile import classify, load_cases

CASES = load_cases()
MIN_CASES = 154  # the cases the issue's hostile user tried


def _param(case):
    marks = [pytest.mark.xfail(strict=False, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_case(case):
    result = classify(case)
    assert result.verdict == result.expected, (
        f"{case.name} [{case.area}]: expected {case.expect.describe()}, got {result.verdict}: {result.detail}")


def test_the_suite_has_at_least_the_issues_cases():
    assert len(CASES) >= MIN_CASES, f"{len(CASES)} hostile cases, fewer than the {MIN_CASES} the suite is held to"
    assert len({c.name for c in CASES}) == len(CASES)
