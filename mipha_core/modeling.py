"""Mipha as transformers' LLaVA model with the one difference Mipha has: a biased lm_head."""

from __future__ import annotations

from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration


class MiphaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose language-model head has a bias, as Phi-2's does.

    Everything else (SigLIP tower, two-layer GELU projector, Phi-2, KV caches, ``generate``,
    quantization, device maps) is the library's own.
    """

    # Mipha checkpoints store SigLIP's pooling head, which Mipha never runs.
    _keys_to_ignore_on_load_unexpected = [r"vision_tower\.(vision_model\.)?head\."]

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=True)
        self.post_init()
