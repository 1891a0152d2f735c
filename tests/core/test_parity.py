"""The engine computes what the original Mipha computes, checked against an independent
composition built from the same safetensors file with plain transformers modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import PhiConfig, PhiForCausalLM, SiglipVisionConfig, SiglipVisionModel

from tests.core.conftest import assistant, user


class ReferenceMipha:
    """SigLIP hidden_states[-2] → Linear/GELU/Linear → spliced into Phi-2 embeddings → Phi-2."""

    def __init__(self, folder):
        weights = load_file(str(folder / "model.safetensors"))
        raw = json.loads((folder / "config.json").read_text())
        tower = raw["vision_config"]["vision_tower"]
        self.vision = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=tower["hidden_size"], intermediate_size=tower["intermediate_size"],
            num_hidden_layers=tower["num_hidden_layers"], num_attention_heads=tower["num_attention_heads"],
            image_size=tower["image_size"], patch_size=tower["patch_size"], hidden_act=tower["hidden_act"],
            layer_norm_eps=tower["layer_norm_eps"], vision_use_head=False,
        )).eval()
        prefix = "model.vision_tower.vision_model."
        self.vision.load_state_dict(
            {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix) and ".head." not in k},
            strict=True,
        )
        self.phi = PhiForCausalLM(PhiConfig(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
            partial_rotary_factor=raw["partial_rotary_factor"], rope_theta=raw["rope_theta"],
            layer_norm_eps=raw["layer_norm_eps"], hidden_act=raw["hidden_act"], tie_word_embeddings=False,
        )).eval()
        self.phi.load_state_dict(
            {k: v for k, v in weights.items() if k.startswith(("model.embed_tokens", "model.layers", "model.final", "lm_head"))},
            strict=True,
        )
        assert self.phi.lm_head.bias is not None and torch.equal(self.phi.lm_head.bias, weights["lm_head.bias"])
        self.projector = [weights[f"model.mm_projector.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias")]

    @torch.no_grad()
    def logits(self, input_ids, image_token_id, pixel_values=None):
        embeds = self.phi.model.embed_tokens(input_ids)
        if pixel_values is not None:
            hidden = self.vision(pixel_values, output_hidden_states=True).hidden_states[-2]
            w0, b0, w2, b2 = self.projector
            features = F.linear(F.gelu(F.linear(hidden, w0, b0)), w2, b2)
            embeds[input_ids == image_token_id] = features.reshape(-1, features.shape[-1])
        return self.phi(inputs_embeds=embeds).logits


def reference_pixels(image: Image.Image) -> torch.Tensor:
    """Pad to a square with mean colour (127), PIL bicubic to 384, rescale, normalise by 0.5/0.5."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    array = np.asarray(canvas.resize((384, 384), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1).unsqueeze(0)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceMipha(tiny_checkpoint)


@pytest.mark.parametrize("case", ["image", "text_only", "multi_turn"])
def test_next_token_logits_match_the_reference(case, engine, reference, photo):
    conversations = {
        "image": [user("What is in this photo?", photo)],
        "text_only": [user("Tell me a story about a cat.")],
        "multi_turn": [user("What is in this photo?", photo), assistant("A red block on a gradient."),
                       user("Which colour is the block?")],
    }
    inputs = engine.encode(conversations[case])
    with torch.no_grad():
        ours = engine.model(**inputs).logits
    pixels = reference_pixels(photo) if "pixel_values" in inputs else None
    if pixels is not None:
        torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-5, rtol=0)
    theirs = reference.logits(inputs["input_ids"], engine.image_token_id, pixels)
    torch.testing.assert_close(ours[0, -1], theirs[0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_logits_are_not_near_ties(engine, photo):
    with torch.no_grad():
        logits = engine.model(**engine.encode([user("What is in this photo?", photo)])).logits[0, -1]
    top2 = logits.topk(2).values
    assert float(top2[0] - top2[1]) > 1e-2


def test_ids_past_the_tokenizer_never_win(engine, photo):
    with torch.no_grad():
        logits = engine.model(**engine.encode([user("Hello", photo)])).logits[0]
    assert int(logits.argmax(-1).max()) < len(engine.tokenizer)


def padded_then_processed(processor, image: Image.Image) -> torch.Tensor:
    """The plain path: the whole square canvas built, then the SigLIP processor on it."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return processor(images=canvas, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("size", [(4000, 3000), (1200, 1600), (201, 517), (3000, 40), (384, 384), (50, 50), (1, 1)])
def test_pixel_values_are_bit_identical_to_padding_the_whole_canvas(engine, size):
    """Without the square canvas, normal photos (noise, the hardest case for rounding) get the same bits."""
    width, height = size
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8))
    assert torch.equal(engine.preprocessor(image), padded_then_processed(engine.preprocessor.processor, image))
