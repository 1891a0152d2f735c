"""Choosing the device and dtype: "auto", or a request checked against this machine and PyTorch build."""

from __future__ import annotations

import logging
import platform
from functools import cache
from pathlib import Path

import torch

from mipha_core.errors import ModelLoadError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")
_ALTERNATIVES = "Use --device cpu or --device auto"


def choose_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then the CPU. Otherwise the requested device, after
    checking that it exists here, so that a wrong ``--device`` fails before anything loads."""
    if requested == "auto":
        return _best_device()
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ModelLoadError(f"--device {requested} is not a device: use auto, cpu, cuda, cuda:N or mps") from error
    if device.type not in DEVICE_TYPES:
        raise ModelLoadError(f"--device {requested} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        _check_cuda(device, requested)
    elif device.type == "mps":
        _check_mps(requested)
    return device


def _best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_cuda(device: torch.device, requested: str) -> None:
    if not torch.cuda.is_available() and torch.version.cuda is None and torch.version.hip is None:
        raise ModelLoadError(
            f"--device {requested} was asked for but this PyTorch has no CUDA support (a CPU-only build). "
            f"{_ALTERNATIVES}, or install a CUDA build of PyTorch"
        )
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"--device {requested} was asked for but this PyTorch (a GPU build) sees no GPU: check the driver "
            f"and CUDA_VISIBLE_DEVICES. {_ALTERNATIVES}"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ModelLoadError(
            f"--device {requested} was asked for but only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1}). "
            f"Use --device cuda:0, or check CUDA_VISIBLE_DEVICES"
        )


def _check_mps(requested: str) -> None:
    if not torch.backends.mps.is_available():
        reason = "this PyTorch has no MPS support" if not torch.backends.mps.is_built() else "no Apple GPU is available"
        raise ModelLoadError(f"--device {requested} was asked for but {reason}. {_ALTERNATIVES}")


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, fp16 on other GPUs; on the CPU bf16 where the
    processor has native bf16 arithmetic (measured faster there), fp32 elsewhere."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ModelLoadError(f"--dtype {requested} is not a dtype: use auto, {', '.join(DTYPES)}")
        dtype = DTYPES[requested]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ModelLoadError(f"--dtype {requested} was asked for but this GPU cannot compute in bfloat16. "
                                 "Use --dtype float16 or --dtype auto")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@cache
def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX, and Arm CPUs with the BF16 extension."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.machine() == "arm64" and platform.system() == "Darwin"
    flags = set(cpuinfo.read_text(errors="replace").split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
