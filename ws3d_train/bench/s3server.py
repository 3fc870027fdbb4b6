"""A real S3-compatible server on 127.0.0.1 for tests and store benchmarks (moto's server, a
test-only dependency: ``pip install 'moto[s3]' flask flask-cors``, in ``ws3d[dev]``).

It runs as its own process (``python -m moto.server``), so the client path is exactly the one a
cloud store takes: HTTP, signatures, listings, multi-object deletes. Nothing is mocked inside
the process under test; credentials and endpoint reach every client (CLI subprocesses, Dask
workers, DataLoader workers) through the standard ``AWS_*`` variables.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

__all__ = ["S3_ENV", "local_s3_server", "make_bucket"]

S3_ENV = {"AWS_ACCESS_KEY_ID": "ws3d-test", "AWS_SECRET_ACCESS_KEY": "ws3d-test", "AWS_DEFAULT_REGION": "us-east-1"}
"""The credentials and region a test server accepts (any would do)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3_server(*, set_env: bool = True, timeout_s: float = 60.0) -> Iterator[str]:
    """Start an S3-compatible server on 127.0.0.1 and yield its endpoint URL; stop it on exit.

    With `set_env`, ``AWS_ENDPOINT_URL`` and the test credentials are set in ``os.environ`` for
    the duration (so that ``s3://`` URLs of this process and of the processes it starts reach it).

    Raises:
        RuntimeError when moto's server is not installed or does not answer in `timeout_s`.
    """
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("the local S3 server needs moto's server: pip install 'moto[s3]' flask flask-cors") from exc
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the local S3 server did not start on {endpoint}") from None
                time.sleep(0.1)
        if set_env:
            os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        if set_env:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_bucket(name: str, endpoint: str) -> str:
    """Create a bucket on the server at `endpoint`; returns ``s3://<name>``."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=S3_ENV["AWS_ACCESS_KEY_ID"],
                           secret=S3_ENV["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
