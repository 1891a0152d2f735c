"""A photo is read in llama.cpp's flash-attention context and the reply decoded in the other one:
the sequence moves between them, and what comes out is what one context alone gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mipha_core import llama_cpp_runtime
from mipha_core.checkpoint import read_checkpoint_config
from mipha_core.errors import MiphaError
from mipha_core.gguf_export import GGUF_PRECISIONS, language_model_gguf
from mipha_core.llama_cpp_runtime import WIDE_READ_POSITIONS, DecodeAbortedError, LlamaCppContext
from mipha_core.llama_cpp_state import StateLayoutError, flip_value_layout, values_transposed
from mipha_core.tiny import write_tiny_checkpoint

PHOTO_POSITIONS = 729


@pytest.fixture(scope="module")
def gguf(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = read_checkpoint_config(tiny_checkpoint)
    return language_model_gguf(tiny_checkpoint, config, precision=GGUF_PRECISIONS["fp16"],
                               cache_dir=tmp_path_factory.mktemp("gguf-bulk"))


@pytest.fixture
def contexts(gguf: Path) -> Iterator[tuple[LlamaCppContext, LlamaCppContext]]:
    """A context that reads photos with flash attention, and one that reads everything without."""
    both = (LlamaCppContext(gguf, context_length=2048, threads=1),
            LlamaCppContext(gguf, context_length=2048, threads=1, bulk_positions=0))
    yield both
    for context in both:
        context.close()


def photo_rows(context: LlamaCppContext, seed: int = 0) -> torch.Tensor:
    return torch.randn(PHOTO_POSITIONS, context.hidden_size, generator=torch.Generator().manual_seed(seed))


def read_photo_prompt(context: LlamaCppContext, rows: torch.Tensor) -> None:
    context.read_tokens(list(range(5, 20)), logits_for_last=False)
    context.read_embeddings(rows, logits_for_last=False)
    context.read_tokens(list(range(30, 40)), logits_for_last=True)


def greedy_reply(context: LlamaCppContext, tokens: int = 8) -> list[int]:
    reply = []
    for _ in range(tokens):
        reply.append(int(context.last_logits().argmax()))
        context.read_tokens([reply[-1]], logits_for_last=True)
    return reply


def record_moves(context: LlamaCppContext, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of positions in each move between ``context``'s two sides, as they happen."""
    moved: list[int] = []
    suffix_state = context._suffix_state

    def recording(side, start):
        state = suffix_state(side, start)
        moved.append(int(state[12:16].view(np.uint32)[0]))
        return state

    monkeypatch.setattr(context, "_suffix_state", recording)
    return moved


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    real = expected > -1000  # the tiny vocabulary's padding ids are pinned far below
    assert int(got.argmax()) == int(expected.argmax())
    assert torch.allclose(got[real], expected[real], atol=2e-2 * float(expected[real].abs().max()))


def test_a_photo_read_with_flash_attention_answers_as_one_context_does(contexts):
    bulk, single = contexts
    rows = photo_rows(bulk)
    for context in contexts:
        read_photo_prompt(context, rows)
    assert bulk.length == single.length == 15 + PHOTO_POSITIONS + 10
    assert_same_logits(bulk.last_logits(), single.last_logits())
    assert greedy_reply(bulk) == greedy_reply(single)
    assert bulk.length == single.length


def test_a_snapshot_taken_after_the_photo_restores_and_goes_on_alike(contexts):
    bulk, single = contexts
    rows = photo_rows(bulk, seed=1)
    read_photo_prompt(bulk, rows)
    state = bulk.snapshot()
    assert values_transposed(np.frombuffer(state, dtype=np.uint8))  # the decoder's layout
    bulk.truncate(0)
    bulk.read_tokens(list(range(50, 60)), logits_for_last=True)
    assert bulk.restore(state)
    assert bulk.length == 15 + PHOTO_POSITIONS + 10
    read_photo_prompt(single, rows)
    bulk.read_tokens([7], logits_for_last=True)
    single.read_tokens([7], logits_for_last=True)
    assert_same_logits(bulk.last_logits(), single.last_logits())


