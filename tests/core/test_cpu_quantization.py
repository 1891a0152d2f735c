"""The packed CPU layers compute what the dense layer computes, within quantization error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mipha_core.cpu_quantization import DECODE_ROWS, Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_linears


@pytest.mark.parametrize(("layer_class", "tolerance"), [(Int8WeightOnlyLinear, 0.01), (Int4WeightOnlyLinear, 0.09)])
@pytest.mark.parametrize("rows", [1, DECODE_ROWS, DECODE_ROWS + 1, 200])
def test_packed_layers_match_the_dense_layer(layer_class, tolerance, rows):
    torch.manual_seed(0)
    dense = nn.Linear(256, 192).to(torch.bfloat16)
    packed = layer_class(dense)
    x = torch.randn(2, rows, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = dense(x).float()
        actual = packed(x)
    assert actual.shape == expected.shape and actual.dtype == torch.bfloat16
    assert float((actual.float() - expected).norm() / expected.norm()) < tolerance


def test_weights_are_stored_in_8_and_4_bits():
    dense = nn.Linear(128, 64).to(torch.bfloat16)
    assert Int8WeightOnlyLinear(dense).weight.dtype == torch.int8
    int4 = Int4WeightOnlyLinear(dense)
    assert int4.weight.dtype == torch.uint8
    assert int4.weight.numel() * int4.weight.element_size() == 128 * 64 // 2


def test_int4_refuses_widths_it_cannot_group():
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4WeightOnlyLinear(nn.Linear(48, 16))


def test_quantize_linears_replaces_every_linear():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32))).to(torch.bfloat16)
    assert quantize_linears(model, bits=8) == 2
    assert not any(isinstance(module, nn.Linear) for module in model.modules())
