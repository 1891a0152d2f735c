"""The LLaVA export (``mipha_core.export_llava``) computes what the engine computes, read the way
vLLM reads it: its config, weight names, tokenizer, chat template and processor.

vLLM itself is not installed here, so ``VllmLayoutLlava`` builds what vLLM's
``LlavaForConditionalGeneration`` builds for this config, from transformers' own modules, and
loads the weights by vLLM's names and skipping rules (vllm/model_executor/models/llava.py:
``hf_to_vllm_mapper``, ``init_vision_tower_for_llava``; siglip.py: ``SiglipVisionModel.load_weights``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PhiForCausalLM,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mipha_core import ModelLoadError, UnsupportedModelError
from mipha_core.conversation import turns_from_messages
from mipha_core.export_llava import UNUSED_ROW_BIAS, ExportError, LlavaExport, export_llava, main
from mipha_core.modeling import MiphaForConditionalGeneration
from mipha_core.preprocessing import pad_and_resize
from mipha_core.prompt import SYSTEM_PROMPT, PhiPromptStyle
from tests.core.conftest import assistant, user

VLLM_LLAVA_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
"""vLLM's ``LlavaForConditionalGeneration.hf_to_vllm_mapper`` (orig_to_new_prefix)."""


def vllm_name(name: str) -> str:
    for old, new in VLLM_LLAVA_PREFIXES.items():
        if name.startswith(old):
            return new + name.removeprefix(old)
    raise AssertionError(f"vLLM's llava loader has no module for {name}")


class VllmLayoutLlava:
    """vLLM's Llava for this config as transformers modules: the language model built from
    ``text_config`` (``PhiForCausalLM``: its lm_head has a bias), SigLIP cut after the feature
    layer (vLLM builds only ``num_hidden_layers + vision_feature_layer + 1`` layers and no post
    norm), and the projector. Every tensor of the export must land in exactly one of them."""

    def __init__(self, folder: Path) -> None:
        self.config: LlavaConfig = AutoConfig.from_pretrained(folder)
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            weights |= {vllm_name(name): tensor for name, tensor in load_file(str(file)).items()}
        text, vision = self.config.text_config, self.config.vision_config
        assert text.architectures == ["PhiForCausalLM"]
        self.language_model = PhiForCausalLM(text).eval()
        kept_layers = vision.num_hidden_layers + self.config.vision_feature_layer + 1
        cut_tower = type(vision)(**{**vision.to_dict(), "num_hidden_layers": kept_layers})
        self.vision_tower = SiglipVisionModel(cut_tower).eval()
        self.projector = LlavaMultiModalProjector(self.config).eval()
        self._load("language_model.", self.language_model, weights)
        self._load("multi_modal_projector.", self.projector, weights)
        # vLLM builds the tower without a post norm (require_post_norm=False); transformers' has one, unused here.
        self._load("vision_tower.", self.vision_tower, self._tower_weights(weights, kept_layers),
                   unused={"post_layernorm.weight", "post_layernorm.bias"})

    @staticmethod
    def _load(prefix: str, module: torch.nn.Module, weights: dict[str, torch.Tensor], unused: set[str] = set()) -> None:
        result = module.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)},
                                        strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) <= unused, result

    def _tower_weights(self, weights: dict[str, torch.Tensor], kept_layers: int) -> dict[str, torch.Tensor]:
        """vLLM's SiglipVisionModel reads ``vision_model.*`` and skips layers past the feature layer
        and the post norm. transformers 5's SiglipVisionModel has no ``vision_model`` level."""
        tower = {k.removeprefix("vision_tower."): v for k, v in weights.items() if k.startswith("vision_tower.")}
        assert tower and all(name.startswith("vision_model.") for name in tower)
        kept = {}
        for name, tensor in tower.items():
            parts = name.split(".")
            if name.startswith("vision_model.post_layernorm"):
                continue
            if name.startswith("vision_model.encoder.layers.") and int(parts[3]) >= kept_layers:
                continue
            kept[name] = tensor
        own_level = any(key.startswith("vision_model.") for key in self.vision_tower.state_dict())
        return {"vision_tower." + (k if own_level else k.removeprefix("vision_model.")): v for k, v in kept.items()}

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = self.projector(self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1])
            embeds[input_ids == self.config.image_token_id] = features.reshape(-1, features.shape[-1])
        return self.language_model(inputs_embeds=embeds).logits


