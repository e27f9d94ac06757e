"""The compile cache: poisoned, corrupt, swapped and linked entries (one WARNING, rebuilt, never
loaded), cache_dir of the wrong kind, and hits that must never serve another model's program."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from hostile_common import artifact_trust, close, convnet, eager_of, mlp, scratch, sqnr_at_least, x_conv, x_mlp

from edgepasses.bench.hostile import Case, SilentlyWrong, clear_error, correct, warning
from edgepasses.errors import OptionError


def _compile(model, options: dict, x):
    """(output, EdgeCompilation) of a fresh torch.compile."""
    torch._dynamo.reset()
    seen = []
    compiled = torch.compile(model, backend="edge", options={**options, "on_compile": seen.append})
    with torch.no_grad():
        out = compiled(x)
    return out, seen[-1]


def _options(cache_dir, **more) -> dict:
    return {"cache_dir": str(cache_dir), "target": "reference", "pipeline": "fold_bn", **more}


def _spoiled(spoil, target: str = "reference"):
    """Compile once (stored), spoil the entry with `spoil(entry, marker)`, compile again: (output, the second
    compilation), after checking the payload did not run."""
    def run():
        cache = scratch("cache")
        options = _options(cache, target=target)
        _, first = _compile(convnet(), options, x_conv())
        entry = Path(first.cache_entry)
        marker = cache.parent / "marker"
        spoil(entry, marker)
        out, again = _compile(convnet(), options, x_conv())
        if marker.exists():
            raise SilentlyWrong("the poisoned cache entry ran its payload")
        return out, again
    return run


def _rebuilt(result):
    out, again = result
    close(eager_of(convnet(), x_conv()), out)
    assert again.cache == "miss", f"cache {again.cache}: a spoiled entry was used"


def _poison(entry: Path, marker: Path) -> None:
    trust = artifact_trust()
    trust._craft(entry, trust._pickled_weight, marker)


def _swap(entry: Path, marker: Path) -> None:
    """Another model's valid entry put under this key (its hashes are right)."""
    other = scratch("other")
    _, stored = _compile(mlp(), _options(other), x_mlp())
    shutil.rmtree(entry)
    shutil.copytree(stored.cache_entry, entry)


def _to_file(entry: Path, marker: Path) -> None:
    shutil.rmtree(entry)
    entry.write_text("not an entry")


def _to_link(entry: Path, marker: Path) -> None:
    elsewhere = entry.parent.parent.parent / "elsewhere"
    shutil.move(entry, elsewhere)
    entry.symlink_to(elsewhere)


