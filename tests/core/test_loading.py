"""Loading real checkpoint folders, and the errors a user meets, each with the way out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mipha_core import ModelLoadError, UnsupportedModelError, load_engine
from mipha_core.tiny import write_tiny_checkpoint
from tests.core.conftest import user


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "copy")


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_sharded_checkpoint_loads_the_same_weights(engine, tmp_path, photo):
    sharded = write_tiny_checkpoint(tmp_path / "sharded", max_shard_bytes=400_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 3
    other = load_engine(str(sharded), device="cpu", dtype="float32")
    inputs = engine.encode([user("Hi", photo)])
    with torch.no_grad():
        torch.testing.assert_close(other.model(**inputs).logits, engine.model(**inputs).logits)


def test_tiny_is_built_once_in_the_data_dir(tmp_path):
    first = load_engine("tiny", device="cpu", dtype="float32", data_dir=tmp_path)
    weights = next((tmp_path / "models").glob("*/model.safetensors"))
    stamp = weights.stat().st_mtime_ns
    second = load_engine("tiny", device="cpu", dtype="float32", data_dir=tmp_path)
    assert weights.stat().st_mtime_ns == stamp
    assert torch.equal(first.model.lm_head.weight, second.model.lm_head.weight)


def test_tiny_command_writes_the_original_format(tmp_path):
    subprocess.run([sys.executable, "-m", "mipha_core.tiny", str(tmp_path / "t")], check=True, capture_output=True)
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["model_type"] == "mipha_phi" and config["architectures"] == ["MiphaPhiForCausalLM"]
    assert set(config["vision_config"]) == {"vision_tower", "mm_projector"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert {"lm_head.bias", "model.mm_projector.0.weight", "model.embed_tokens.weight",
            "model.vision_tower.vision_model.head.probe"} <= names


def test_offline_hub_id_says_how_to_go_on(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match="could not download zhumj34/Mipha-3B.*--model tiny"):
        load_engine("zhumj34/Mipha-3B", data_dir=tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        load_engine(str(tmp_path / "nowhere" / "model"), data_dir=tmp_path)


@pytest.mark.parametrize(
    ("model_type", "named"), [("mipha_gemma", "Gemma"), ("mipha_phi3", "Phi-3"), ("llava", "'llava'")]
)
def test_unsupported_variants_name_what_is_supported(checkpoint_copy, model_type, named):
    edit_config(checkpoint_copy, model_type=model_type)
    with pytest.raises(UnsupportedModelError, match=f"{named}.*this app runs Mipha-3B"):
        load_engine(str(checkpoint_copy))


def test_missing_weights_are_reported(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        load_engine(str(checkpoint_copy))


def test_corrupt_weights_are_reported(checkpoint_copy):
    weights = checkpoint_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="could not be loaded.*download the model again"):
        load_engine(str(checkpoint_copy))


def test_corrupt_config_is_reported(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is corrupt"):
        load_engine(str(checkpoint_copy))


def test_missing_tokenizer_is_reported(checkpoint_copy):
    for name in ("tokenizer.json", "vocab.json"):
        (checkpoint_copy / name).unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_engine(str(checkpoint_copy))


@pytest.mark.parametrize(("quantization", "storage_dtype"), [("8bit", torch.int8), ("4bit", torch.uint8)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantized_loads_hold_integer_weights_and_stream(tiny_checkpoint, quantization, storage_dtype, dtype, photo, capfd):
    """bf16 on the CPU takes torch's packed kernels, other dtypes bitsandbytes: both really quantize."""
    engine = load_engine(str(tiny_checkpoint), device="cpu", dtype=dtype, quantization=quantization)
    layer = engine.model.model.language_model.layers[0]
    assert layer.mlp.fc1.weight.dtype == storage_dtype
    assert layer.self_attn.q_proj.weight.dtype == storage_dtype
    packed = "WeightOnlyLinear" in type(layer.mlp.fc1).__name__
    assert packed == (dtype == "bfloat16")
    reply = engine.stream([user("What is this?", photo)], max_new_tokens=16, temperature=0)
    assert reply.text()
    assert reply.stats.completion_tokens == 16
    assert "MatMul8bitLt" not in "".join(capfd.readouterr())


