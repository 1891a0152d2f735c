"""Start Mipha Chat: flags and environment become one `Settings`, which is passed down.

    python launch.py                      # Mipha-3B from the Hub, http://127.0.0.1:7860
    python launch.py --model tiny         # small random model built offline, to try the interface
    python launch.py --help               # every option and its environment variable

This is the only module that wires things together; importing it starts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from app.settings import ApiKey, Credential, RemoteEngineSettings, Settings

log = logging.getLogger("launch")

ENV_PREFIX = "MIPHA_"
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, got {value!r}") from None


def _env_int_or(environ: Mapping[str, str], name: str, default: int) -> int:
    value = _env_int(environ, name)
    return default if value is None else value


def _env_bool(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise SystemExit(f"{name} must be one of {sorted(TRUE_WORDS | FALSE_WORDS - {''})}, got {value!r}")


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """./data, or /data on a Hugging Face Space that has persistent storage mounted."""
    persistent = Path("/data")
    if environ.get("SPACE_ID") and persistent.is_dir() and os.access(persistent, os.W_OK):
        return persistent
    return Path("data")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line; each default comes from the MIPHA_* variable named in its help."""
    env = environ.get
    on_space = bool(env("SPACE_ID"))
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Mipha Chat: chat about your photos with Mipha-3B in the browser.",
        epilog="Every option can also be set by the environment variable named in its help; "
        "a flag on the command line wins over the variable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=env("MIPHA_MODEL", "zhumj34/Mipha-3B"),
                       help="Hub id or local folder of a Mipha-3B checkpoint; 'tiny' builds a small random "
                       "model offline to try the interface [MIPHA_MODEL]")
    model.add_argument("--device", default=env("MIPHA_DEVICE", "auto"),
                       help="'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps' [MIPHA_DEVICE]")
    model.add_argument("--dtype", default=env("MIPHA_DTYPE", "auto"), choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights precision; 'auto' picks bf16/fp16 on GPUs, and on the CPU bf16 where it computes "
                       "bf16 natively (AVX512-BF16, AMX), fp32 elsewhere [MIPHA_DTYPE]")
    model.add_argument("--runtime", default=env("MIPHA_RUNTIME", "auto"), choices=["auto", "llama.cpp", "torch"],
                       help="where the language model runs: 'auto' takes llama.cpp on the CPU when it is installed "
                       "(int8, or int4 when memory is short; 2-3x faster than PyTorch there), PyTorch elsewhere; "
                       "--dtype picks PyTorch on the CPU [MIPHA_RUNTIME]")
    quant = model.add_mutually_exclusive_group()
    quant.add_argument("--load-8bit", action="store_true", default=_env_bool(environ, "MIPHA_LOAD_8BIT"),
                       help="load the language model in 8-bit (about half the memory): llama.cpp's Q8_0 on the CPU, "
                       "torch's packed int8 kernels with --runtime torch on a CPU with native bf16, bitsandbytes "
                       "elsewhere [MIPHA_LOAD_8BIT]")
    quant.add_argument("--load-4bit", action="store_true", default=_env_bool(environ, "MIPHA_LOAD_4BIT"),
                       help="load the language model in 4-bit (about a quarter): llama.cpp's Q4_K_M on the CPU, "
                       "torch's packed int4 kernels with --runtime torch on a CPU with native bf16, bitsandbytes NF4 "
                       "elsewhere [MIPHA_LOAD_4BIT]")
    model.add_argument("--kv-cache-mb", type=int, default=_env_int(environ, "MIPHA_KV_CACHE_MB"),
                       help="memory kept for conversations' KV caches, so follow-up questions skip re-reading "
                       "the photo and the chat; a full 2048-token conversation takes 0.67 GB in bf16; 0 turns it off "
                       "(default: 2048 on the CPU, 1024 on a GPU) "
                       "[MIPHA_KV_CACHE_MB]")
    model.add_argument("--engine-url", default=env("MIPHA_ENGINE_URL"),
                       help="send every turn to this OpenAI-compatible server (vLLM serving Mipha, another Mipha "
                       "Chat with --api-key) instead of loading the model here, e.g. http://gpu-box:8000/v1; "
                       "--model then only supplies the tokenizer and conversation rules [MIPHA_ENGINE_URL]")
    model.add_argument("--engine-api-key", default=None,
                       help="key sent to --engine-url as 'Authorization: Bearer KEY' [MIPHA_ENGINE_API_KEY]")
    model.add_argument("--engine-model", default=env("MIPHA_ENGINE_MODEL"),
                       help="model name at --engine-url (default: the first one it lists) [MIPHA_ENGINE_MODEL]")
    model.add_argument("--engine-timeout", type=float, default=float(env("MIPHA_ENGINE_TIMEOUT", "120")),
                       help="seconds to wait for the next piece of a reply from --engine-url [MIPHA_ENGINE_TIMEOUT]")
    model.add_argument("--max-new-tokens", type=int, default=int(env("MIPHA_MAX_NEW_TOKENS", "512")),
                       help="upper bound of the reply length a user can choose [MIPHA_MAX_NEW_TOKENS]")

    server = parser.add_argument_group("server")
    server.add_argument("--host", default=env("MIPHA_HOST", env("GRADIO_SERVER_NAME", "0.0.0.0" if on_space else "127.0.0.1")),
                        help="address to listen on; anything but 127.0.0.1 exposes the app to your network [MIPHA_HOST]")
    server.add_argument("--port", type=int, default=int(env("MIPHA_PORT", env("GRADIO_SERVER_PORT", "7860"))),
                        help="port to listen on [MIPHA_PORT]")
    server.add_argument("--share", action="store_true", default=_env_bool(environ, "MIPHA_SHARE"),
                        help="also publish a temporary public gradio.live link [MIPHA_SHARE]")
    server.add_argument("--concurrency", type=int, default=int(env("MIPHA_CONCURRENCY", "1")),
                        help="replies generated at the same time; others wait in the queue and see their "
                        "position [MIPHA_CONCURRENCY]")
    server.add_argument("--show-api", action="store_true", default=_env_bool(environ, "MIPHA_SHOW_API"),
                        help="publish Gradio's API page and schema (off: they answer 404) [MIPHA_SHOW_API]")
    server.add_argument("--max-upload-mb", type=int, default=_env_int_or(environ, "MIPHA_MAX_UPLOAD_MB", 20),
                        help="largest photo one upload may carry [MIPHA_MAX_UPLOAD_MB]")
    server.add_argument("--uploads-per-minute", type=int, default=_env_int_or(environ, "MIPHA_UPLOADS_PER_MINUTE", 10),
                        help="photo uploads one visitor (user, else address) may start per minute "
                        "[MIPHA_UPLOADS_PER_MINUTE]")
    server.add_argument("--upload-mb-per-hour", type=int, default=_env_int_or(environ, "MIPHA_UPLOAD_MB_PER_HOUR", 200),
                        help="upload volume one visitor may send per hour [MIPHA_UPLOAD_MB_PER_HOUR]")

    access = parser.add_argument_group("access")
    access.add_argument("--auth", action="append", metavar="USER:PASS", default=None,
                        help="require a login; repeat for several users. Conversations belong to the user "
                        "[MIPHA_AUTH: space-separated USER:PASS pairs]")
    access.add_argument("--api-key", action="append", metavar="KEY", default=None,
                        help="turn on the OpenAI-compatible API at /v1 for clients sending 'Authorization: Bearer "
                        "KEY' (16+ characters); repeat for several keys. Off without a key "
                        "[MIPHA_API_KEYS: space-separated keys]")
    access.add_argument("--api-queue", type=int, default=_env_int_or(environ, "MIPHA_API_QUEUE", 16),
                        help="API calls that may wait for the model; more get 429 [MIPHA_API_QUEUE]")
    access.add_argument("--auth-file", type=Path, default=env("MIPHA_AUTH_FILE"),
                        help="file with one USER:PASS per line ('#' starts a comment) [MIPHA_AUTH_FILE]")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, default=Path(env("MIPHA_DATA_DIR") or default_data_dir(environ)),
                      help="where the conversation database, photos and the tiny model live; /data on a "
                      "Space with persistent storage [MIPHA_DATA_DIR]")
    data.add_argument("--database-url", default=env("MIPHA_DATABASE_URL"),
                      help="SQLAlchemy URL of the database; default: SQLite file in the data dir "
                      "[MIPHA_DATABASE_URL]")
    data.add_argument("--log-level", default=env("MIPHA_LOG_LEVEL", "INFO"),
                      choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="terminal log detail [MIPHA_LOG_LEVEL]")
    return parser


