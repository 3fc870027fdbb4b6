"""Runs a per-scene stage over a list of scenes; the only module that imports Dask.

A stage is plain data: a name and a picklable function `fn(scene_id) -> SceneResult` (usually a
`functools.partial` of a stage module's `run_scene` with the store path and config bound). The
executor maps it over scenes with the synchronous scheduler (tests), a local cluster (default), a
running scheduler by address, or a SLURM/PBS cluster through dask-jobqueue. A scene that raises is
recorded as failed with its file and message; the others go on. A worker that dies is handled by
the Dask scheduler, which reschedules its tasks elsewhere (`allowed-failures`).

A cluster that cannot work fails fast instead of waiting for ever: before dask-jobqueue starts,
the submit command (`sbatch` / `qsub`) must be on PATH; the job script is written to
`job_dir` first, and when no worker has joined `worker_timeout_s` after the jobs were submitted,
the run stops with a :class:`ClusterError` naming the command, the queue and that script.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.schema import check_scene_id

SUBMIT_COMMANDS = {"slurm": "sbatch", "pbs": "qsub"}
"""The command dask-jobqueue submits jobs with, per executor kind."""


class ClusterError(UserError):
    """A cluster that cannot run the stage: no submit command, or no worker joined in time."""


@dataclass(frozen=True)
class ExecutorConfig:
    """Where and how a stage runs."""

    kind: Literal["sync", "local", "address", "slurm", "pbs"] = "local"
    """sync: in this process (tests, shards of an array job); local: a local process cluster;
    address: a running scheduler; slurm/pbs: a dask-jobqueue cluster started by this command."""
    workers: int = 0
    """Local cluster worker processes; 0 = one per core."""
    threads_per_worker: int = 1
    """Threads per worker process; stages parallelise inside (numba), so 1 avoids oversubscription."""
    memory_per_worker: str = "auto"
    """Local worker memory limit (Dask spills/restarts above it), e.g. "6GiB"; auto = RAM / workers."""
    address: str = ""
    """Scheduler address for kind=address, e.g. tcp://10.0.0.5:8786 or tls://... (see README)."""
    host: str = "127.0.0.1"
    """Interface the local/jobqueue scheduler binds to. Localhost unless workers live elsewhere."""
    dashboard: str = ""
    """Dashboard address (e.g. 127.0.0.1:8787); empty = no dashboard."""
    cores: int = 8
    """jobqueue: cores per job."""
    processes: int = 1
    """jobqueue: worker processes per job."""
    memory: str = "32GB"
    """jobqueue: memory per job."""
    walltime: str = "04:00:00"
    """jobqueue: walltime per job."""
    queue: str = ""
    """jobqueue: partition / queue name (empty = the cluster default)."""
    account: str = ""
    """jobqueue: account / project to charge (empty = none)."""
    jobs: int = 4
    """jobqueue: number of jobs to start."""
    job_extra_directives: tuple[str, ...] = ()
    """jobqueue: extra #SBATCH/#PBS lines, e.g. ["--constraint=cpu"]."""
    job_script_prologue: tuple[str, ...] = ()
    """jobqueue: shell lines run before the worker starts, e.g. ["source .venv/bin/activate"]."""
    local_directory: str = ""
    """jobqueue: worker scratch directory (empty = default)."""
    job_dir: str = ""
    """jobqueue: where the job script and the jobs' output files go (empty = <tmp>/ws3d-jobs)."""
    worker_timeout_s: float = 600.0
    """jobqueue/address: stop with an error when no worker has joined this long after the jobs
    were submitted (a wrong queue, a job stuck pending, a worker that cannot start)."""


@dataclass
class SceneResult:
    """What happened to one scene in one stage."""

    scene_id: str
    status: Literal["done", "skipped", "failed"]
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    file: str | None = None


