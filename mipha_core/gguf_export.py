"""Mipha's language model (Phi-2) as a GGUF file that llama.cpp runs, written from the original checkpoint.

The weights are streamed one tensor at a time from the checkpoint's safetensors into an F16
GGUF (so writing it never holds the model in memory), then llama.cpp's own quantizer makes
the Q8_0 or Q4_K_M file. Only the language model goes in: the SigLIP tower and projector stay
in PyTorch and hand their projected features over as input embeddings. The result is cached
beside the data directory under a name that fingerprints the checkpoint, so it is built once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from mipha_core.checkpoint import MiphaCheckpointConfig
from mipha_core.errors import ModelLoadError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the written file would change, so older cached files are not reused."""


@dataclass(frozen=True)
class GgufPrecision:
    """How the language model's weights are stored for llama.cpp."""

    name: str
    """What a person reads: "int8", "int4", "fp16" or "bf16"."""
    file_type: str
    """llama.cpp's name for it: Q8_0, Q4_K_M, F16 or BF16."""
    llama_ftype: int
    """``llama_ftype`` in llama.h."""
    bits_per_weight: float
    """About how many bits one weight takes (Q4_K_M mixes in some 6-bit tensors)."""


GGUF_PRECISIONS = {
    "int8": GgufPrecision("int8", "Q8_0", 7, 8.5),
    "int4": GgufPrecision("int4", "Q4_K_M", 15, 4.9),
    "fp16": GgufPrecision("fp16", "F16", 1, 16.0),
    "bf16": GgufPrecision("bf16", "BF16", 32, 16.0),
}
_UNQUANTIZED = ("F16", "BF16")
"""Written straight from the checkpoint; the others are quantized from the F16 file by llama.cpp."""

