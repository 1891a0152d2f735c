"""launch.py: flags and environment become one Settings; importing it starts nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import launch
from app.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def parse(argv, **environ) -> Settings:
    return launch.settings_from_args(argv, environ)[0]


def test_defaults_are_local_and_private():
    settings = parse([])
    assert (settings.model, settings.host, settings.port, settings.share) == ("zhumj34/Mipha-3B", "127.0.0.1", 7860, False)
    assert settings.data_dir == Path("data") and settings.quantization is None
    assert settings.exposure_warning is None


def test_environment_sets_every_option_and_flags_win():
    env = {"MIPHA_MODEL": "tiny", "MIPHA_DEVICE": "cpu", "MIPHA_DTYPE": "float32", "MIPHA_LOAD_4BIT": "1",
           "MIPHA_HOST": "0.0.0.0", "MIPHA_PORT": "8000", "MIPHA_SHARE": "true", "MIPHA_AUTH": "ada:pw bob:x:y",
           "MIPHA_DATA_DIR": "/tmp/d", "MIPHA_DATABASE_URL": "postgresql://h/db", "MIPHA_MAX_NEW_TOKENS": "256",
           "MIPHA_CONCURRENCY": "3"}
    s = parse([], **env)
    assert (s.model, s.device, s.dtype, s.quantization, s.host, s.port, s.share) == (
        "tiny", "cpu", "float32", "4bit", "0.0.0.0", 8000, True)
    assert [(c.username, c.password) for c in s.auth] == [("ada", "pw"), ("bob", "x:y")]
    assert (s.data_dir, s.database_url, s.max_new_tokens, s.concurrency) == (Path("/tmp/d"), "postgresql://h/db", 256, 3)
    assert parse(["--model", "other", "--port", "9000", "--auth", "eve:1"], **env).auth[0].username == "eve"


def test_auth_file_and_passwords_stay_out_of_repr(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("# team\nada:secret-one\n\nbob:secret-two\n")
    settings = parse(["--auth-file", str(users), "--host", "0.0.0.0"])
    assert [c.username for c in settings.auth] == ["ada", "bob"]
    assert "secret" not in repr(settings)
    assert settings.exposure_warning is None  # exposed, but behind a login


@pytest.mark.parametrize("argv", [["--share"], ["--host", "0.0.0.0"], ["--host", "192.168.1.5"]])
def test_exposure_without_auth_warns(argv):
    assert "anyone with the address can use the model" in parse(argv).exposure_warning


@pytest.mark.parametrize("argv, message", [
    (["--auth", "nopassword"], "expected USER:PASS"),
    (["--concurrency", "0"], "concurrency must be at least 1"),
    (["--max-new-tokens", "5000"], "max_new_tokens must be in"),
    (["--load-8bit", "--load-4bit"], "not allowed with"),
])
def test_bad_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert message in (capsys.readouterr().err + str(exit_info.value))


def test_space_defaults(monkeypatch):
    settings = parse([], SPACE_ID="user/mipha", OAUTH_CLIENT_ID="x", SPACES_ZERO_GPU="true")
    assert settings.on_space and settings.oauth_enabled and settings.zero_gpu
    assert settings.host == "0.0.0.0"
    monkeypatch.setattr(launch.os, "access", lambda path, mode: True)
    monkeypatch.setattr(Path, "is_dir", lambda self: str(self) == "/data")
    assert launch.default_data_dir({"SPACE_ID": "user/mipha"}) == Path("/data")
    assert launch.default_data_dir({}) == Path("data")


def test_help_lists_every_option_and_import_is_light():
    code = "import sys, launch; print('gradio' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    help_text = subprocess.run([sys.executable, "launch.py", "--help"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout
    for option in ("--model", "--device", "--dtype", "--load-8bit", "--load-4bit", "--host", "--port", "--share",
                   "--auth", "--auth-file", "--data-dir", "--max-new-tokens", "--concurrency", "MIPHA_DATA_DIR",
                   "--show-api", "--max-upload-mb", "--uploads-per-minute", "--upload-mb-per-hour"):
        assert option in help_text


def test_kv_cache_budget_comes_from_flag_or_environment():
    assert parse([]).kv_cache_mb is None
    assert parse([], MIPHA_KV_CACHE_MB="0").kv_cache_mb == 0
    assert parse(["--kv-cache-mb", "512"], MIPHA_KV_CACHE_MB="0").kv_cache_mb == 512
    with pytest.raises(SystemExit):
        parse(["--kv-cache-mb", "-1"])
    with pytest.raises(SystemExit, match="MIPHA_KV_CACHE_MB must be a whole number"):
        parse([], MIPHA_KV_CACHE_MB="lots")


def test_upload_limits_and_api_page_come_from_flags_or_environment():
    s = parse([])
    assert (s.show_api, s.max_upload_mb, s.uploads_per_minute, s.upload_mb_per_hour) == (False, 20, 10, 200)
    env = {"MIPHA_SHOW_API": "1", "MIPHA_MAX_UPLOAD_MB": "5", "MIPHA_UPLOADS_PER_MINUTE": "3",
           "MIPHA_UPLOAD_MB_PER_HOUR": "50"}
    s = parse([], **env)
    assert (s.show_api, s.max_upload_mb, s.uploads_per_minute, s.upload_mb_per_hour) == (True, 5, 3, 50)
    assert parse(["--uploads-per-minute", "7"], **env).uploads_per_minute == 7
    with pytest.raises(SystemExit):
        parse(["--uploads-per-minute", "0"])
    with pytest.raises(SystemExit, match="MIPHA_UPLOAD_MB_PER_HOUR must be a whole number"):
        parse([], MIPHA_UPLOAD_MB_PER_HOUR="lots")


def test_launch_options_close_what_a_public_link_should_not_show(tmp_path):
    settings = parse(["--data-dir", str(tmp_path)])
    options = launch.launch_options(settings, photo_exists=lambda sha256: True)
    assert options["enable_monitoring"] is False and options["run_history"] is False
    assert options["mcp_server"] is False and options["ssr_mode"] is False and options["num_workers"] == 0
    assert "api" not in options["footer_links"]
    assert options["app_kwargs"]["openapi_url"] is None and callable(options["app_kwargs"]["lifespan"])
    assert "api" in launch.launch_options(parse(["--show-api"]), photo_exists=lambda s: True)["footer_links"]
