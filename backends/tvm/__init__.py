"""The `tvm` target: Relax through `from_exported_program`, tuned with MetaSchedule for this CPU.

`torch.export` → Relax (`tvm.relax.frontend.torch.from_exported_program`, weights as
constants) → MetaSchedule records (cached per graph structure, target and TVM version; see
`build.py`) → `tvm.compile` for an llvm target with this CPU's `mcpu` and `num-cores` = torch's
thread count → a Relax VM called through DLPack. When the importer reports ops it cannot
convert ("Unsupported function types [...]"), the graph (after the importer's own core-ATen
decomposition, so the names match) is split: TVM runs the partitions it converts, PyTorch the
rest, and one warning names each op left behind.

Quantized graphs (`quantize`'s Q/DQ) are rewritten first (`quant.py`): Q/DQ conv2d/linear call our
int8 C++ kernels from Relax, activation matmuls become integer Relax matmuls, other Q/DQ Relax
elementwise ops; `Lowering.int8_ops` counts the integer layers.

A graph with dynamic dims (`torch.compile(..., dynamic=True)`) becomes one static program per input
shape, each built on the first call with its shape (`per_shape.py` says why, with measurements); the
lowering warns once that each new shape costs a build.

The budget: `TVMTarget(trials=N, time_limit_s=T)` (N MetaSchedule trials per fused op; 0 =
untuned plain loops), the same keywords on `lower`, or the backend option
`target_options={"tvm": {"trials": N, "time_limit_s": T}}`; `EDGEPASSES_TVM_TRIALS` sets the
budget when none of these does.
"""
from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from edgepasses.dynamic_shapes import dynamic_dims
from edgepasses.errors import ArtifactError, OptionError, first_line
from edgepasses.quant import QuantCaps, cpu_int8_saturates

from .. import Lowering, TargetBase, distribution_versions, tensors_mb
from ..input_check import input_signature, mismatch
from ..partition import (fallbacks_of, lower_by_partition, report_fallbacks, sparse24_layers, state_writes,
                         warn_dense_sparse24)

_UNSUPPORTED = re.compile(r"Unsupported function types (\[.*?\])", re.DOTALL)


def unsupported_ops(message: str) -> set[str] | None:
    """The op names (`OpOverload.__name__`, e.g. "mystery.default") in the importer's error."""
    match = _UNSUPPORTED.search(message)
    return set(ast.literal_eval(match.group(1))) if match else None


def _built_for(target: str | None) -> str:
    """The CPU a build was compiled for: from its target (a JSON dict in TVM 0.27), else this host's."""
    try:
        return json.loads(target)["mcpu"]
    except (TypeError, ValueError, KeyError):
        from .build import host_cpu

        return host_cpu()


def _default_trials() -> int:
    from .build import DEFAULT_TRIALS_PER_TASK

    value = os.environ.get("EDGEPASSES_TVM_TRIALS")
    return int(value) if value else DEFAULT_TRIALS_PER_TASK


