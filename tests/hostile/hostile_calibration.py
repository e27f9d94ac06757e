"""Calibration data: for every data-aware pass, batches of the wrong shape, dtype or arity, empty,
junk, NaN and Inf (in the first or a later batch, in either input of a two-input model), under
torch.compile and under compress(); and valid calibration, which must give what compress() gives."""
from __future__ import annotations

import torch
from torch import nn

from hostile_common import close, compile_run, ln_mlp, randn, x_ln

import edgepasses
from edgepasses.bench.hostile import Case, clear_error, correct
from edgepasses.errors import OptionError

# The data-aware passes, each as a pipeline that really uses the calibration data on ln_mlp.
DATA_AWARE = {
    "quantize": "quantize",
    "smooth": "smooth",
    "sparsify_24": "sparsify_24",
    "prune": "prune(ratio=0.25,criterion=activation)",
    "lowrank": "lowrank(rank=4,round_to=1,min_saving=0,data_aware=true)",
}


def _batches(n: int = 4) -> list[tuple]:
    return [(x_ln(10 + i),) for i in range(n)]


def _poisoned(value: float, index: int) -> list[tuple]:
    batches = _batches()
    x = batches[index][0].clone()
    x[1, 3] = value
    batches[index] = (x,)
    return batches


# (label, maker of the calibration list, regex of the error)
NONFINITE = [
    ("NaN in the first batch", lambda: _poisoned(float("nan"), 0), r"batch 0.*NaN"),
    ("Inf in a later batch", lambda: _poisoned(float("inf"), 2), r"batch 2.*Inf"),
    ("-Inf in the last batch", lambda: _poisoned(float("-inf"), 3), r"batch 3.*Inf"),
]
FORM = [
    ("a batch of the wrong shape", lambda: _batches(2) + [(randn(2, 17),)], r"batch 2.*\(2, 17\)"),
    ("a float64 batch", lambda: _batches(2) + [(randn(2, 16, dtype=torch.float64),)], r"batch 2.*float64"),
    ("a batch with two inputs", lambda: _batches(1) + [(x_ln(), x_ln())], r"batch 1.*2 input"),
    ("a string batch", lambda: ["abc"], r"batch 0"),
    ("empty", lambda: [], r"empty"),
]
# Under torch.compile the calibration set runs through the whole model first (each graph is calibrated
# on the inputs it really gets): a batch the model cannot take fails there, and must still be named.
def _compile(pipeline: str, calibration):
    return lambda: compile_run(ln_mlp(), {"target": "reference", "pipeline": pipeline,
                                          "calibration": calibration()}, x_ln())


def _compress(pipeline: str, calibration):
    return lambda: edgepasses.compress(ln_mlp(), (x_ln(),), pipeline, calibration=calibration())


def _same_as_compress(pipeline: str):
    """torch.compile with calibration gives what the compress() graph of the same pipeline gives."""
    def run():
        calibration = _batches()
        compiled = compile_run(ln_mlp(), {"target": "reference", "pipeline": pipeline, "calibration": calibration},
                               x_ln())
        with torch.no_grad():
            graph = edgepasses.compress(ln_mlp(), (x_ln(),), pipeline, calibration=calibration)(x_ln())
        return compiled, graph

    def check(result):
        compiled, graph = result
        assert torch.isfinite(compiled).all(), "non-finite outputs"
        close(graph, compiled, atol=2e-2 if "quantize" in pipeline else 1e-4, rtol=1e-2)
    return run, check


def _as_compress_with_tuples(got):
    """What compress() gives with the same batches written as tuples."""
    with torch.no_grad():
        graph = edgepasses.compress(ln_mlp(), (x_ln(),), "quantize", calibration=_batches())(x_ln())
    close(graph, got, atol=2e-2, rtol=1e-2)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def _two_inputs_poisoned(pipeline: str, position: int):
    def run():
        batches = [(x_ln(20 + i), x_ln(30 + i)) for i in range(3)]
        bad = list(batches[1])
        bad[position] = bad[position].clone()
        bad[position][0, 0] = float("nan")
        batches[1] = tuple(bad)
        return compile_run(TwoInputs().eval(), {"target": "reference", "pipeline": pipeline, "calibration": batches},
                           x_ln(), x_ln(2))
    return run


def cases() -> list[Case]:
    cases = []
    for name, pipeline in DATA_AWARE.items():
        # under torch.compile one check covers every graph before any pass runs: each kind once (quantize),
        # and NaN once per pass; under compress() each pass checks its own batches: NaN for each
        for label, make, pattern in NONFINITE if name == "quantize" else NONFINITE[:1]:
            cases.append(Case(f"calibration {name}: {label}", "calibration", _compile(pipeline, make),
                              clear_error(OptionError, pattern)))
        cases.append(Case(f"calibration {name} via compress: NaN in a later batch", "calibration",
                          _compress(pipeline, lambda: _poisoned(float("nan"), 1)),
                          clear_error(OptionError, r"batch 1.*NaN")))
        for label, make, pattern in FORM:
            cases.append(Case(f"calibration {name} via compress: {label}", "calibration", _compress(pipeline, make),
                              clear_error(OptionError, pattern)))
        run, check = _same_as_compress(pipeline)
        cases.append(Case(f"calibration {name}: valid batches give compress()'s result", "calibration", run,
                          correct(check)))
    for label, make, pattern in FORM:
        cases.append(Case(f"calibration quantize: {label}", "calibration", _compile("quantize", make),
                          clear_error(OptionError, pattern)))
    for position in (0, 1):
        cases.append(Case(f"calibration quantize: NaN in input {position} of a two-input model", "calibration",
                          _two_inputs_poisoned("quantize", position),
                          clear_error(OptionError, rf"batch 1, input {position}.*NaN")))
    cases += [
        Case("calibration quantize: lone tensors instead of tuples", "calibration",
             lambda: compile_run(ln_mlp(), {"target": "reference", "pipeline": "quantize",
                                            "calibration": [x_ln(10 + i) for i in range(4)]}, x_ln()),
             correct(_as_compress_with_tuples)),
        Case("calibration quantize: calibration missing", "calibration",
             lambda: compile_run(ln_mlp(), {"target": "reference", "pipeline": "quantize"}, x_ln()),
             clear_error(OptionError, r"needs calibration data")),
        # iterating a tensor gives its rows: each row is one batch (a lone tensor is one input)
        Case("calibration quantize: a tensor of stacked batches as the calibration set", "calibration",
             lambda: compile_run(ln_mlp(), {"target": "reference", "pipeline": "quantize",
                                            "calibration": torch.stack([b[0] for b in _batches()])}, x_ln()),
             correct(_as_compress_with_tuples)),
        Case("calibration quantize: a dict as the calibration set", "calibration",
             lambda: compile_run(ln_mlp(), {"target": "reference", "pipeline": "quantize",
                                            "calibration": {"x": x_ln()}}, x_ln()),
             clear_error(OptionError, r"calibration")),
        Case("calibration quantize: minmax with Inf", "calibration",
             _compile("quantize(calib=minmax)", lambda: _poisoned(float("inf"), 1)),
             clear_error(OptionError, r"batch 1.*Inf")),
        Case("calibration quantize: calibrated on a batch size other than the call's", "calibration",
             lambda: compile_run(ln_mlp(), {"target": "reference", "pipeline": "quantize",
                                            "calibration": [(randn(4, 16, seed=s),) for s in range(3)]}, x_ln()),
             clear_error(OptionError, r"calibration.*\(4, 16\)|\(4, 16\).*calibration")),
    ]
    return cases
