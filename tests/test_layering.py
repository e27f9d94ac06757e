"""The library does not import the benchmarks: `edgepasses.bench` (the bench/ folder) measures the
library, never the other way round. Timing and peers live in `edgepasses.measure`, the models in
`edgepasses.zoo`. The one exception is the command line, whose `bench` subcommands run the benchmarks:
it imports them inside those subcommands only, so that `import edgepasses.cli` stays without them."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("edgepasses", "backends", "kernels")  # the folders installed as edgepasses.* besides bench/
CLI = ROOT / "edgepasses" / "cli.py"


def _imported_modules(node: ast.AST, package: str) -> list[str]:
    """Absolute names of what an import statement imports (relative ones resolved against `package`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        module = ".".join([*base, node.module] if node.module else base)
        return [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return []


def _package_of(path: Path) -> str:
    """The package a module's relative imports start from: its folder, as installed."""
    parts = path.relative_to(ROOT).parts[:-1]
    return ".".join(parts if parts[0] == "edgepasses" else ("edgepasses", *parts))


def _bench_imports(path: Path, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = _package_of(path)
    return [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}" for node in nodes
            for name in _imported_modules(node, package)
            if name == "edgepasses.bench" or name.startswith("edgepasses.bench.")]


def _library_files() -> list[Path]:
    return [p for folder in LIBRARY for p in sorted((ROOT / folder).rglob("*.py")) if p != CLI]


def test_the_resolver_sees_relative_and_absolute_bench_imports():
    search = ROOT / "edgepasses" / "search"
    assert _imported_modules(ast.parse("from ..bench.timing import x").body[0], "edgepasses.search") == \
        ["edgepasses.bench.timing", "edgepasses.bench.timing.x"]
    assert _imported_modules(ast.parse("from edgepasses.bench import zoo").body[0], "edgepasses.search")[0] == \
        "edgepasses.bench"
    assert _package_of(search / "cli.py") == "edgepasses.search"
    assert _package_of(ROOT / "backends" / "openvino" / "__init__.py") == "edgepasses.backends.openvino"


def test_no_library_module_imports_the_benchmarks():
    files = _library_files()
    assert len(files) > 50 and ROOT / "edgepasses" / "search" / "confirm.py" in files
    assert [found for path in files for found in _bench_imports(path)] == []


def test_the_cli_imports_the_benchmarks_only_inside_its_subcommands():
    assert _bench_imports(CLI, top_level_only=True) == []
