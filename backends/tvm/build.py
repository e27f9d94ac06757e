"""Build a Relax module for this CPU, tuned and cached on disk.

TVM 0.27's default CPU pipeline lowers each op to plain, single-threaded loops (many times
slower than eager PyTorch); its only CPU schedules (DLight) cover matrix-vector
products, and this wheel has no DNNL/BLAS offload. fp32 convolutions get our blocked-layout
schedule (`conv_nchwc`: its tile measured per conv); MetaSchedule tiles, vectorises and
parallelises the other fused ops for the target (`num-cores` sets the parallelism), measured on
this machine. Tiles and records live per (graph structure, target, TVM version) so the second
compile of the same graph only applies them.

Two problems of the wheel are worked around here (both found on apache-tvm 0.27.0.post1):
- `import tvm.s_tir.tensor_intrin` (done by every TuneContext and every builder/runner
  worker process) parses hundreds of TVMScript functions, each calling `inspect.stack()`,
  whose `inspect.getmodule` scans `sys.modules` for every "<ast>" frame: minutes per process.
  `fast_tensor_intrin_import` memoises those lookups, which makes the import many times faster.
- With apache-tvm-ffi 0.1.15, `tvm.ir.save_json` of any object segfaults, and MetaSchedule
  serialises modules in its mutators, builder and database; 0.1.14 works. Tuning is skipped
  (with a warning) on a broken tvm-ffi.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import time
from pathlib import Path

import torch

log = logging.getLogger("edgepasses")


def _register_kernels() -> None:
    """Programs call our int8 kernels by name (`quant`): register them on import, which every path to a
    Relax VM takes (`TVMProgram` imports this module before it builds or loads an executable)."""
    try:
        from .quant import register_kernels
        register_kernels()
    except ImportError:  # TVM not installed: there is no program to call them
        pass


_register_kernels()

SEARCH_POPULATION = 256
# Part of the records' key (and the compile cache's): the ops MetaSchedule is given and the code built
# depend on our converters and schedules (`conv_nchwc`, `int8_conv`, `quant`). Bump it when they change.
LOWERING_VERSION = 3
DEFAULT_TRIALS_PER_TASK = 0  # no tuning unless asked: a ResNet-18 costs ~minutes per 8 trials/task


def cache_root() -> Path:
    """Tuning records and builds, beside the kernels' build cache (`edgepasses.paths`)."""
    from edgepasses.paths import cache_root as edgepasses_cache

    return edgepasses_cache() / "tvm"


def host_cpu() -> str:
    """LLVM's name for this CPU (znver3, sapphirerapids, ...), as `llc -mcpu=native` would pick."""
    import tvm

    try:
        return str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001 - older/newer TVM without the helper
        return "generic"


def host_target(num_cores: int | None = None):
    """An llvm target for this CPU. TVM 0.27 rejects "llvm -mcpu=..." strings: pass a dict."""
    import tvm

    cores = num_cores or torch.get_num_threads()
    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "num-cores": int(cores)})


def use_threads(count: int) -> int:
    """Run TVM's parallel loops on `count` threads. Unless TVM_NUM_THREADS (or OMP_NUM_THREADS) says
    otherwise, TVM's runtime pool starts half of `std::thread::hardware_concurrency()` threads on x86,
    assuming two hyperthreads per core: on a 2-core machine without them, one thread, so every parallel
    loop ran on one core. The environment serves pools created
    later (other threads, MetaSchedule's runner processes); this thread's pool may exist already.

    Its workers also stop spinning when a loop ends (TVM_THREAD_POOL_SPIN_COUNT=0, unless set): spinning,
    they took the cores from the OpenMP threads of our int8 kernels called between TVM's loops and from
    PyTorch partitions, and won nothing measurable on fp32."""
    import tvm_ffi

    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(count)
    count = int(os.environ.get("TVM_NUM_THREADS") or os.environ["OMP_NUM_THREADS"])
    if tvm_ffi.get_global_func("runtime.NumThreads")() != count:
        share_all_cores = -3  # TVM's ThreadPool::AffinityMode kSpecifyThreadShareAllCore
        cores = [str(core) for core in sorted(os.sched_getaffinity(0))]
        tvm_ffi.get_global_func("runtime.config_threadpool")(share_all_cores, count, cores)
    return count


def tvm_ffi_version() -> str:
    try:
        import tvm_ffi
        return getattr(tvm_ffi, "__version__", "unknown")
    except ImportError:
        return "none"