@pytest.fixture(scope="module")
def export(tiny_checkpoint, tmp_path_factory) -> LlavaExport:
    return export_llava(str(tiny_checkpoint), tmp_path_factory.mktemp("llava") / "mipha-llava")


@pytest.fixture(scope="module")
def tokenizer(export):
    return AutoTokenizer.from_pretrained(export.folder)


@pytest.fixture(scope="module")
def processor(export):
    return AutoProcessor.from_pretrained(export.folder)


@pytest.fixture(scope="module")
def vllm_model(export) -> VllmLayoutLlava:
    return VllmLayoutLlava(export.folder)


def sent_photo(engine, photo: Image.Image) -> Image.Image:
    """What Mipha Chat sends to a server: the photo padded to a square and resized to 384 px."""
    preprocessor = engine.preprocessor
    return pad_and_resize(photo, preprocessor.size, background=preprocessor.background,
                          resample=preprocessor.processor.resample)


# Conversations as (role, text, carries the photo); each is checked in every content style.
CONVERSATIONS = {
    "single_turn_with_image": [("user", "What is in this photo?", True)],
    "multi_turn": [("user", "What is this?", True), ("assistant", "A red square."), ("user", "And the colour?")],
    "image_in_a_later_turn": [("user", "Hi"), ("assistant", "Hello."), ("user", "Look at this", True)],
    "no_image": [("user", "Tell me a story about a cat.")],
}


def engine_messages(conversation, photo) -> list[dict]:
    return [user(text, photo if rest else None) if role == "user" else assistant(text)
            for role, text, *rest in conversation]


def openai_messages(conversation, style: str) -> list[dict]:
    """What reaches the chat template: ``parts`` as vLLM passes OpenAI content in its "openai"
    format (an image part becomes {"type": "image"}); ``strings`` with plain strings where there
    is no image, as Mipha Chat's remote engine sends them; ``vllm_string`` as vLLM flattens
    content in its "string" format (placeholders first, then the text, joined by a newline)."""
    messages = []
    for role, text, *rest in conversation:
        image = bool(rest and rest[0])
        if style == "vllm_string":
            content = ("<image>\n" if image else "") + text
        elif style == "strings" and not image:
            content = text
        else:
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages


def phi_prompt(conversation, photo, *, system: str | None = None) -> str:
    turns = turns_from_messages(engine_messages(conversation, photo))
    image_turn = next((i for i, turn in enumerate(turns) if turn.image is not None), None)
    style = PhiPromptStyle()
    if system is None:
        return style.render(turns, image_turn=image_turn).text
    return style.render(turns, image_turn=image_turn, system=system).text


def vllm_token_ids(tokenizer, prompt: str, export: LlavaExport) -> list[int]:
    """The prompt's ids as vLLM builds them: tokenized whole, then ``<image>`` expanded."""
    ids = []
    for token in tokenizer(prompt, add_special_tokens=False).input_ids:
        ids += [token] * (export.image_seq_length if token == export.image_token_id else 1)
    return ids


def as_export_ids(engine, ids: list[int], export: LlavaExport) -> list[int]:
    return [export.image_token_id if token == engine.image_token_id else token for token in ids]


# --- config and weights -----------------------------------------------------------------------


