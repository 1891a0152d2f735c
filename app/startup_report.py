"""The lines the terminal shows a person at start: what runs where, and the address to open.

They describe what was configured (device and precision as `load_engine` will choose them), not
how loading went: the model loads in the background and reports that in the log (and the page
says what runs once it is ready).
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
from mipha_core.llama_cpp_runtime import llama_cpp_available
from mipha_core.loading import uses_packed_cpu_kernels
from mipha_core.precision import ModelSize, Precision, choose_precision

SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_NO_SIZE = ModelSize(language_params=0, vision_params=0, layers=0, hidden=0, context_length=0)
_AMPLE_BYTES = 2**60
"""With no size and this much memory, `choose_precision` takes its first choice without measuring."""


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
    """Device and precision as `load_engine` will pick them; "auto" is resolved and says so.

    The precision is `choose_precision`'s first choice; where it also depends on the free memory
    (known only once the checkpoint is read), the report says it is chosen at load.
    """
    if settings.remote_engine is not None:
        url = urlsplit(settings.remote_engine.url)
        return f"model server at {url.scheme}://{url.netloc}{url.path}", "the server's"
    try:
        device = choose_device(settings.device)
        choose_dtype(settings.dtype, device)
    except ModelLoadError:  # the loader reports the same error with its way out
        return f"{settings.device} (cannot be used here: see the error in the log)", settings.dtype
    device_text = str(device) + (" (auto)" if settings.device == "auto" else "")
    llama_cpp_problem = llama_cpp_available()
    try:
        precision = first_choice(settings, llama_cpp_problem=llama_cpp_problem)
    except ModelLoadError:
        return device_text, f"--runtime {settings.runtime} cannot be used here: see the error in the log"
    text = describe_precision(precision, chosen_at_load=settings.dtype == "auto" and settings.quantization is None)
    if llama_cpp_problem and first_choice(settings, llama_cpp_problem=None).runtime == "llama.cpp":
        text += f"; llama.cpp would be faster, but {llama_cpp_problem}"
    return device_text, text


def first_choice(settings: Settings, *, llama_cpp_problem: str | None) -> Precision:
    """`choose_precision` with memory to spare: the precision `load_engine` takes where the model fits."""
    # without llama.cpp, "auto" and "torch" choose alike; "torch" spares the log the loader's warning twice
    runtime = "torch" if llama_cpp_problem and settings.runtime == "auto" else settings.runtime
    return choose_precision(device=settings.device, dtype=settings.dtype, quantization=settings.quantization,
                            runtime=runtime, size=_NO_SIZE, llama_cpp_problem=llama_cpp_problem,
                            free_bytes=_AMPLE_BYTES)


def describe_precision(precision: Precision, *, chosen_at_load: bool) -> str:
    """For the report: "int8 language model (llama.cpp), fp32 vision encoder", "bf16", or, where
    `chosen_at_load`, the first choice and that a smaller format is taken when memory is short."""
    weights, vision = precision.weights, SHORT_DTYPES[str(precision.dtype).removeprefix("torch.")]
    if chosen_at_load and precision.runtime == "llama.cpp":
        return f"chosen at load from free memory (llama.cpp {weights}, or int4 when memory is short)"
    if chosen_at_load:
        return f"chosen at load from free memory (PyTorch {weights}, or smaller down to int4 when memory is short)"
    if precision.runtime == "llama.cpp":
        return f"{weights} language model (llama.cpp), {vision} vision encoder"
    if precision.quantization is None:
        return weights
    if uses_packed_cpu_kernels(precision.device, precision.dtype):
        kernels = "torch's packed CPU kernels"
    else:
        kernels = "bitsandbytes NF4" if weights == "int4" else "bitsandbytes"
    return f"{weights} language model ({kernels}), {vision} vision encoder"


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
