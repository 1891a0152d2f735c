"""``load_engine``: find a Mipha checkpoint (Hub id, folder or "tiny") and load it."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError
from transformers import AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from mipha_core.checkpoint import KEY_MAPPING, MiphaCheckpointConfig, read_checkpoint_config
from mipha_core.cpu_quantization import quantize_linears
from mipha_core.devices import choose_device, choose_dtype
from mipha_core.engine import CacheSettings, Engine
from mipha_core.errors import ModelLoadError
from mipha_core.fitting import PromptFitter
from mipha_core.gguf_export import GGUF_PRECISIONS, language_model_gguf
from mipha_core.llama_cpp_engine import LlamaCppEngine
from mipha_core.llama_cpp_runtime import (
    LlamaCppContext,
    llama_cpp_available,
    physical_cores,
)
from mipha_core.modeling import MiphaForConditionalGeneration
from mipha_core.precision import RUNTIMES, ModelSize, Precision, choose_precision
from mipha_core.preprocessing import ImagePreprocessor
from mipha_core.remote import RemoteEngine, RemoteServer
from mipha_core.tiny import ensure_tiny_checkpoint
from mipha_core.vision import VisionEncoder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "zhumj34/Mipha-3B"
TINY_MODEL = "tiny"
TINY_FOLDER = Path("models") / "tiny-v1"
Quantization = Literal["8bit", "4bit"]
_CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]
_DOWNLOAD_PATTERNS = [*_CONFIG_PATTERNS, "*.safetensors"]
_NOT_QUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
_WAY_OUT = "Use --model PATH for a local copy or --model tiny for the offline demo model"


def load_engine(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantization: Quantization | None = None,
    runtime: str = "auto",
    data_dir: Path = Path("data"),
    caches: CacheSettings | None = None,
    free_bytes: int | None = None,
) -> Engine | LlamaCppEngine:
    """Load Mipha from a Hub id, a folder in the original format, or ``"tiny"``.

    ``"tiny"`` builds a small random checkpoint once under ``data_dir`` (offline). The runtime and
    precision are ``choose_precision``'s: explicit ``dtype``, ``quantization`` and ``runtime`` win,
    ``auto`` picks from the free memory (``free_bytes`` overrides the measured figure) and the
    processor; on a CPU with llama.cpp the language model is converted to GGUF once, under
    ``data_dir``. ``caches`` bounds the follow-up caches (default: ``default_cache_settings(device)``).
    Every failure raises ``ModelLoadError`` whose message says what went wrong and what to do;
    device, dtype, quantization and runtime are checked first, before anything is downloaded or read.
    """
    _check_quantization(quantization)
    choose_dtype(dtype, choose_device(device))
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"--runtime {runtime} is not a runtime: use {', '.join(RUNTIMES)}")
    folder = resolve_checkpoint(model, data_dir=data_dir)
    checkpoint = read_checkpoint_config(folder)
    text = checkpoint.llava.text_config
    size = ModelSize.of_checkpoint(folder, layers=text.num_hidden_layers, hidden=text.hidden_size,
                                   context_length=checkpoint.context_length)
    precision = choose_precision(device=device, dtype=dtype, quantization=quantization, runtime=runtime, size=size,
                                 llama_cpp_problem=llama_cpp_available(), free_bytes=free_bytes)
    logger.info("loading %s as %s (about %.1f GB resident)", model, precision.label,
                precision.resident_bytes(size) / 1e9)
    tokenizer = _load_tokenizer(folder, checkpoint)
    caches = caches or default_cache_settings(precision.device)
    if precision.runtime == "llama.cpp":
        return _load_llama_cpp_engine(folder, checkpoint, tokenizer=tokenizer, precision=precision, model_id=model,
                                      data_dir=data_dir, caches=caches)
    mipha = _load_model(folder, checkpoint, device=precision.device, dtype=precision.dtype,
                        quantization=precision.quantization)
    return Engine(
        model=mipha,
        tokenizer=tokenizer,
        preprocessor=_load_preprocessor(folder, checkpoint),
        model_id=model,
        context_length=checkpoint.context_length,
        image_tokens=checkpoint.image_tokens,
        caches=caches,
        precision_label=precision.label,
    )


def _load_llama_cpp_engine(folder: Path, checkpoint: MiphaCheckpointConfig, *, tokenizer: PreTrainedTokenizerBase,
                           precision: Precision, model_id: str, data_dir: Path,
                           caches: CacheSettings) -> LlamaCppEngine:
    """The language model as GGUF on llama.cpp (converted once), the vision tower and projector in PyTorch."""
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder} has no .safetensors weights: download the model again")
    reader_gguf = None
    if precision.reader_weights:
        # The photo reader's file first: an F16 one is then found by quantizing and kept (it removes only what it wrote).
        try:
            reader_gguf = language_model_gguf(folder, checkpoint, precision=GGUF_PRECISIONS[precision.reader_weights],
                                              cache_dir=data_dir / "gguf")
        except ModelLoadError as error:
            logger.warning("photos are read on the %s weights instead: %s", precision.weights, error)
            precision = replace(precision, photo_reader=precision.weights)
    gguf = language_model_gguf(folder, checkpoint, precision=GGUF_PRECISIONS[precision.weights],
                               cache_dir=data_dir / "gguf")
    try:
        vision = VisionEncoder(folder, checkpoint, dtype=precision.dtype)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ModelLoadError(f"the vision weights in {folder} could not be loaded ({error}): "
                             "download the model again") from error
    context = LlamaCppContext(gguf, context_length=checkpoint.context_length, threads=physical_cores(),
                              bulk_positions=None if precision.photo_reader else 0,
                              reader_path=reader_gguf)
    return LlamaCppEngine(
        context=context,
        vision=vision,
        tokenizer=tokenizer,
        preprocessor=_load_preprocessor(folder, checkpoint),
        model_id=model_id,
        precision_label=precision.label,
        context_length=checkpoint.context_length,
        image_tokens=checkpoint.image_tokens,
        image_token_id=checkpoint.llava.image_token_id,
        caches=caches,
    )


def load_remote_engine(
    server: RemoteServer,
    *,
    model: str = DEFAULT_MODEL,
    data_dir: Path = Path("data"),
) -> RemoteEngine:
    """An engine that sends each turn to ``server``, with ``model``'s tokenizer and conversation rules.

    Only the tokenizer, the configs and the image processor's settings of ``model`` are read
    (for a Hub id, only those files are downloaded): they decide which turns fit and how the
    photo is padded and resized before it is sent. The server is not contacted until a turn.
    """
    folder = resolve_checkpoint(model, data_dir=data_dir, weights=False)
    checkpoint = read_checkpoint_config(folder)
    tokenizer = _load_tokenizer(folder, checkpoint)
    fitter = PromptFitter(tokenizer, context_length=checkpoint.context_length, image_tokens=checkpoint.image_tokens,
                          image_token_id=checkpoint.llava.image_token_id)
    logger.info("replies come from the model server at %s (%s)", server.url, server.model or "its first model")
    return RemoteEngine(server=server, fitter=fitter, preprocessor=_load_preprocessor(folder, checkpoint),
                        model_id=model)


def _check_quantization(quantization: str | None) -> None:
    if quantization not in (None, "8bit", "4bit"):
        raise ModelLoadError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}: "
                             "use --load-8bit or --load-4bit, or neither")


def default_cache_settings(device: torch.device) -> CacheSettings:
    """2 GiB of KV caches in RAM on the CPU, 1 GiB on a GPU, where memory is scarcer.

    A full 2048-token Mipha-3B conversation keeps 32 layers x 2 x 2560 values a token: 0.67 GB in
    bf16, 1.34 GB in fp32, so 2 GiB holds about three full conversations in bf16 (more short ones).
    Photo features take the `CacheSettings` default (3.7 MB a photo in bf16).
    """
    kv_bytes = 2 * 1024**3 if device.type == "cpu" else 1024**3
    return CacheSettings(kv_cache_bytes=kv_bytes)


def resolve_checkpoint(model: str, *, data_dir: Path, weights: bool = True) -> Path:
    """The local folder holding ``model``: built for "tiny", downloaded for a Hub id (without
    the weights when ``weights`` is False)."""
    if model == TINY_MODEL:
        return _tiny_checkpoint(data_dir)
    path = _expanded(model)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{model} is a file, not a folder: point --model at the folder holding config.json")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"{model} is neither an existing folder nor a Hub id like zhumj34/Mipha-3B")
    return _download(model, patterns=_DOWNLOAD_PATTERNS if weights else _CONFIG_PATTERNS)


def _tiny_checkpoint(data_dir: Path) -> Path:
    try:
        return ensure_tiny_checkpoint(data_dir / TINY_FOLDER)
    except OSError as error:
        raise ModelLoadError(
            f"could not write the tiny model under {data_dir} ({error}): use --data-dir with a writable folder"
        ) from error


def _expanded(model: str) -> Path:
    """``~`` expanded where it can be; ``~unknown-user/x`` stays as written (and is then not found)."""
    try:
        return Path(model).expanduser()
    except RuntimeError:
        return Path(model)


def _download(repo_id: str, *, patterns: list[str]) -> Path:
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise ModelLoadError(f"{repo_id} was not found on the Hugging Face Hub, or needs a login: {_WAY_OUT}") from error
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(f"could not download {repo_id}: no network and no cached copy. {_WAY_OUT}") from error
    except HFValidationError as error:
        raise ModelLoadError(f"{repo_id} is not a valid Hub id: {_WAY_OUT}") from error
    except OSError as error:
        raise ModelLoadError(f"could not download {repo_id} ({error}). {_WAY_OUT}") from error


def _load_tokenizer(folder: Path, checkpoint: MiphaCheckpointConfig) -> PreTrainedTokenizerBase:
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json or vocab.json): download the model again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, config=checkpoint.llava)
    except Exception as error:  # noqa: BLE001 - a malformed tokenizer.json raises plain Exception from the Rust library
        raise ModelLoadError(f"the tokenizer in {folder} could not be read ({error}): download the model again") from error
    if len(tokenizer) >= checkpoint.llava.text_config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {checkpoint.llava.text_config.vocab_size}: "
            "the folder mixes files from different models"
        )
    return tokenizer


def _load_preprocessor(folder: Path, checkpoint: MiphaCheckpointConfig) -> ImagePreprocessor:
    try:
        return ImagePreprocessor.from_checkpoint(folder, image_size=checkpoint.image_size)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
        raise ModelLoadError(
            f"{folder / 'preprocessor_config.json'} could not be used ({error}): download the model again"
        ) from error


def _load_model(
    folder: Path,
    checkpoint: MiphaCheckpointConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Quantization | None,
) -> MiphaForConditionalGeneration:
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder} has no .safetensors weights: download the model again")
    packed_on_cpu = quantization is not None and uses_packed_cpu_kernels(device, dtype)
    try:
        model = MiphaForConditionalGeneration.from_pretrained(
            folder,
            config=checkpoint.llava,
            key_mapping=KEY_MAPPING,
            dtype=dtype,
            device_map={"": str(device)},
            quantization_config=None if packed_on_cpu else _quantization_config(quantization, dtype),
        )
    except (MemoryError, ImportError, SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise _load_failure(error, folder=folder, device=device, dtype=dtype, quantization=quantization) from error
    if packed_on_cpu:
        _quantize_on_cpu(model, quantization)
    return model.eval()


def _load_failure(
    error: Exception, *, folder: Path, device: torch.device, dtype: torch.dtype, quantization: Quantization | None
) -> ModelLoadError:
    """What a failed ``from_pretrained`` means: memory ran out, a package is missing, the files are
    damaged, or this device, dtype and quantization cannot hold the model."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower():
        return ModelLoadError(f"out of memory while loading the model on {device}: try --load-8bit or --load-4bit")
    if isinstance(error, ImportError):
        return ModelLoadError(f"--load-{quantization} needs a package that is missing ({error}): "
                              "pip install bitsandbytes, or load without quantization")
    if isinstance(error, (SafetensorError, OSError)):
        return ModelLoadError(f"the weights in {folder} could not be loaded ({error}): download the model again")
    setup = f"{device} as {str(dtype).removeprefix('torch.')}"
    if quantization:
        setup += f" with {quantization} weights"
    return ModelLoadError(
        f"the model in {folder} could not be loaded on {setup} ({error}): try --device cpu --dtype float32 "
        "without quantization, and if that fails too, download the model again"
    )


