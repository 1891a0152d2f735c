"""The language model on llama.cpp: the real GGUF conversion and llama.cpp's kernels, checked against
the fp32 PyTorch model on the tiny checkpoint (photo included), plus follow-ups, switching and Stop."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mipha_core import CacheKey, devices, llama_cpp_runtime, load_engine
from mipha_core.checkpoint import read_checkpoint_config
from mipha_core.gguf_export import GGUF_PRECISIONS, language_model_gguf, read_gguf_metadata
from mipha_core.llama_cpp_engine import LlamaCppEngine
from mipha_core.llama_cpp_runtime import DecodeAbortedError, LlamaCppContext
from mipha_core.precision import ModelSize, choose_precision, photo_reader_weights
from mipha_core.vision import VisionCancelledError
from tests.core.conftest import assistant, user

PRECISIONS = ["fp16", "int8", "int4"]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-data")


@pytest.fixture(scope="module")
def llama_engines(tiny_checkpoint: Path, gguf_dir: Path) -> dict[str, LlamaCppEngine]:
    quantization = {"fp16": None, "int8": "8bit", "int4": "4bit"}
    engines = {}
    for name in ("int8", "int4"):
        engines[name] = load_engine(str(tiny_checkpoint), device="cpu", quantization=quantization[name],
                                    runtime="llama.cpp", data_dir=gguf_dir)
    return engines


def _first_token_logits(engine, messages) -> torch.Tensor:
    inputs = engine.encode(messages)
    with torch.no_grad():
        return engine.model(**inputs).logits[0, -1]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_gguf_precision_keeps_the_greedy_first_token_after_a_photo(engine, tiny_checkpoint, gguf_dir, photo,
                                                                         precision):
    messages = [user("What is in this photo?", photo)]
    expected = _first_token_logits(engine, messages)
    checkpoint = read_checkpoint_config(tiny_checkpoint)
    path = language_model_gguf(tiny_checkpoint, checkpoint, precision=GGUF_PRECISIONS[precision],
                               cache_dir=gguf_dir)
    assert read_gguf_metadata(path)["general.file_type"] == GGUF_PRECISIONS[precision].llama_ftype
    context = LlamaCppContext(path, context_length=checkpoint.context_length, threads=1)
    try:
        prepared = engine.prepare(messages, max_new_tokens=8)
        ids = prepared.token_ids
        first = ids.index(checkpoint.llava.image_token_id)
        features = engine.model.model.get_image_features(pixel_values=engine.encode(messages)["pixel_values"])
        context.read_tokens(ids[:first], logits_for_last=False)
        context.read_embeddings(features.pooler_output[0], logits_for_last=False)
        context.read_tokens(ids[first + checkpoint.image_tokens:], logits_for_last=True)
        got = context.last_logits()[: expected.shape[0]]
    finally:
        context.close()
    real = slice(0, len(engine.tokenizer))
    assert int(got[real].argmax()) == int(expected[real].argmax())
    if precision == "fp16":
        assert torch.allclose(got[real], expected[real], atol=0.05)


def test_the_engine_greedy_reply_matches_pytorch(engine, llama_engines, photo):
    messages = [user("Describe the photo.", photo)]
    expected = engine.stream(messages, max_new_tokens=12, temperature=0).text()
    reply = llama_engines["int8"].stream(messages, max_new_tokens=12, temperature=0)
    assert reply.text()[:1] == expected[:1]
    assert reply.stats.completion_tokens >= 1
    assert reply.stats.vision_seconds is not None


def test_auto_on_a_cpu_takes_llama_cpp_int8_and_explicit_flags_win(tiny_checkpoint, gguf_dir):
    roomy = load_engine(str(tiny_checkpoint), device="cpu", data_dir=gguf_dir, free_bytes=64 * 1024**3)
    assert isinstance(roomy, LlamaCppEngine)
    assert roomy.label.endswith(f"int8 · CPU (llama.cpp, prompts read in {photo_reader_weights()})")
    explicit = load_engine(str(tiny_checkpoint), device="cpu", dtype="float32", data_dir=gguf_dir)
    assert not isinstance(explicit, LlamaCppEngine)
    assert explicit.label.endswith("fp32 · CPU")


MIPHA_3B = ModelSize(language_params=2_780_000_000, vision_params=412_000_000, layers=32, hidden=2560,
                     context_length=2048)


@pytest.mark.parametrize(("free_gb", "expected", "photo_reader"),
                         [(64, "int8", "fp16"), (16, "int8", "fp16"), (12, "int8", "int8"), (7, "int8", None),
                          (6.5, "int4", "int4"), (4.5, "int4", None), (2, "int4", None)])
def test_auto_takes_the_fastest_faithful_precision_that_fits_mipha_3b(monkeypatch, free_gb, expected, photo_reader):
    """When memory is short, the photo reader's 16-bit weights go first, then its KV cache, then int8
    weights. On a processor without native bf16 (the vision tower then takes fp32), so the figures
    do not depend on the machine the test runs on."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    chosen = choose_precision(device="cpu", dtype="auto", quantization=None, runtime="auto", size=MIPHA_3B,
                              llama_cpp_problem=None, free_bytes=int(free_gb * 1024**3))
    assert (chosen.runtime, chosen.weights, chosen.photo_reader) == ("llama.cpp", expected, photo_reader)


