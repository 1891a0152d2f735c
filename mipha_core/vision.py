"""The vision half of Mipha on its own: SigLIP and the projector, for engines whose language model runs elsewhere."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from mipha_core.checkpoint import KEY_MAPPING, MiphaCheckpointConfig
from mipha_core.errors import MiphaError, ModelLoadError
from mipha_core.modeling import MiphaForConditionalGeneration


class VisionCancelledError(MiphaError):
    """Stop was pressed while the vision tower was encoding the photo."""


_VISION_PREFIXES = ("model.vision_tower.", "model.mm_projector.")
_TOWER_MAPPING = {r"^model\.vision_tower\.vision_model\.": "model.vision_tower."}
"""transformers' ``SiglipVisionModel`` names its weights without the checkpoint's ``vision_model.`` level."""


class VisionEncoder:
    """Pixel values → projected image features ``(image_tokens, hidden)``, exactly as the full model computes them.

    The whole Mipha module is built with its weights on the meta device (its small buffers, such
    as position ids, are real) and only the vision tower's and the projector's weights are loaded, so the library's own ``get_image_features`` runs without
    the language model ever taking memory.
    """

    def __init__(self, folder: Path, checkpoint: MiphaCheckpointConfig, *, dtype: torch.dtype) -> None:
        with init_empty_weights(include_buffers=False):
            model = MiphaForConditionalGeneration(checkpoint.llava)
        state = _vision_weights(folder, dtype=dtype)
        missing = [name for name, _ in model.model.named_parameters()
                   if name.startswith(("vision_tower.", "multi_modal_projector.")) and f"model.{name}" not in state]
        if missing:
            raise ModelLoadError(f"{folder} lacks vision weights such as {missing[0]}: download the model again")
        model.load_state_dict(state, strict=False, assign=True)
        self._model = model.model
        self._model.vision_tower.eval()
        self._model.multi_modal_projector.eval()
        self.dtype = dtype
        self._cancel: threading.Event | None = None
        for layer in self._model.vision_tower.encoder.layers:
            layer.register_forward_pre_hook(self._stop_if_cancelled)

    @contextmanager
    def stoppable(self, cancel: threading.Event) -> Iterator[None]:
        """Inside, setting ``cancel`` ends an encoding between two of the tower's layers
        (``VisionCancelledError``), a fraction of a second on a CPU instead of the whole tower."""
        self._cancel = cancel
        try:
            yield
        finally:
            self._cancel = None

    def _stop_if_cancelled(self, _module: torch.nn.Module, _inputs: object) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise VisionCancelledError("the photo's encoding was stopped")

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            output = self._model.get_image_features(pixel_values=pixel_values.to(dtype=self.dtype))
        return output.pooler_output[0]

    @property
    def nbytes(self) -> int:
        parts = (self._model.vision_tower, self._model.multi_modal_projector)
        return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def _vision_weights(folder: Path, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's vision-tower and projector weights under the module's names, in ``dtype``."""
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            for original in file.keys():
                if not original.startswith(_VISION_PREFIXES) or ".head." in original:
                    continue
                name = original
                for pattern, replacement in {**KEY_MAPPING, **_TOWER_MAPPING}.items():
                    name = re.sub(pattern, replacement, name)
                weights[name] = file.get_tensor(original).to(dtype)
    return weights