def test_cutting_back_into_the_photo_and_reading_again_matches_a_fresh_read(contexts):
    bulk, single = contexts
    first, second = photo_rows(bulk, seed=2), photo_rows(bulk, seed=3)
    read_photo_prompt(bulk, first)
    greedy_reply(bulk, tokens=3)
    bulk.truncate(15)
    bulk.read_embeddings(second, logits_for_last=False)
    bulk.read_tokens(list(range(30, 40)), logits_for_last=True)
    read_photo_prompt(single, second)
    assert_same_logits(bulk.last_logits(), single.last_logits())
    assert greedy_reply(bulk, tokens=4) == greedy_reply(single, tokens=4)


def test_a_second_photo_later_in_the_conversation_is_read_after_the_whole_conversation(contexts):
    bulk, single = contexts
    for context in contexts:
        read_photo_prompt(context, photo_rows(context, seed=4))
        greedy_reply(context, tokens=3)
        context.read_embeddings(photo_rows(context, seed=5), logits_for_last=True)
    assert_same_logits(bulk.last_logits(), single.last_logits())
    assert greedy_reply(bulk, tokens=3) == greedy_reply(single, tokens=3)


def test_stop_during_the_photo_keeps_what_was_read_before_it(contexts):
    bulk, _ = contexts
    bulk.read_tokens(list(range(5, 20)), logits_for_last=False)
    bulk.abort()
    with pytest.raises(DecodeAbortedError):
        bulk.read_embeddings(photo_rows(bulk), logits_for_last=False)
    bulk.resume()
    assert bulk.length == 15
    bulk.read_embeddings(photo_rows(bulk), logits_for_last=True)
    assert bulk.length == 15 + PHOTO_POSITIONS


def test_only_the_positions_the_other_side_lacks_move(contexts, monkeypatch):
    """Each side keeps what it read: after a reply only the reply's positions go to the reader, and
    after the reader's long read only that read comes back, with the same logits as one context."""
    bulk, single = contexts
    moved = record_moves(bulk, monkeypatch)
    for context in contexts:
        read_photo_prompt(context, photo_rows(context, seed=3))
    assert greedy_reply(bulk) == greedy_reply(single)
    more = photo_rows(bulk, seed=4)[:300]
    for context in contexts:
        context.read_embeddings(more, logits_for_last=False)
        context.read_tokens([41, 42], logits_for_last=True)
    assert moved == [15, PHOTO_POSITIONS, 10 + 8, 300]
    assert_same_logits(bulk.last_logits(), single.last_logits())
    assert greedy_reply(bulk) == greedy_reply(single)


def test_flipping_the_value_layout_twice_gives_the_state_back(contexts):
    _, single = contexts
    read_photo_prompt(single, photo_rows(single))
    state = np.frombuffer(single.snapshot(), dtype=np.uint8).copy()
    flipped = state.copy()
    flip_value_layout(flipped)
    assert values_transposed(state) and not values_transposed(flipped)
    assert not np.array_equal(flipped, state)
    flip_value_layout(flipped)
    assert np.array_equal(flipped, state)