@pytest.mark.parametrize(("quantization", "tolerance"), [("8bit", 0.02), ("4bit", 0.2)])
def test_packed_cpu_quantization_stays_close_to_bf16(tiny_checkpoint, quantization, tolerance, photo):
    full = load_engine(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    quantized = load_engine(str(tiny_checkpoint), device="cpu", dtype="bfloat16", quantization=quantization)
    for messages in ([user("What is this?", photo)], [user("A longer question about the photo " * 3, photo)]):
        inputs = full.encode(messages)
        with torch.no_grad():
            reference = full.model(**inputs).logits[0, -1].float()
            logits = quantized.model(**inputs).logits[0, -1].float()
        assert float((logits - reference).norm() / reference.norm()) < tolerance


def test_importing_the_core_pulls_in_no_ui_or_database():
    code = "import sys, mipha_core; print(sorted(m for m in ('gradio', 'storage', 'sqlalchemy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


def test_cache_budgets_default_by_device_and_can_be_set(tiny_checkpoint):
    from mipha_core import CacheSettings

    default = load_engine(str(tiny_checkpoint), device="cpu", dtype="float32")
    assert default.kv_cache._store.max_bytes == 2 * 1024**3
    off = load_engine(str(tiny_checkpoint), device="cpu", dtype="float32", caches=CacheSettings(0, 0))
    reply = off.stream([user("Hi")], max_new_tokens=3)
    reply.text()
    assert off.kv_cache.nbytes == 0 and reply.stats.reused_tokens == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_how_to_go_on(tmp_path):
    with pytest.raises(ModelLoadError, match="--device cuda was asked for but .*Use --device cpu or --device auto"):
        load_engine("tiny", device="cuda", dtype="float32", data_dir=tmp_path)
    assert not (tmp_path / "models").exists(), "the device is checked before anything is built or downloaded"


def test_a_gpu_index_that_does_not_exist_is_named(tmp_path):
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(ModelLoadError, match=f"--device {missing} was asked for but"):
        load_engine("tiny", device=missing, dtype="float32", data_dir=tmp_path)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_mps_without_an_apple_gpu_says_how_to_go_on(tmp_path):
    with pytest.raises(ModelLoadError, match="--device mps was asked for but .*Use --device cpu"):
        load_engine("tiny", device="mps", data_dir=tmp_path)


@pytest.mark.parametrize(("options", "message"), [
    ({"device": "gpu"}, "--device gpu is not a device: use auto, cpu, cuda"),
    ({"device": "meta"}, "--device meta is not supported"),
    ({"device": "cpu", "dtype": "int8"}, "--dtype int8 is not a dtype: use auto, float32"),
    ({"device": "cpu", "quantization": "3bit"}, "quantization must be None, '8bit' or '4bit', got '3bit'"),
])
def test_bad_settings_are_refused_before_the_download(monkeypatch, tmp_path, options, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match=message):
        load_engine("zhumj34/Mipha-3B", data_dir=tmp_path, **options)


def test_bfloat16_on_a_gpu_without_it_is_refused(monkeypatch):
    """The one check that needs a GPU's answer: it is asked of torch, so torch is told the answer."""
    from mipha_core.devices import choose_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ModelLoadError, match="cannot compute in bfloat16. Use --dtype float16"):
        choose_dtype("bfloat16", torch.device("cuda"))
    assert choose_dtype("auto", torch.device("cuda")) == torch.float16


@pytest.mark.parametrize("content", ["{not json", '{"size": {"shortest_edge": 384}}', '{"image_mean": "grey"}'])
def test_a_bad_preprocessor_config_is_reported(checkpoint_copy, content):
    (checkpoint_copy / "preprocessor_config.json").write_text(content)
    with pytest.raises(ModelLoadError, match="preprocessor_config.json could not be used"):
        load_engine(str(checkpoint_copy), device="cpu", dtype="float32")


@pytest.mark.parametrize("content", ['{"a": 1}', '{"version": "1.0", "added_tokens": [], "model": {}}'])
def test_a_malformed_tokenizer_is_reported(checkpoint_copy, content):
    (checkpoint_copy / "tokenizer.json").write_text(content)
    with pytest.raises(ModelLoadError, match="the tokenizer in .* could not be read"):
        load_engine(str(checkpoint_copy), device="cpu", dtype="float32")


def test_an_unknown_home_folder_is_just_not_found(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        load_engine("~no-such-user-here/Mipha-3B", device="cpu", data_dir=tmp_path)
