"""A small random checkpoint in the original Mipha-3B format, built offline.

``python -m mipha_core.tiny DIR`` writes it. It has the same ``config.json`` layout, weight
names (SigLIP pooling head and biased ``lm_head`` included), tokenizer kind and
preprocessor config as Mipha-3B, so tests and the offline demo run the real loading path.
Weights are drawn large enough that next-token logits are far from ties, and the head
rows past the tokenizer's vocabulary carry a large negative bias so they never win.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mipha_core.prompt import END_OF_TEXT, SYSTEM_PROMPT

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Dimensions:
    """Sizes of the Phi-2 language model and the SigLIP vision tower."""

    text: dict[str, int | float]
    vision: dict[str, int]


TINY = Dimensions(
    text={"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "partial_rotary_factor": 0.4},
    vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
            "image_size": 384, "patch_size": 14},
)
MIPHA_3B = Dimensions(
    text={"vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4},
    vision={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "image_size": 384, "patch_size": 14},
)
"""The real Mipha-3B sizes (SigLIP-so400m at 384 px, Phi-2 2.7B), for benchmarks."""

TOKENIZER_VOCAB = 900
DEFAULT_SHARD_BYTES = 2 * 1024**3

_CORPUS = [
    SYSTEM_PROMPT,
    "USER: What is in this photo? ASSISTANT: The photo shows a cat sitting on a wooden table.",
    "USER: Describe the image in detail. ASSISTANT: A person in a space suit stands in front of a flag.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "There is a cup of coffee with milk foam on a saucer, next to a spoon and a small plate.",
    "A rocket is standing on the launch pad, with clouds of steam rising around its base.",
    "Colors: red, green, blue, yellow, orange, purple, black, white, gray and brown.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation: . , ; : ! ? ' \" ( ) [ ] { } - _ / \\",
    "Can you count the people? How many animals are there? Where was this picture taken?",
    "def greet(name):\n    return f'Hello, {name}!'\n\nprint(greet('world'))",
    "Café, naïve, résumé, 東京, Привет, 😀 — unicode text should round-trip through bytes.",
]


def write_tiny_checkpoint(
    folder: Path,
    *,
    dims: Dimensions = TINY,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a random Mipha checkpoint with ``dims`` (tiny by default) into ``folder``.

    Tensors are drawn one at a time and written shard by shard, so a full-size checkpoint
    never needs more than one shard in memory.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_size = _write_tokenizer(folder)
    generator = torch.Generator().manual_seed(seed)
    weights = _random_weights(dims, generator, tokenizer_size=tokenizer_size, dtype=dtype)
    _write_weights(folder, weights, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(_original_config(dims, dtype), indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(dims), indent=2))
    logger.info("wrote a random Mipha checkpoint to %s", folder)
    return folder


def ensure_tiny_checkpoint(folder: Path) -> Path:
    """Build the tiny checkpoint once: later calls reuse it. Written beside, then renamed."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    write_tiny_checkpoint(staging)
    try:
        os.rename(staging, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    return folder


def _write_tokenizer(folder: Path) -> int:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CodeGenTokenizer",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size()


def _weight_shapes(dims: Dimensions) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Mipha checkpoint with ``dims``, under its original name."""
    t, v = dims.text, dims.vision
    hidden, inner, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(t["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes |= _linear(f"{prefix}.self_attn.{name}", hidden, hidden)
        shapes |= _linear(f"{prefix}.mlp.fc1", hidden, inner) | _linear(f"{prefix}.mlp.fc2", inner, hidden)
        shapes |= _norm(f"{prefix}.input_layernorm", hidden)
    shapes |= _norm("model.final_layernorm", hidden) | _linear("lm_head", hidden, vocab)
    shapes |= _vision_shapes("model.vision_tower.vision_model", v)
    shapes |= _linear("model.mm_projector.0", v["hidden_size"], hidden) | _linear("model.mm_projector.2", hidden, hidden)
    return shapes


def _vision_shapes(prefix: str, v: dict[str, int]) -> dict[str, tuple[int, ...]]:
    width, inner, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    positions = (v["image_size"] // patch) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.embeddings.patch_embedding.weight": (width, 3, patch, patch),
        f"{prefix}.embeddings.patch_embedding.bias": (width,),
        f"{prefix}.embeddings.position_embedding.weight": (positions, width),
    }
    for layer in range(v["num_hidden_layers"]):
        block = f"{prefix}.encoder.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= _linear(f"{block}.self_attn.{name}", width, width)
        shapes |= _norm(f"{block}.layer_norm1", width) | _norm(f"{block}.layer_norm2", width)
        shapes |= _linear(f"{block}.mlp.fc1", width, inner) | _linear(f"{block}.mlp.fc2", inner, width)
    shapes |= _norm(f"{prefix}.post_layernorm", width)
    head = f"{prefix}.head"
    shapes |= {f"{head}.probe": (1, 1, width)}
    shapes |= {f"{head}.attention.in_proj_weight": (3 * width, width), f"{head}.attention.in_proj_bias": (3 * width,)}
    shapes |= _linear(f"{head}.attention.out_proj", width, width) | _norm(f"{head}.layernorm", width)
    shapes |= _linear(f"{head}.mlp.fc1", width, inner) | _linear(f"{head}.mlp.fc2", inner, width)
    return shapes


def _linear(name: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (fan_out, fan_in), f"{name}.bias": (fan_out,)}


def _norm(name: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


_NORM = re.compile(r"(layernorm|layer_norm\d?)\.(weight|bias)$")


def _random_weights(
    dims: Dimensions, generator: torch.Generator, *, tokenizer_size: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in _weight_shapes(dims).items():
        tensor = torch.randn(shape, generator=generator)
        if _NORM.search(name):
            tensor.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            tensor.mul_(0.1)
        elif not (name.endswith("embed_tokens.weight") or "position_embedding" in name or name.endswith("probe")):
            gain = 2.0 if name.startswith("lm_head") else 1.0
            tensor.mul_(gain / math.sqrt(math.prod(shape[1:])))
        if name == "lm_head.weight":
            tensor[tokenizer_size:] = 0.0
        if name == "lm_head.bias":
            tensor[tokenizer_size:] = -1e4
        yield name, tensor.to(dtype)


def write_weights(
    folder: Path, weights: Iterator[tuple[str, torch.Tensor]], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    """Write named tensors as ``model.safetensors``, or as shards with an index past ``max_shard_bytes``,
    holding one shard in memory at a time (``mipha_core.export_llava`` writes its checkpoint with it)."""
    _write_weights(folder, weights, max_shard_bytes=max_shard_bytes)


def _write_weights(folder: Path, weights: Iterator[tuple[str, torch.Tensor]], *, max_shard_bytes: int) -> None:
    """Write shards of at most ``max_shard_bytes``; several shards get an index file."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    files: list[str] = []
    total = 0

    def flush() -> None:
        files.append(f"part-{len(files)}.safetensors")
        save_file(shards[-1], str(folder / files[-1]), metadata={"format": "pt"})
        shards[-1] = {name: torch.empty(0) for name in shards[-1]}

    for name, tensor in weights:
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and _bytes(shards[-1]) + size > max_shard_bytes:
            flush()
            shards.append({})
        shards[-1][name] = tensor
        total += size
    flush()
    if len(files) == 1:
        (folder / files[0]).rename(folder / "model.safetensors")
        return
    weight_map = {}
    for index, (old_name, shard) in enumerate(zip(files, shards)):
        new_name = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        (folder / old_name).rename(folder / new_name)
        weight_map |= {name: new_name for name in shard}
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def _original_config(dims: Dimensions, dtype: torch.dtype) -> dict:
    """A config.json laid out as the original repository saved Mipha-3B's."""
    v = dims.vision
    vision_tower = {
        "_name_or_path": "google/siglip-so400m-patch14-384", "model_type": "mipha_vision_model",
        "architectures": None, "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6, "num_channels": 3, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "return_dict": True, "output_hidden_states": False, "torch_dtype": None, "use_bfloat16": False, **v,
    }
    mm_projector = {
        "model_type": "mipha_projector", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": v["hidden_size"],
        "hidden_size": dims.text["hidden_size"], "return_dict": True, "torch_dtype": None,
    }
    return {
        "_name_or_path": "mipha-tiny", "architectures": ["MiphaPhiForCausalLM"], "model_type": "mipha_phi",
        **dims.text, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "qk_layernorm": False, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "resid_pdrop": 0.1, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "use_cache": True, "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "freeze_vision_tower": True,
        "transformers_version": "4.37.0", "vision_config": {"vision_tower": vision_tower, "mm_projector": mm_projector},
    }


def _preprocessor_config(dims: Dimensions) -> dict:
    size = dims.vision["image_size"]
    return {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Mipha checkpoint (original format).")
    parser.add_argument("folder", type=Path, help="where to write it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-mb", type=int, default=DEFAULT_SHARD_BYTES // 2**20,
                        help="largest safetensors file to write, in MiB")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_checkpoint(args.folder, seed=args.seed, max_shard_bytes=args.max_shard_mb * 2**20)


if __name__ == "__main__":
    main()