@dataclass
class RunReport:
    """All scene results of one stage run."""

    stage: str
    results: list[SceneResult]
    seconds: float = 0.0

    def of(self, status: str) -> list[SceneResult]:
        return [r for r in self.results if r.status == status]

    @property
    def ok(self) -> bool:
        return not self.of("failed")

    def summary(self) -> str:
        """A short human summary, with a table of failures (scene, file, error)."""
        lines = [
            f"{self.stage}: {len(self.of('done'))} done, {len(self.of('skipped'))} skipped (complete), "
            f"{len(self.of('failed'))} failed in {self.seconds:.1f} s"
        ]
        for r in self.of("failed"):
            lines.append(f"  FAILED {r.scene_id}  file={r.file or '-'}  {r.error}")
        return "\n".join(lines)

    def append_log(self, path: str | Path) -> Path:
        """Append one JSON line per scene (stage, scene, status, seconds, error, file) to ``path``."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            for r in self.results:
                handle.write(json.dumps({"stage": self.stage, "scene": r.scene_id, "status": r.status,
                                         "seconds": round(r.seconds, 3), "error": r.error, "file": r.file}) + "\n")
        return path


def run_guarded(fn: Callable[[str], SceneResult | None], scene_id: str) -> SceneResult:
    """Run one scene; turn any exception into a failed SceneResult naming file and error."""
    start = time.perf_counter()
    try:
        result = fn(scene_id)
    except Exception as exc:  # one bad scene must not stop the others; the error is reported
        file = getattr(exc, "file", None) or getattr(exc, "filename", None)
        message = str(exc) or type(exc).__name__
        if not hasattr(exc, "scene_id"):
            # an unexpected error: keep the innermost frame so that a bug is findable
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
            message = f"{type(exc).__name__}: {message}{where}"
        return SceneResult(scene_id, "failed", time.perf_counter() - start, error=message,
                           file=str(file) if file else None)
    if result is None:
        result = SceneResult(scene_id, "done")
    result.seconds = result.seconds or time.perf_counter() - start
    return result


def read_scene_list(path: str | Path) -> list[str]:
    """Scene ids from a text file (one per line, # comments); every id validated before use."""
    path = Path(path)
    ids = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            ids.append(check_scene_id(line))
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
    return ids


def select_shard(scene_ids: Sequence[str], shard: str | None) -> list[str]:
    """Scenes of shard `i/n` (0-based i) of the sorted list: scenes[i::n]; all when shard is None."""
    ids = sorted(scene_ids)
    if not shard:
        return ids
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected i/n, e.g. 0/8") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {shard!r}: need 0 <= i < n")
    return ids[index::count]


@contextlib.contextmanager
def dask_client(cfg: ExecutorConfig) -> Iterator[Any]:
    """A distributed Client for the configured cluster, closed (and the cluster stopped) on exit."""
    from distributed import Client, LocalCluster

    if cfg.kind == "address":
        if not cfg.address:
            raise ClusterError("executor kind=address needs executor.address=tcp://HOST:PORT")
        try:
            client = Client(cfg.address, timeout=f"{cfg.worker_timeout_s}s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"no Dask scheduler reachable at {cfg.address} within {cfg.worker_timeout_s:g} s: {exc}") from None
        with client:
            _wait_for_workers(client, cfg, f"the scheduler at {cfg.address} has no worker")
            yield client
        return
    if cfg.kind == "local":
        import os

        workers = cfg.workers or os.cpu_count() or 1
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            host=cfg.host,
            dashboard_address=cfg.dashboard or None,
            memory_limit=cfg.memory_per_worker,
        )
    elif cfg.kind in ("slurm", "pbs"):
        command = check_submit_command(cfg)
        cluster = make_jobqueue_cluster(cfg)
        script = write_job_script(cluster, cfg)
        with cluster, Client(cluster) as client:
            cluster.scale(jobs=cfg.jobs)
            queue = cfg.queue or "(the cluster's default queue)"
            _wait_for_workers(
                client, cfg,
                f"`{command}` submitted {cfg.jobs} job(s) to queue {queue} but no worker joined; "
                f"job script: {script} (job output under {script.parent}); check the queue "
                f"(squeue/qstat), executor.queue and executor.account, or raise executor.worker_timeout_s",
            )
            yield client
        return
    else:
        raise ClusterError(f"no Dask cluster for executor kind {cfg.kind!r}")
    with cluster, Client(cluster) as client:
        yield client


