"""The bench checkpoint's language model as GGUF files for llama.cpp: BF16, then quantized.

Mipha-3B's language model is a plain Phi-2, and the original Mipha weight names for it
(``model.embed_tokens``, ``model.layers.N.*``, ``model.final_layernorm``, ``lm_head``) are already
``PhiForCausalLM``'s: ``mipha_core.checkpoint.KEY_MAPPING`` moves exactly these under
``model.language_model`` for our LLaVA class, so the way back is the identity. Extracting means
keeping those tensors, writing a ``phi`` config and copying the tokenizer files; llama.cpp's own
``convert_hf_to_gguf.py`` then does the rest (see ``bench/llama_cpp_convert.py`` for its tokenizer
check). Every file is written under a temporary name and renamed, so an interrupted run redoes
only the step it was in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from bench.llama_cpp_build import BenchError, LlamaCpp

logger = logging.getLogger(__name__)

LANGUAGE_MODEL_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.final_layernorm.", "lm_head.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
PHI_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "partial_rotary_factor", "hidden_act", "layer_norm_eps", "max_position_embeddings",
    "rope_theta", "qk_layernorm", "tie_word_embeddings", "bos_token_id", "eos_token_id", "initializer_range",
    "resid_pdrop", "embd_pdrop", "attention_dropout", "use_cache",
)
QUANTIZATIONS = ("Q8_0", "Q4_K_M")


def gguf_models(llama: LlamaCpp, checkpoint: Path, *, types: list[str]) -> dict[str, Path]:
    """GGUF file per type ("BF16", "Q8_0", "Q4_K_M"), converting and quantizing what is missing."""
    folder = llama.source.parent / "models"
    bf16 = folder / f"{checkpoint.name}-phi2-BF16.gguf"
    if not bf16.is_file():
        hf_folder = extract_phi2(checkpoint, folder / f"{checkpoint.name}-phi2-hf")
        convert_to_gguf(llama, hf_folder, bf16)
        shutil.rmtree(hf_folder)  # 5.5 GB that only the conversion needs
    paths = {"BF16": bf16}
    for kind in types:
        if kind != "BF16":
            paths[kind] = quantize(llama, bf16, folder / f"{checkpoint.name}-phi2-{kind}.gguf", kind=kind)
    return {kind: paths[kind] for kind in types}


def extract_phi2(checkpoint: Path, folder: Path) -> Path:
    """A ``PhiForCausalLM`` folder with the checkpoint's language model, one shard at a time."""
    if (folder / "config.json").is_file():
        return folder
    logger.info("extracting the Phi-2 language model of %s into %s", checkpoint, folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weight_map = {}
    for shard in sorted(checkpoint.glob("model-*.safetensors")):
        with safe_open(shard, framework="pt") as source:
            tensors = {name: source.get_tensor(name) for name in source.keys()
                       if name.startswith(LANGUAGE_MODEL_PREFIXES)}
        if tensors:
            save_file(tensors, staging / shard.name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard.name))
        del tensors
    if not weight_map:
        raise BenchError(f"{checkpoint} has no language-model weights: delete it and run again to rebuild it")
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (staging / "config.json").write_text(json.dumps(phi_config(checkpoint), indent=2))
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, staging / name)
    staging.rename(folder)
    return folder


def phi_config(checkpoint: Path) -> dict:
    """The original Mipha config's language-model settings, as a transformers ``PhiConfig``."""
    original = json.loads((checkpoint / "config.json").read_text())
    return {"architectures": ["PhiForCausalLM"], "model_type": "phi", "torch_dtype": "bfloat16",
            **{key: original[key] for key in PHI_CONFIG_KEYS if key in original}}


def convert_to_gguf(llama: LlamaCpp, hf_folder: Path, target: Path) -> None:
    logger.info("converting %s to %s with llama.cpp's convert_hf_to_gguf.py", hf_folder.name, target.name)
    partial = target.with_name(target.name + ".partial")
    command = [sys.executable, "-m", "bench.llama_cpp_convert", str(llama.source), str(hf_folder),
               "--outtype", "bf16", "--outfile", str(partial)]
    _run(command, what="converting to GGUF", cwd=Path(__file__).parent.parent)
    partial.rename(target)


def quantize(llama: LlamaCpp, bf16: Path, target: Path, *, kind: str) -> Path:
    if target.is_file():
        return target
    logger.info("quantizing to %s with llama-quantize", kind)
    partial = target.with_name(target.name + ".partial")
    command = [str(llama.tool("llama-quantize")), str(bf16), str(partial), kind, str(os.cpu_count() or 1)]
    _run(command, what=f"llama-quantize {kind}")
    partial.rename(target)
    return target


def _run(command: list[str], *, what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        logger.error("%s failed; the end of its output:\n%s", what, tail)
        raise BenchError(f"{what} failed (exit code {result.returncode}); its output is logged above")
