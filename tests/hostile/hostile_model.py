"""Models: state (buffer mutation, weights replaced or edited after compiling), graph breaks, other
shapes, non-tensor and aliased outputs, in-place ops, grad and training mode, dtypes, and models
compress() cannot capture."""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from hostile_common import (close, compile_run, convnet, eager_of, matches_eager, mlp, randn, sqnr_at_least, sqnr_db,
                            x_conv, x_mlp)

import edgepasses
from edgepasses.bench.hostile import Case, clear_error, correct, warning
from edgepasses.errors import (ExportFailedError, GradientsNeededError, OptionError, StaleWeightsError,
                               UnsupportedOpError)


class Counter(nn.Module):
    """`self.cnt += 1` then a Linear: eager gives 1, 2, 3 (on top of the Linear)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(4, 4)
        self.register_buffer("cnt", torch.zeros(()))

    def forward(self, x):
        self.cnt += 1
        return self.l(x) + self.cnt


def _counts(target: str, strict: bool = False):
    def run():
        model, x = Counter().eval(), torch.zeros(1, 4)
        outs = compile_run(model, {"target": target, "strict": strict}, x, calls=3)
        return [round((o - eager_of(model.l, x)).mean().item(), 4) for o in outs], model.cnt.item()
    return run


def _counts_right(result):
    counts, buffer = result
    assert counts == [1.0, 2.0, 3.0], f"counts {counts}, eager 1, 2, 3"
    assert buffer == 3, f"the model's buffer is {buffer} after 3 calls, eager 3"


def _replaced(how: str):
    def run():
        model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.ones(1, 4)
        compiled = torch.compile(model, backend="edge", options={"target": "reference"})
        with torch.no_grad():
            compiled(x)
            if how == "parameter":
                model[0].weight = nn.Parameter(torch.zeros(4, 4))
            else:
                model[0] = nn.Linear(4, 4)
            return compiled(x)
    return run


def _edited_in_place(pipeline: str, calibration: bool = False):
    """README: weights are frozen, the compiled graph does not see later in-place changes. Either the
    old model's outputs (frozen) or the edited model's (seen) are consistent; a mix of both is not."""
    def run():
        model, x = mlp(), x_mlp()
        options = {"target": "reference", "pipeline": pipeline}
        if calibration:
            options["calibration"] = [(x_mlp(s),) for s in range(10, 14)]
        compiled = torch.compile(model, backend="edge", options=options)
        with torch.no_grad():
            old = model(x)
            compiled(x)
            model[0].weight.mul_(2)
            model[2].bias.add_(1)
            return old, model(x), compiled(x)
    return run


def _old_or_new(floor_db: float):
    def check(result):
        old, new, got = result
        db_old, db_new = sqnr_db(old, got), sqnr_db(new, got)
        assert max(db_old, db_new) >= floor_db, (f"neither the frozen weights' outputs ({db_old:.1f} dB) nor the "
                                                 f"edited weights' ({db_new:.1f} dB)")
    return check


class Breaks(nn.Module):
    """A graph break in the middle."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(8, 8)

    def forward(self, x):
        y = self.l(x)
        if y.sum() > 0:
            return y * 2
        return y - 1


