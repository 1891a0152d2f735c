"""Weight-only int8 and int4 linear layers for CPU decoding, on torch's own packed kernels.

Measured on a 2-core AVX512-BF16 CPU for one Phi-2 MLP matrix (10240×2560) and one token:
bf16 dense 6.5 ms, bitsandbytes 8-bit far slower, ``torch._weight_int8pack_mm`` 2.8 ms,
``torch._weight_int4pack_mm_for_cpu`` 1.2 ms. Decoding reads every weight once per token, so
these kernels decode 2–5× faster than bf16 while holding a half or a quarter of the bytes.
For long prompts the int8 layer dequantizes and uses the dense bf16 matmul, which is faster
there; the int4 kernel is used for both. Prefill stays slower than bf16 (the packed kernels
are matrix-vector kernels), so quantization trades prompt speed for memory and decode speed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

DECODE_ROWS = 80
"""Up to this many tokens at once the packed int8 kernel beats dequantize-then-matmul (measured
for 10240×2560 in bf16: 52 ms against 63 ms at 64 rows, 77 ms against 69 ms at 96); a follow-up
question with its reply is usually under it, a first prompt with the photo far over."""
_INT4_GROUP_SIZES = (128, 64, 32)
_INT4_INNER_K_TILES = 8


class Int8WeightOnlyLinear(nn.Module):
    """``y = x Wᵀ + b`` with W stored as int8 rows and one scale per output row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if rows.shape[0] <= DECODE_ROWS:
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight, self.scales)
        else:
            out = rows @ (self.weight.to(self.scales.dtype) * self.scales[:, None]).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4WeightOnlyLinear(nn.Module):
    """``y = x Wᵀ + b`` with W in 4 bits, asymmetric per group of input columns."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.group_size = next((size for size in _INT4_GROUP_SIZES if in_features % size == 0), None)
        if self.group_size is None:
            raise ValueError(f"int4 needs in_features divisible by 32, got {in_features}")
        groups = linear.weight.detach().float().reshape(out_features, -1, self.group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15.0
        levels = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(levels, _INT4_INNER_K_TILES))
        zero = low + 8.0 * scale  # the kernel computes (level - 8) * scale + zero
        scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()
        out = torch._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_linears(module: nn.Module, *, bits: int) -> int:
    """Replace every ``nn.Linear`` under ``module`` in place; returns how many were replaced."""
    layer_class = {8: Int8WeightOnlyLinear, 4: Int4WeightOnlyLinear}[bits]
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, layer_class(child))
                replaced += 1
    return replaced
