"""Strict loader on the tiny fixture: LoRA merged exactly (W + 2*B@A), project_down dropped on purpose, a
missing / an extra / a mis-shaped key each fail naming the key, sharded and modern-peft (`.base_layer`)
checkpoints load to the same weights; tokenizers load offline (slow Llama; lazy BERT with a clear error when
absent); the demo checkpoint is byte-deterministic and loads."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.paths import TINY
from support.numerics import assert_close_scaled

from videochat.model.checkpoint import CheckpointError
from videochat.tools.demo_checkpoint import main as demo_main
from videochat.tools.demo_checkpoint import make_demo_checkpoint
from videochat.model.videochat_model import VideoChatModel
from videochat.model.tokenization import TokenizerNotFoundError

FIXTURE = TINY
Q_PROJ = "lm.base_model.model.model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def fixture_tensors() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "model.safetensors")


@pytest.fixture(scope="module")
def model() -> VideoChatModel:
    return VideoChatModel.from_checkpoint(FIXTURE, device="cpu")


def write_ckpt(root: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE / "config.json", root / "config.json")
    shutil.copytree(FIXTURE / "llm_tokenizer", root / "llm_tokenizer")
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, root / "model.safetensors")
        return root
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, root / name)
        weight_map.update({k: name for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def test_fixture_loads_with_lora_merged(model, fixture_tensors):
    t = fixture_tensors
    want = t[Q_PROJ + ".weight"] + 2.0 * t[Q_PROJ + ".lora_B.default.weight"] @ t[Q_PROJ + ".lora_A.default.weight"]
    assert_close_scaled(model.llm.model.layers[1].self_attn.q_proj.weight, want, rel=1e-6)
    lm_head = "lm.base_model.model.lm_head"
    want = t[lm_head + ".weight"] + 2.0 * t[lm_head + ".lora_B.default.weight"] @ t[lm_head + ".lora_A.default.weight"]
    assert_close_scaled(model.llm.lm_head.weight, want, rel=1e-6)
    assert not hasattr(model, "project_down")
    assert model.qformer.embeddings.position_ids.dtype == torch.int64
    assert model.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert model.llm.model.rotary_emb.inv_freq.device == model.device   # rebuilt after meta loading


def test_tokenizers(model):
    assert type(model.tokenizer).__name__ == "SentencePieceLlamaTokenizer"   # the slow one's ids, not the fast one's
    assert model.tokenizer("[INST] hi")["input_ids"][:3] == [1, 426, 3]   # <s> ▁ [INST]
    assert model._qformer_tokenizer is None                         # lazy
    assert len(model.qformer_tokenizer) == model.config.qformer.word_embeddings_rows


def test_missing_qformer_tokenizer_is_a_clear_error(tmp_path, fixture_tensors):
    m = VideoChatModel.from_checkpoint(write_ckpt(tmp_path / "c", dict(fixture_tensors)), device="cpu")
    clips = torch.zeros(1, 1, 3, 224, 224)
    assert m.encode_media([clips], ["image"], [None])[0].shape == (96, 64)   # no instruction: not needed
    with pytest.raises(TokenizerNotFoundError, match="vocab.txt"):
        m.encode_media([clips], ["image"], ["describe"])


@pytest.mark.parametrize("edit, expect", [
    ("missing", ["missing keys (1)", "vision_encoder.blocks.2.attn.proj.bias"]),
    ("missing_lora", ["missing keys (1)", Q_PROJ + ".lora_B.default.weight"]),
    ("extra", ["unexpected keys (1)", "qformer.cls.predictions.bias"]),
    ("shape", ["shape mismatches (1)", "vision_encoder.pos_embed: checkpoint [1, 2048, 64] vs model [1, 2049, 64]"]),
    ("lora_shape", ["shape mismatches (1)", Q_PROJ + ".lora_A.default.weight: checkpoint [8, 64] vs model [16, 64]"]),
])
def test_loader_errors_name_the_key(tmp_path, fixture_tensors, edit, expect):
    t = dict(fixture_tensors)
    if edit == "missing":
        del t["vision_encoder.blocks.2.attn.proj.bias"]
    elif edit == "missing_lora":
        del t[Q_PROJ + ".lora_B.default.weight"]
    elif edit == "extra":
        t["qformer.cls.predictions.bias"] = torch.zeros(116)
    elif edit == "shape":
        t["vision_encoder.pos_embed"] = t["vision_encoder.pos_embed"][:, :-1].contiguous()
    elif edit == "lora_shape":
        t[Q_PROJ + ".lora_A.default.weight"] = t[Q_PROJ + ".lora_A.default.weight"][:8].contiguous()
    with pytest.raises(CheckpointError) as err:
        VideoChatModel.from_checkpoint(write_ckpt(tmp_path / "c", t), device="cpu")
    for text in expect:
        assert text in str(err.value)


def test_no_checkpoint_file_is_a_clear_error(tmp_path):
    ckpt = write_ckpt(tmp_path / "c", {"x": torch.zeros(1)})
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        VideoChatModel.from_checkpoint(ckpt, device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors"])
def test_unreadable_weight_file_is_a_checkpoint_error_naming_it(tmp_path, fixture_tensors, damage):
    ckpt = write_ckpt(tmp_path / "c", dict(fixture_tensors))
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>404</html>")
    with pytest.raises(CheckpointError, match=f"cannot read weight file {weights}: ") as err:   # not SafetensorError
        VideoChatModel.from_checkpoint(ckpt, device="cpu")
    assert isinstance(err.value, RuntimeError)


def _same_weights(a: VideoChatModel, b: VideoChatModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_sharded_checkpoint_loads_the_same(tmp_path, fixture_tensors, model):
    sharded = VideoChatModel.from_checkpoint(write_ckpt(tmp_path / "s", dict(fixture_tensors), shards=3), device="cpu")
    _same_weights(model, sharded)


def test_modern_peft_base_layer_alias_loads_the_same(tmp_path, fixture_tensors, model):
    t = {}
    for k, v in fixture_tensors.items():
        if k.endswith(".weight") and k[: -len(".weight")] + ".lora_A.default.weight" in fixture_tensors:
            k = k[: -len(".weight")] + ".base_layer.weight"
        t[k] = v
    assert sum(k.endswith(".base_layer.weight") for k in t) == 2 * 7 + 1
    _same_weights(model, VideoChatModel.from_checkpoint(write_ckpt(tmp_path / "m", t), device="cpu"))
    t[Q_PROJ + ".weight"] = fixture_tensors[Q_PROJ + ".weight"].clone()  # both names at once: ambiguous
    with pytest.raises(CheckpointError, match="duplicate keys"):
        VideoChatModel.from_checkpoint(write_ckpt(tmp_path / "d", t), device="cpu")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_checkpoint_is_deterministic_and_loads(tmp_path, capsys):
    assert demo_main([str(tmp_path / "a")]) == 0
    assert "demo checkpoint written" in capsys.readouterr().out
    make_demo_checkpoint(tmp_path / "b", seed=0)
    make_demo_checkpoint(tmp_path / "c", seed=1)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and a["model.safetensors"] != c["model.safetensors"]
    stored = load_file(tmp_path / "a" / "model.safetensors")
    assert {"project_down.weight", "vision_encoder.img_pos_embed", Q_PROJ + ".lora_A.default.weight"} <= stored.keys()
    assert stored["qformer.bert.embeddings.position_ids"].dtype == torch.int64
    assert sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file()) < 5_000_000
    demo = VideoChatModel.from_checkpoint(tmp_path / "a", device="cpu")
    (v,) = demo.encode_media([torch.randn(3, 8, 3, 224, 224)], ["video"], ["watch the video."])
    assert v.shape == (3 * 96, demo.config.llm.hidden_size) and torch.isfinite(v).all()
