"""Optuna study: storage in the run directory (SQLite, or a journal file for several processes),
samplers, and resuming (finished trials are kept; trials a killed run left RUNNING are closed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STUDY_NAME = "edgepasses-search"
META = "search.json"
SQLITE = "study.db"
JOURNAL = "journal.log"


def storage_for(out: "str | Path", journal: bool = False):
    """SQLite (`study.db`) by default; a journal file (multi-process safe) for Ray workers. An existing
    run directory keeps the kind it was started with."""
    import optuna

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if journal or ((out / JOURNAL).exists() and not (out / SQLITE).exists()):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(out / JOURNAL)))
    return optuna.storages.RDBStorage(f"sqlite:///{(out / SQLITE).resolve()}",
                                      engine_kwargs={"connect_args": {"timeout": 60}})


def make_sampler(name: str, trials: int, seed: int | None):
    import optuna

    from .objectives import constraints_func

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(12, trials // 5)), seed=seed,
                                             constraints_func=constraints_func)
    if name == "tpe":
        return optuna.samplers.TPESampler(constraints_func=constraints_func, multivariate=True, seed=seed,
                                          n_startup_trials=max(2, min(10, trials // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; valid: nsga2, tpe, random")


def open_study(storage, directions: list[str], sampler=None):
    import optuna

    return optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=directions, sampler=sampler,
                               load_if_exists=True)


def close_interrupted(study) -> int:
    """Trials a killed run left RUNNING become FAIL (marked 'interrupted', not counted as done)."""
    from optuna.trial import TrialState

    closed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        closed += 1
    return closed


def done_count(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))


def trial_params(out: "str | Path", number: int) -> dict[str, Any]:
    """The configuration (Optuna params) of trial `number` of the run in `out`."""
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(out))
    return dict(study.trials[number].params)


def write_meta(out: "str | Path", meta: dict[str, Any]) -> None:
    path = Path(out) / META
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **meta}, indent=2, default=str))


def read_meta(out: "str | Path") -> dict[str, Any]:
    path = Path(out) / META
    if not path.exists():
        raise FileNotFoundError(f"{out} is no search run directory (no {META}); run `edgepasses search --out {out}`")
    return json.loads(path.read_text())