@pytest.mark.parametrize("damage", ["cut short", "streams", "cells shared", "unknown V type", "flag"])
def test_a_state_of_another_layout_is_refused_not_misread(contexts, damage):
    _, single = contexts
    single.read_tokens(list(range(5, 25)), logits_for_last=True)
    state = np.frombuffer(single.snapshot(), dtype=np.uint8).copy()
    cells = int(state[12:16].view(np.uint32)[0])
    flag_at = 16 + cells * 12
    if damage == "cut short":
        state = state[:-100]
    elif damage == "streams":
        state[8:12] = np.frombuffer(np.uint32(2).tobytes(), dtype=np.uint8)
    elif damage == "cells shared":
        state[16 + 4:16 + 8] = np.frombuffer(np.uint32(2).tobytes(), dtype=np.uint8)
    elif damage == "flag":
        state[flag_at:flag_at + 4] = np.frombuffer(np.uint32(7).tobytes(), dtype=np.uint8)
    else:
        flip_value_layout(state)
        state[-(cells * 2 * 64 + 12):][:4] = np.frombuffer(np.int32(12).tobytes(), dtype=np.uint8)
    with pytest.raises(StateLayoutError):
        flip_value_layout(state)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_text_read_as_its_token_table_rows_answers_as_token_ids_do(tiny_checkpoint, tmp_path_factory, precision):
    """A photo and the question after it are one batch of embeddings: the question's rows come from
    the GGUF's own (quantized) table, so it reads as its token ids would."""
    config = read_checkpoint_config(tiny_checkpoint)
    path = language_model_gguf(tiny_checkpoint, config, precision=GGUF_PRECISIONS[precision],
                               cache_dir=tmp_path_factory.mktemp(f"gguf-{precision}"))
    one_batch, by_parts = (LlamaCppContext(path, context_length=2048, threads=1, bulk_positions=0) for _ in range(2))
    try:
        rows = photo_rows(one_batch, seed=6)
        one_batch.read([list(range(5, 20)), rows, list(range(30, 40))], logits_for_last=True)
        read_photo_prompt(by_parts, rows)
        assert one_batch.length == by_parts.length
        assert_same_logits(one_batch.last_logits(), by_parts.last_logits())
        assert greedy_reply(one_batch, tokens=4) == greedy_reply(by_parts, tokens=4)
    finally:
        one_batch.close()
        by_parts.close()


@pytest.fixture(scope="module")
def int8_gguf(tiny_checkpoint: Path, gguf: Path) -> Path:
    """Quantized from the F16 file beside it, which stays (the photo reader's weights)."""
    return language_model_gguf(tiny_checkpoint, read_checkpoint_config(tiny_checkpoint),
                               precision=GGUF_PRECISIONS["int8"], cache_dir=gguf.parent)


@pytest.fixture(scope="module")
def bf16_gguf(tiny_checkpoint: Path, gguf: Path) -> Path:
    return language_model_gguf(tiny_checkpoint, read_checkpoint_config(tiny_checkpoint),
                               precision=GGUF_PRECISIONS["bf16"], cache_dir=gguf.parent)


@pytest.mark.parametrize("reader", ["fp16", "bf16"])
def test_a_photo_read_on_16_bit_weights_is_decoded_on_int8_as_if_handed_over_by_a_snapshot(gguf, bf16_gguf,
                                                                                           int8_gguf, reader):
    """The reader may run on other weights: the photo prompt is read on F16 or BF16 (the question's
    rows from that file's table too, so the logits are exactly its own), the reply decoded on Q8_0
    with the KV cache that read left."""
    reader_gguf = {"fp16": gguf, "bf16": bf16_gguf}[reader]
    mixed = LlamaCppContext(int8_gguf, context_length=2048, threads=1, reader_path=reader_gguf)
    alone = LlamaCppContext(reader_gguf, context_length=2048, threads=1, bulk_positions=0)
    int8 = LlamaCppContext(int8_gguf, context_length=2048, threads=1, bulk_positions=0)
    try:
        rows = photo_rows(mixed, seed=7)
        parts = [list(range(5, 20)), rows, list(range(30, 40))]
        mixed.read(parts, logits_for_last=True)
        alone.read(parts, logits_for_last=True)
        assert torch.equal(mixed.last_logits(), alone.last_logits())
        assert int8.restore(alone.snapshot())
        int8.read_tokens([int(alone.last_logits().argmax())], logits_for_last=True)
        assert greedy_reply(mixed) == [int(alone.last_logits().argmax()), *greedy_reply(int8, tokens=7)]
        assert mixed.length == int8.length
    finally:
        for context in (mixed, alone, int8):
            context.close()


