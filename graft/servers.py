"""Local servers graft starts on one machine: a Prefect server (so schedules fire and the UI
exists: Prefect's ephemeral API has no scheduler), bound to loopback, always stopped after."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from graft.errors import TransientError

DEFAULT_PREFECT_PORT = 4200


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens there, else any free loopback port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise TransientError("no free port on 127.0.0.1")


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200; fail early when the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TransientError(f"{what} exited with code {proc.returncode} before answering {url}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TransientError(f"{what} did not answer {url} within {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server and everything it started (its process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


@contextlib.contextmanager
def prefect_server(port: int | None = None, *, home: Path | None = None, log: Path | None = None,
                   timeout: float = 180) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1; yields its API URL and stops it on exit."""
    port = port or free_port(DEFAULT_PREFECT_PORT)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1",
               PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL", None)
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api"
        wait_http(f"{url}/health", proc, timeout, "prefect server")
        yield url
    finally:
        stop(proc)
        if log:
            out.close()