class TVMProgram(torch.nn.Module):
    """A Relax VM executable behind the calling convention of the module it replaced."""

    def __init__(self, exported: torch.export.ExportedProgram, *, trials: int, time_limit_s: float | None,
                 cache_dir: str | None, records: bool = True, executable=None):
        import tvm
        from tvm import relax

        from .build import build, use_threads

        super().__init__()
        if executable is None:
            executable, self.info = build(exported, trials_per_task=trials, time_limit_s=time_limit_s,
                                          cache_dir=cache_dir, records=records)
        else:  # built before: the library edgepasses.artifacts.load read back
            use_threads(torch.get_num_threads())
            self.info = {"loaded": True}
        self.executable = executable  # edgepasses.artifacts.save writes it with export_library
        self.vm = relax.VirtualMachine(executable, tvm.cpu())
        self.main = self.vm["main"]
        self._from_dlpack = tvm.runtime.from_dlpack
        self.out_spec = exported.call_spec.out_spec
        self.signature = input_signature(exported)
        self.weights_mb = sum(t.numel() * t.element_size() for t in exported.state_dict.values()) / 1e6
        self.weights_mb += sum(t.numel() * t.element_size() for t in exported.constants.values()
                               if isinstance(t, torch.Tensor)) / 1e6

    @classmethod
    def from_module(cls, module: torch.nn.Module, example_inputs: tuple, **options) -> "TVMProgram":
        return cls(torch.export.export(module, example_inputs), **options)

    def forward(self, *args, **kwargs):
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        try:
            result = self.main(*(self._from_dlpack(x.detach().contiguous()) for x in leaves))
        except (RuntimeError, ValueError):  # the VM's check names its C++ condition: name the shapes instead
            error = mismatch("TVM", self.signature, leaves)
            if error is None:
                raise
            raise error from None
        results = list(result) if not hasattr(result, "__dlpack__") else [result]
        # Copy out of the VM's buffers: its memory planner reuses them on the next call.
        outputs = [torch.from_dlpack(r).clone() for r in results]
        return pytree.tree_unflatten(outputs, self.out_spec)


