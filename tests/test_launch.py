"""launch.py: flags and environment become one Settings; importing it starts nothing."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launch
from app import startup_report
from app.settings import Settings
from tests.app_process import running_app

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
    assert options["app_kwargs"]["openapi_url"] is None and callable(options["app_kwargs"]["lifespan"])


def test_footer_links_the_api_only_when_it_is_on_and_never_gradio_developer_items():
    assert launch.launch_options(parse([]), photo_exists=lambda sha256: True)["footer_links"] == []  # no footer
    assert launch.launch_options(parse(["--show-api"]), photo_exists=lambda sha256: True)["footer_links"] == ["api"]


# --- what the terminal shows a person at start ----------------------------------------------------


def report_of(log: Path, *, timeout: float = 30) -> list[str]:
    """The start-up report's lines: printed right after the server answers, so wait for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines()  # the report is printed in one write
        if "Mipha Chat" in lines:
            start = lines.index("Mipha Chat")
            return [lines[start], *itertools.takewhile(lambda line: line.startswith("  "), lines[start + 1:])]
        time.sleep(0.2)
    raise AssertionError(f"no start-up report in {log}:\n{log.read_text()[-3000:]}")


def test_start_up_says_what_runs_where_in_plain_lines_without_library_noise(tmp_path):
    with running_app(tmp_path / "data", name="launch-report") as app:
        report = report_of(app.log)
        output = app.log.read_text()
    assert report[1:] == [
        "  Model:      tiny (small random model to try the interface; its replies are noise)",
        "  Device:     cpu",
        "  Precision:  chosen at load from free memory (llama.cpp int8, or int4 when memory is short)",
        f"  Data:       {(tmp_path / 'data').resolve()}",
        f"  Open:       {app.url}",
    ]
    assert re.search(r"loading tiny as int[84] · CPU \(llama\.cpp(, prompts read in (fp16|bf16))?\)", output)  # what the loader chose
    assert "setup plugin" not in output and "INFO alembic" not in output  # its warnings would still show
    assert "share=True" not in output and "Running on local URL" not in output


def test_public_bind_names_the_network_address_and_failed_share_link_warns(tmp_path):
    # An address without a port makes Gradio's tunnel set-up fail at once, offline, before any download.
    env = {"GRADIO_SHARE_SERVER_ADDRESS": "no-share-server"}
    with running_app(tmp_path / "data", "--host", "0.0.0.0", "--share", "--dtype", "float32", env=env,
                     name="launch-report-public") as app:
        report = report_of(app.log)
        output = app.log.read_text()
    port = app.url.rsplit(":", 1)[1].strip("/")
    assert "  Precision:  fp32" in report
    assert f"  Open:       http://localhost:{port}/ on this machine" in report
    assert re.fullmatch(rf"  +http://\S+:{port}/ from other devices on your network", report[6])
    assert report[7] == "  Share link: not created (Gradio's reason is in the warning above)"
    assert "WARNING launch: Mipha Chat is reachable through a public share link" in output  # warnings still show
    assert re.search(r"WARNING launch: Gradio: .*Could not create share link", output, re.DOTALL)
    assert "share=True" not in output and "setup plugin" not in output


class FakeBlocks:
    """Prints what Gradio prints even with quiet=True, and returns what its `launch` returns."""

    def __init__(self, printed: str, share_url: str | None) -> None:
        self.printed, self.share_url, self.options = printed, share_url, None

    def launch(self, **options):
        self.options = options
        print(self.printed)
        return None, "http://127.0.0.1:7860/", self.share_url


def test_launch_quietly_keeps_the_share_link_for_the_report_and_passes_other_prints_on_as_warnings(capsys, caplog):
    blocks = FakeBlocks("* Running on public URL: https://abc.gradio.live", "https://abc.gradio.live")
    assert launch.launch_quietly(blocks, {"quiet": True}) == "https://abc.gradio.live"
    assert blocks.options == {"quiet": True, "prevent_thread_lock": True}
    assert capsys.readouterr().out == "" and not caplog.records

    blocks = FakeBlocks("\nCould not create share link. Please check your internet connection.", None)
    assert launch.launch_quietly(blocks, {}) is None
    assert capsys.readouterr().out == ""
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "Gradio: Could not create share link. Please check your internet connection.")]


def test_report_lines_for_a_share_link_a_space_and_a_database_url():
    share = startup_report.startup_lines(
        parse(["--share", "--database-url", "postgresql://ada:secret@db.example/mipha"]),
        device="cuda (auto)", precision="bf16 (auto)", share_url="https://abc.gradio.live", network_address=None)
    assert share[-1] == "  Share link: https://abc.gradio.live (public, temporary)"
    assert "  Database:   postgresql://ada:***@db.example/mipha" in share and "secret" not in "".join(share)
    assert share[-2] == "  Open:       http://127.0.0.1:7860/"
    space = startup_report.startup_lines(parse([], SPACE_ID="user/mipha"), device="cpu", precision="fp32",
                                         share_url=None, network_address="10.0.0.7")
    assert space[-1] == "  Open:       this Space's page (the server listens on port 7860 inside it)"
    ipv6 = startup_report.startup_lines(parse(["--host", "::"]), device="cpu", precision="fp32", share_url=None,
                                        network_address="10.0.0.7")
    assert ipv6[-2:] == ["  Open:       http://localhost:7860/ on this machine",
                         "              http://10.0.0.7:7860/ from other devices on your network"]