def _truncate(entry: Path, marker: Path) -> None:
    data = (entry / "graph.pt2").read_bytes()
    (entry / "graph.pt2").write_bytes(data[: len(data) // 2])


def _hit(target: str):
    def run():
        cache = scratch("cache")
        first, miss = _compile(convnet(), _options(cache, target=target), x_conv())
        second, hit = _compile(convnet(), _options(cache, target=target), x_conv())
        return first, second, miss.cache, hit.cache
    return run


def _hit_check(result):
    first, second, miss, hit = result
    assert (miss, hit) == ("miss", "hit"), f"cache {miss}, then {hit}"
    close(eager_of(convnet(), x_conv()), second)
    close(first, second, atol=0)


def _changed(change):
    """Two compiles into one cache_dir that must not share an entry: (outputs, expected outputs, cache states)."""
    def run():
        cache = scratch("cache")
        return change(cache)
    return run


def _weights_edited(cache):
    model = convnet()
    a, first = _compile(model, _options(cache), x_conv())
    with torch.no_grad():
        model[0].weight.mul_(-1)
    b, second = _compile(model, _options(cache), x_conv())
    return b, eager_of(model, x_conv()), (first.cache, second.cache)


def _other_weights(cache):
    a, first = _compile(convnet(), _options(cache), x_conv())
    torch.manual_seed(123)
    other = convnet()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    b, second = _compile(other, _options(cache), x_conv())
    return b, eager_of(other, x_conv()), (first.cache, second.cache)


def _other_calibration(cache):
    calib_a = [(x_conv(s),) for s in range(10, 12)]
    calib_b = [(x_conv(s) * 3,) for s in range(20, 22)]
    _, first = _compile(convnet(), _options(cache, pipeline="fold_bn,quantize", calibration=calib_a), x_conv())
    b, second = _compile(convnet(), _options(cache, pipeline="fold_bn,quantize", calibration=calib_b), x_conv())
    return b, None, (first.cache, second.cache)


def _not_shared(result):
    out, expected, states = result
    assert states == ("miss", "miss"), f"cache {states}: the second compile reused the first one's entry"
    if expected is not None:
        close(expected, out)


def _path_object():
    cache = scratch("cache")
    out, compilation = _compile(convnet(), {**_options(cache), "cache_dir": cache}, x_conv())
    return out, compilation.cache


def _compiled_is_a_file():
    cache = scratch("cache")
    (cache / "compiled").write_text("in the way")
    return _compile(convnet(), _options(cache), x_conv())[0]


def _stale_tmp():
    cache = scratch("cache")
    (cache / "compiled" / ".0123456789ab-deadbeef0000.tmp").mkdir(parents=True)
    ((cache / "compiled" / ".0123456789ab-deadbeef0000.tmp") / "graph.pt2").write_bytes(b"half")
    return _hit("reference")()


def cases() -> list[Case]:
    rebuilt = r"compile cache entry .* is unusable"
    cases = [
        Case("cache poisoned entry (pickled payload)", "cache", _spoiled(_poison),
             warning(rebuilt + r".*pickled object", _rebuilt)),
        Case("cache entry manifest deleted", "cache", _spoiled(lambda e, m: (e / "manifest.json").unlink()),
             warning(rebuilt, _rebuilt)),
        Case("cache entry graph.pt2 truncated", "cache", _spoiled(_truncate), warning(rebuilt, _rebuilt)),
        Case("cache entry with an extra file", "cache", _spoiled(lambda e, m: (e / "extra.py").write_text("x")),
             warning(rebuilt, _rebuilt)),
        Case("cache entry replaced by a file", "cache", _spoiled(_to_file), warning(rebuilt, _rebuilt)),
        # the link's target is the same valid entry: used or rebuilt, the outputs are the model's
        Case("cache entry replaced by a link to itself moved elsewhere", "cache", _spoiled(_to_link),
             correct(lambda r: close(eager_of(convnet(), x_conv()), r[0]))),
        Case("cache entry of another model under this key", "cache", _spoiled(_swap),
             warning(rebuilt + r".*not the compile cache entry", _rebuilt)),
        Case("cache hit gives the first compile's outputs", "cache", _hit("reference"), correct(_hit_check)),
        Case("cache weights edited in place between compiles", "cache", _changed(_weights_edited),
             correct(_not_shared)),
        Case("cache another model of the same architecture", "cache", _changed(_other_weights), correct(_not_shared)),
        Case("cache other calibration data", "cache", _changed(_other_calibration), correct(_not_shared)),
        Case("cache stale temporary entry left by an interrupted store", "cache", _stale_tmp, correct(_hit_check)),
        Case("cache cache_dir as a pathlib.Path", "cache", _path_object,
             correct(lambda r: (close(eager_of(convnet(), x_conv()), r[0]), r[1] == "miss"))),
        Case("cache cache_dir is a file", "cache",
             lambda: _compile(convnet(), _options(_a_file()), x_conv()),
             clear_error(OptionError, r"cache_dir")),
        Case("cache cache_dir/compiled is a file", "cache", _compiled_is_a_file,
             warning(r"could not store the compile cache entry", lambda out: close(eager_of(convnet(), x_conv()), out))),
        Case("cache cache_dir that does not exist yet", "cache",
             lambda: _compile(convnet(), _options(scratch("cache") / "a" / "b"), x_conv())[0],
             correct(lambda out: close(eager_of(convnet(), x_conv()), out))),
        Case("cache quantized entry hit", "cache", _quantized_hit,
             correct(lambda r: (r[2:] == ("miss", "hit") or _fail(f"cache {r[2:]}"), close(r[0], r[1], atol=0)))),
    ]
    if importlib.util.find_spec("openvino") is not None:
        cases += [
            Case("cache openvino poisoned entry", "cache", _spoiled(_poison, "openvino"),
                 warning(rebuilt + r".*pickled object", _rebuilt)),
        ]
    return cases


def _a_file() -> Path:
    path = scratch("cache") / "a-file"
    path.write_text("a file")
    return path


def _fail(message: str):
    raise AssertionError(message)


def _quantized_hit():
    cache = scratch("cache")
    calibration = [(x_conv(s),) for s in range(10, 12)]
    options = _options(cache, pipeline="fold_bn,quantize", calibration=calibration)
    first, miss = _compile(convnet(), options, x_conv())
    second, hit = _compile(convnet(), options, x_conv())
    sqnr_at_least(convnet, (x_conv(),), 20.0)(second)
    return first, second, miss.cache, hit.cache
