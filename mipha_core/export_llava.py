"""Write a Mipha checkpoint in the LLaVA layout that vLLM serves.

``python -m mipha_core.export_llava SOURCE OUT_DIR`` takes what ``--model`` takes (a Hub id, a
folder in the original Mipha format, or ``tiny``) and writes a plain ``LlavaForConditionalGeneration``
checkpoint, readable by transformers (4.56+ and 5) and by vLLM:

- ``config.json``: ``llava`` with a Phi ``text_config`` (``PhiForCausalLM``, whose ``lm_head`` has a
  bias, as Phi-2's does) and a SigLIP ``vision_config``: features from layer -2, all 729 patches
  (``"full"``: SigLIP has no CLS token to drop), a Linear-GELU-Linear projector with biases. The
  rotary settings are written both ways (``rope_parameters`` and the older top-level fields), so a
  transformers 4 reader does not fall back to Phi's default ``partial_rotary_factor`` of 0.5.
- the weights under transformers' own Llava names (``model.language_model.*``, ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``lm_head.*``), which vLLM's ``LlavaForConditionalGeneration``
  maps onto its modules (``hf_to_vllm_mapper``): ``lm_head.weight`` and ``lm_head.bias`` become the
  biased head of vLLM's ``PhiForCausalLM``, built from ``text_config.architectures``. The SigLIP pooling
  head, which Mipha never runs, is left out (vLLM would refuse it). Head rows past the tokenizer
  (Phi-2's padding rows and ``<image>``) are set to weight 0 and bias ``UNUSED_ROW_BIAS``: the
  engine suppresses those ids when it generates, and this way the server never samples them either.
- the tokenizer with ``<image>`` added as a special token, and a chat template (in
  ``tokenizer_config.json`` and ``chat_template.jinja``) that renders OpenAI-style messages into
  exactly ``PhiPromptStyle``'s prompt;
- ``preprocessor_config.json`` and ``processor_config.json`` for ``LlavaProcessor`` with a
  ``SiglipImageProcessor`` (384 px, mean = std = 0.5, patch 14: ``<image>`` becomes 729 tokens);
- ``generation_config.json``: ``<|endoftext|>`` ends a reply; the app's default sampling.

Photos: Mipha pads a photo to a square with the mean colour before resizing it to 384 px, and
vLLM's processor only resizes (a wide photo would be squashed). Mipha Chat's remote engine sends
each photo already padded and resized (``ImagePreprocessor.model_image``), losslessly as PNG, so
the server's resize leaves it as it is and every backend sees the same pixels. Other clients
must pad the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shutil
import string
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, LlavaConfig, PreTrainedTokenizerBase

from mipha_core.checkpoint import KEY_MAPPING, MiphaCheckpointConfig, read_checkpoint_config
from mipha_core.errors import MiphaError
from mipha_core.generation import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ORIGINAL_TOP_K
from mipha_core.loading import resolve_checkpoint
from mipha_core.modeling import MiphaForConditionalGeneration
from mipha_core.preprocessing import ImagePreprocessor
from mipha_core.prompt import END_OF_TEXT, IMAGE_PLACEHOLDER, SYSTEM_PROMPT, PhiPromptStyle
from mipha_core.tiny import DEFAULT_SHARD_BYTES, write_weights

logger = logging.getLogger(__name__)

UNUSED_ROW_BIAS = -1e4
"""Bias of the head rows no token uses: far below any real logit, and finite in fp16 and bf16."""

_UNUSED_WEIGHTS = [re.compile(pattern) for pattern in MiphaForConditionalGeneration._keys_to_ignore_on_load_unexpected]


class ExportError(MiphaError):
    """The checkpoint could not be written in the LLaVA layout; the message says why and what to do."""


_TEMPLATE_SOURCE = string.Template("""\
{#- Mipha's "phi" prompt, as PhiPromptStyle (mipha_core/prompt.py) writes it:
    SYSTEM USER: <image>\\nQUESTION ASSISTANT: ANSWER<|endoftext|>USER: QUESTION ASSISTANT:
    A system message replaces the default sentence. Content is a string or a list of text and
    image parts; the image opens the user turn that carries it. -#}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_content = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_content = $system -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if system_content is string -%}
    {{- system_content -}}
{%- else -%}
    {{- system_content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}
{%- endif -%}
{{- ' ' -}}
{%- for message in loop_messages -%}
    {%- set parts = namespace(texts=[], images=0) -%}
    {%- if message['content'] is string -%}
        {%- set parts.texts = [message['content']] -%}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'text' -%}
                {%- set parts.texts = parts.texts + [part['text']] -%}
            {%- elif part['type'] in ['image', 'image_url'] -%}
                {%- set parts.images = parts.images + 1 -%}
            {%- else -%}
                {{- raise_exception('Mipha reads text and image parts only, got ' + part['type']) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- $user + ': ' -}}
        {%- for _ in range(parts.images) -%}{{- $image -}}{%- endfor -%}
        {%- if parts.images -%}{{- '\\n' -}}{%- endif -%}
        {{- parts.texts | join('\\n') + ' ' -}}
    {%- elif message['role'] == 'assistant' and not parts.images -%}
        {{- $assistant + ': ' + parts.texts | join('\\n') + $end -}}
    {%- else -%}
        {{- raise_exception('Mipha takes user and assistant messages (a system message first) and images '
                            'in user messages only; got a ' + message['role'] + ' message') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- $assistant + ':' -}}
{%- endif -%}
""")

CHAT_TEMPLATE = _TEMPLATE_SOURCE.substitute({
    name: json.dumps(value)  # a Jinja string literal
    for name, value in {
        "system": SYSTEM_PROMPT, "user": PhiPromptStyle.user_role, "assistant": PhiPromptStyle.assistant_role,
        "image": IMAGE_PLACEHOLDER, "end": END_OF_TEXT,
    }.items()
})
"""Renders OpenAI-style messages into exactly ``PhiPromptStyle``'s prompt (tests hold the two together).

It loops over ``message['content']``, so vLLM detects the "openai" content format and passes the
parts through, an image part as ``{"type": "image"}``."""


@dataclass(frozen=True)
class LlavaExport:
    """What ``export_llava`` wrote."""

    folder: Path
    image_token_id: int
    """The id of ``<image>`` (``image_token_index`` in config.json): the first id past the source tokenizer."""
    image_seq_length: int
    """Positions a photo takes: ``<image>`` becomes this many image tokens."""
    end_token_id: int
    dtype: str
    """The weights' dtype, as stored in the source checkpoint."""


@dataclass(frozen=True)
class _TokenIds:
    tokenizer_size: int
    end: int
    image: int


def export_llava(
    source: str,
    out_dir: Path,
    *,
    data_dir: Path = Path("data"),
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> LlavaExport:
    """Write the Mipha checkpoint ``source`` into ``out_dir`` in the LLaVA layout (see the module).

    ``source`` is a Hub id, a folder in the original Mipha format, or ``"tiny"`` (built under
    ``data_dir``). ``out_dir`` must be new or empty; the files are written beside it and moved
    into place at the end, so a failed export leaves nothing behind. Raises ``ModelLoadError``
    (``UnsupportedModelError`` for another model) for the source, ``ExportError`` for the rest.
    """
    _check_out_dir(out_dir)
    folder = resolve_checkpoint(source, data_dir=data_dir)
    checkpoint = read_checkpoint_config(folder)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        export = _write_export(folder, checkpoint, staging, max_shard_bytes=max_shard_bytes)
        _readable_as_the_folder(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s in the LLaVA layout to %s", source, out_dir)
    return replace(export, folder=out_dir)


def _readable_as_the_folder(folder: Path) -> None:
    """Files as readable as ``folder`` (made with the umask): safetensors writes its files 0600,
    which a server running as another user could not read."""
    mode = folder.stat().st_mode & 0o666
    for file in folder.iterdir():
        file.chmod(mode)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} is not empty: choose a new folder for the export (nothing was written)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file: choose a new folder for the export (nothing was written)")


def _write_export(folder: Path, checkpoint: MiphaCheckpointConfig, out: Path, *, max_shard_bytes: int) -> LlavaExport:
    ids = _write_tokenizer(folder, out, checkpoint)
    expected = _expected_shapes(checkpoint.llava)
    write_weights(out, _llava_weights(folder, expected=expected, tokenizer_size=ids.tokenizer_size),
                  max_shard_bytes=max_shard_bytes)
    dtype = _dtype_name(out)
    _write_json(out / "config.json", _llava_config(checkpoint, image_token_id=ids.image, end_token_id=ids.end,
                                                      dtype=dtype))
    _write_json(out / "generation_config.json", _generation_config(ids.end))
    _write_json(out / "preprocessor_config.json", _image_processor_config(folder, checkpoint))
    _write_json(out / "processor_config.json", _processor_config(checkpoint))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return LlavaExport(folder=out, image_token_id=ids.image, image_seq_length=checkpoint.image_tokens,
                       end_token_id=ids.end, dtype=dtype)


# --- config ---------------------------------------------------------------------------------


def _llava_config(checkpoint: MiphaCheckpointConfig, *, image_token_id: int, end_token_id: int,
                      dtype: str) -> dict[str, Any]:
    """``config.json`` for the export: the engine's ``LlavaConfig`` with the names vLLM and both
    transformers generations read."""
    config = copy.deepcopy(checkpoint.llava)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.image_token_id = image_token_id
    config.text_config.architectures = ["PhiForCausalLM"]
    config.text_config.bos_token_id = config.text_config.eos_token_id = end_token_id
    raw = config.to_diff_dict()
    raw |= {
        "image_token_index": image_token_id,
        "image_seq_length": checkpoint.image_tokens,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    text = config.text_config
    raw["text_config"] |= {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "tie_word_embeddings": False,
        "max_position_embeddings": text.max_position_embeddings,
        # transformers 4 reads these two; transformers 5 and vLLM read rope_parameters.
        "rope_theta": text.rope_parameters["rope_theta"],
        "partial_rotary_factor": text.rope_parameters["partial_rotary_factor"],
        # vLLM's Phi MLP reads n_inner (else 4 x hidden_size); transformers reads intermediate_size.
        "n_inner": text.intermediate_size,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    raw["vision_config"] |= {"model_type": "siglip_vision_model", "vision_use_head": False}
    return raw


def _generation_config(end_token_id: int) -> dict[str, Any]:
    """A reply ends at ``<|endoftext|>``; vLLM takes the sampling here as its defaults, which are the app's."""
    return {
        "bos_token_id": end_token_id,
        "eos_token_id": end_token_id,
        "pad_token_id": end_token_id,
        "do_sample": True,
        "temperature": DEFAULT_TEMPERATURE,
        "top_p": DEFAULT_TOP_P,
        "top_k": ORIGINAL_TOP_K,
    }


def _image_processor_config(folder: Path, checkpoint: MiphaCheckpointConfig) -> dict[str, Any]:
    """SigLIP's processor with the engine's settings. ``SiglipImageProcessor`` is the class name both
    transformers generations know (the PIL class in 4, the torchvision one in 5)."""
    processor = ImagePreprocessor.from_checkpoint(folder, image_size=checkpoint.image_size).processor
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_resize": True,
        "size": {"height": processor.size.height, "width": processor.size.width},
        "resample": int(processor.resample),
        "do_rescale": True,
        "rescale_factor": processor.rescale_factor,
        "do_normalize": True,
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
        "do_convert_rgb": True,
    }


def _processor_config(checkpoint: MiphaCheckpointConfig) -> dict[str, Any]:
    """``LlavaProcessor`` expands ``<image>`` to (size / patch)^2 tokens with the "full" strategy."""
    return {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_PLACEHOLDER,
        "patch_size": checkpoint.llava.vision_config.patch_size,
        "vision_feature_select_strategy": "full",
        "num_additional_image_tokens": 0,
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# --- tokenizer --------------------------------------------------------------------------------


def _write_tokenizer(folder: Path, out: Path, checkpoint: MiphaCheckpointConfig) -> _TokenIds:
    """The engine's tokenizer with ``<image>`` added after its last token, and the chat template."""
    tokenizer = _source_tokenizer(folder, checkpoint.llava)
    vocab = tokenizer.get_vocab()
    if END_OF_TEXT not in vocab:
        raise ExportError(f"the tokenizer in {folder} has no {END_OF_TEXT}: it is not Mipha-3B's tokenizer")
    if IMAGE_PLACEHOLDER in vocab:
        raise ExportError(f"the tokenizer in {folder} already has a {IMAGE_PLACEHOLDER} token: it is not Mipha-3B's")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)])
    ids = _TokenIds(tokenizer_size=len(tokenizer), end=vocab[END_OF_TEXT], image=backend.token_to_id(IMAGE_PLACEHOLDER))
    if ids.image != ids.tokenizer_size:
        raise ExportError(f"{IMAGE_PLACEHOLDER} got id {ids.image}, expected {ids.tokenizer_size}: "
                          f"the tokenizer in {folder} is inconsistent; download the model again")
    if ids.image >= checkpoint.llava.text_config.vocab_size:
        raise ExportError(f"the model has {checkpoint.llava.text_config.vocab_size} token rows and the tokenizer "
                          f"{ids.tokenizer_size} tokens: no row is left for {IMAGE_PLACEHOLDER}")
    backend.save(str(out / "tokenizer.json"))
    settings = _read_json(folder / "tokenizer_config.json") or {"tokenizer_class": type(tokenizer).__name__}
    _write_json(out / "tokenizer_config.json", _with_image_token(settings, ids.image) | {
        "model_max_length": checkpoint.context_length,
        "chat_template": CHAT_TEMPLATE,
    })
    special = _read_json(folder / "special_tokens_map.json") or {
        "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
    }
    _write_json(out / "special_tokens_map.json", _with_image_token(special, None))
    return ids


def _source_tokenizer(folder: Path, config: LlavaConfig) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder, config=config)
    except Exception as error:  # noqa: BLE001 - a malformed tokenizer.json raises plain Exception from the Rust library
        raise ExportError(f"the tokenizer in {folder} could not be read ({error}): download the model again") from error


