"""Which runtime and precision a model loads in: explicit flags win; ``auto`` picks from free memory and the processor.

On a CPU the language model runs fastest on llama.cpp, and there int8 (Q8_0) is both faster than
bf16/fp32 and close to lossless, so ``auto`` takes int8 where it fits with headroom and int4
(Q4_K_M, faster still but lossier) where only that fits. Without llama.cpp, or with
``--runtime torch``, PyTorch runs it: bf16 where the CPU computes bf16 natively, fp32 elsewhere,
falling back to bf16 and then torch's packed int8 when fp32 would not fit. On a GPU ``auto``
takes bf16 (fp16 where bf16 is not supported), then bitsandbytes 8-bit, then 4-bit, by free VRAM.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from mipha_core import devices
from mipha_core.devices import choose_device, choose_dtype
from mipha_core.errors import ModelLoadError
from mipha_core.llama_cpp_runtime import PREPARED_MOVE_POSITIONS

logger = logging.getLogger(__name__)

Runtime = Literal["llama.cpp", "torch"]
RUNTIMES = ("auto", "llama.cpp", "torch")
HEADROOM = 1.25
"""Memory asked for beyond the estimate (the app, Python, page cache for the photo store)."""
_GGUF_BYTES_PER_WEIGHT = {"int8": 8.5 / 8, "int4": 4.9 / 8, "fp16": 2.0, "bf16": 2.0}
_COMPUTE_BUFFER_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class ModelSize:
    """What a checkpoint needs memory for, read from its files' headers."""

    language_params: int
    vision_params: int
    layers: int
    hidden: int
    context_length: int

    @property
    def kv_bytes(self) -> int:
        """One full context's KV cache in 16-bit floats."""
        return self.context_length * self.layers * 2 * self.hidden * 2

    @classmethod
    def of_checkpoint(cls, folder: Path, *, layers: int, hidden: int, context_length: int) -> ModelSize:
        vision = language = 0
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as file:
                    for name in file.keys():
                        count = math.prod(file.get_slice(name).get_shape())
                        if name.startswith(("model.vision_tower.", "model.mm_projector.")):
                            vision += count
                        else:
                            language += count
            except (SafetensorError, OSError) as error:
                raise ModelLoadError(f"the weights in {folder} could not be loaded ({error}): "
                                     "download the model again") from error
        return cls(language_params=language, vision_params=vision, layers=layers, hidden=hidden,
                   context_length=context_length)


@dataclass(frozen=True)
class Precision:
    """One way to run the model: where, on what, in which number format."""

    runtime: Runtime
    device: torch.device
    dtype: torch.dtype
    """PyTorch's compute dtype: the whole model's on the torch runtime, the vision tower's on llama.cpp."""
    weights: str
    """The language model's weights: "int8", "int4", "bf16", "fp16" or "fp32"."""
    quantization: Literal["8bit", "4bit"] | None = None
    """For the torch runtime: bitsandbytes or torch's packed kernels."""
    photo_reader: str | None = None
    """For llama.cpp: the weights a second context reads prompts on. A 16-bit copy of the weights
    (``photo_reader_weights``) reads photos 1.2-1.7x faster than int8 or int4 on a CPU, and questions
    of 8 positions or more too (``llama_cpp_runtime.WIDE_READ_POSITIONS``); ``weights`` itself reads
    only photos, with flash attention, ~7-15% faster (``BULK_READ_POSITIONS``); None reads everything
    in the decoder. Given up, the 16-bit copy first, before the weights' precision is."""

    @property
    def reader_weights(self) -> str | None:
        """The photo reader's weights where they are another file than ``weights`` (e.g. "fp16"), else None."""
        return self.photo_reader if self.photo_reader not in (None, self.weights) else None

    @property
    def label(self) -> str:
        """For a person: "int8 · CPU (llama.cpp)", "bf16 · CUDA"."""
        device = {"cpu": "CPU", "cuda": "CUDA", "mps": "Apple GPU"}.get(self.device.type, self.device.type)
        if self.runtime != "llama.cpp":
            return f"{self.weights} · {device}"
        reader = f", prompts read in {self.reader_weights}" if self.reader_weights else ""
        return f"{self.weights} · {device} (llama.cpp{reader})"

    def resident_bytes(self, size: ModelSize) -> int:
        """About what the model keeps in memory once loaded (weights, KV caches, buffers)."""
        vision = size.vision_params * _itemsize(self.dtype)
        if self.runtime == "llama.cpp":
            language = size.language_params * _GGUF_BYTES_PER_WEIGHT[self.weights]
            if self.reader_weights:
                language += size.language_params * _GGUF_BYTES_PER_WEIGHT[self.reader_weights]
            kv = size.kv_bytes
            if self.photo_reader:  # its own KV cache, and the buffer moves between the two reuse
                kv += size.kv_bytes + size.kv_bytes // max(size.context_length, 1) * PREPARED_MOVE_POSITIONS
            return int(language + vision + kv + _COMPUTE_BUFFER_BYTES)
        bits = {"8bit": 1, "4bit": 0.5}.get(self.quantization or "", _itemsize(self.dtype))
        return int(size.language_params * bits + vision + size.kv_bytes)


