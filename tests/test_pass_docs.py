"""`edgepasses passes` and docs/passes.md: every option with its type, default and description."""
import dataclasses
from pathlib import Path

from edgepasses import cli, registered_passes
from edgepasses.pass_docs import MARKDOWN_COMMAND, WIDTH, passes_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "passes.md"


def test_passes_prints_each_option_with_its_description_within_the_width(capsys):
    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= WIDTH
    flat = " ".join(out.split())  # descriptions wrap
    assert "ratio: float = 0.3 Share of each group's channels to remove" in flat
    assert "criterion: auto|magnitude|activation = auto Which 2 of each 4 weights stay" in flat
    assert "runs before, where the pipeline has them: sparsify_24, quantize" in flat
    for info in registered_passes().values():
        for f in dataclasses.fields(info.options):
            assert f"{f.name}: " in out and " ".join(f.metadata["doc"].split()) in flat, (info.name, f.name)


def test_docs_passes_md_is_what_the_generator_prints(capsys):
    assert cli.main(["passes", "--markdown"]) == 0
    assert capsys.readouterr().out == passes_markdown() + "\n"
    assert DOCS.read_text() == passes_markdown() + "\n", f"docs/passes.md is stale: run `{MARKDOWN_COMMAND}`"