@pytest.mark.parametrize(("native_bf16", "reader"), [(False, "fp16"), (True, "bf16")])
def test_the_page_says_when_photos_are_read_on_other_weights(monkeypatch, native_bf16, reader):
    """Photos are read on the 16-bit format the processor multiplies fastest: bf16 where it has it natively."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    roomy, tight = (choose_precision(device="cpu", dtype="auto", quantization=None, runtime="auto", size=MIPHA_3B,
                                     llama_cpp_problem=None, free_bytes=gb * 1024**3) for gb in (64, 12))
    assert roomy.label == f"int8 · CPU (llama.cpp, prompts read in {reader})"
    assert tight.label == "int8 · CPU (llama.cpp)"


@pytest.mark.parametrize(("native_bf16", "reader", "reader_file"), [(False, "fp16", "F16"), (True, "bf16", "BF16")])
def test_photos_read_on_16_bit_weights_keep_that_file_beside_the_int8_one(tiny_checkpoint, tmp_path, monkeypatch,
                                                                          native_bf16, reader, reader_file):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    engine = load_engine(str(tiny_checkpoint), device="cpu", data_dir=tmp_path, free_bytes=64 * 1024**3)
    try:
        files = sorted(path.name.rsplit("-", 1)[-1] for path in (tmp_path / "gguf").iterdir())
        assert files == sorted([f"{reader_file}.gguf", "Q8_0.gguf"])
        assert engine.label.endswith(f"prompts read in {reader})")
    finally:
        engine.close()


@pytest.mark.parametrize(("native_bf16", "reader_file"), [(False, "F16"), (True, "BF16")])
def test_photos_are_read_on_the_int8_weights_when_the_16_bit_file_cannot_be_written(
        tiny_checkpoint, tmp_path, photo, caplog, monkeypatch, native_bf16, reader_file):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    checkpoint = read_checkpoint_config(tiny_checkpoint)
    int8 = language_model_gguf(tiny_checkpoint, checkpoint, precision=GGUF_PRECISIONS["int8"],
                               cache_dir=tmp_path / "gguf")
    blocked = int8.with_name(int8.name.replace("Q8_0", reader_file))
    blocked.mkdir()  # where the F16 file would go: writing it fails as a full or read-only disk would
    (blocked / "taken").write_text("")
    with caplog.at_level(logging.WARNING, logger="mipha_core.loading"):
        engine = load_engine(str(tiny_checkpoint), device="cpu", data_dir=tmp_path, free_bytes=64 * 1024**3)
    try:
        assert engine.label.endswith("int8 · CPU (llama.cpp)")
        assert "photos are read on the int8 weights instead" in caplog.text
        reply = engine.stream([user("What is in this photo?", photo)], max_new_tokens=4, temperature=0)
        assert reply.text() and reply.stats.completion_tokens >= 1
    finally:
        engine.close()


def test_the_gguf_file_is_built_once(tiny_checkpoint, gguf_dir):
    checkpoint = read_checkpoint_config(tiny_checkpoint)
    first = language_model_gguf(tiny_checkpoint, checkpoint, precision=GGUF_PRECISIONS["int8"], cache_dir=gguf_dir)
    written = first.stat().st_mtime_ns
    again = language_model_gguf(tiny_checkpoint, checkpoint, precision=GGUF_PRECISIONS["int8"], cache_dir=gguf_dir)
    assert again == first and again.stat().st_mtime_ns == written
    assert not list(gguf_dir.glob("*.partial"))


def test_a_follow_up_reads_only_its_own_tokens_and_answers_as_a_fresh_read(llama_engines, photo):
    engine = llama_engines["int8"]
    key = CacheKey(owner="ann", conversation="c1")
    first_turn = [user("What is in this photo?", photo)]
    first = engine.stream(first_turn, max_new_tokens=10, temperature=0, cache=key)
    answer = first.text()
    follow_up = [*first_turn, assistant(answer), user("And the colours?")]
    cached = engine.stream(follow_up, max_new_tokens=10, temperature=0, cache=key)
    cached_text = cached.text()
    # the photo and the first question are not read again (the random model's reply starts without
    # the space the prompt puts after "ASSISTANT:", so from there on the prompt differs from what it saw)
    assert cached.stats.reused_tokens >= first.stats.prompt_tokens
    assert cached.stats.vision_seconds is None
    fresh = engine.stream(follow_up, max_new_tokens=10, temperature=0).text()
    assert cached_text == fresh


def test_another_conversation_in_between_keeps_the_first_ones_state(llama_engines, photo):
    engine = llama_engines["int8"]
    ann, bob = CacheKey("ann", "a"), CacheKey("bob", "b")
    ann_turn = [user("What is in this photo?", photo)]
    ann_answer = engine.stream(ann_turn, max_new_tokens=8, temperature=0, cache=ann).text()
    engine.stream([user("Hello there", Image.new("RGB", (40, 40), (0, 90, 200)))], max_new_tokens=8,
                  temperature=0, cache=bob).text()
    again = engine.stream([*ann_turn, assistant(ann_answer), user("Why?")], max_new_tokens=8, temperature=0,
                          cache=ann)
    again.text()
    assert again.stats.reused_tokens > engine.image_tokens
    assert again.stats.vision_seconds is None


def test_a_cancelled_reply_stops_before_reading_and_keeps_nothing_broken(llama_engines, photo):
    engine = llama_engines["int8"]
    cancel = threading.Event()
    cancel.set()
    reply = engine.stream([user("What is in this photo?", photo)], max_new_tokens=50, cancel=cancel)
    assert reply.text() == ""
    assert reply.stats.finish_reason == "cancelled"
    after = engine.stream([user("What is in this photo?", photo)], max_new_tokens=4, temperature=0)
    assert after.text()


def test_abort_stops_llama_cpp_mid_read_and_keeps_what_it_finished(tiny_checkpoint, gguf_dir):
    checkpoint = read_checkpoint_config(tiny_checkpoint)
    path = language_model_gguf(tiny_checkpoint, checkpoint, precision=GGUF_PRECISIONS["int8"], cache_dir=gguf_dir)
    context = LlamaCppContext(path, context_length=checkpoint.context_length, threads=1)
    try:
        context.read_tokens(list(range(10, 30)), logits_for_last=True)
        context.abort()
        with pytest.raises(DecodeAbortedError):
            context.read_tokens(list(range(30, 40)), logits_for_last=True)
        assert context.length == 20
        context.resume()
        context.read_tokens(list(range(30, 40)), logits_for_last=True)
        assert context.length == 30
    finally:
        context.close()


def test_without_llama_cpp_auto_falls_back_to_pytorch_with_a_log_line(tiny_checkpoint, caplog):
    size = ModelSize(language_params=10**6, vision_params=10**5, layers=2, hidden=64, context_length=2048)
    with caplog.at_level(logging.WARNING):
        chosen = choose_precision(device="cpu", dtype="auto", quantization=None, runtime="auto", size=size,
                                  llama_cpp_problem="llama-cpp-python is not installed", free_bytes=8 * 1024**3)
    assert chosen.runtime == "torch"
    assert "runs on PyTorch instead" in caplog.text


@pytest.mark.parametrize(("options", "message"), [
    ({"runtime": "llama.cpp", "llama_cpp_problem": "llama-cpp-python is not installed"}, "make run"),
    ({"runtime": "gpu"}, "--runtime gpu is not a runtime"),
])
def test_impossible_runtime_requests_say_the_way_out(options, message):
    from mipha_core.errors import ModelLoadError
    size = ModelSize(language_params=10**6, vision_params=10**5, layers=2, hidden=64, context_length=2048)
    arguments = {"device": "cpu", "dtype": "auto", "quantization": None, "runtime": "auto", "size": size,
                 "llama_cpp_problem": None} | options
    with pytest.raises(ModelLoadError, match=message):
        choose_precision(**arguments)


def test_pytorch_on_a_cpu_without_room_for_fp32_takes_less():
    chosen = choose_precision(device="cpu", dtype="auto", quantization=None, runtime="torch", size=MIPHA_3B,
                              llama_cpp_problem=None, free_bytes=6 * 1024**3)
    assert chosen.weights in ("int8", "int4") and chosen.runtime == "torch"


def test_forgetting_a_conversation_drops_its_state(llama_engines, photo):
    engine = llama_engines["int8"]
    key = CacheKey("cy", "gone")
    turn = [user("What is in this photo?", photo)]
    answer = engine.stream(turn, max_new_tokens=6, temperature=0, cache=key).text()
    engine.forget(key)
    again = engine.stream([*turn, assistant(answer), user("More?")], max_new_tokens=4, temperature=0, cache=key)
    again.text()
    assert again.stats.reused_tokens == len(engine.shared_opening_ids)  # Mipha's public system sentence only


def test_a_new_conversation_reads_no_system_sentence_and_no_one_elses_words(llama_engines, photo):
    engine = llama_engines["int8"]
    opening = engine.shared_opening_ids
    assert engine.tokenizer.decode(opening).endswith("questions. USER:")
    engine.stream([user("What is in this photo?", photo)], max_new_tokens=4, temperature=0,
                  cache=CacheKey("gus", "g")).text()
    for messages in ([user("What is in this photo?", photo)], [user("What is in this photo?")]):
        fresh = engine.stream(messages, max_new_tokens=4, temperature=0, cache=CacheKey("hal", str(len(messages[0]))))
        text = fresh.text()
        assert fresh.stats.reused_tokens == len(opening)  # not gus's question, nor his photo
        assert text == engine.stream(messages, max_new_tokens=4, temperature=0).text()
    custom = [{"role": "system", "content": "Answer in French."}, user("What is in this photo?")]
    other = engine.stream(custom, max_new_tokens=4, temperature=0, cache=CacheKey("hal", "custom"))
    answer = other.text()
    assert other.stats.reused_tokens < len(opening)  # at most the words it shares with Mipha's sentence
    assert answer == engine.stream(custom, max_new_tokens=4, temperature=0).text()


def test_stop_ends_the_photo_encoding_between_layers(llama_engines, photo):
    engine = llama_engines["int8"]
    pixels = engine.photo_features.preprocessor(photo)
    cancel = threading.Event()
    layers_run = []
    tower = engine.vision._model.vision_tower.encoder.layers
    handle = tower[0].register_forward_hook(lambda *_: (layers_run.append(0), cancel.set()))
    try:
        with pytest.raises(VisionCancelledError), engine.vision.stoppable(cancel):
            engine.vision(pixels)
    finally:
        handle.remove()
    assert layers_run == [0]  # the second layer never ran
    assert engine.vision(pixels).shape == (engine.image_tokens, engine.context.hidden_size)


def test_after_a_finished_reply_the_next_turns_opening_is_read_ahead(tiny_checkpoint, gguf_dir, photo, monkeypatch):
    # everything read on the int8 weights: a fresh read would otherwise read the earlier reply on the
    # reader's 16-bit weights, which the conversation decoded on int8
    monkeypatch.setattr(llama_cpp_runtime, "WIDE_READ_POSITIONS", 0)
    monkeypatch.setattr(llama_cpp_runtime, "BULK_READ_POSITIONS", 0)
    engine = load_engine(str(tiny_checkpoint), device="cpu", quantization="8bit", runtime="llama.cpp",
                         data_dir=gguf_dir)
    ordinary = list(engine.suppressed_ids)
    engine.suppressed_ids = [i for i in range(engine.context.vocab_size) if i != engine.end_token_id]
    key = CacheKey("dee", "ahead")
    turn = [user("What is in this photo?", photo)]
    first = engine.stream(turn, max_new_tokens=8, temperature=0, cache=key)
    answer = first.text()
    assert first.stats.finish_reason == "stop"
    opening = engine.tokenizer("USER:", add_special_tokens=False).input_ids
    ahead = first.stats.prompt_tokens + 1 + len(opening)  # the end token, then "USER:"
    deadline = time.monotonic() + 10
    while engine.context.length < ahead and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.context.length == ahead
    # the empty reply renders as "ASSISTANT: <|endoftext|>", a space the model never generated,
    # so this follow-up reads from there: what was read ahead is cut off, and the answer is unchanged
    engine.suppressed_ids = ordinary
    follow_up = [*turn, assistant(answer), user("And the colours?")]
    cached = engine.stream(follow_up, max_new_tokens=6, temperature=0, cache=key)
    cached_text = cached.text()
    assert cached.stats.reused_tokens >= first.stats.prompt_tokens
    assert cached_text == engine.stream(follow_up, max_new_tokens=6, temperature=0).text()