class Outputs(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.l, self.kind = nn.Linear(8, 4), kind

    def forward(self, x):
        y = self.l(x)
        if self.kind == "tuple":
            return y, 3, "label", None
        if self.kind == "dict":
            return {"logits": y, "hidden": x * 2}
        if self.kind == "alias":
            return y, x
        if self.kind == "view":
            return y.view(-1), y.t()
        return y


def _outputs_check(kind: str):
    def check(got):
        expected = eager_of(Outputs(kind).eval(), x_mlp())
        if kind == "tuple":
            close(expected[0], got[0])
            assert got[1:] == expected[1:], f"non-tensor outputs {got[1:]!r}, eager {expected[1:]!r}"
        elif kind == "dict":
            assert set(got) == set(expected), f"keys {sorted(got)}"
            for key in expected:
                close(expected[key], got[key])
        else:
            for e, g in zip(expected, got):
                close(e, g)
    return check


class AddsToInput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(8, 8)

    def forward(self, x):
        x.add_(1)
        return torch.relu_(self.l(x))


def _input_mutation():
    x = x_mlp()
    out = compile_run(AddsToInput().eval(), {"target": "reference"}, x)
    return x, out


def _input_mutation_check(result):
    x, out = result
    eager_x = x_mlp()
    expected = eager_of(AddsToInput().eval(), eager_x)
    close(eager_x, x)
    close(expected, out)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l, self.scale = nn.Linear(8, 4), 1.0

    def forward(self, x):
        return self.l(x) * self.scale


def _python_attribute_changed():
    """The recompile after the first change holds the new value as a constant; a second change reaches
    that program as an input, which must not run with the stale constant."""
    model = Scaled().eval()
    compiled = torch.compile(model, backend="edge", options={"target": "reference"})
    with torch.no_grad():
        compiled(x_mlp())
        model.scale = 3.0
        close(model(x_mlp()), compiled(x_mlp()))
        model.scale = 5.0
        return compiled(x_mlp())


def _new_shapes(**compile_kwargs):
    """(compiled, eager) outputs at three batch sizes: the default dynamic=None compiles a dynamic graph
    at the second, dynamic=True at the first."""
    def run():
        model = mlp()
        compiled = torch.compile(model, backend="edge", options={"target": "reference"}, **compile_kwargs)
        with torch.no_grad():
            return [(compiled(x), model(x)) for x in (x_mlp(), randn(3, 8), randn(5, 8))]
    return run


def _all_close(pairs) -> None:
    for got, expected in pairs:
        close(expected, got)


def _with_grad(options, input_grad: bool):
    def run():
        model, x = mlp(), x_mlp().requires_grad_(input_grad)
        compiled = torch.compile(model, backend="edge", options={"target": "reference", **options})
        return compiled(x)  # grad mode; the parameters require grad
    return run


def _train_mode_bn():
    """BatchNorm in train mode (under no_grad): batch statistics, and running stats updated."""
    model = convnet().train()
    out = compile_run(model, {"target": "reference"}, x_conv())
    return out, model[1].running_mean.clone()


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.l = nn.Embedding(20, 8), nn.Linear(8, 4)

    def forward(self, ids):
        return self.l(self.e(ids))


class Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(8, 4)

    def forward(self, x, *, shift=None, scale: float = 1.0):
        y = self.l(x) * scale
        return y if shift is None else y + shift


def _ids():
    return torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))


def _lowered_other_shape():
    gm = edgepasses.compress(mlp(), (x_mlp(),), "fold_bn")
    program = edgepasses.lower(gm, (x_mlp(),), target="reference")
    with torch.no_grad():
        return program(randn(3, 8))


def _model_of_dtype(dtype):
    def make():
        return mlp().to(dtype)
    return make


def _float64():
    return compile_run(_model_of_dtype(torch.float64)(), {"target": "reference"}, x_mlp().double())


def _bf16():
    return compile_run(_model_of_dtype(torch.bfloat16)(), {"target": "reference"}, x_mlp().bfloat16())