def test_a_follow_up_question_is_read_on_the_16_bit_weights_and_a_short_one_on_int8(gguf, int8_gguf, monkeypatch):
    """Eight positions or more are arithmetic-bound, so a question after a reply is read where a photo
    is; a shorter read stays on the int8 decoder. Each side gets only what it lacks, as is."""
    mixed = LlamaCppContext(int8_gguf, context_length=2048, threads=1, reader_path=gguf)
    fp16 = LlamaCppContext(gguf, context_length=2048, threads=1, bulk_positions=0)
    int8 = LlamaCppContext(int8_gguf, context_length=2048, threads=1, bulk_positions=0)
    moved = record_moves(mixed, monkeypatch)
    try:
        mixed.read([list(range(5, 20)), photo_rows(mixed, seed=8), list(range(30, 40))], logits_for_last=True)
        greedy_reply(mixed)
        assert fp16.restore(mixed.snapshot())
        question = list(range(50, 50 + WIDE_READ_POSITIONS))
        for context in (mixed, fp16):
            context.read_tokens(question, logits_for_last=True)
        assert torch.equal(mixed.last_logits(), fp16.last_logits())
        assert int8.restore(fp16.snapshot())
        short = list(range(70, 70 + WIDE_READ_POSITIONS - 1))
        for context in (mixed, int8):
            context.read_tokens(short, logits_for_last=True)
        assert torch.equal(mixed.last_logits(), int8.last_logits())
        assert greedy_reply(mixed, tokens=4) == greedy_reply(int8, tokens=4)
        assert moved == [15 + PHOTO_POSITIONS + 10, 8, len(question)]  # the photo prompt, the reply, the question
    finally:
        for context in (mixed, fp16, int8):
            context.close()


def test_llama_cpp_is_built_without_openmp_and_an_openmp_build_is_named_in_the_log(monkeypatch, caplog):
    """With OpenMP, ggml's barriers are libgomp's, which sleep instead of spinning once a second
    thread of ours has run OpenMP work: a fifth slower decoding on a reply's thread (measured)."""
    import llama_cpp

    system = llama_cpp.llama_print_system_info()
    assert b"OPENMP = 1" not in system, "rebuild: bash scripts/install-llama-cpp.sh"
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: system + b"OPENMP = 1 | ")
    llama_cpp_runtime._warn_of_openmp_once.cache_clear()
    try:
        llama_cpp_runtime._warn_of_openmp_once()
    finally:
        llama_cpp_runtime._warn_of_openmp_once.cache_clear()
    assert "built with OpenMP" in caplog.text and "make run" in caplog.text


def test_the_bf16_file_holds_a_bf16_checkpoints_weights_exactly(tmp_path):
    """Written from the checkpoint, not through F16, whose narrower range and rounding would change them."""
    import gguf as gguf_py
    from safetensors import safe_open

    checkpoint = write_tiny_checkpoint(tmp_path / "bf16-checkpoint", dtype=torch.bfloat16, seed=3)
    path = language_model_gguf(checkpoint, read_checkpoint_config(checkpoint), precision=GGUF_PRECISIONS["bf16"],
                               cache_dir=tmp_path / "gguf")
    tensors = {tensor.name: tensor for tensor in gguf_py.GGUFReader(path).tensors}
    up = tensors["blk.0.ffn_up.weight"]
    assert up.tensor_type == gguf_py.GGMLQuantizationType.BF16
    (weights,) = checkpoint.glob("*.safetensors")
    with safe_open(str(weights), framework="pt") as file:
        original = file.get_tensor("model.layers.0.mlp.fc1.weight")
    stored = torch.from_numpy(np.asarray(up.data).view(np.int16).copy()).view(torch.bfloat16)
    assert torch.equal(stored.reshape(original.shape), original)
    assert [file.name.rsplit("-", 1)[-1] for file in path.parent.iterdir()] == ["BF16.gguf"]


def test_a_token_id_outside_the_vocabulary_is_refused_before_reading(contexts):
    bulk, _ = contexts
    bulk.read_tokens([5, 6], logits_for_last=True)
    for hostile in ([10**9], [-1]):
        with pytest.raises(MiphaError, match="outside the model's vocabulary"):
            bulk.read([hostile, photo_rows(bulk)], logits_for_last=True)
    assert bulk.length == 2
