"""Start the real app (`launch.py`) in a subprocess on a free localhost port, for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"


@dataclass(frozen=True)
class RunningApp:
    """A started server: its base URL (ending in '/'), data dir, log file and process."""

    url: str
    data_dir: Path
    log: Path
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, *, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as e:  # a login page still means the server is up
            if e.code in (401, 403):
                return
            time.sleep(0.3)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"the app did not answer at {url} within {timeout} s:\n{log.read_text()[-4000:]}")


def app_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            **(extra or {})}


@contextmanager
def running_app(data_dir: Path, *args: str, env: Mapping[str, str] | None = None, name: str = "server",
                timeout: float = 120, port: int | None = None) -> Iterator[RunningApp]:
    """`launch.py --model tiny --device cpu --data-dir DATA_DIR ARGS...` until the block ends, on
    `port` (default: a free one). The server log is copied to test-artifacts/NAME.log afterwards.
    """
    port = port or free_port()
    log = data_dir / f"{name}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    command: Sequence[str] = [sys.executable, "launch.py", "--model", "tiny", "--device", "cpu",
                              "--data-dir", str(data_dir), "--port", str(port), *args]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=app_env(env), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, process, timeout=timeout, log=log)
        yield RunningApp(url=url, data_dir=data_dir, log=log, process=process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"{name}.log").write_text(log.read_text())