_TENSOR_NAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.embed_tokens\.weight$", "token_embd.weight"),
    (r"^model\.final_layernorm\.(weight|bias)$", r"output_norm.\1"),
    (r"^lm_head\.(weight|bias)$", r"output.\1"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.(weight|bias)$", r"blk.\1.attn_norm.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", r"blk.\1.attn_q.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)$", r"blk.\1.attn_k.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)$", r"blk.\1.attn_v.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.dense\.(weight|bias)$", r"blk.\1.attn_output.\2"),
    (r"^model\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"blk.\1.ffn_up.\2"),
    (r"^model\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"blk.\1.ffn_down.\2"),
)
"""Original Mipha weight name → llama.cpp's phi2 tensor name; everything else (vision, projector) stays out."""


def gguf_name(name: str) -> str | None:
    """llama.cpp's name for a Mipha language-model weight, None for the vision tower and projector."""
    for pattern, replacement in _TENSOR_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def language_model_gguf(folder: Path, checkpoint: MiphaCheckpointConfig, *, precision: GgufPrecision,
                        cache_dir: Path) -> Path:
    """The path of ``folder``'s language model as a GGUF file in ``precision``, built the first time.

    Raises ``ModelLoadError`` with the way out when the file cannot be written (disk full, a
    folder that cannot be written) or llama.cpp cannot quantize it.
    """
    target = cache_dir / f"mipha-phi2-{checkpoint_fingerprint(folder)}-{precision.file_type}.gguf"
    if target.is_file():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if precision.file_type in _UNQUANTIZED:
            logger.info("writing the language model of %s as GGUF (%s), once", folder, target.name)
            _atomically(target, lambda partial: write_unquantized_gguf(folder, checkpoint, partial, precision))
            return target
        f16 = target.with_name(target.name.replace(precision.file_type, GGUF_PRECISIONS["fp16"].file_type))
        wrote_f16 = not f16.is_file()
        if wrote_f16:
            logger.info("writing the language model of %s as GGUF (%s), once", folder, f16.name)
            _atomically(f16, lambda partial: write_unquantized_gguf(folder, checkpoint, partial,
                                                                    GGUF_PRECISIONS["fp16"]))
        logger.info("quantizing the language model to %s with llama.cpp, once", precision.file_type)
        _atomically(target, lambda partial: quantize_gguf(f16, partial, precision))
        if wrote_f16:  # one that was there is in use: the fp16 weights, or a photo reader's
            f16.unlink()
    except OSError as error:
        raise ModelLoadError(
            f"could not write the llama.cpp copy of the model under {cache_dir} ({error.strerror or error}): "
            "free disk space (up to 14 GB for Mipha-3B while converting), use --data-dir with a writable folder, or --runtime torch"
        ) from error
    return target


def checkpoint_fingerprint(folder: Path) -> str:
    """A short hash of the checkpoint's config and weight files (names, sizes, modification times)."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
    digest.update((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def write_unquantized_gguf(folder: Path, checkpoint: MiphaCheckpointConfig, path: Path,
                           precision: GgufPrecision) -> None:
    """Write the language model as a phi2 GGUF: 2-D weights in ``precision`` (F16 or BF16), norms
    and biases in F32. BF16 keeps a bf16 checkpoint's weights exactly; F16 rounds them."""
    import gguf

    text = checkpoint.llava.text_config
    writer = gguf.GGUFWriter(path, "phi2")
    writer.add_name("Mipha-3B language model")
    writer.add_context_length(checkpoint.context_length)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_layer_norm_eps(text.layer_norm_eps)
    rope = text.rope_parameters
    head_dim = text.hidden_size // text.num_attention_heads
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_file_type(precision.llama_ftype)
    _add_vocabulary(writer, folder, vocab_size=text.vocab_size)
    bf16 = precision.file_type == "BF16"
    weights = list(_language_weights(folder))
    for weight in weights:
        raw = gguf.GGMLQuantizationType.BF16 if bf16 and weight.matrix else None
        writer.add_tensor_info(weight.name, weight.shape, weight.dtype(bf16=bf16), weight.nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for weight in weights:
        with safe_open(str(weight.file), framework="pt") as file:
            tensor = file.get_tensor(weight.original)
        writer.write_tensor_data(weight.stored(tensor, bf16=bf16))
        del tensor
    writer.close()


def quantize_gguf(source: Path, target: Path, precision: GgufPrecision) -> None:
    """``llama_model_quantize`` from the F16 file into ``precision``, on every core."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = precision.llama_ftype
    params.nthread = os.cpu_count() or 1
    failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if failed:
        raise ModelLoadError(f"llama.cpp could not quantize the model to {precision.file_type} (code {failed}): "
                             "use --runtime torch, or report the problem with the log")


def _add_vocabulary(writer, folder: Path, *, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's gpt2 kind, padded to the model's rows. The app tokenizes
    with the Hugging Face tokenizer and hands llama.cpp token ids; the vocabulary is here
    because llama.cpp needs one to load a model."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer)
    writer.add_add_bos_token(False)


@dataclass(frozen=True)
class _Weight:
    name: str
    original: str
    file: Path
    shape: tuple[int, ...]
    """PyTorch's order; the writer stores it reversed, as ggml counts dimensions."""

    @property
    def matrix(self) -> bool:
        return len(self.shape) == 2

    def dtype(self, *, bf16: bool) -> np.dtype:
        """How numpy holds it: F32 for vectors; a matrix's bf16 bits as uint16, since numpy has no bfloat16."""
        if not self.matrix:
            return np.dtype(np.float32)
        return np.dtype(np.uint16 if bf16 else np.float16)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (2 if self.matrix else 4)

    def stored(self, tensor: torch.Tensor, *, bf16: bool) -> np.ndarray:
        if bf16 and self.matrix:
            return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return tensor.float().numpy().astype(self.dtype(bf16=bf16), copy=False)


def _language_weights(folder: Path) -> Iterator[_Weight]:
    """Every language-model weight in the checkpoint, in file order."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no .safetensors weights: download the model again")
    for path in files:
        with safe_open(str(path), framework="pt") as file:
            for original in file.keys():
                name = gguf_name(original)
                if name is not None:
                    shape = tuple(file.get_slice(original).get_shape())
                    yield _Weight(name=name, original=original, file=path, shape=shape)


def _atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name, so an interrupted build never leaves a file that looks finished."""
    partial = target.with_name(target.name + ".partial")
    try:
        write(partial)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """A few scalar fields of a GGUF file, for tests and logs."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields: dict[str, object] = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1 and field.types[0] != gguf.GGUFValueType.ARRAY:
            value = field.parts[field.data[0]]
            fields[key] = bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.item()
    return fields


