"""The original Mipha checkpoint format: reading its config and naming its weights.

Mipha-3B was saved by the original repository (transformers 4.37) as ``mipha_phi``: Phi-2's
fields at the top level of ``config.json`` and the vision tower and projector under
``vision_config``. This module translates that into a ``LlavaConfig`` and maps the weight
names onto ``MiphaForConditionalGeneration`` at load time, so no converted copy is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import LlavaConfig, PhiConfig, SiglipVisionConfig

from mipha_core.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_MODEL_TYPE = "mipha_phi"
SUPPORTED_DESCRIPTION = "Mipha-3B (model_type 'mipha_phi': Phi-2 with a SigLIP vision tower and an mlp2x_gelu projector)"

KEY_MAPPING: dict[str, str] = {
    r"^model\.embed_tokens\.": "model.language_model.embed_tokens.",
    r"^model\.layers\.": "model.language_model.layers.",
    r"^model\.final_layernorm\.": "model.language_model.final_layernorm.",
    r"^model\.mm_projector\.0\.": "model.multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "model.multi_modal_projector.linear_2.",
}
"""Original weight name (regex) → ``MiphaForConditionalGeneration`` name. The vision tower
(``model.vision_tower.vision_model.*``) and ``lm_head`` already have matching names."""

_UNSUPPORTED_HINTS = {
    "mipha_gemma": "a Gemma-based Mipha",
    "mipha_phi3": "a Phi-3-based Mipha",
    "mipha_phi15": "a Phi-1.5-based Mipha",
}


@dataclass(frozen=True)
class MiphaCheckpointConfig:
    """What the engine needs from an original Mipha ``config.json``."""

    llava: LlavaConfig
    image_size: int
    image_tokens: int
    context_length: int
    image_aspect_ratio: str


def read_checkpoint_config(folder: Path) -> MiphaCheckpointConfig:
    """Read and check ``folder/config.json``; raise with the way out if it is not Mipha-3B."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ModelLoadError(f"{folder} has no config.json: it is not a Mipha checkpoint folder") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is corrupt ({error}): download the model again") from error
    _check_supported(raw, folder)
    return _translate(raw, folder)


def _check_supported(raw: dict[str, Any], folder: Path) -> None:
    model_type = raw.get("model_type")
    if model_type != SUPPORTED_MODEL_TYPE:
        what = _UNSUPPORTED_HINTS.get(model_type, f"model_type {model_type!r}")
        raise UnsupportedModelError(f"{folder} holds {what}; this app runs {SUPPORTED_DESCRIPTION}")
    if "phi3" in str(raw.get("architectures", "")).lower():
        raise UnsupportedModelError(f"{folder} holds a Phi-3-based Mipha; this app runs {SUPPORTED_DESCRIPTION}")
    vision = raw.get("vision_config", {})
    tower, projector = vision.get("vision_tower", {}), vision.get("mm_projector", {})
    if "siglip" not in str(tower.get("vision_model_name_or_path", "")).lower():
        raise UnsupportedModelError(
            f"{folder} uses vision tower {tower.get('vision_model_name_or_path')!r}; this app runs {SUPPORTED_DESCRIPTION}"
        )
    if projector.get("mm_projector_type") != "mlp2x_gelu":
        raise UnsupportedModelError(
            f"{folder} uses projector {projector.get('mm_projector_type')!r}; this app runs {SUPPORTED_DESCRIPTION}"
        )
    if raw.get("image_aspect_ratio", "pad") != "pad":
        raise UnsupportedModelError(
            f"{folder} preprocesses images with {raw['image_aspect_ratio']!r}; this app supports 'pad' only"
        )


def _translate(raw: dict[str, Any], folder: Path) -> MiphaCheckpointConfig:
    tower = raw["vision_config"]["vision_tower"]
    try:
        text = PhiConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            hidden_act=raw.get("hidden_act", "gelu_new"),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-5),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rope_theta=raw.get("rope_theta", 10000.0),
            partial_rotary_factor=raw.get("partial_rotary_factor", 0.5),
            qk_layernorm=raw.get("qk_layernorm", False),
            tie_word_embeddings=False,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
        vision = SiglipVisionConfig(
            hidden_size=tower["hidden_size"],
            intermediate_size=tower["intermediate_size"],
            num_hidden_layers=tower["num_hidden_layers"],
            num_attention_heads=tower["num_attention_heads"],
            num_channels=tower.get("num_channels", 3),
            image_size=tower["image_size"],
            patch_size=tower["patch_size"],
            hidden_act=tower.get("hidden_act", "gelu_pytorch_tanh"),
            layer_norm_eps=tower.get("layer_norm_eps", 1e-6),
            attention_dropout=0.0,
            vision_use_head=False,
        )
    except KeyError as error:
        raise ModelLoadError(f"{folder / 'config.json'} lacks {error}: download the model again") from error
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=text.vocab_size - 1,
        image_seq_length=image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=tower.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    return MiphaCheckpointConfig(
        llava=llava,
        image_size=vision.image_size,
        image_tokens=image_tokens,
        context_length=raw.get("tokenizer_model_max_length") or text.max_position_embeddings,
        image_aspect_ratio=raw.get("image_aspect_ratio", "pad"),
    )