class TVMTarget(TargetBase):
    name = "tvm"
    # Quantized conv/linear run on our C++ int8 kernels (`quant`): u8 or i8 activations with any zero
    # point, per-channel symmetric weights; their fast AVX2 path adds u8·s8 pairs in 16 bits, exact for
    # 7-bit weights, so ask for those where that is the path (as the reference target does).
    quant_caps = QuantCaps(bits=(8,), saturating_int8=cpu_int8_saturates())
    # The Relax VM executable as a shared library: machine code for the CPU it was built on.
    artifact_files = ("model.so",)
    native_code = True

    def __init__(self, trials: int | None = None, time_limit_s: float | None = None, records: bool = True):
        """`trials`: MetaSchedule trials per fused op (0: no tuning); `time_limit_s`: tuning stops
        after the batch in flight then (each op's first batch of up to 32 trials still runs); `records`: apply tuning records cached for this graph (False: plain untuned build)."""
        self.trials = trials
        self.time_limit_s = time_limit_s
        self.records = records

    def unavailable_reason(self) -> str | None:
        try:
            import tvm  # noqa: F401
            from tvm.relax.frontend.torch import from_exported_program  # noqa: F401
        except ImportError as exc:
            return f"TVM is not installed ({exc}): pip install apache-tvm"
        return None

    def cache_key(self) -> str:
        """A build is code for this CPU and thread count (`num-cores`), made by this version of our lowering."""
        from .build import LOWERING_VERSION, host_target

        return f"{distribution_versions('apache-tvm', 'apache-tvm-ffi')}; {host_target()} lowering {LOWERING_VERSION}"

    def can_save(self, program) -> bool:
        return isinstance(program, TVMProgram) and program.executable is not None

    def save_program(self, folder: Path, exported, program, *, required: bool) -> dict:
        """The library is written from the executable `lower` built (needs a C compiler, as TVM's builds do)."""
        if not self.can_save(program):
            raise ArtifactError("save: a TVM artifact is written from the TVMProgram lower() returned for the "
                                "graph: pass it as program=")
        import tvm

        program.executable.export_library(str(folder / "model.so"))
        return {"tvm_version": tvm.__version__, "mcpu": _built_for(program.info.get("target"))}

    def load_program(self, folder: Path, info: dict, exported, *, precision: str, cache_dir: str | None,
                     notes: list[str]) -> "TVMProgram | None":
        """The saved library, where it was built for this CPU (its machine code may use instructions
        another CPU lacks)."""
        import tvm

        from .build import host_cpu

        saved, here = info.get("mcpu"), host_cpu()
        if saved != here:
            notes.append(f"the TVM library was built for CPU {saved!r} and this CPU is {here!r}: .program is None "
                         "(lower() the graph again)")
            return None
        try:
            library = tvm.runtime.load_module(str(folder / "model.so"))
        except Exception as exc:  # TVM raises its own error types for a bad library
            raise ArtifactError(f"load: {folder / 'model.so'} could not be loaded by TVM {tvm.__version__} (saved "
                                f"with {info.get('tvm_version')}): {first_line(exc)}") from exc
        return TVMProgram(exported, trials=0, time_limit_s=None, cache_dir=None, executable=library)

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None, trials: int | None = None,
              time_limit_s: float | None = None) -> Callable:
        if precision != "f32":
            raise OptionError(f"the tvm target runs precision 'f32' only; got {precision!r}")
        trials = next(t for t in (trials, self.trials, _default_trials()) if t is not None)
        options = {"trials": trials, "time_limit_s": time_limit_s or self.time_limit_s, "cache_dir": cache_dir,
                   "records": self.records}
        warn_dense_sparse24(self.name, sparse24_layers(gm), "TVM's CPU code generation has no 2:4 kernels")
        from .quant import report_float_ops, rewrite_int8

        int8 = rewrite_int8(gm)
        report_float_ops(self.name, int8.float_ops, strict=strict)
        if dynamic_dims(gm):
            from .per_shape import PerShapeProgram, warn_one_program_per_shape

            warn_one_program_per_shape(gm)
            return PerShapeProgram(gm, lambda args, kwargs: self._lower_static(
                int8, args, kwargs, strict=strict, precision=precision, options=options), example_inputs)
        return self._lower_static(int8, example_inputs, {}, strict=strict, precision=precision, options=options)

    def _lower_static(self, int8, args: tuple, kwargs: dict, *, strict: bool, precision: str,
                      options: dict) -> Callable:
        """The program for the shapes of `args`/`kwargs` (a graph with dynamic dims is exported static here)."""
        exported = torch.export.export(int8.gm, tuple(args), kwargs or None)
        if state_writes(int8.gm, self.name):  # a whole-graph program would read the state as a constant
            lowered = self._lower_partitioned(exported, set(), strict=strict, options=options)
            lowered.edge_lowering.int8_ops = int8.int8_ops
            return lowered
        try:
            program = TVMProgram(exported, **options)
        except AssertionError as exc:  # the importer asserts on unknown ops
            missing = unsupported_ops(str(exc))
            if missing is None:
                raise
            lowered = self._lower_partitioned(exported, missing, strict=strict, options=options)
            lowered.edge_lowering.int8_ops = int8.int8_ops
            return lowered
        program.edge_lowering = Lowering(self.name, precision, partitions=1, int8_ops=int8.int8_ops,
                                         weights_mb=program.weights_mb)
        return program

    def _lower_partitioned(self, exported, missing: set[str], *, strict: bool, options: dict) -> torch.fx.GraphModule:
        # The importer decomposes to core ATen first: partition that graph so names match.
        decomposed = exported.run_decompositions().module()
        unsupported = {n: "TVM's Relax importer (from_exported_program) has no converter for it"
                       for n in decomposed.graph.nodes
                       if n.op == "call_function" and getattr(n.target, "__name__", None) in missing}
        unsupported.update(state_writes(decomposed, self.name))
        if not unsupported:
            raise RuntimeError(f"TVM could not import the graph and the ops it names ({sorted(missing)}) are "
                               "not in it after decomposition, so it cannot be partitioned")
        fallbacks = fallbacks_of(unsupported)
        report_fallbacks(self.name, fallbacks, strict=strict)
        programs: list[TVMProgram] = []

        def compile_partition(sub, samples):
            programs.append(TVMProgram.from_module(sub, samples, **options))
            return programs[-1]

        lowered = lower_by_partition(decomposed, unsupported, compile_partition, prefix="tvm_")
        lowered.edge_lowering = Lowering(self.name, "f32", len(programs), fallbacks,
                                         weights_mb=sum(p.weights_mb for p in programs) + tensors_mb(lowered))
        lowered.tvm_programs = programs
        return lowered