def _with_image_token(settings: dict[str, Any], image_id: int | None) -> dict[str, Any]:
    """``settings`` with ``<image>`` among the additional special tokens (and the added tokens, if listed)."""
    updated = dict(settings)
    extra = list(updated.get("additional_special_tokens") or [])
    updated["additional_special_tokens"] = [*extra, IMAGE_PLACEHOLDER]
    if image_id is not None and "added_tokens_decoder" in updated:
        updated["added_tokens_decoder"] = dict(updated["added_tokens_decoder"]) | {str(image_id): {
            "content": IMAGE_PLACEHOLDER, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }}
    return updated


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is corrupt ({error}): download the model again") from error


# --- weights ----------------------------------------------------------------------------------


_TOWER = "model.vision_tower."
_TOWER_MODEL = _TOWER + "vision_model."


def _expected_shapes(config: LlavaConfig) -> dict[str, torch.Size]:
    """Every tensor the engine's model has (built on the meta device: no memory), by the name the
    export gives it. The tower keeps its ``vision_model.`` level, as in the original checkpoint:
    vLLM's SigLIP needs it, and transformers 5 (which dropped that level) still reads it."""
    with torch.device("meta"):
        model = MiphaForConditionalGeneration(config)
    return {_with_tower_level(name): tensor.shape for name, tensor in model.state_dict().items()}


