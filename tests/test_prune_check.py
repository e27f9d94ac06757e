"""`edgepasses prune-check`: a pruned zoo model keeps its output shape and runs alike on every target."""
from __future__ import annotations

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

from edgepasses import cli  # noqa: E402  (after the importorskips)
from edgepasses import zoo  # noqa: E402
from edgepasses.bench import prune_check  # noqa: E402


@pytest.fixture(scope="module")
def digits_check():
    """digits_cnn with its initial weights (no training) pruned at 0.5: checked once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zoo, "load_or_train", lambda name, factory, **recipe: factory().eval())
        yield prune_check.check_model("digits_cnn", 0.5)


@pytest.fixture
def untrained_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "load_or_train", lambda name, factory, **recipe: factory().eval())


def test_pruned_model_keeps_output_shape_and_shrinks(digits_check):
    assert digits_check.output_shapes == [(1, 10)]
    assert digits_check.pipeline == "fold_bn,prune(ratio=0.5,round_to=8)"
    assert digits_check.params_after < 0.5 * digits_check.params_before
    assert digits_check.macs_after < 0.5 * digits_check.macs_before
    assert digits_check.groups_pruned == 3 and digits_check.groups == 4 and digits_check.groups_rounded_whole == 0
    # the classifier is the model output: its width is the number of classes
    assert list(digits_check.left_whole.values()) == ["model output (linear)"]


def test_openvino_runs_the_pruned_graph_like_the_reference_target(digits_check):
    pytest.importorskip("openvino")
    assert digits_check.output_scale > 0
    assert digits_check.relative_diff <= prune_check.RELATIVE_TOLERANCE


def test_openvino_mismatch_raises_naming_model_and_ratio(untrained_digits, monkeypatch):
    pytest.importorskip("openvino")
    real_lower = prune_check.edgepasses.lower

    def off_by_one_on_openvino(gm, inputs, target, **kwargs):
        run = real_lower(gm, inputs, target="reference")
        return (lambda *args: run(*args) + 1.0) if target == "openvino" else run

    monkeypatch.setattr(prune_check.edgepasses, "lower", off_by_one_on_openvino)
    with pytest.raises(prune_check.PruneCheckError, match=r"digits_cnn at ratio 0.3 .*OpenVINO differs"):
        prune_check.check_model("digits_cnn", 0.3)


def test_pipeline_needs_exactly_one_prune_step():
    with pytest.raises(ValueError, match="exactly one prune step"):
        prune_check.prune_step_index("fold_bn")
    assert prune_check.prune_step_index("fold_bn,prune(ratio=0.3)") == 1


def test_markdown_aggregates_identical_reasons(digits_check):
    other = prune_check.PruneCheck(**{**vars(digits_check), "ratio": 0.3,
                                      "left_whole": {"a": "aten.roll at roll", "b": "aten.roll at roll_1",
                                                     "c": "aten.add.Tensor at add_12 with conv2d_3",
                                                     "fc": "model output (linear)"}})
    text = prune_check.to_markdown([digits_check, other])
    assert "| digits_cnn | 0.5 |" in text and "| digits_cnn | 0.3 |" in text
    assert ("- digits_cnn at 0.3:\n  - ×2: aten.roll at roll (a, b)\n  - ×1: aten.add.Tensor at add with conv2d (c)\n"
            "  - ×1: model output (linear) (fc)") in text
    same = prune_check.to_markdown([digits_check, prune_check.PruneCheck(**{**vars(digits_check), "ratio": 0.3})])
    assert "- digits_cnn (every ratio):\n  - ×1: model output (linear) (12)" in same


def test_cli_prints_and_writes_the_table(digits_check, monkeypatch, tmp_path, capsys):
    calls = []

    def checked(name, ratio, pipeline):  # the real check is the fixture's; here the wiring counts
        calls.append((name, ratio, pipeline))
        return digits_check

    monkeypatch.setattr(prune_check, "DEFAULT_MODELS", ("digits_cnn",))
    monkeypatch.setattr(prune_check, "check_model", checked)
    path = tmp_path / "prune.md"
    assert cli.main(["prune-check", "--ratio", "0.5", "--md", str(path)]) == 0
    assert calls == [("digits_cnn", 0.5, prune_check.DEFAULT_PIPELINE)]
    out = capsys.readouterr().out
    assert "| model | ratio | params" in out and "| digits_cnn | 0.5 |" in out
    assert "Groups left whole" in out and path.read_text().strip() in out


def test_cli_reports_a_failing_model_and_runs_the_rest(digits_check, monkeypatch, capsys):
    def fails_at_03(name, ratio, pipeline):
        if ratio == 0.3:
            raise prune_check.PruneCheckError(f"{name} at ratio {ratio}: shapes differ")
        return digits_check

    monkeypatch.setattr(prune_check, "check_model", fails_at_03)
    assert cli.main(["prune-check", "--model", "digits_cnn"]) == 1
    out = capsys.readouterr().out
    assert "| digits_cnn | 0.5 |" in out and "Failed:\n- digits_cnn at ratio 0.3: shapes differ" in out


@pytest.mark.parametrize("pipeline, message", [("fold_bn,prune(ratio=0.3)", "must contain '{ratio}'"),
                                               ("fold_bn,smooth(alpha={ratio})", "exactly one prune step"),
                                               ("prune(ratio={ratio},size=3)", "size")])
def test_cli_rejects_a_pipeline_without_ratio_or_prune(pipeline, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune-check", "--model", "digits_cnn", "--pipeline", pipeline])
    assert message in capsys.readouterr().err
