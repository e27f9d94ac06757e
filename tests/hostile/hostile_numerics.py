"""Numerics: NaN and Inf inputs to fp32, int8, 2:4 and low-rank programs on the reference, OpenVINO and
TVM targets — eager gives NaN/Inf there, and so must they, except where docs/trust.md says they give
numbers (int8 activations clamp; OpenVINO's and TVM's ReLU maps NaN to 0), and there `verify=True`
must refuse the input — NaN weights, huge and all-zero inputs."""
from __future__ import annotations

import importlib.util

import torch

from hostile_common import (close, compile_run, convnet, eager_of, mlp, nonfinite_as_documented, nonfinite_as_eager,
                            sqnr_at_least, x_conv, x_mlp)

from edgepasses.bench.hostile import Case, clear_error, correct
from edgepasses.errors import NonFiniteInputError

# label: (pipeline, calibrated, lossy: finite outputs compared with the compressed graph's, not eager's)
PIPELINES = {
    "fp32": ("fold_bn", False, False),
    "int8": ("quantize", True, False),
    "int8 weight-only": ("quantize(weight_only=true)", False, False),
    "2:4": ("sparsify_24", False, True),
    "low-rank": ("lowrank(ratio=0.5,min_saving=0)", False, True),
}


def _poisoned(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x.view(x.shape[0], -1)[0 if value != value else 1, 3] = value  # NaN in row 0, +-Inf in row 1
    return x


def _run(model_fn, make_x, pipeline: str, calibrated: bool, target: str, value: float, verify: bool = False):
    def run():
        options = {"target": target, "pipeline": pipeline, "verify": verify}
        if calibrated:
            options["calibration"] = [(make_x(s),) for s in range(10, 14)]
        return compile_run(model_fn(), options, _poisoned(make_x(), value))
    return run


def _compressed(pipeline: str, x: torch.Tensor):
    """The compressed graph's outputs on `x` (what a lossy program must match where eager is finite)."""
    def reference():
        import edgepasses

        with torch.no_grad():
            return edgepasses.compress(mlp(), (x_mlp(),), pipeline)(x)
    return reference


def _nan_weights():
    model = mlp()
    with torch.no_grad():
        model[0].weight[3, 2] = float("nan")
    return model


def cases() -> list[Case]:
    targets = ["reference"] + [t for t in ("openvino", "tvm") if importlib.util.find_spec(t) is not None]
    cases = []
    for target in targets:
        for label, (pipeline, calibrated, lossy) in PIPELINES.items():
            if (target, label) not in {("openvino", "fp32"), ("openvino", "int8"), ("tvm", "fp32")} \
                    and target != "reference":
                continue  # OpenVINO and TVM compile slowly: a few programs of theirs only
            for name, value in (("NaN", float("nan")), ("+Inf", float("inf"))):
                x = _poisoned(x_mlp(), value)
                run = _run(mlp, x_mlp, pipeline, calibrated, target, value)
                if label == "int8" or (target != "reference" and name == "NaN"):  # numbers, as documented
                    cases += [Case(f"numerics {label} on {target}: {name} input", "numerics", run,
                                   correct(nonfinite_as_documented(mlp, (x,)))),
                              Case(f"numerics {label} on {target}: {name} input, verify=True", "numerics",
                                   _run(mlp, x_mlp, pipeline, calibrated, target, value, verify=True),
                                   clear_error(NonFiniteInputError, r"input 0 .*contains (NaN|Inf)"))]
                    continue
                reference = _compressed(pipeline, x) if lossy else None
                cases.append(Case(f"numerics {label} on {target}: {name} input", "numerics", run,
                                  correct(nonfinite_as_eager(mlp, (x,), reference=reference))))
    cases += [
        Case("numerics int8 conv on reference: NaN input", "numerics",
             _run(convnet, x_conv, "fold_bn,quantize", True, "reference", float("nan")),
             correct(nonfinite_as_documented(convnet, (_poisoned(x_conv(), float("nan")),)))),
        Case("numerics NaN weight on reference", "numerics",
             lambda: compile_run(_nan_weights(), {"target": "reference", "pipeline": "fold_bn"}, x_mlp()),
             correct(nonfinite_as_eager(_nan_weights, (x_mlp(),)))),
        Case("numerics huge finite inputs on reference", "numerics",
             lambda: compile_run(mlp(), {"target": "reference", "pipeline": "fold_bn"}, x_mlp() * 1e30),
             correct(lambda got: close(eager_of(mlp(), x_mlp() * 1e30), got, atol=0, rtol=1e-4))),
        Case("numerics all-zero input to an int8 program", "numerics",
             lambda: compile_run(mlp(), {"target": "reference", "pipeline": "quantize",
                                        "calibration": [(x_mlp(s),) for s in range(10, 14)]}, torch.zeros(2, 8)),
             correct(sqnr_at_least(mlp, (torch.zeros(2, 8),), 20.0))),
    ]
    return cases
