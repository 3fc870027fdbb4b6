"""Locked down by default (issue 26, item 1): the local cluster authenticates, nothing serves HTTP
unless asked, binding beyond loopback warns, job folders are the user's own and never written
through a link. Each test stands for an attack or exposure that worked before."""
from __future__ import annotations

import os
import stat
import urllib.request
import warnings

import psutil
import pytest

from pipeline.executor import (
    ClusterError,
    ExecutorConfig,
    ExposureWarning,
    dask_client,
    default_job_dir,
    is_loopback,
    job_dir,
    make_jobqueue_cluster,
    write_job_script,
)


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes listen on."""
    found = set()
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port))
    return found


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_local_cluster_refuses_other_clients_and_serves_no_http():
    """Another local user connecting to the scheduler port ran code as the ws3d user, and a Dask
    HTTP server listened on 127.0.0.1:8787 during every stage. Now: TLS with this process's own
    certificates (a plain client and a client with other certificates are refused), and the only
    listeners are the scheduler's, the nannies' and the workers' TLS ports, all on loopback."""
    from distributed import Client
    from distributed.security import Security

    with dask_client(ExecutorConfig(kind="local", workers=2)) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(os.getpid).result() != os.getpid()  # our own client works
        info = client.scheduler_info()
        workers = info["workers"]
        comm_ports = {_port(address)} | {_port(w) for w in workers} | {_port(v["nanny"]) for v in workers.values()}
        pids = {os.getpid()} | set(client.run(os.getpid).values())
        listening = _listening(pids)
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
        assert {port for _, port in listening} == comm_ports, "a listener beyond the cluster's TLS ports (HTTP?)"
        assert 8787 not in {port for _, port in listening}
        assert "dashboard" not in info.get("services", {})

        # the attacks: a client without credentials, and one with certificates of its own
        with pytest.raises((OSError, TimeoutError)):
            Client(address.replace("tls://", "tcp://"), timeout="3s")
        intruder = Security.temporary()
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=intruder, timeout="3s")
        # an intruder who skips checking the server is still refused by it: its certificate is not
        # ours (the same probe with this run's own certificate is let in: the probe can tell)
        assert _server_refuses(address, intruder)
        assert not _server_refuses(address, client.security)


def _server_refuses(address: str, credentials) -> bool:
    """Whether the scheduler ends the TLS session of a client presenting ``credentials`` (the
    client verifies nothing, as an attacker would not): a TLS alert or a closed connection is a
    refusal; a server still waiting for the client's first message a second later let it in."""
    import socket
    import ssl
    import tempfile

    host, port = address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as cert, tempfile.NamedTemporaryFile("w", suffix=".pem") as key:
        cert.write(credentials.tls_client_cert)
        key.write(credentials.tls_client_key)
        cert.flush()
        key.flush()
        context.load_cert_chain(cert.name, key.name)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.settimeout(1.0)
                return tls.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            return True
        except TimeoutError:
            return False


def test_dashboard_only_when_asked_and_then_with_a_warning():
    with pytest.warns(ExposureWarning, match="no authentication"):
        cfg = ExecutorConfig(kind="local", workers=1, dashboard="127.0.0.1:0")
        with dask_client(cfg) as client:
            port = client.scheduler_info()["services"]["dashboard"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
                assert reply.status == 200


def test_binding_beyond_loopback_warns_and_stays_tls():
    """`executor.host=0.0.0.0` opened every listener on every interface, plain TCP, silently."""
    with pytest.warns(ExposureWarning, match="beyond loopback"):
        with dask_client(ExecutorConfig(kind="local", workers=1, host="0.0.0.0")) as client:
            assert client.scheduler.address.startswith("tls://")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExposureWarning)  # loopback: no warning
        assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
        assert is_loopback("tls://127.0.0.1:8786") and not is_loopback("0.0.0.0") and not is_loopback(":8787")
        assert not is_loopback("10.0.0.5:8786") and not is_loopback("login-node")


def test_default_job_dir_is_the_users_own_and_private(tmp_path, monkeypatch):
    """The default job folder was the fixed `<tmp>/ws3d-jobs`, shared by every user."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = job_dir(ExecutorConfig(kind="slurm"))
    assert folder == default_job_dir() == tmp_path / "cache" / "ws3d" / "jobs"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()


def test_job_dir_through_a_link_or_open_to_others_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ClusterError, match="symbolic link"):
        job_dir(ExecutorConfig(kind="slurm", job_dir=str(tmp_path / "link")))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ClusterError, match="writable by others"):
        job_dir(ExecutorConfig(kind="slurm", job_dir=str(shared)))
    if os.getuid() == 0:  # only root can hand a folder to another user
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ClusterError, match="another user"):
            job_dir(ExecutorConfig(kind="slurm", job_dir=str(foreign)))


class _Script:
    def job_script(self) -> str:
        return "#!/bin/sh\necho job\n"


def test_job_script_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    """Another user's symlink in the job folder made ws3d overwrite the file it pointed to."""
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o700)
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    (jobs / "ws3d-slurm-job.sh").symlink_to(victim)
    path = write_job_script(_Script(), ExecutorConfig(kind="slurm", job_dir=str(jobs)))
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and path.read_text().startswith("#!/bin/sh")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_jobqueue_cluster_uses_tls_and_quiet_workers(tmp_path):
    """SLURM workers get this run's certificates (files of this user only, in the private job
    folder), talk TLS, and start without an HTTP server."""
    cfg = ExecutorConfig(kind="slurm", job_dir=str(tmp_path / "jobs"), queue="cpu")
    cluster = make_jobqueue_cluster(cfg)
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert "--worker-class pipeline.executor.QuietWorker" in script and "--no-dashboard" in script
        assert "--tls-cert" in script and "--tls-key" in script and "--tls-ca-file" in script
        credentials = [p for p in (tmp_path / "jobs").iterdir() if p.name.startswith(".dask-jobqueue.worker.")]
        assert credentials and str(credentials[0]) in script
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in credentials)
        pids = {os.getpid()}
        ports = {port for _, port in _listening(pids)}
        assert 8787 not in ports and _port(cluster.scheduler_address) in ports
    finally:
        cluster.close()


@pytest.mark.timeout(180)
def test_a_job_scripts_worker_joins_over_tls_without_http(tmp_path):
    """The worker command of the SLURM job script, run here as a job would run it: it joins with
    the certificates written for it, is a QuietWorker, and serves no HTTP."""
    import shlex
    import subprocess

    from distributed import Client

    from tests.paths import ROOT

    cluster = make_jobqueue_cluster(ExecutorConfig(kind="slurm", job_dir=str(tmp_path / "jobs"), cores=1, memory="2GB"))
    line = next(x for x in cluster.job_script().splitlines() if "distributed.cli.dask_worker" in x)
    worker = subprocess.Popen(shlex.split(line), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(cluster, security=cluster.security) as client:
            client.wait_for_workers(1, timeout=120)
            assert set(client.run(lambda dask_worker: type(dask_worker).__name__).values()) == {"QuietWorker"}
            comm = {_port(w) for w in client.scheduler_info()["workers"]}
            pids = {worker.pid} | {p.pid for p in psutil.Process(worker.pid).children(recursive=True)}
            nanny = {_port(v["nanny"]) for v in client.scheduler_info()["workers"].values()}
            assert {port for _, port in _listening(pids)} == comm | nanny
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        cluster.close()
