"""The user docs: README's size and example, and bench/report.py's generated sections."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgepasses.bench import report

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

MACHINE = report.Machine("Test CPU", 2, 4, "AVX2; no AVX-512 VNNI, no AMX", 2, (0.5, 0.25, 0.125),
                         "2026-01-01T00:00:00+00:00", "abc1234")


def test_write_section_replaces_its_section_and_keeps_the_rest(tmp_path):
    doc = tmp_path / "benchmarks.md"
    report.write_section(doc, "kernels", "| a |\n|---|\n| 1 |", machine=MACHINE, command="edgepasses bench kernels")
    report.write_section(doc, "models", "| m |\n|---|\n| 2 |", machine=MACHINE)
    assert doc.read_text().startswith(report.PREAMBLE)
    doc.write_text(doc.read_text() + "\nA note someone added by hand.\n")
    before = doc.read_text()
    report.write_section(doc, "kernels", "| a |\n|---|\n| 3 |", machine=MACHINE)
    after = doc.read_text()
    sections = report.read_sections(doc)
    assert list(sections) == ["kernels", "models"]
    assert "| 3 |" in sections["kernels"] and "| 1 |" not in after
    assert sections["models"] == report.sections_of(before)["models"]
    assert after.endswith("\nA note someone added by hand.\n")
    assert after.replace(sections["kernels"], "") == before.replace(report.sections_of(before)["kernels"], "")


def test_section_header_names_machine_load_date_and_commit():
    text = report.render_section("kernels", "body", machine=MACHINE, command="edgepasses bench kernels")
    line = next(x for x in text.splitlines() if x.startswith("Machine:"))
    for fact in ("Test CPU", "2 cores / 4 logical CPUs", "AVX2", "0.50 / 0.25 / 0.12", "2026-01-01", "abc1234"):
        assert fact in line
    here = report.Machine.here()
    assert here.cpu and here.logical_cpus >= 1 and len(here.load_average) == 3
    assert here.kernel_path.split(";")[0] in ("AVX2", "portable", "portable (EDGE_KERNELS_PORTABLE)")


def test_kernel_path_follows_the_kernels_choice():
    assert report.kernel_cpu_path({"avx2"}, {}) == "AVX2; no AVX-512 VNNI, no AMX"
    assert report.kernel_cpu_path({"avx2", "avx512_vnni", "amx_int8"}, {}) == "AVX2; AVX-512 VNNI, AMX"
    assert report.kernel_cpu_path({"avx2"}, {"EDGE_KERNELS_PORTABLE": "1"}).startswith("portable")
    assert report.kernel_cpu_path(set(), {}).startswith("portable;")


def test_explicit_md_writes_plain_markdown_and_a_sectioned_file_keeps_its_sections(tmp_path):
    plain = tmp_path / "plain.md"
    assert report.write_markdown(str(plain), "kernels", "table\n", machine=MACHINE) == plain
    assert plain.read_text() == "table\n"
    doc = tmp_path / "benchmarks.md"
    report.write_section(doc, "models", "m", machine=MACHINE)
    report.write_markdown(str(doc), "kernels", "k", machine=MACHINE)
    assert list(report.read_sections(doc)) == ["models", "kernels"]


def test_no_default_doc_inside_tests():
    assert report.default_doc(ROOT) is None  # bench tests run the commands on stand-in results


def test_unterminated_section_is_refused(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("<!-- bench:kernels begin -->\nhalf\n")
    with pytest.raises(ValueError, match="no end marker"):
        report.write_section(doc, "kernels", "x", machine=MACHINE)


def test_readme_is_short_and_links_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", text):
        assert (ROOT / link).exists(), link


def test_every_docs_link_resolves():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.relative_to(ROOT)} links to {link}"


def test_readme_results_are_copied_from_a_generated_file():
    """No measured number is written by hand: each one in README's results table is in docs/accuracy.md."""
    text = README.read_text()
    table = text[text.index("## Results"):text.index("Every measured table")]
    generated = (ROOT / "docs" / "accuracy.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    numbers = {n for row in rows for n in re.findall(r"\d+\.\d+", row)}
    assert numbers and all(n in generated for n in numbers), sorted(n for n in numbers if n not in generated)


def _readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return blocks[0]


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    pytest.importorskip("openvino")
    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
