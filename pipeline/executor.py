"""Runs a per-scene stage over a list of scenes; the only module that imports Dask.

A stage is plain data: a name and a picklable function `fn(scene_id) -> SceneResult` (usually a
`functools.partial` of a stage module's `run_scene` with the store path and config bound). The
executor maps it over scenes with the synchronous scheduler (tests), a local cluster (default), a
running scheduler by address, or a SLURM/PBS cluster through dask-jobqueue. A scene that raises is
recorded as failed with its file and message; the others go on. A worker that dies is handled by
the Dask scheduler, which reschedules its tasks elsewhere (`task_retries` times); a scene whose
worker keeps dying (out of memory) is then a failed scene in the report, never a traceback.

Locked down by default: the local cluster and a jobqueue cluster run with TLS and ephemeral
certificates (`distributed.Security.temporary()`) held by the process that started them (a
jobqueue cluster's worker copies are files readable by this user only in its private job folder),
so no other account on the machine can connect to the scheduler or a worker and run code; no
HTTP server (dashboard, metrics) listens unless `dashboard` asks for one; binding beyond loopback
(`host`) warns, and is only ever done with TLS. Job scripts go to a folder of this user's own
(created 0700, refused when it is a link, another user's or writable by others) and are written
through a new file, never through a link.

A cluster that cannot work fails fast instead of waiting for ever: config values that cannot make
a cluster (`workers=-3`) are refused when the config is built; before dask-jobqueue starts, the
submit command (`sbatch` / `qsub`) must be on PATH; the job script is written to `job_dir` first,
and when no worker has joined `worker_timeout_s` after the jobs were submitted, the run stops with
a :class:`ClusterError` naming the command, the queue and that script.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import stat
import tempfile
import time
import traceback
import warnings
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


class ExposureWarning(UserWarning):
    """Something listens beyond loopback, or without authentication, because the config asked."""


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
    """Interface the local/jobqueue scheduler (and local workers) bind to. Loopback unless workers
    live elsewhere; anything else warns (the cluster always runs with TLS and its own certificates)."""
    dashboard: str = ""
    """Address of the scheduler's HTTP server (dashboard, metrics), e.g. 127.0.0.1:8787; it has no
    authentication. Empty = no HTTP server at all (on the scheduler and on every worker)."""
    task_retries: int = 3
    """Times a scene is started again on a fresh worker after its worker died while running it
    (out of memory, a crash); after that the scene fails alone and the others go on."""
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
    """jobqueue: where the job script, the jobs' output and the workers' TLS credentials go: a
    folder of this user's own, not writable by others, and not a link (created 0700); on a shared
    file system, since the workers read their credentials there. Empty = ~/.cache/ws3d/jobs
    ($XDG_CACHE_HOME/ws3d/jobs)."""
    worker_timeout_s: float = 600.0
    """jobqueue/address: stop with an error when no worker has joined this long after the jobs
    were submitted (a wrong queue, a job stuck pending, a worker that cannot start)."""

    def __post_init__(self) -> None:
        # values that cannot make a cluster: refused here, since Dask would wait for ever on them
        for name in ("threads_per_worker", "cores", "processes", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"executor.{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"executor.workers must be >= 0 (0: one per core), got {self.workers}")
        if self.task_retries < 0:
            raise ValueError(f"executor.task_retries must be >= 0, got {self.task_retries}")
        if not self.worker_timeout_s > 0:
            raise ValueError(f"executor.worker_timeout_s must be > 0, got {self.worker_timeout_s}")
        if not self.host.strip():
            raise ValueError("executor.host is empty; 127.0.0.1 keeps the cluster on this machine")


@dataclass
class SceneResult:
    """What happened to one scene in one stage."""

    scene_id: str
    status: Literal["done", "skipped", "failed"]
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    file: str | None = None


WARNINGS_SHOWN = 10
"""Scenes whose reader warnings the summary prints (all are in the stage's log)."""


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
        warned = [r for r in self.results if r.status == "done" and r.stats.get("warnings")]
        for r in warned[:WARNINGS_SHOWN]:
            lines.extend(f"  warning {r.scene_id}: {w}" for w in r.stats["warnings"])
        if len(warned) > WARNINGS_SHOWN:
            lines.append(f"  ... warnings for {len(warned) - WARNINGS_SHOWN} more scene(s) in the stage log")
        return "\n".join(lines)

    def append_log(self, path: str | Path) -> Path:
        """Append one JSON line per scene (stage, scene, status, seconds, error, file) to ``path``."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            for r in self.results:
                line = {"stage": self.stage, "scene": r.scene_id, "status": r.status,
                        "seconds": round(r.seconds, 3), "error": r.error, "file": r.file}
                if r.stats.get("warnings"):
                    line["warnings"] = list(r.stats["warnings"])
                handle.write(json.dumps(line) + "\n")
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


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name stays on this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if "://" in host:
        host = host.split("://", 1)[1]
    if host.count(":") == 1:  # host:port
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface: assume it is reachable from elsewhere


def _warn_exposure(cfg: ExecutorConfig) -> None:
    """A warning (it reaches the terminal) for each listener the config puts beyond loopback or
    without authentication."""
    if cfg.kind in ("local", "slurm", "pbs") and not is_loopback(cfg.host):
        where = "the scheduler and every worker" if cfg.kind == "local" else "the scheduler"
        warnings.warn(
            f"executor.host={cfg.host}: {where} listen beyond loopback (TLS with this run's own certificates: "
            "nothing without them can connect)", ExposureWarning, stacklevel=3)
    if cfg.dashboard and cfg.kind in ("local", "slurm", "pbs"):
        reach = "on loopback" if is_loopback(cfg.dashboard) else "beyond loopback"
        warnings.warn(
            f"executor.dashboard={cfg.dashboard}: the scheduler's HTTP server (dashboard, metrics, no "
            f"authentication) listens {reach} at {cfg.dashboard}", ExposureWarning, stacklevel=3)
    if cfg.kind == "address" and cfg.address.startswith("tcp://") and not is_loopback(cfg.address):
        warnings.warn(
            f"executor.address={cfg.address} is plain TCP: whoever can reach that scheduler can run code on its "
            "workers; use tls:// with a distributed.Security configuration (docs/cluster.md)",
            ExposureWarning, stacklevel=3)


def __getattr__(name: str) -> Any:
    """The Dask server classes without an HTTP server (`QuietScheduler`, `QuietWorker`), built on
    first use so that importing this module stays light (Dask loads only when a cluster starts);
    worker processes find them here by name."""
    if name not in ("QuietScheduler", "QuietWorker"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _SERVER_CLASSES:
        from distributed import Scheduler, Worker

        base = Scheduler if name == "QuietScheduler" else Worker
        cls = type(name, (base,), {
            "start_http_server": _no_http_server, "__module__": __name__, "__qualname__": name,
            "__doc__": f"A Dask {base.__name__} that serves no HTTP (no dashboard, no metrics endpoint).",
        })
        _SERVER_CLASSES[name] = cls
    return _SERVER_CLASSES[name]


_SERVER_CLASSES: dict[str, type] = {}


def _no_http_server(self: Any, routes: Any, dashboard_address: Any, default_port: int = 0, ssl_options: Any = None) -> None:
    """Replaces `distributed.node.ServerNode.start_http_server`, which always listens (the
    scheduler on 8787 even without a dashboard, each worker on a random port): the server object
    exists, so that closing the node works, but it never binds a socket."""
    from distributed.http.routing import RoutingApplication
    from tornado.httpserver import HTTPServer

    self.http_application = RoutingApplication([])
    self.http_server = HTTPServer(self.http_application)


def _temporary_security() -> Any:
    """TLS with a fresh self-signed certificate held in memory by this process (and handed to the
    worker processes it starts): scheduler, workers and client all require it."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError:  # pragma: no cover - cryptography is a dependency
        raise ClusterError("a local Dask cluster needs the `cryptography` package for its TLS certificates "
                           "(pip install cryptography)") from None


def _scheduler_config(cfg: ExecutorConfig) -> dict[str, Any]:
    """Dask settings of a scheduler started here: how often a task may kill its worker before it
    is given up, and one task at a time per worker thread (so that a worker that dies takes only
    the scene that killed it with it, not a queued bystander)."""
    return {"distributed.scheduler.allowed-failures": cfg.task_retries,
            "distributed.scheduler.worker-saturation": 1.0}


def make_local_cluster(cfg: ExecutorConfig) -> Any:
    """The local process cluster, locked down: TLS with temporary certificates, no HTTP server
    unless `cfg.dashboard`, worker scratch in a private temporary folder (removed on close).

    Raises:
        ClusterError: a memory limit Dask cannot parse, or workers that cannot start.
    """
    import logging

    import dask
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.worker_memory import parse_memory_limit

    _warn_exposure(cfg)
    workers = cfg.workers or os.cpu_count() or 1
    try:
        memory = parse_memory_limit(cfg.memory_per_worker, 1, total_cores=workers,
                                    logger=logging.getLogger("distributed.worker_memory"))
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"executor.memory_per_worker={cfg.memory_per_worker!r}: {exc}") from None
    security = _temporary_security()
    scratch = tempfile.mkdtemp(prefix="ws3d-dask-")  # 0700: spilled data and worker files of this run only
    quiet_scheduler = __getattr__("QuietScheduler")
    quiet_worker = __getattr__("QuietWorker")
    scheduler_options = dict(host=cfg.host, security=security, protocol="tls://", port=0,
                             dashboard=bool(cfg.dashboard), dashboard_address=cfg.dashboard or None)
    worker_options = dict(host=cfg.host, nthreads=cfg.threads_per_worker, memory_limit=memory, security=security,
                          protocol="tls://", local_directory=scratch, dashboard=False, dashboard_address=None,
                          worker_class=quiet_worker, silence_logs=logging.WARNING)
    scheduler = {"cls": Scheduler if cfg.dashboard else quiet_scheduler, "options": scheduler_options}
    worker = {"cls": Nanny, "options": worker_options}
    try:
        with dask.config.set(_scheduler_config(cfg)):
            cluster = SpecCluster(scheduler=scheduler, workers={i: worker for i in range(workers)}, worker=worker,
                                  security=security, silence_logs=logging.WARNING, name="ws3d")
    except (RuntimeError, OSError, TimeoutError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ClusterError(f"the local Dask cluster did not start ({workers} worker(s) on {cfg.host}): {exc}") from None
    cluster._ws3d_scratch = scratch  # removed when the cluster closes (dask_client)
    return cluster


def joinable_by_address(client: Any) -> Any:
    """A context in which `executor kind=address` clients can join ``client``'s cluster: its run-made
    TLS credentials set as dask config (as a user's ``~/.config/dask`` would set a cluster's), e.g.
    for a benchmark that keeps one local cluster for several stages."""
    import dask

    sec = client.security
    return dask.config.set({"distributed.comm.require-encryption": True, "distributed.comm.tls.ca-file": sec.tls_ca_file,
                            "distributed.comm.tls.client.cert": sec.tls_client_cert,
                            "distributed.comm.tls.client.key": sec.tls_client_key})


@contextlib.contextmanager
def dask_client(cfg: ExecutorConfig) -> Iterator[Any]:
    """A distributed Client for the configured cluster, closed (and the cluster stopped) on exit."""
    from distributed import Client

    if cfg.kind == "address":
        if not cfg.address:
            raise ClusterError("executor kind=address needs executor.address=tcp://HOST:PORT")
        _warn_exposure(cfg)
        try:
            client = Client(cfg.address, timeout=f"{cfg.worker_timeout_s}s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"no Dask scheduler reachable at {cfg.address} within {cfg.worker_timeout_s:g} s: {exc}") from None
        with client:
            _wait_for_workers(client, cfg, f"the scheduler at {cfg.address} has no worker")
            yield client
        return
    if cfg.kind == "local":
        cluster = make_local_cluster(cfg)
        try:
            with cluster, Client(cluster, security=cluster.security) as client:
                yield client
        finally:
            shutil.rmtree(cluster._ws3d_scratch, ignore_errors=True)
        return
    if cfg.kind in ("slurm", "pbs"):
        import dask

        command = check_submit_command(cfg)
        with dask.config.set(_scheduler_config(cfg)):
            cluster = make_jobqueue_cluster(cfg)
        script = write_job_script(cluster, cfg)
        with cluster, Client(cluster, security=cluster.security) as client:
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
    raise ClusterError(f"no Dask cluster for executor kind {cfg.kind!r}")


def check_submit_command(cfg: ExecutorConfig) -> str:
    """The submit command of a jobqueue executor (``sbatch``/``qsub``); ClusterError if not on PATH."""
    command = SUBMIT_COMMANDS[cfg.kind]
    if shutil.which(command) is None:
        raise ClusterError(
            f"executor kind={cfg.kind} needs `{command}` on PATH, and it is not there (not a {cfg.kind.upper()} "
            f"login node?); run on this machine with executor.kind=local (make preprocess without EXECUTOR=...)"
        )
    return command


def default_job_dir() -> Path:
    """This user's own job folder: ``$XDG_CACHE_HOME/ws3d/jobs`` or ``~/.cache/ws3d/jobs`` (a home
    folder is per user and, on a cluster, shared with the compute nodes)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ws3d" / "jobs"


def job_dir(cfg: ExecutorConfig) -> Path:
    """Where job scripts, job output and the workers' TLS credentials go: created 0700 when absent.

    Raises:
        ClusterError: the folder is a symbolic link, not a folder, owned by another user, or
        writable by group or others (anyone who can write there could swap the job script or read
        the workers' credentials).
    """
    path = Path(cfg.job_dir).expanduser() if cfg.job_dir else default_job_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ClusterError(f"executor.job_dir {path}: cannot create it: {exc.strerror or exc}") from None
    info = os.lstat(path)
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link (job scripts are never written through a link)"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.getuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by others (mode {stat.S_IMODE(info.st_mode):o}; chmod 700 it)"
    if problem:
        raise ClusterError(f"executor.job_dir {path} {problem}; give executor.job_dir=<a folder of your own>")
    return path


def write_private_file(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a new file (mode 0600) renamed over it: a link or another
    user's file at ``path`` is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_job_script(cluster: Any, cfg: ExecutorConfig) -> Path:
    """Write the cluster's job script to ``job_dir`` (what each submitted job runs), for a person
    to read or submit by hand; returns its path."""
    return write_private_file(job_dir(cfg) / f"ws3d-{cfg.kind}-job.sh", cluster.job_script())


def _wait_for_workers(client: Any, cfg: ExecutorConfig, message: str) -> None:
    """Wait until a worker has joined; ClusterError with ``message`` after ``worker_timeout_s``."""
    try:
        client.wait_for_workers(1, timeout=cfg.worker_timeout_s)
    except TimeoutError:
        raise ClusterError(f"{message} (waited {cfg.worker_timeout_s:g} s)") from None


def make_jobqueue_cluster(cfg: ExecutorConfig) -> Any:
    """A dask-jobqueue SLURMCluster or PBSCluster from the config (starts no job by itself): TLS
    with temporary certificates (the workers' copies written 0600 into the private job folder),
    a scheduler without an HTTP server unless `cfg.dashboard`, workers without one."""
    import dask_jobqueue
    from distributed import Scheduler

    _warn_exposure(cfg)
    folder = job_dir(cfg)
    kwargs: dict[str, Any] = dict(
        cores=cfg.cores,
        processes=cfg.processes,
        memory=cfg.memory,
        walltime=cfg.walltime,
        job_extra_directives=list(cfg.job_extra_directives),
        job_script_prologue=list(cfg.job_script_prologue),
        scheduler_options={"host": cfg.host, "dashboard_address": cfg.dashboard or None,
                           "dashboard": bool(cfg.dashboard)},
        scheduler_cls=Scheduler if cfg.dashboard else __getattr__("QuietScheduler"),
        worker_extra_args=["--worker-class", f"{__name__}.QuietWorker", "--no-dashboard"],
        security=_temporary_security(),
        shared_temp_directory=str(folder),
        protocol="tls://",
    )
    if cfg.queue:
        kwargs["queue"] = cfg.queue
    if cfg.account:
        kwargs["account"] = cfg.account
    if cfg.local_directory:
        kwargs["local_directory"] = cfg.local_directory
    kwargs["log_directory"] = str(folder)
    cls = dask_jobqueue.SLURMCluster if cfg.kind == "slurm" else dask_jobqueue.PBSCluster
    return cls(**kwargs)


def _lost_scene(scene_id: str, exc: BaseException, cfg: ExecutorConfig) -> SceneResult:
    """The failed row of a scene whose task never returned a result: its worker died every time it
    ran it (KilledWorker: out of memory, a crash), or the result could not come back."""
    if type(exc).__name__ == "KilledWorker":
        message = (f"its worker died each of the {cfg.task_retries + 1} times it ran this scene (out of memory? "
                   f"executor.memory_per_worker={cfg.memory_per_worker}, executor.workers={cfg.workers or 'auto'}); "
                   "the other scenes went on")
    else:
        message = f"{type(exc).__name__}: {exc}"
    return SceneResult(scene_id, "failed", error=message)


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
                futures = {client.submit(run_guarded, fn, s, key=f"{stage}-{s}", pure=False): s for s in ids}
                for future in as_completed(futures):
                    scene_id = futures.pop(future)
                    try:
                        results.append(future.result())
                    except Exception as exc:  # run_guarded catches the scene's errors: this is its worker dying
                        results.append(_lost_scene(scene_id, exc, cfg))
                    future.release()  # a result held by a worker that dies later is not recomputed
                    bar.update()
    order = {s: i for i, s in enumerate(ids)}
    results.sort(key=lambda r: order[r.scene_id])
    return RunReport(stage, results, time.perf_counter() - start)