def test_config_is_llava_with_a_phi_language_model(export, tokenizer):
    config = AutoConfig.from_pretrained(export.folder)
    assert isinstance(config, LlavaConfig) and config.architectures == ["LlavaForConditionalGeneration"]
    assert config.text_config.model_type == "phi" and config.text_config.architectures == ["PhiForCausalLM"]
    assert config.vision_config.model_type == "siglip_vision_model" and not config.vision_config.vision_use_head
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "full")
    assert config.projector_hidden_act == "gelu" and config.multimodal_projector_bias
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == export.image_token_id
    assert config.image_seq_length == export.image_seq_length == 729
    raw = json.loads((export.folder / "config.json").read_text())
    assert raw["image_token_index"] == export.image_token_id
    text = raw["text_config"]
    assert text["tie_word_embeddings"] is False
    # transformers 4 (what vLLM runs) reads these two, and would otherwise use Phi's default 0.5.
    assert (text["rope_theta"], text["partial_rotary_factor"]) == (
        text["rope_parameters"]["rope_theta"], text["rope_parameters"]["partial_rotary_factor"]) == (10000.0, 0.4)


def test_generation_stops_at_endoftext(export, engine):
    generation = json.loads((export.folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == engine.end_token_id == export.end_token_id


def test_transformers_llava_reads_every_weight(export):
    """transformers' own Llava reads everything but the head's bias (its lm_head has none);
    Mipha's model (that Llava with a biased head) reads every tensor, nothing missing."""
    _, info = LlavaForConditionalGeneration.from_pretrained(export.folder, output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == {"lm_head.bias"}
    _, info = MiphaForConditionalGeneration.from_pretrained(export.folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_vllm_modules_take_every_tensor_and_the_pooling_head_is_gone(export, vllm_model):
    names = {name for file in export.folder.glob("*.safetensors") for name in load_file(str(file))}
    assert not any(".head." in name for name in names)
    assert {"lm_head.weight", "lm_head.bias"} <= names
    stored = load_file(str(export.folder / "model.safetensors"))["lm_head.bias"]
    assert torch.equal(vllm_model.language_model.lm_head.bias, stored)


@pytest.mark.parametrize("case", ["image", "text_only", "multi_turn"])
def test_logits_match_the_engine(case, engine, export, tokenizer, processor, vllm_model, photo):
    """The vLLM path end to end (chat template, processor, vLLM's modules) against the engine, fp32."""
    conversation = {
        "image": CONVERSATIONS["single_turn_with_image"],
        "text_only": CONVERSATIONS["no_image"],
        "multi_turn": CONVERSATIONS["multi_turn"],
    }[case]
    prompt = tokenizer.apply_chat_template(openai_messages(conversation, "parts"), tokenize=False,
                                           add_generation_prompt=True)
    has_image = any(rest and rest[0] for _, _, *rest in conversation)
    inputs = processor(text=prompt, images=[sent_photo(engine, photo)] if has_image else None, return_tensors="pt")
    ours = engine.encode(engine_messages(conversation, photo))
    assert inputs["input_ids"][0].tolist() == as_export_ids(engine, ours["input_ids"][0].tolist(), export)
    if has_image:
        torch.testing.assert_close(inputs["pixel_values"], ours["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = engine.model(**ours).logits
    theirs = vllm_model.logits(inputs["input_ids"], inputs.get("pixel_values"))
    torch.testing.assert_close(theirs[0, -1], expected[0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-4)


def test_head_rows_past_the_tokenizer_never_win(tiny_checkpoint, tmp_path, engine):
    """Phi-2's padding rows (and <image>) are suppressed by the engine; the export masks them."""
    source = shutil.copytree(tiny_checkpoint, tmp_path / "source")
    weights = load_file(str(source / "model.safetensors"))
    size = len(engine.tokenizer)
    weights["lm_head.weight"][size:] = torch.randn_like(weights["lm_head.weight"][size:])
    weights["lm_head.bias"][size:] = 5.0
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    exported = load_file(str(export_llava(str(source), tmp_path / "out").folder / "model.safetensors"))
    assert torch.equal(exported["lm_head.weight"][:size], weights["lm_head.weight"][:size])
    assert torch.equal(exported["lm_head.bias"][:size], weights["lm_head.bias"][:size])
    assert not exported["lm_head.weight"][size:].any()
    assert (exported["lm_head.bias"][size:] == UNUSED_ROW_BIAS).all()


# --- chat template ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["parts", "strings", "vllm_string"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_renders_the_phi_prompt(name, style, engine, export, tokenizer, photo):
    conversation = CONVERSATIONS[name]
    prompt = tokenizer.apply_chat_template(openai_messages(conversation, style), tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == phi_prompt(conversation, photo)
    ours = engine.encode(engine_messages(conversation, photo))["input_ids"][0].tolist()
    assert vllm_token_ids(tokenizer, prompt, export) == as_export_ids(engine, ours, export)


def test_chat_template_writes_the_exact_original_text(tokenizer):
    messages = openai_messages(CONVERSATIONS["multi_turn"], "parts")
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        SYSTEM_PROMPT + " USER: <image>\nWhat is this? ASSISTANT: A red square.<|endoftext|>"
        "USER: And the colour? ASSISTANT:"
    )


@pytest.mark.parametrize("as_parts", [False, True])
def test_a_system_message_replaces_the_default_sentence(as_parts, tokenizer, photo):
    system = "You answer in one short sentence."
    content = [{"type": "text", "text": system}] if as_parts else system
    conversation = CONVERSATIONS["single_turn_with_image"]
    messages = [{"role": "system", "content": content}, *openai_messages(conversation, "parts")]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == phi_prompt(conversation, photo, system=system)
    assert prompt.startswith(system + " USER: <image>\n") and SYSTEM_PROMPT not in prompt


def test_chat_template_lives_in_the_tokenizer_and_the_processor(export, tokenizer, processor):
    template = (export.folder / "chat_template.jinja").read_text()
    assert tokenizer.chat_template == processor.chat_template == template
    assert json.loads((export.folder / "tokenizer_config.json").read_text())["chat_template"] == template


def test_chat_template_refuses_what_mipha_cannot_read(tokenizer):
    with pytest.raises(Exception, match="user and assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)
    with pytest.raises(Exception, match="text and image parts"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}], tokenize=False)


# --- processor --------------------------------------------------------------------------------


def test_processor_keeps_a_padded_photo_and_expands_the_placeholder(engine, export, processor, photo):
    assert (processor.patch_size, processor.vision_feature_select_strategy) == (14, "full")
    image_processor = processor.image_processor
    assert (image_processor.size["height"], image_processor.size["width"]) == (384, 384)
    assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5, 0.5, 0.5]
    inputs = processor(text="USER: <image>\nWhat is this? ASSISTANT:", images=[sent_photo(engine, photo)],
                       return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], engine.preprocessor(photo), atol=1e-6, rtol=0)
    assert int((inputs["input_ids"] == export.image_token_id).sum()) == export.image_seq_length == engine.image_tokens


# --- command line -----------------------------------------------------------------------------


def test_command_exports_tiny_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "mipha_core.export_llava", "tiny", str(out), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", "processor_config.json", "generation_config.json"} <= written
    assert "vllm serve" in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    return lines[0]


def test_command_names_a_missing_folder(tmp_path, capsys):
    line = error_line(capsys, [str(tmp_path / "missing"), str(tmp_path / "out")])
    assert line.startswith("python -m mipha_core.export_llava: error: ") and str(tmp_path / "missing") in line
    assert not (tmp_path / "out").exists()


def test_command_refuses_another_model(tmp_path, capsys):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    line = error_line(capsys, [str(other), str(tmp_path / "out")])
    assert "model_type 'llama'" in line and "Mipha-3B" in line
    with pytest.raises(UnsupportedModelError):
        export_llava(str(other), tmp_path / "out")
    assert list(tmp_path.iterdir()) == [other]


def test_command_refuses_a_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error_line(capsys, [str(tmp_path / "empty"), str(tmp_path / "out")])
    with pytest.raises(ModelLoadError):
        export_llava(str(tmp_path / "empty"), tmp_path / "out")


def test_export_never_writes_into_a_folder_with_files(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in error_line(capsys, [str(tiny_checkpoint), str(out)])
    with pytest.raises(ExportError, match="not empty"):
        export_llava(str(tiny_checkpoint), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_export_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    source = shutil.copytree(tiny_checkpoint, tmp_path / "source")
    weights = load_file(str(source / "model.safetensors"))
    del weights["model.mm_projector.2.bias"]
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="lacks 1 weights"):
        export_llava(str(source), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