class NoParams(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 2 + x.mean(-1, keepdim=True)


class Identity(nn.Module):
    def forward(self, x):
        return x


def _compiled_twice():
    model = mlp()
    a = compile_run(model, {"target": "reference", "pipeline": "fold_bn"}, x_mlp())
    torch._dynamo.reset()
    b = compile_run(model, {"target": "reference", "pipeline": "lowrank(ratio=0.5,min_saving=0)"}, x_mlp())
    return a, b


def _compiled_twice_check(result):
    a, b = result
    close(eager_of(mlp(), x_mlp()), a)
    assert b.shape == a.shape and torch.isfinite(b).all()


def cases() -> list[Case]:
    openvino = importlib.util.find_spec("openvino") is not None
    cases = [
        Case("model buffer mutation on reference", "model", _counts("reference"), correct(_counts_right)),
        Case("model parameter reassigned after compile", "model", _replaced("parameter"),
             clear_error(StaleWeightsError, r"0\.weight replaced")),
        Case("model submodule replaced after compile", "model", _replaced("module"),
             clear_error(StaleWeightsError, r"0\.weight, 0\.bias replaced")),
        Case("model weights edited in place after compile: old or new outputs, not a mix", "model",
             _edited_in_place("fold_bn"), correct(_old_or_new(60.0))),
        Case("model weights edited in place after an int8 compile: old or new outputs, not a mix", "model",
             _edited_in_place("quantize", calibration=True), correct(_old_or_new(20.0))),
        Case("model graph break matches eager", "model",
             lambda: compile_run(Breaks().eval(), {"target": "reference"}, x_mlp()),
             correct(matches_eager(lambda: Breaks().eval(), x_mlp()))),
        Case("model graph break with quantize calibration", "model",
             lambda: compile_run(Breaks().eval(), {"target": "reference", "pipeline": "quantize",
                                                  "calibration": [(x_mlp(s),) for s in range(10, 14)]}, x_mlp()),
             correct(sqnr_at_least(lambda: Breaks().eval(), (x_mlp(),), 20.0))),
        Case("model data-dependent branch under torch.compile", "model",
             lambda: compile_run(DataDependent().eval(), {"target": "reference"}, x_mlp()),
             correct(matches_eager(lambda: DataDependent().eval(), x_mlp()))),
        # docs/dynamic-shapes.md: symbolic dims stay symbolic through the canonical form to the target
        Case("model new batch sizes under the default torch.compile", "model", _new_shapes(), correct(_all_close)),
        Case("model torch.compile(dynamic=True)", "model", _new_shapes(dynamic=True), correct(_all_close)),
        Case("model tuple output with int, str and None", "model",
             lambda: compile_run(Outputs("tuple").eval(), {"target": "reference"}, x_mlp()),
             correct(_outputs_check("tuple"))),
        Case("model dict output", "model", lambda: compile_run(Outputs("dict").eval(), {"target": "reference"}, x_mlp()),
             correct(_outputs_check("dict"))),
        Case("model output aliasing the input", "model",
             lambda: compile_run(Outputs("alias").eval(), {"target": "reference"}, x_mlp()),
             correct(_outputs_check("alias"))),
        Case("model outputs that are views", "model",
             lambda: compile_run(Outputs("view").eval(), {"target": "openvino" if openvino else "reference"}, x_mlp()),
             correct(_outputs_check("view"))),
        Case("model identity (returns its input)", "model",
             lambda: compile_run(Identity(), {"target": "reference"}, x_mlp()), correct(matches_eager(Identity, x_mlp()))),
        Case("model in-place ops on the input and an activation", "model", _input_mutation,
             correct(_input_mutation_check)),
        # Dynamo makes a changed Python number an input of the graph; the backend compiles numbers as constants
        Case("model Python attribute changed after compile", "model", _python_attribute_changed,
             clear_error(OptionError, r"self\.scale")),
        Case("model input requiring grad under grad mode", "model", _with_grad({}, True),
             clear_error(GradientsNeededError, r"require grad")),
        Case("model input requiring grad with allow_training", "model", _with_grad({"allow_training": True}, True),
             warning(r"allow_training", lambda got: close(eager_of(mlp(), x_mlp()), got.detach()))),
        # inference only: the frozen weights give eager's values (the output has no grad_fn)
        Case("model parameters requiring grad under grad mode: eager's values", "model", _with_grad({}, False),
             correct(lambda got: close(eager_of(mlp(), x_mlp()), got.detach()))),
        Case("model BatchNorm in train mode", "model", _train_mode_bn,
             clear_error(GradientsNeededError, r"training mode.*model\.eval\(\)")),
        Case("model integer input (Embedding)", "model",
             lambda: compile_run(Embed().eval(), {"target": "reference", "pipeline": "fold_bn"}, _ids()),
             correct(matches_eager(lambda: Embed().eval(), _ids()))),
        Case("model integer input with quantize", "model",
             lambda: compile_run(Embed().eval(), {"target": "reference", "pipeline": "quantize",
                                                 "calibration": [(_ids(),)]}, _ids()),
             correct(sqnr_at_least(lambda: Embed().eval(), (_ids(),), 15.0))),
        Case("model keyword arguments", "model",
             lambda: torch.compile(Keyword().eval(), backend="edge", options={"target": "reference"})(
                 x_mlp(), shift=torch.ones(4), scale=2.0).detach(),
             correct(lambda got: close(Keyword().eval()(x_mlp(), shift=torch.ones(4), scale=2.0).detach(), got))),
        Case("model float64 weights and inputs", "model", _float64,
             correct(lambda got: close(eager_of(mlp().double(), x_mlp().double()), got))),
        Case("model bfloat16 weights and inputs", "model", _bf16,
             correct(lambda got: close(eager_of(mlp().bfloat16(), x_mlp().bfloat16()), got, atol=2e-2, rtol=2e-2))),
        Case("model without parameters", "model", lambda: compile_run(NoParams(), {"target": "reference"}, x_mlp()),
             correct(matches_eager(NoParams, x_mlp()))),
        Case("model empty batch", "model", lambda: compile_run(mlp(), {"target": "reference"}, randn(0, 8)),
             correct(matches_eager(mlp, randn(0, 8)))),
        Case("model compiled twice with different pipelines", "model", _compiled_twice, correct(_compiled_twice_check)),
        Case("model compress: data-dependent control flow", "model",
             lambda: edgepasses.compress(DataDependent().eval(), (x_mlp(),), "fold_bn"),
             clear_error(ExportFailedError, r"(?i)data.dependent|control flow|torch.cond")),
        Case("model compress: example inputs of the wrong shape", "model",
             lambda: edgepasses.compress(mlp(), (randn(2, 5),), "fold_bn"),
             clear_error(ExportFailedError, r"(?i)shape|size")),
        Case("model compress: a bare tensor as example inputs", "model",
             lambda: edgepasses.compress(mlp(), x_mlp(), "fold_bn"),
             clear_error((OptionError, ExportFailedError), r"(?i)example.inputs|tuple")),
        Case("model compress: not a module", "model", lambda: edgepasses.compress(lambda x: x * 2, (x_mlp(),), "fold_bn"),
             clear_error((OptionError, ExportFailedError), r"(?i)module")),
        Case("model lower: unknown target", "model",
             lambda: edgepasses.lower(edgepasses.compress(mlp(), (x_mlp(),), "fold_bn"), (x_mlp(),), target="nope"),
             clear_error(OptionError, r"unknown target 'nope'")),
        Case("model lowered reference program called with another shape", "model", _lowered_other_shape,
             clear_error((OptionError, ValueError, RuntimeError), r"(?s)(?=.*\b2, 8\b)(?=.*\b3, 8\b)")),
    ]
    if openvino:
        cases += [
            Case("model buffer mutation on openvino", "model", _counts("openvino"),
                 warning(r"writes buffer 'cnt' in place", _counts_right)),
            Case("model buffer mutation on openvino under strict", "model", _counts("openvino", strict=True),
                 clear_error(UnsupportedOpError, r"buffer 'cnt'")),
        ]
    if importlib.util.find_spec("tvm") is not None:
        cases.append(Case("model buffer mutation on tvm", "model", _counts("tvm"),
                          warning(r"writes buffer 'cnt' in place", _counts_right)))
    return cases