def choose_precision(*, device: str, dtype: str, quantization: str | None, runtime: str, size: ModelSize,
                     llama_cpp_problem: str | None, free_bytes: int | None = None) -> Precision:
    """The precision to load in (see the module). ``llama_cpp_problem`` is why llama.cpp cannot run
    here (None when it can); ``free_bytes`` overrides the memory measured on the chosen device."""
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"--runtime {runtime} is not a runtime: use auto, llama.cpp or torch")
    torch_device = choose_device(device)
    if runtime == "llama.cpp" and torch_device.type != "cpu":
        raise ModelLoadError(f"--runtime llama.cpp runs on the CPU, but --device is {torch_device}: "
                             "use --device cpu, or --runtime auto")
    if runtime == "llama.cpp" and llama_cpp_problem:
        raise ModelLoadError(f"--runtime llama.cpp was asked for but {llama_cpp_problem}: run `make run` to "
                             "build it, or use --runtime torch")
    wants_llama = torch_device.type == "cpu" and runtime != "torch" and dtype == "auto"
    if wants_llama and llama_cpp_problem:
        logger.warning("%s: the language model runs on PyTorch instead, 2-4x slower on a CPU. "
                       "`make run` builds it; --runtime torch silences this line", llama_cpp_problem)
    free = free_bytes if free_bytes is not None else free_memory(torch_device)
    vision_dtype = choose_dtype("auto", torch_device) if dtype == "auto" else choose_dtype(dtype, torch_device)
    if wants_llama and not llama_cpp_problem:
        weights = {"8bit": "int8", "4bit": "int4"}.get(quantization or "")
        options = [weights] if weights else ["int8", "int4"]
        return _first_fitting([Precision("llama.cpp", torch_device, vision_dtype, option, photo_reader=reader)
                               for option in options for reader in (photo_reader_weights(), option, None)],
                              size=size, free=free)
    if dtype != "auto" or quantization is not None:
        return _torch_precision(torch_device, vision_dtype, quantization)
    return _first_fitting([_torch_precision(torch_device, candidate, quantization)
                           for candidate in _torch_candidates(torch_device, vision_dtype)], size=size, free=free)


def photo_reader_weights() -> str:
    """The 16-bit weights llama.cpp reads a long batch fastest on, on this CPU.

    A batch is bound by arithmetic: where the CPU multiplies bf16 natively (AVX512-BF16, AMX), BF16;
    elsewhere F16, which F16C and FMA convert on the fly. llama-bench, the bench's 771-position
    photo prompt, 2 threads, flash attention: on an AVX512-BF16 EPYC BF16 42.7 tok/s, Q4_K_M 35.6,
    F16 28.9, Q8_0 25.1; on an AVX2 EPYC F16 28.1, Q8_0 18.2."""
    return "bf16" if devices.cpu_has_native_bf16() else "fp16"


def free_memory(device: torch.device) -> int | None:
    """Bytes free for the model on ``device``: free VRAM on CUDA; on the CPU the smaller of Linux's
    MemAvailable and what the cgroup (a container's, a Space's) still allows; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    candidates = [value for value in (_mem_available(), _cgroup_room()) if value is not None]
    return min(candidates) if candidates else None


def _torch_candidates(device: torch.device, preferred: torch.dtype) -> list[torch.dtype]:
    if device.type == "cpu" and preferred == torch.float32:
        return [torch.float32, torch.bfloat16]
    return [preferred]


def _torch_precision(device: torch.device, dtype: torch.dtype, quantization: str | None) -> Precision:
    weights = {"8bit": "int8", "4bit": "int4"}.get(quantization or "") or _SHORT[dtype]
    return Precision("torch", device, dtype, weights, quantization)  # type: ignore[arg-type]


def _first_fitting(options: list[Precision], *, size: ModelSize, free: int | None) -> Precision:
    """The first option whose resident size fits ``free`` with headroom; quantized fallbacks on the torch runtime."""
    if free is None:
        return options[0]
    for option in options:
        if option.resident_bytes(size) * HEADROOM <= free:
            return option
    last = options[-1]
    if last.runtime == "torch":
        for bits in ("8bit", "4bit"):
            dtype = torch.bfloat16 if last.device.type == "cpu" else last.dtype
            quantized = _torch_precision(last.device, dtype, bits)
            if quantized.resident_bytes(size) * HEADROOM <= free:
                return quantized
        last = _torch_precision(last.device, torch.bfloat16 if last.device.type == "cpu" else last.dtype, "4bit")
    logger.warning("the model needs about %.1f GB in %s but only %.1f GB is free: loading anyway, it may run out",
                   last.resident_bytes(size) / 1e9, last.label, free / 1e9)
    return last


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        used = (base / "memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max":
        return None
    return max(int(limit) - int(used), 0)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