def _quantize_on_cpu(model: MiphaForConditionalGeneration, quantization: Quantization) -> None:
    try:
        replaced = quantize_linears(model.model.language_model, bits=8 if quantization == "8bit" else 4)
    except RuntimeError as error:
        raise ModelLoadError(
            f"this PyTorch could not quantize the model to {quantization} on the CPU ({error}): "
            "load without quantization or with --dtype float32"
        ) from error
    logger.info("quantized %d language-model layers to %s with torch's packed CPU kernels", replaced, quantization)


def uses_packed_cpu_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """On a CPU computing in bf16, torch's packed int8/int4 kernels decode 2-5x faster than
    bf16 and bitsandbytes (see ``cpu_quantization``); elsewhere bitsandbytes is used."""
    return device.type == "cpu" and dtype == torch.bfloat16


def _quantization_config(quantization: Quantization | None, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes for the language model; the vision tower and projector stay unquantized."""
    if quantization is None:
        return None
    if quantization == "8bit":
        _silence_int8_cast_warning()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_NOT_QUANTIZED)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=_NOT_QUANTIZED,
        )
    raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes' 8-bit matmul logs, on every call on the CPU, that it casts to fp16."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _silence_int8_cast_warning() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(existing, _DropInt8CastNotice) for existing in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastNotice())