def parse_credentials(pairs: Sequence[str], *, source: str) -> tuple[Credential, ...]:
    """`USER:PASS` strings to credentials; the password may itself contain ':'."""
    credentials = []
    for pair in pairs:
        username, sep, password = pair.partition(":")
        if not sep:
            raise SystemExit(f"{source}: expected USER:PASS, got {username!r} without ':'")
        credentials.append(Credential(username=username.strip(), password=password))
    return tuple(credentials)


def read_auth_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SystemExit(f"--auth-file {path}: cannot read it ({e.strerror})") from e
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def settings_from_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[Settings, str]:
    """Parse flags over environment into `Settings`; also returns the log level."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    auth = parse_credentials(args.auth if args.auth is not None else environ.get("MIPHA_AUTH", "").split(),
                             source="--auth")
    if args.auth_file is not None:
        auth += parse_credentials(read_auth_file(args.auth_file), source=str(args.auth_file))
    secrets = args.api_key if args.api_key is not None else environ.get("MIPHA_API_KEYS", "").split()
    quantization = "8bit" if args.load_8bit else "4bit" if args.load_4bit else None
    if args.load_8bit and args.load_4bit:
        parser.error("choose one of --load-8bit and --load-4bit")
    try:
        settings = Settings(
            model=args.model, device=args.device, dtype=args.dtype, quantization=quantization, runtime=args.runtime,
            host=args.host, port=args.port, share=args.share, auth=auth,
            data_dir=args.data_dir, database_url=args.database_url,
            max_new_tokens=args.max_new_tokens, concurrency=args.concurrency, kv_cache_mb=args.kv_cache_mb,
            show_api=args.show_api, max_upload_mb=args.max_upload_mb, uploads_per_minute=args.uploads_per_minute,
            upload_mb_per_hour=args.upload_mb_per_hour,
            on_space=bool(environ.get("SPACE_ID")),
            oauth_enabled=bool(environ.get("SPACE_ID") and environ.get("OAUTH_CLIENT_ID")),
            zero_gpu=environ.get("SPACES_ZERO_GPU", "").lower() in TRUE_WORDS,
            api_keys=tuple(ApiKey(secret, label=f"key {n}") for n, secret in enumerate(secrets, start=1)),
            api_queue=args.api_queue,
            remote_engine=RemoteEngineSettings(url=args.engine_url,
                                               api_key=args.engine_api_key or environ.get("MIPHA_ENGINE_API_KEY"),
                                               model=args.engine_model, timeout_s=args.engine_timeout)
            if args.engine_url else None,
        )
    except ValueError as e:
        parser.error(str(e))
    return settings, args.log_level


def configure_logging(level: str) -> None:
    """Our loggers at `level`; libraries' routine chatter (alembic's plugin and migration lines,
    each HTTP request) only from WARNING up."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "httpx", "httpcore", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_services(settings: Settings):
    """Storage opened, the model loading on a background thread: the page can come up now."""
    from app.model_slot import ModelSlot
    from app.services import Services
    from storage import StorageConfig, StorageLimits, open_storage

    limits = StorageLimits(max_image_bytes=settings.max_upload_mb * 1024**2)  # the upload cap, in both layers
    storage = open_storage(StorageConfig(data_dir=settings.data_dir, database_url=settings.database_url,
                                         limits=limits))
    model = ModelSlot(settings.model)
    model.load_in_background(engine_loader(settings))
    return Services(settings=settings, storage=storage, model=model)


