"""The search space: per-group compression choices, written as pipeline text.

Layers (conv/linear, by `graph_utils.layer_name`) are grouped by the start of their module path
(`conv1`, `layer1`, ..., `fc` on a ResNet; `encoder.layer.0`, ... on a transformer): one choice per
group keeps the space small. A configuration (a dict of choices, as Optuna suggests them) becomes one pipeline whose
per-group choices are `ignore=[...]` lists, so every trial's result is text a user can paste.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx

from ..graph_utils import CONV_OPS, LINEAR_OPS, layer_name
from ..pipeline import Pipeline, format_value

PRUNE_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5)
LOWRANK_ENERGIES = (0.0, 0.99, 0.97, 0.95, 0.9)  # 0.0: no low-rank split
QUANT_CONV = ("int8", "float")
QUANT_LINEAR = ("int8", "float", "w8", "w4")      # w8 / w4: weight-only int8 / int4 (Linears only)


@dataclass(frozen=True)
class Group:
    name: str
    layers: tuple[str, ...]
    linear_only: bool
    has_linear: bool           # 2:4 pays only on Linears: the one 2:4 kernel on CPUs is the reference target's
    patterns: tuple[str, ...]  # whole-name regexes matching exactly this group's layers (and their
                               # low-rank factors), free of backslashes so the text stays readable

    @property
    def prunable(self) -> bool:
        """Convs, or several Linears (a transformer layer's FFN and heads): not a lone classifier."""
        return not self.linear_only or len(self.layers) > 1


MIN_GROUPS = 4     # fewer groups than this at the first level: group one level deeper (a transformer's layers)
MAX_DEPTH = 4


def layer_groups(gm: torch.fx.GraphModule) -> list[Group]:
    """Conv/linear layers of a canonical graph grouped by the start of their module path: its first
    component (`conv1`, `layer1`, ... on a ResNet), or as many as give at least MIN_GROUPS groups
    (`encoder.layer.0` ... on a transformer, whose layers all sit under `encoder`)."""
    layers = [(layer_name(n), n.target in LINEAR_OPS) for n in gm.graph.nodes
              if n.op == "call_function" and (n.target in CONV_OPS or n.target in LINEAR_OPS)]
    counts = {d: len({_prefix(name, d) for name, _ in layers}) for d in range(1, MAX_DEPTH + 1)}
    depth = next((d for d in counts if counts[d] >= MIN_GROUPS), max(counts, key=lambda d: (counts[d], -d)))
    grouped: dict[str, list[tuple[str, bool]]] = {}
    for name, linear in layers:
        grouped.setdefault(_prefix(name, depth), []).append((name, linear))
    groups = []
    for key, members in grouped.items():
        names = tuple(dict.fromkeys(n for n, _ in members))
        # the layer `key`, the layers under it, and low-rank factors; [.] keeps the text free of backslashes
        patterns = (key.replace(".", "[.]") + "([.].*)?",)
        linears = [linear for _, linear in members]
        groups.append(Group(key, names, all(linears), any(linears), patterns))
    return groups


def _prefix(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


@dataclass
class SearchSpace:
    groups: list[Group]
    prune: bool = True
    lowrank: bool = True
    sparsify_24: bool = True
    quantize: bool = True
    data_aware: bool = True  # prune(criterion=activation) where calibration data is given
    prune_ratios: tuple[float, ...] = PRUNE_RATIOS
    lowrank_energies: tuple[float, ...] = LOWRANK_ENERGIES
    prefix: str = "fold_bn"
    suffix: str = "dce"
    distill_point: str = field(default="before quantize", init=False)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One configuration drawn through an Optuna trial (`trial.suggest_categorical` per knob)."""
        config: dict[str, Any] = {}
        for g in self.groups:
            if self.quantize:
                config[f"quant:{g.name}"] = trial.suggest_categorical(
                    f"quant:{g.name}", QUANT_LINEAR if g.linear_only else QUANT_CONV)
            if self.prune and g.prunable:
                config[f"prune:{g.name}"] = trial.suggest_categorical(f"prune:{g.name}", self.prune_ratios)
            if self.lowrank:
                config[f"lowrank:{g.name}"] = trial.suggest_categorical(f"lowrank:{g.name}", self.lowrank_energies)
            if self.sparsify_24 and g.has_linear:
                config[f"sparse24:{g.name}"] = trial.suggest_categorical(f"sparse24:{g.name}", (False, True))
        return config

    def uniform(self, quant: str = "int8") -> dict[str, Any]:
        """Every group the same: `quant` everywhere, nothing else (a seed trial, e.g. int8 only)."""
        config: dict[str, Any] = {}
        for g in self.groups:
            if self.quantize:
                config[f"quant:{g.name}"] = quant
            if self.prune and g.prunable:
                config[f"prune:{g.name}"] = 0.0
            if self.lowrank:
                config[f"lowrank:{g.name}"] = 0.0
            if self.sparsify_24 and g.has_linear:
                config[f"sparse24:{g.name}"] = False
        return config

    def pruned(self, ratio: float, groups: list[Group], quant: "str | dict[str, Any]" = "int8") -> dict[str, Any]:
        """`quant` everywhere (or the quant choices of a configuration) and `ratio` on `groups`, nothing else."""
        config = self.uniform(quant) if isinstance(quant, str) else dict(quant)
        config.update({f"prune:{g.name}": ratio for g in groups})
        return config

    def float_where(self, float_layers: set[str]) -> dict[str, Any]:
        """int8 everywhere but the groups holding one of `float_layers`, which stay float."""
        config = self.uniform("int8")
        if self.quantize:
            config.update({f"quant:{g.name}": "float" for g in self.groups if float_layers & set(g.layers)})
        return config

    def prunable_after_first(self) -> list[Group]:
        """The groups a uniform prune ratio goes to: every prunable group but the first (the stem)."""
        return [g for g in self.groups if g.prunable][1:] if self.prune else []

    def prune_seeds(self, ratios: tuple[float, ...]) -> list[dict[str, Any]]:
        """Seed trials near where int8 + structure should pay: int8 everywhere, each ratio on the later
        half of the prunable groups, then on all of them after the first (the stem stays whole)."""
        prunable = [g for g in self.groups if g.prunable]
        if not self.prune or not prunable:
            return []
        late, rest = prunable[len(prunable) // 2:], self.prunable_after_first()
        seeds = []
        for chosen in (late, rest):
            for ratio in ratios:
                if ratio in self.prune_ratios and ratio > 0:
                    config = self.pruned(ratio, chosen)
                    if config not in seeds:
                        seeds.append(config)
        return seeds

    def _others(self, chosen: list[Group]) -> list[str]:
        names = {g.name for g in chosen}
        return [p for g in self.groups if g.name not in names for p in g.patterns]

    def _step(self, name: str, options: dict[str, Any], chosen: list[Group]) -> str:
        others = self._others(chosen)
        if others:
            options = {**options, "ignore": tuple(others)}
        if not options:
            return name
        return f"{name}(" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + ")"

    def _by_value(self, config: dict[str, Any], knob: str, off: Any) -> dict[Any, list[Group]]:
        chosen: dict[Any, list[Group]] = {}
        for g in self.groups:
            value = config.get(f"{knob}:{g.name}", off)
            if value != off:
                chosen.setdefault(value, []).append(g)
        return chosen

    def structural_steps(self, config: dict[str, Any], with_calibration: bool) -> list[str]:
        """prune, lowrank, sparsify_24 steps: the ones distillation recovers from."""
        steps = []
        criterion = {"criterion": "activation"} if with_calibration and self.data_aware else {}
        for ratio, groups in sorted(self._by_value(config, "prune", 0.0).items()):
            steps.append(self._step("prune", {"ratio": ratio, **criterion}, groups))
        for energy, groups in sorted(self._by_value(config, "lowrank", 0.0).items(), reverse=True):
            steps.append(self._step("lowrank", {"energy": energy}, groups))
        sparse = self._by_value(config, "sparse24", False).get(True)
        if sparse:
            steps.append(self._step("sparsify_24", {}, sparse))
        return steps

    def quant_steps(self, config: dict[str, Any]) -> list[str]:
        steps = []
        static = self._by_value(config, "quant", "float").pop("int8", [])
        if static:
            steps.append(self._step("quantize", {}, static))
        quantized = list(static)  # an earlier step's layers are no longer quantizable: not in later ignores
        for mode, bits in (("w8", 8), ("w4", 4)):
            groups = [g for g in self.groups if config.get(f"quant:{g.name}") == mode]
            if groups:  # weight-only sees Linears only: ignore the other Linear-only groups
                others = [p for g in self.groups if g.linear_only and g not in groups and g not in quantized
                          for p in g.patterns]
                quantized += groups
                options: dict[str, Any] = {"weight_only": True, "bits": bits}
                if others:
                    options["ignore"] = tuple(others)
                steps.append("quantize(" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + ")")
        return steps

    def pipeline(self, config: dict[str, Any], with_calibration: bool = True) -> str:
        """The canonical pipeline text of a configuration."""
        steps = [self.prefix, *self.structural_steps(config, with_calibration), *self.quant_steps(config),
                 self.suffix]
        return str(Pipeline.parse(",".join(s for s in steps if s)))

    def split(self, config: dict[str, Any], with_calibration: bool = True) -> tuple[str, str | None]:
        """(the pipeline up to the quantize steps, the rest or None): where flash distillation goes."""
        head = ",".join(s for s in [self.prefix, *self.structural_steps(config, with_calibration)] if s)
        tail = ",".join(s for s in [*self.quant_steps(config), self.suffix] if s)
        return str(Pipeline.parse(head)), (str(Pipeline.parse(tail)) if tail else None)


def build_space(gm: torch.fx.GraphModule, *, target: str = "openvino", **kwargs: Any) -> SearchSpace:
    return SearchSpace(layer_groups(gm), **kwargs)


Suggest = Callable[[Any], dict[str, Any]]
