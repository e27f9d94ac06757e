"""Trials on Ray: each task opens the same study (a journal file: multi-process safe) and runs its share
with `study.optimize`. `workers="ray"` starts a local Ray instance; "ray://host:port" joins a cluster
(whose workers must see the run directory, e.g. a shared filesystem)."""
from __future__ import annotations

import contextlib
from pathlib import Path


def _worker(out: str, spec, directions: list[str], sampler_name: str, trials: int, n: int, seed: int | None):
    from .engine import run_local
    from .study import make_sampler, open_study, storage_for

    study = open_study(storage_for(out, journal=True), directions, make_sampler(sampler_name, trials, seed))
    run_local(study, spec, n, show_progress=False)
    return n


@contextlib.contextmanager
def ray_session(address: str, num_workers: int | None = None):
    """Ray for the block: the running instance, else a local one ("ray") or the cluster at `address`,
    shut down at the end. Searches that call `run_ray` several times (pipeline="auto") start it once."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("--workers ray needs Ray: pip install 'edgepasses[ray]'") from exc
    started = not ray.is_initialized()
    if started and address == "ray":
        ray.init(num_cpus=num_workers or 2, include_dashboard=False, log_to_driver=False)
    elif started:
        ray.init(address=address, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def run_ray(address: str, out: "str | Path", spec, directions: list[str], sampler_name: str, trials: int,
            remaining: int, seed: int | None, num_workers: int | None = None) -> None:
    with ray_session(address, num_workers) as ray:
        workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = max(1, min(workers, remaining))
        shares = [remaining // workers + (1 if i < remaining % workers else 0) for i in range(workers)]
        task = ray.remote(num_cpus=1)(_worker)
        spec_ref = ray.put(spec)
        ray.get([task.remote(str(Path(out).resolve()), spec_ref, directions, sampler_name, trials, n,
                             None if seed is None else seed + i)
                 for i, n in enumerate(shares) if n])
