"""A second server on the same data directory refuses to start instead of touching the first's replies."""

from __future__ import annotations

import subprocess
import sys

from tests.app_process import REPO, app_env, free_port, running_app


def test_a_second_server_on_the_same_data_dir_refuses_with_a_clear_message(tmp_path):
    data_dir = tmp_path / "data"
    with running_app(data_dir, name="first-server") as first:
        second = subprocess.run(
            [sys.executable, "launch.py", "--model", "tiny", "--device", "cpu", "--data-dir", str(data_dir),
             "--port", str(free_port())], cwd=REPO, env=app_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"pid {first.process.pid}" in second.stderr and "--data-dir" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.process.poll() is None  # the first one keeps serving
