"""The lines the terminal shows a person at start: what runs where, and the address to open.

They describe what was configured (device and precision as `load_engine` will choose them), not
how loading went: the model loads in the background and reports that in the log.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

from app.settings import Settings
from mipha_core import TINY_MODEL, ModelLoadError
from mipha_core.devices import choose_device, choose_dtype
from mipha_core.loading import uses_packed_cpu_kernels

SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def startup_lines(settings: Settings, *, device: str, precision: str, share_url: str | None,
                  network_address: str | None) -> list[str]:
    """The report; `network_address` is this machine's address when listening on all interfaces."""
    lines = [
        "Mipha Chat",
        f"  Model:      {describe_model(settings.model)}",
        f"  Device:     {device}",
        f"  Precision:  {precision}",
        f"  Data:       {settings.data_dir.resolve()}",
    ]
    if settings.database_url:
        lines.append(f"  Database:   {make_url(settings.database_url).render_as_string(hide_password=True)}")
    if settings.on_space:
        lines.append(f"  Open:       this Space's page (the server listens on port {settings.port} inside it)")
    else:
        lines += _address_lines(settings, network_address)
    if settings.api_keys:
        lines.append(f"  API:        /v1 (OpenAI-compatible; {len(settings.api_keys)} key"
                     f"{'s' if len(settings.api_keys) > 1 else ''})")
    if settings.share:
        lines.append(f"  Share link: {share_url} (public, temporary)" if share_url
                     else "  Share link: not created (Gradio's reason is in the warning above)")
    return lines


def _address_lines(settings: Settings, network_address: str | None) -> list[str]:
    if not listens_everywhere(settings.host):
        return [f"  Open:       {_url(settings.host, settings.port)}"]
    other = network_address or socket.gethostname()
    return [f"  Open:       {_url('localhost', settings.port)} on this machine",
            f"              {_url(other, settings.port)} from other devices on your network"]


def describe_model(model: str) -> str:
    if model == TINY_MODEL:
        return "tiny (small random model to try the interface; its replies are noise)"
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.is_dir() else f"{model} (Hugging Face Hub)"


def describe_hardware(settings: Settings) -> tuple[str, str]:
    """Device and precision as `load_engine` will pick them; "auto" is resolved and says so."""
    if settings.remote_engine is not None:
        url = urlsplit(settings.remote_engine.url)
        return f"model server at {url.scheme}://{url.netloc}{url.path}", "the server's"
    try:
        device = choose_device(settings.device)
        dtype = choose_dtype(settings.dtype, device)
    except ModelLoadError:  # the loader reports the same error with its way out
        return f"{settings.device} (cannot be used here: see the error in the log)", settings.dtype
    auto = " (auto)"
    device_text = str(device) + (auto if settings.device == "auto" else "")
    dtype_text = SHORT_DTYPES[str(dtype).removeprefix("torch.")]
    if settings.quantization is None:
        return device_text, dtype_text + (auto if settings.dtype == "auto" else "")
    bits = "int8" if settings.quantization == "8bit" else "int4"
    if uses_packed_cpu_kernels(device, dtype):
        kernels = "torch's packed CPU kernels"
    else:
        kernels = "bitsandbytes NF4" if bits == "int4" else "bitsandbytes"
    return device_text, f"{bits} language model ({kernels}), {dtype_text} vision encoder"


def listens_everywhere(host: str) -> bool:
    """0.0.0.0 or ::, where the address others use is not the one the server was given."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def network_address() -> str | None:
    """This machine's address on its network: the source address of the default route.

    Connecting a UDP socket sends nothing; it only asks the kernel which interface it would use.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            return probe.getsockname()[0]
    except OSError:  # no network route at all
        return None


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
