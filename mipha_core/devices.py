"""Choosing the device and dtype for "auto"."""

from __future__ import annotations

import logging
import platform
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def choose_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then the CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, fp16 on other GPUs; on the CPU bf16 where the
    processor has native bf16 arithmetic (measured faster there), fp32 elsewhere."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {requested!r}")
        return DTYPES[requested]
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