@pytest.mark.parametrize("argv, precision", [
    (["--device", "cpu", "--dtype", "float32", "--load-4bit"],
     "int4 language model (bitsandbytes NF4), fp32 vision encoder"),
    (["--device", "cpu", "--dtype", "bfloat16", "--load-8bit"],
     "int8 language model (torch's packed CPU kernels), bf16 vision encoder"),
    (["--device", "cpu", "--dtype", "float16"], "fp16"),
])
def test_precision_names_what_the_loader_will_use(argv, precision):
    assert startup_report.describe_hardware(parse(argv)) == ("cpu", precision)


LLAMA_CPP_MISSING = "llama-cpp-python is not usable here (No module named 'llama_cpp')"


@pytest.mark.parametrize("argv, problem, precision", [
    ([], None, r"chosen at load from free memory \(llama\.cpp int8, or int4 when memory is short\)"),
    (["--load-4bit"], None, r"int4 language model \(llama\.cpp\), (fp32|bf16) vision encoder"),
    (["--runtime", "torch"], None,
     r"chosen at load from free memory \(PyTorch (fp32|bf16), or smaller down to int4 when memory is short\)"),
    ([], LLAMA_CPP_MISSING,
     (r"chosen at load from free memory \(PyTorch (fp32|bf16), or smaller down to int4 when memory is short\); "
      r"llama\.cpp would be faster, but llama-cpp-python is not usable here \(No module named 'llama_cpp'\)")),
    (["--runtime", "torch"], LLAMA_CPP_MISSING, r"chosen at load from free memory \(PyTorch [^;]*\)"),
    (["--dtype", "float32"], LLAMA_CPP_MISSING, r"fp32"),  # --dtype picks PyTorch: llama.cpp is not missed
    (["--runtime", "llama.cpp"], LLAMA_CPP_MISSING, r"--runtime llama\.cpp cannot be used here: see the error in the log"),
])
def test_auto_precision_on_the_cpu_is_chosen_at_load_and_says_so(monkeypatch, argv, problem, precision):
    monkeypatch.setattr(startup_report, "llama_cpp_available", lambda: problem)
    device, described = startup_report.describe_hardware(parse(["--device", "cpu", *argv]))
    assert device == "cpu" and re.fullmatch(precision, described), described


def test_a_device_that_cannot_be_used_is_reported_as_asked_for():
    device, precision = startup_report.describe_hardware(parse(["--device", "cuda:99"]))
    assert device == "cuda:99 (cannot be used here: see the error in the log)" and precision == "auto"


def test_api_keys_and_the_remote_engine_come_from_flags_or_environment_and_stay_secret(capsys):
    key, other = "k" * 20, "z" * 24
    env = {"MIPHA_API_KEYS": f"{key} {other}", "MIPHA_ENGINE_URL": "http://gpu:8000/v1",
           "MIPHA_ENGINE_API_KEY": "engine-secret-value", "MIPHA_ENGINE_MODEL": "mipha-3b", "MIPHA_API_QUEUE": "4"}
    s = parse([], **env)
    assert [k.secret for k in s.api_keys] == [key, other] and s.api_queue == 4
    assert (s.remote_engine.url, s.remote_engine.api_key, s.remote_engine.model) == (
        "http://gpu:8000/v1", "engine-secret-value", "mipha-3b")
    assert key not in repr(s) and "engine-secret-value" not in repr(s)
    assert [k.secret for k in parse(["--api-key", "y" * 16], **env).api_keys] == ["y" * 16]
    assert parse([]).api_keys == () and parse([]).remote_engine is None
    launch.build_parser(env).print_help()
    assert "engine-secret-value" not in capsys.readouterr().out  # --help shows no secret as a default


@pytest.mark.parametrize("argv, message", [
    (["--api-key", "short"], "at least 16 characters"),
    (["--engine-url", "gpu-box:8000"], "must start with http"),
])
def test_bad_api_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    error = capsys.readouterr().err
    assert message in error and "short" not in error.split(message)[0].split(":")[-1]


def test_the_api_names_a_local_model_folder_without_its_path():
    from app.api import served_model_name

    assert served_model_name(Settings(model="/home/ada/models/mipha-3b")) == "mipha-3b"
    assert served_model_name(Settings(model="zhumj34/Mipha-3B")) == "zhumj34/Mipha-3B"
    assert served_model_name(Settings(model="tiny")) == "mipha-tiny"
