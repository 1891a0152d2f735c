"""Moving one sequence's KV state between a llama.cpp context with flash attention and one without.

The two keep V differently: without flash attention each layer's V is stored transposed (one row
per channel, positions along it), with it one row per position like K. ``llama_state_seq_set_data``
refuses a state of the other layout, so ``flip_value_layout`` rewrites it in place: same size, V
transposed layer by layer. The layout, as llama.cpp writes it (``llama_context::state_seq_get_data``
and ``llama_kv_cache::state_write``, checked against llama-cpp-python 0.3.36)::

    u32 magic, i32 sequence id, u32 streams (1), u32 cells
    per cell: i32 position, u32 sequence count (1), i32 sequence id
    u32 V transposed (0 or 1), u32 layers
    per layer: i32 K type, u64 K row bytes, cells x K row
    per layer, V by rows:      i32 V type, u64 V row bytes, cells x V row
    per layer, V transposed:   i32 V type, u32 element bytes, u32 V width, width x cells elements

Anything else (several streams, cells shared by sequences, extra per-cell data, a size that does not
add up) raises ``StateLayoutError``, so a llama.cpp that writes another layout is noticed, not misread.
"""

from __future__ import annotations

import numpy as np

_HEADER_BYTES = 16
_CELL_BYTES = 12
_ELEMENT_TYPES = {np.dtype(np.uint16).itemsize: np.uint16, np.dtype(np.uint32).itemsize: np.uint32}
"""Element bytes to a same-sized integer type: only moved, never read as numbers (F16, BF16, F32)."""


class StateLayoutError(ValueError):
    """A sequence state is not laid out as this module expects."""


def values_transposed(state: np.ndarray) -> bool:
    """Whether ``state`` (bytes of ``llama_state_seq_get_data``) keeps V transposed."""
    cells = _cells(state)
    return bool(_u32(state, _HEADER_BYTES + cells * _CELL_BYTES))


def flip_value_layout(state: np.ndarray) -> None:
    """Rewrite ``state`` (a writable uint8 array) in place for a context of the other V layout."""
    cells = _cells(state)
    meta = state[_HEADER_BYTES:_HEADER_BYTES + cells * _CELL_BYTES]
    if len(meta) != cells * _CELL_BYTES or np.any(meta.view(np.int32).reshape(cells, 3)[:, 1] != 1):
        raise StateLayoutError("each cell should belong to exactly one sequence")
    offset = _HEADER_BYTES + cells * _CELL_BYTES
    transposed, layers = _u32(state, offset), _u32(state, offset + 4)
    if transposed not in (0, 1):
        raise StateLayoutError(f"unknown V layout flag {transposed}")
    state[offset:offset + 4] = np.frombuffer(np.uint32(1 - transposed).tobytes(), dtype=np.uint8)
    offset += 8
    for _ in range(layers):
        offset += 12 + cells * _u64(state, offset + 4)
    for _ in range(layers):
        offset = _flip_layer(state, offset, cells, transposed=bool(transposed))
    if offset != len(state):
        raise StateLayoutError(f"the state holds {len(state)} bytes where its layout adds up to {offset}")


def _flip_layer(state: np.ndarray, offset: int, cells: int, *, transposed: bool) -> int:
    """Transpose one layer's V block and rewrite its header; the offset after it."""
    if transposed:
        element, width = _u32(state, offset + 4), _u32(state, offset + 8)
    else:
        row = _u64(state, offset + 4)
        element = _element_bytes(row, state, offset)
        width = row // element
    if element not in _ELEMENT_TYPES:
        raise StateLayoutError(f"V elements of {element} bytes")
    start, end = offset + 12, offset + 12 + cells * width * element
    if end > len(state):
        raise StateLayoutError("a layer's V runs past the end of the state")
    values = state[start:end].view(_ELEMENT_TYPES[element])
    shape = (width, cells) if transposed else (cells, width)
    values[:] = values.reshape(shape).T.copy().reshape(-1)
    header = np.frombuffer(np.uint64(width * element).tobytes(), dtype=np.uint8) if transposed else \
        np.frombuffer(np.array([element, width], dtype=np.uint32).tobytes(), dtype=np.uint8)
    state[offset + 4:offset + 12] = header
    return end


def _element_bytes(row: int, state: np.ndarray, offset: int) -> int:
    """The byte size of a V element, from the layer's ggml type (F32 = 0, F16 = 1, BF16 = 30)."""
    sizes = {0: 4, 1: 2, 30: 2}
    ggml_type = int(state[offset:offset + 4].view(np.int32)[0])
    if ggml_type not in sizes or row % sizes[ggml_type]:
        raise StateLayoutError(f"V of ggml type {ggml_type} (row of {row} bytes) cannot be transposed here")
    return sizes[ggml_type]


def _cells(state: np.ndarray) -> int:
    if len(state) < _HEADER_BYTES:
        raise StateLayoutError("the state is shorter than its header")
    if _u32(state, 8) != 1:
        raise StateLayoutError(f"{_u32(state, 8)} KV streams where one was expected")
    return _u32(state, 12)


def _u32(state: np.ndarray, offset: int) -> int:
    return int.from_bytes(state[offset:offset + 4].tobytes(), "little")


def _u64(state: np.ndarray, offset: int) -> int:
    return int.from_bytes(state[offset:offset + 8].tobytes(), "little")