def check_submit_command(cfg: ExecutorConfig) -> str:
    """The submit command of a jobqueue executor (``sbatch``/``qsub``); ClusterError if not on PATH."""
    command = SUBMIT_COMMANDS[cfg.kind]
    if shutil.which(command) is None:
        raise ClusterError(
            f"executor kind={cfg.kind} needs `{command}` on PATH, and it is not there (not a {cfg.kind.upper()} "
            f"login node?); run on this machine with executor.kind=local (make preprocess without EXECUTOR=...)"
        )
    return command


def job_dir(cfg: ExecutorConfig) -> Path:
    """Where job scripts and job output go (created)."""
    path = Path(cfg.job_dir) if cfg.job_dir else Path(tempfile.gettempdir()) / "ws3d-jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_job_script(cluster: Any, cfg: ExecutorConfig) -> Path:
    """Write the cluster's job script to ``job_dir`` (what each submitted job runs), for a person
    to read or submit by hand; returns its path."""
    path = job_dir(cfg) / f"ws3d-{cfg.kind}-job.sh"
    path.write_text(cluster.job_script())
    return path


def _wait_for_workers(client: Any, cfg: ExecutorConfig, message: str) -> None:
    """Wait until a worker has joined; ClusterError with ``message`` after ``worker_timeout_s``."""
    try:
        client.wait_for_workers(1, timeout=cfg.worker_timeout_s)
    except TimeoutError:
        raise ClusterError(f"{message} (waited {cfg.worker_timeout_s:g} s)") from None


def make_jobqueue_cluster(cfg: ExecutorConfig) -> Any:
    """A dask-jobqueue SLURMCluster or PBSCluster from the config (starts no job by itself)."""
    import dask_jobqueue

    kwargs: dict[str, Any] = dict(
        cores=cfg.cores,
        processes=cfg.processes,
        memory=cfg.memory,
        walltime=cfg.walltime,
        job_extra_directives=list(cfg.job_extra_directives),
        job_script_prologue=list(cfg.job_script_prologue),
        scheduler_options={"host": cfg.host, "dashboard_address": cfg.dashboard or None},
    )
    if cfg.queue:
        kwargs["queue"] = cfg.queue
    if cfg.account:
        kwargs["account"] = cfg.account
    if cfg.local_directory:
        kwargs["local_directory"] = cfg.local_directory
    kwargs["log_directory"] = str(job_dir(cfg))
    cls = dask_jobqueue.SLURMCluster if cfg.kind == "slurm" else dask_jobqueue.PBSCluster
    return cls(**kwargs)


def run_scenes(
    stage: str,
    fn: Callable[[str], SceneResult | None],
    scene_ids: Sequence[str],
    cfg: ExecutorConfig = ExecutorConfig(),
    *,
    progress: bool = True,
) -> RunReport:
    """Run `fn` over every scene with the configured executor; never raises for a scene's error."""
    start = time.perf_counter()
    ids = [check_scene_id(s) for s in scene_ids]
    # a bar on a terminal, a plain line every few seconds in a log (a cluster job's output stays readable)
    bar = progress_bar(total=len(ids), desc=stage, unit="scene", enabled=progress, leave=False)
    results: list[SceneResult] = []
    with bar:  # closed also when the cluster cannot start
        if cfg.kind == "sync" or not ids:
            import dask

            for scene_id in ids:
                results.append(dask.delayed(run_guarded)(fn, scene_id).compute(scheduler="synchronous"))
                bar.update()
        else:
            from distributed import as_completed

            with dask_client(cfg) as client:
                # pure=False: a rerun must execute again rather than reuse a cached result
                futures = [client.submit(run_guarded, fn, s, key=f"{stage}-{s}", pure=False) for s in ids]
                for future in as_completed(futures):
                    results.append(future.result())
                    bar.update()
    order = {s: i for i, s in enumerate(ids)}
    results.sort(key=lambda r: order[r.scene_id])
    return RunReport(stage, results, time.perf_counter() - start)
