"""Every error one clear line, as early as possible: options refused when they are
parsed (before any graph compiles), dynamic shapes, programs called with other shapes, and the CLI."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses import cli
from edgepasses.backend import parse_options
from edgepasses.errors import InputMismatchError, OptionError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()


def _compile_and_call(options, x=None):
    compiled = torch.compile(_model(), backend="edge", options=options)
    with torch.no_grad():
        return compiled(torch.randn(2, 4) if x is None else x)


def _first_line(exc: pytest.ExceptionInfo) -> str:
    return str(exc.value).splitlines()[0]


CALIBRATION = "calibration must be a list of the model's input tuples (or dicts of keyword arguments), e.g. [(x1,), (x2,)]"


@pytest.mark.parametrize("options, message", [
    ({"on_compile": 5}, "on_compile must be a callable taking an EdgeCompilation (e.g. a list's append); got 5 (int)"),
    ({"calibration": 5}, f"{CALIBRATION}; got 5 (int)"),
    ({"calibration": "x.pt"}, f"{CALIBRATION}; got 'x.pt' (str)"),
    ({"calibration": {"x": 1}}, f"{CALIBRATION}; got {{'x': 1}} (dict)"),
    ({"calibration": iter([(torch.zeros(2, 4),)])},
     f"{CALIBRATION}, re-iterable: not an iterator or generator (wrap it in list(...))"),
    ("fold_bn", "torch.compile(backend='edge') options must be a dict such as {'pipeline': 'fold_bn,quantize', "
                "'target': 'openvino'}; got 'fold_bn' (str) (options={'pipeline': 'fold_bn'}?)"),
    ({"pipeline": "quantize(ignore=['[bad'])", "calibration": [(torch.zeros(2, 4),)]},
     "pass 'quantize' option 'ignore': '[bad' is not a valid regular expression (unterminated character set at "
     "position 0); escape special characters (re.escape) to match a name literally"),
])
def test_wrong_options_are_one_clear_line_at_parse_time(options, message):
    with pytest.raises(OptionError) as exc:
        _compile_and_call(options)
    assert _first_line(exc) == message


def test_on_compile_is_refused_before_any_pass_runs(monkeypatch):
    """It used to fail only after a whole compile, when it was called."""
    runs = []
    monkeypatch.setattr(edgepasses.Pipeline, "run", lambda *args, **kwargs: runs.append(args))
    with pytest.raises(OptionError, match="^on_compile must be a callable"):
        _compile_and_call({"on_compile": 5, "calibration": [(torch.zeros(2, 4),)], "pipeline": "quantize"})
    assert runs == []


def test_invalid_ignore_regex_is_refused_when_the_pipeline_is_parsed():
    for pipeline in ("sparsify_24(ignore=['a(b'])", "prune(ratio=0.5,ignore=['*'])", "smooth(ignore=['[x'])"):
        with pytest.raises(OptionError, match=r"option 'ignore': '.*' is not a valid regular expression"):
            edgepasses.Pipeline.parse(pipeline)


def test_cache_dir_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "cache"
    file.write_text("")
    with pytest.raises(OptionError) as exc:
        _compile_and_call({"cache_dir": str(file)})
    assert _first_line(exc) == (f"cache_dir {str(file)!r} is a file, not a directory: name a directory (it is created "
                                "if missing) or pass None for no cache")


def test_cache_dir_accepts_a_path(tmp_path):
    compilations = []
    _compile_and_call({"cache_dir": tmp_path / "cache", "target": "reference", "on_compile": compilations.append})
    assert compilations[0].cache == "miss"
    assert Path(compilations[0].cache_entry).is_relative_to(tmp_path / "cache")
    assert parse_options({"cache_dir": tmp_path}).cache_dir == str(tmp_path)


def test_dynamic_false_compiles_once_per_shape():
    model = _model()
    compiled = torch.compile(model, backend="edge", dynamic=False, options={"target": "reference"})
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("target, runtime", [("openvino", "OpenVINO"), ("tvm", "TVM"), ("reference", "reference")])
def test_a_program_called_with_another_shape_names_expected_and_given(target, runtime):
    if target != "reference":
        pytest.importorskip(target)
    model, x = _model(), torch.randn(2, 4)
    program = edgepasses.lower(edgepasses.compress(model, (x,)), (x,), target=target)
    with pytest.raises(InputMismatchError) as exc:
        program(torch.randn(3, 4))
    assert str(exc.value) == (f"the {runtime} program was compiled for inputs [2, 4] float32; got [3, 4] float32: "
                              "call it with those, or compile again for these (edgepasses.lower on an example of "
                              "them; torch.compile recompiles by itself)")
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # no C++ location above it
    torch.testing.assert_close(program(x), model(x))


def test_cli_report_of_a_missing_directory_is_one_line(capsys):
    assert cli.main(["report", "/nope"]) == 1
    err = capsys.readouterr().err
    assert err == ("edgepasses report: error: /nope is no search run directory (no search.json); run "
                   "`edgepasses search --out /nope`\n")


@pytest.mark.parametrize("argv, message", [
    (["bench", "--rounds", "-1"], "argument --rounds: must be at least 1; got -1"),
    (["bench", "--warmup", "x"], "argument --warmup: must be an integer; got 'x'"),
    (["search", "--model", "digits_cnn", "--out", "r", "--trials", "0"], "argument --trials: must be at least 1; got 0"),
])
def test_cli_usage_errors_are_one_line_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"edgepasses {argv[0]}: error: {message} (--help for usage)\n"


FORM = " (each batch is a tuple of the model's inputs, or a dict of keyword arguments, like the calls)"


@pytest.mark.parametrize("batch, message", [
    ((torch.randn(2, 4, dtype=torch.float64),), re.escape(
        "calibration batch 1 failed in the model (its input 0 is (2, 4) torch.float64 where the call has (2, 4) "
        "torch.float32): RuntimeError: ") + ".*" + re.escape(FORM)),
    ((torch.randn(2, 4), torch.randn(2, 4)), re.escape(
        "calibration batch 1 failed in the model (it has 2 input(s) where the call has 1): TypeError: ") + ".*"),
    ("abc", re.escape("calibration batch 1 failed in the model (its input 0 is str where the call has (2, 4) "
                      "torch.float32): TypeError: ") + ".*"),
])
def test_a_calibration_batch_unlike_the_call_is_named_under_torch_compile(batch, message):
    """Such a batch used to fail inside the model, or make Dynamo compile a dynamic graph, naming no batch."""
    with pytest.raises(OptionError) as exc:
        _compile_and_call({"target": "reference", "pipeline": "quantize",
                           "calibration": [(torch.randn(2, 4),), batch]})
    assert re.fullmatch(message, _first_line(exc))


def test_a_calibration_batch_of_another_shape_calibrates_the_dynamic_graph_it_makes():
    """Under the default dynamic=None, Dynamo compiles a dynamic graph for it; that graph serves any batch."""
    model, compilations = _model(), []
    compiled = torch.compile(model, backend="edge", options={
        "target": "reference", "pipeline": "smooth", "on_compile": compilations.append,
        "calibration": [(torch.randn(2, 4),), (torch.randn(3, 4),)]})
    with torch.no_grad():
        for batch in (2, 3, 5, 7):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(compiled(x), model(x))
    assert [bool(c.dynamic) for c in compilations] == [False, True]


def test_calibration_batches_of_another_shape_are_fine_with_dynamic_false():
    """They calibrate the graph of their own shape (compiled when a call of that shape comes); smooth
    needs calibration and is exact in float."""
    model = _model()
    calibration = [(torch.randn(2, 4),), (torch.randn(3, 4),)]
    compiled = torch.compile(model, backend="edge", dynamic=False, options={
        "target": "reference", "pipeline": "smooth", "calibration": calibration})
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(compiled(x), model(x))


def test_a_calibration_batch_the_model_fails_on_is_named():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x, scale):
            if scale <= 0:
                raise ValueError("scale must be positive")
            return self.l(x) * scale

    compiled = torch.compile(Picky().eval(), backend="edge", options={
        "target": "reference", "pipeline": "quantize", "calibration": [(torch.randn(2, 4), 1.0),
                                                                       (torch.randn(2, 4), -1.0)]})
    with torch.no_grad(), pytest.raises(OptionError) as exc:
        compiled(torch.randn(2, 4), 1.0)
    assert _first_line(exc) == f"calibration batch 1 failed in the model: ValueError: scale must be positive{FORM}"


def test_a_non_string_option_key_is_named():
    with pytest.raises(OptionError, match=r"^unknown option\(s\) 5 for torch.compile\(backend='edge'\); valid options"):
        _compile_and_call({5: 1, "target": "reference"})


def test_a_python_number_changed_after_compiling_is_one_clear_line():
    """Once it changed, Dynamo passes it as a graph input (read with .item()); the backend compiles the value
    of that compile as a constant, and refuses to run the program with another."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.scale = nn.Linear(4, 4), 1.0

        def forward(self, x):
            return self.l(x) * self.scale

    model, x = Scaled().eval(), torch.randn(2, 4)
    compiled = torch.compile(model, backend="edge", options={"target": "reference"})
    with torch.no_grad():
        compiled(x)
        model.scale = 3.0
        torch.testing.assert_close(compiled(x), model(x))  # the recompile holds 3.0
        model.scale = 5.0
        with pytest.raises(OptionError) as exc:
            compiled(x)
    assert _first_line(exc) == (
        "the Python number self.scale is 5.0 where the edge backend compiled it as the constant 3.0 (Dynamo "
        "passes a number that changed between calls, or under dynamic=True any float, as a graph input): compile "
        "again (torch._dynamo.reset(), then torch.compile), or pass it to forward as a tensor")


@pytest.mark.parametrize("content, message", [
    ("{", "search.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ('{"model": "digits_cnn"}', "search.json lacks objectives, target: it is no complete search run"),
])
def test_cli_report_of_a_broken_run_directory_is_one_line(content, message, tmp_path, capsys):
    (tmp_path / "search.json").write_text(content)
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"edgepasses report: error: {tmp_path}/{message}") and err.count("\n") == 1