def tuning_unavailable_reason() -> str | None:
    """Why MetaSchedule cannot run with this TVM installation, or None."""
    version = tvm_ffi_version()
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match and tuple(map(int, match.groups())) >= (0, 1, 15):
        return (f"apache-tvm-ffi {version} segfaults in tvm.ir.save_json, which MetaSchedule needs; "
                "install 0.1.14: pip install 'apache-tvm-ffi==0.1.14.post1'")
    return None


def fast_tensor_intrin_import() -> None:
    """Import tvm.s_tir.tensor_intrin with inspect.getmodule memoised for "<...>" file names.

    Module-level so MetaSchedule's builder and runner worker processes can run it as their
    initializer (cloudpickle sends it by reference: edgepasses.backends.tvm.build)."""
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.getmodule
    memo: dict[str, object] = {}

    def getmodule(obj, _filename=None):
        if _filename is not None and _filename.startswith("<"):
            if _filename not in memo:
                memo[_filename] = original(obj, _filename)
            return memo[_filename]
        return original(obj, _filename)

    inspect.getmodule = getmodule
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.getmodule = original


def graph_key(exported: torch.export.ExportedProgram, target, extra: str = "") -> str:
    """Hash of the graph's structure (ops, wiring, shapes and dtypes; not weight values, as the
    compile cache hashes it), the target and the TVM version: the name of the tuning records' folder."""
    import tvm

    from edgepasses.compile_cache import graph_hash

    text = "\n".join([graph_hash(exported.graph_module), str(target), tvm.__version__, extra])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def prepare(mod, target):
    """The Relax passes before tuning: the static-shape-tuning pipeline's, up to tuning."""
    import tvm
    from tvm import relax

    with target:
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
        ])(mod)


DEADLINE_REACHED = "edgepasses: the tuning time limit is reached"


class _Deadline:
    """A MeasureCallback that ends tuning once the time budget is spent, by raising out of the task
    scheduler (`tune` catches it). Terminating the tasks from the callback instead breaks the
    scheduler: it joins a task's measurements (running the callbacks) after picking it, then checks
    that the task is alive (an InternalError that throws away the whole run). What was measured
    is in the database already: the default callbacks, first in the list, commit each batch."""

    @staticmethod
    def make(deadline: float):
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
        from tvm.ir.utils import derived_object

        @derived_object
        class Deadline(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                if time.monotonic() > deadline:
                    raise TimeoutError(DEADLINE_REACHED)

        return Deadline()


def _in_process_builder():
    """MetaSchedule's LocalBuilder starts fresh worker processes for every batch, and each one
    imports TVM and its tensor intrinsics (slow even with `fast_tensor_intrin_import`):
    more than the builds themselves. Compile the candidates here instead, one after another."""
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for build_input in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(build_input.mod, build_input.target,
                                                                              None)), None))
                except Exception as exc:  # noqa: BLE001 - a failed candidate, reported to the tuner
                    results.append(BuilderResult(None, f"InProcessBuilder: {exc}"))
            return results

    return InProcessBuilder()


def _flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - an op it cannot count: tune it last
        return 0.0