def _with_tower_level(name: str) -> str:
    if name.startswith(_TOWER) and not name.startswith(_TOWER_MODEL):
        return _TOWER_MODEL + name.removeprefix(_TOWER)
    return name


def _llava_weights(
    folder: Path, *, expected: dict[str, torch.Size], tokenizer_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's tensors one at a time under their Llava names, checked against ``expected``."""
    seen: set[str] = set()
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                name = _llava_name(key)
                if name is None:
                    continue
                if name not in expected:
                    raise ExportError(f"{file.name} holds {key!r}, which Mipha-3B does not have: "
                                      "the folder mixes files from different models")
                tensor = weights.get_tensor(key)
                if tensor.shape != expected[name]:
                    raise ExportError(f"{key} in {file.name} has shape {tuple(tensor.shape)}, config.json says "
                                      f"{tuple(expected[name])}: the folder mixes files from different models")
                seen.add(name)
                yield name, _without_unused_rows(name, tensor, tokenizer_size)
    if missing := sorted(expected.keys() - seen):
        raise ExportError(f"{folder} lacks {len(missing)} weights (first: {missing[0]}): download the model again")


def _weight_files(folder: Path) -> list[Path]:
    index = _read_json(folder / "model.safetensors.index.json")
    if index:
        files = sorted({folder / name for name in index["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} has no .safetensors weights: download the model again")
    return files


def _llava_name(key: str) -> str | None:
    """The Llava name of an original Mipha weight, or None for the pooling head Mipha never runs."""
    if any(pattern.search(key) for pattern in _UNUSED_WEIGHTS):
        return None
    for pattern, replacement in KEY_MAPPING.items():
        name, count = re.subn(pattern, replacement, key)
        if count:
            return name
    return key


def _without_unused_rows(name: str, tensor: torch.Tensor, tokenizer_size: int) -> torch.Tensor:
    """Head rows past the tokenizer never win: weight 0, bias ``UNUSED_ROW_BIAS``."""
    if name not in ("lm_head.weight", "lm_head.bias") or tensor.shape[0] <= tokenizer_size:
        return tensor
    tensor = tensor.clone()
    tensor[tokenizer_size:] = 0.0 if name.endswith("weight") else UNUSED_ROW_BIAS
    return tensor


_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _dtype_name(folder: Path) -> str:
    """The dtype the head's weights are stored in, in ``folder``: the checkpoint's dtype."""
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as weights:
            if "lm_head.weight" in weights.keys():
                stored = weights.get_slice("lm_head.weight").get_dtype()
                return _DTYPE_NAMES.get(stored, stored.lower())
    raise ExportError(f"{folder} has no lm_head.weight")


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mipha_core.export_llava",
        description="Write a Mipha checkpoint in the LLaVA layout that vLLM serves (see the module docstring).",
    )
    parser.add_argument("source", help="a Hub id (zhumj34/Mipha-3B), a folder in the original Mipha format, or 'tiny'")
    parser.add_argument("out_dir", type=Path, help="a new or empty folder to write the export to")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where 'tiny' is built (default: ./data)")
    parser.add_argument("--max-shard-mb", type=int, default=DEFAULT_SHARD_BYTES // 2**20,
                        help="largest safetensors file to write, in MiB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export = export_llava(args.source, args.out_dir, data_dir=args.data_dir,
                              max_shard_bytes=args.max_shard_mb * 2**20)
    except (MiphaError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    logger.info("serve it with: vllm serve %s --served-model-name mipha-3b --chat-template %s "
                "--chat-template-content-format openai --max-model-len 2048 --limit-mm-per-prompt '{\"image\":1}' "
                "--dtype bfloat16\nthen start Mipha Chat with --engine-url http://HOST:8000/v1 --engine-model mipha-3b",
                export.folder, export.folder / "chat_template.jinja")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