def engine_loader(settings: Settings):
    """What loads the engine: the model here, or only its tokenizer for a remote model server."""
    from mipha_core import CacheSettings, RemoteServer, load_engine, load_remote_engine

    remote = settings.remote_engine
    if remote is not None:
        server = RemoteServer(url=remote.url, api_key=remote.api_key, model=remote.model, timeout_s=remote.timeout_s)
        return lambda: load_remote_engine(server, model=settings.model, data_dir=settings.data_dir)
    caches = None if settings.kv_cache_mb is None else CacheSettings(kv_cache_bytes=settings.kv_cache_mb * 1024**2)
    return lambda: load_engine(settings.model, device=settings.device, dtype=settings.dtype,
                               quantization=settings.quantization, runtime=settings.runtime,
                               data_dir=settings.data_dir, caches=caches)


def launch_options(settings: Settings, *, photo_exists: Callable[[str], bool], routes: Sequence = ()) -> dict:
    """Keyword arguments for `gr.Blocks.launch`; `photo_exists` tells the guard which photos are still stored,
    `routes` are pages served beside Gradio's (the read-only share pages)."""
    from app.ui.assets import page_head
    from app.web import app_kwargs

    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "share": settings.share,
        "auth": [(c.username, c.password) for c in settings.auth] or None,
        "auth_message": "Mipha Chat: sign in with the user name and password you were given.",
        "allowed_paths": [str(settings.images_dir.resolve())],  # copied into the cache; the guard serves only copies
        "max_file_size": f"{settings.max_upload_mb}mb",
        "head": page_head(),
        "show_error": True,
        "quiet": True,  # no "Running on local URL" or "set `share=True`" hints: main prints our own lines
        "footer_links": ["api"] if settings.show_api else [],  # [] hides the footer; never Gradio's dev links
        "enable_monitoring": False,
        "run_history": False,  # would keep questions and photos in the browser's storage
        "mcp_server": False,
        "ssr_mode": False,  # a Node server in front would answer without the guard
        "num_workers": 0,  # static-file workers, on ports of their own, would bypass the guard too
        "app_kwargs": app_kwargs(settings, photo_exists=photo_exists, inner=visitor_middleware(settings),
                                 routes=routes),
    }