@contextlib.contextmanager
def _without_foreign_log_handlers():
    """MetaSchedule's logging setup lists its logger's handlers by name in a `dictConfig`, which fails on
    any handler it did not create (pytest's capture handlers, a user's): detach those meanwhile."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith(logger.name)]
    for handler in foreign:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in foreign:
            logger.addHandler(handler)


def tune(mod, target, work_dir: Path, trials_per_task: int, time_limit_s: float | None = None) -> dict:
    """MetaSchedule over every fused op of `mod` (prepared), records into `work_dir`."""
    import tvm.s_tir.meta_schedule as ms

    fast_tensor_intrin_import()
    work_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target)
             if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)]  # conv_nchwc's
    # Heaviest first: the scheduler's first round goes through the tasks in order, so when the
    # time limit cuts tuning short, what is left untuned is the cheap ops.
    tasks = sorted(tasks, key=lambda t: -_flops(t.dispatched[0]) * t.weight)
    # A smaller evolutionary search than the default (512 candidates, 4 generations): the
    # default search takes a large share of each task's time on a small CPU; measurements decide anyway.
    strategy = ms.search_strategy.EvolutionarySearch(population_size=SEARCH_POPULATION, genetic_num_iters=2)
    with _without_foreign_log_handlers():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(work_dir), strategy=strategy, num_threads=int(target.attrs["num-cores"]), seed=0)
    try:
        import xgboost  # noqa: F401
        cost_model = "xgb"
    except ImportError:
        cost_model = "random"
    callbacks = ms.measure_callback.MeasureCallback.create("default")
    if time_limit_s:
        callbacks = list(callbacks) + [_Deadline.make(time.monotonic() + time_limit_s)]
    runner = ms.runner.LocalRunner(timeout_sec=60,
                                   evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                                               min_repeat_ms=50))
    start, stopped = time.perf_counter(), False
    try:
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                           max_trials_global=trials_per_task * len(tasks), max_trials_per_task=trials_per_task,
                           num_trials_per_iter=min(trials_per_task, 32), builder=_in_process_builder(),
                           runner=runner, database=ms.database.JSONDatabase(work_dir=str(work_dir)),
                           cost_model=cost_model, measure_callbacks=callbacks)
    except Exception as exc:  # noqa: BLE001 - TVM's FFI may re-raise the callback's error as its own type
        if DEADLINE_REACHED not in str(exc):
            raise
        stopped = True
        log.warning("target 'tvm': tuning stopped at its time limit (%.0f s); tasks not yet tuned to %d trials "
                    "run the best schedules found so far", time_limit_s, trials_per_task)
    return {"tasks": len(tasks), "trials_per_task": trials_per_task, "tuning_s": time.perf_counter() - start,
            "cost_model": cost_model, "stopped_at_time_limit": stopped}


def build(exported: torch.export.ExportedProgram, *, trials_per_task: int = DEFAULT_TRIALS_PER_TASK,
          time_limit_s: float | None = None, cache_dir: str | None = None, num_cores: int | None = None,
          records: bool = True):
    """(VM executable, info): `exported` imported to Relax, tuned (or records reused), built.

    With `records` False the cache is neither read nor written: the untuned build."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from . import conv_nchwc, int8_conv
    from .quant import convert_map

    target = host_target(num_cores)
    threads = use_threads(int(target.attrs["num-cores"]))  # before tiles or tuning: they time parallel loops
    # Our converters for Q/DQ and the int8 ops `quant.rewrite_int8` leaves (the importer has none).
    mod = from_exported_program(exported, keep_params_as_input=False, custom_convert_map=convert_map())
    mod = prepare(conv_nchwc.to_nchwc(mod, target), target)
    info = {"target": str(target), "cache_hit": False, "tuned": False, "tuning_s": 0.0,
            "int8_conv_kernels": sum(g.name_hint.startswith(int8_conv.FUNC_NAME) for g in mod.functions)}
    reason = tuning_unavailable_reason() if trials_per_task > 0 else None
    if reason:
        log.warning("target 'tvm' builds without tuning, so it runs plain loops: %s", reason)
        trials_per_task = 0
    key = graph_key(exported, target, f"lowering {LOWERING_VERSION} threads={threads}")
    work_dir = (Path(cache_dir) if cache_dir else cache_root()) / key
    meta_path = work_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    # Convolutions first, by our schedule: their tiles measured when tuning is asked for, or read back.
    start = time.perf_counter()
    mod, info["conv_tiles"] = conv_nchwc.choose_tiles(mod, target, work_dir / "conv_tiles.json" if records else None,
                                                     measure_new=records and trials_per_task > 0)
    info["conv_tiles"]["seconds"] = time.perf_counter() - start
    if not records:
        trials_per_task = 0
    elif meta and meta.get("trials_per_task", 0) >= trials_per_task and meta.get("tasks"):
        info.update(cache_hit=True, tuned=True, records=str(work_dir), tasks=meta["tasks"],
                    trials_per_task=meta["trials_per_task"], recorded_tuning_s=meta.get("tuning_s"),
                    recorded_conv_tiles_s=meta.get("conv_tiles_s"))
        log.info("target 'tvm': reusing tuning records in %s (%d trials/task)", work_dir, meta["trials_per_task"])
    elif trials_per_task > 0:
        done = tune(mod, target, work_dir, trials_per_task, time_limit_s)
        done.update(tvm=tvm.__version__, conv_tiles_s=info["conv_tiles"]["seconds"])
        meta_path.write_text(json.dumps(done))
        info.update(tuned=True, records=str(work_dir), **done)
    if info["tuned"]:
        with target, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    start = time.perf_counter()
    executable = tvm.compile(mod, target=target)
    info["build_s"] = time.perf_counter() - start
    return executable, info