def visitor_middleware(settings: Settings) -> list:
    """Inside the guard: the anonymous visitor's cookie, then each Gradio session bound to its browser."""
    from starlette.middleware import Middleware

    from app.session_binding import SessionBindingMiddleware
    from app.visitor import VisitorCookieMiddleware

    return [Middleware(VisitorCookieMiddleware, cross_site=settings.on_space), Middleware(SessionBindingMiddleware)]


def main(argv: Sequence[str] | None = None) -> None:
    settings, log_level = settings_from_args(argv, os.environ)
    configure_logging(log_level)
    if settings.exposure_warning:
        log.warning(settings.exposure_warning)
    from app.web import prepare_temp_dir, stored_photo_lookup
    from storage import DataDirError

    try:
        services = open_services(settings)  # locks the data dir first: its temp dir is then ours to empty
    except DataDirError as e:  # another server on this data dir, or one that cannot be written
        raise SystemExit(str(e)) from None
    prepare_temp_dir(settings.temp_dir)  # before gradio is imported: it reads GRADIO_TEMP_DIR then
    import gradio as gr

    from app.api import api_routes
    from app.share_page import share_routes
    from app.ui import ASSETS, build_app

    gr.set_static_paths([str(ASSETS)])  # example photos are served from assets/, never copied to the temp dir
    blocks = build_app(services)
    options = launch_options(settings, photo_exists=stored_photo_lookup(services.storage),
                             routes=[*api_routes(services), *share_routes(services.storage)])
    share_url = launch_quietly(blocks, options)
    print_startup_report(settings, share_url=share_url)
    blocks.block_thread()


def launch_quietly(blocks, options: dict) -> str | None:
    """Start the server without blocking; returns the share link, if one was made.

    Even with `quiet=True`, Gradio prints the public URL and, when the tunnel fails, why: the URL
    goes into our report instead, and anything else reaches the terminal as a warning.
    """
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            _, _, share_url = blocks.launch(prevent_thread_lock=True, **options)
    finally:
        other = [line for line in printed.getvalue().splitlines()
                 if line.strip() and not line.startswith("* Running on public URL:")]
        if other:
            log.warning("Gradio: %s", "\n".join(other))
    return share_url


def print_startup_report(settings: Settings, *, share_url: str | None) -> None:
    """Plain lines on stdout, flushed: a Space's or container's log shows them at once too."""
    from app.startup_report import describe_hardware, listens_everywhere, network_address, startup_lines

    device, precision = describe_hardware(settings)
    address = network_address() if listens_everywhere(settings.host) else None
    lines = startup_lines(settings, device=device, precision=precision, share_url=share_url, network_address=address)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
