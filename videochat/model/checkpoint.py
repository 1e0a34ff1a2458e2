"""The one strict checkpoint loader (docs/model.md, "Checkpoint loading").

* Files: `model.safetensors`, or shards listed in `model.safetensors.index.json`.
* Names: the explicit `KEY_TABLE` maps official key prefixes to module prefixes; `DROPPED` lists the keys
  that inference never uses (dropped on purpose, nothing else is dropped silently).
* LoRA (peft 0.5.0 naming, the official one; modern peft's `.base_layer.weight` is accepted as an alias):
  `W' = W + (alpha / r) * B @ A`, computed in float32 on the target device, then cast to the model dtype.
* Memory: the model is built on the meta device; tensors are read lazily one module weight at a time (the
  safetensors file is opened per read, so no mapping of the whole file stays resident), cast, moved and
  assigned, so the weights are never held twice.
* Errors: one `CheckpointError` listing every missing, unexpected and mis-shaped key by name; a weight file
  or index that cannot be read (missing, truncated, not safetensors) is a `CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from videochat.errors import UserError
from videochat.model.config import VideoChatConfig

# official key prefix -> module key prefix (an entry without a trailing "." matches the whole key)
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("query_tokens", "query_tokens"),                 # [1, 32, Hq]
    ("extra_query_tokens", "extra_query_tokens"),     # [1, 64, Hq]
    ("vision_encoder.", "vision_encoder."),           # ViT: same names (blocks.N.attn.qkv, ls1, pos_embed, ...)
    ("vision_layernorm.", "vision_layernorm."),
    ("qformer.bert.", "qformer."),                    # BERT QFormer; `qformer.cls.*` does not exist
    ("project_up.", "project_up."),
    ("lm.base_model.model.", "llm."),                 # peft PeftModelForCausalLM -> MistralForCausalLM
)

# official keys present in the checkpoint that inference never reads
DROPPED: dict[str, str] = {
    "project_down.weight": "training-only LLM -> QFormer projection, never called at inference",
    "project_down.bias": "training-only LLM -> QFormer projection, never called at inference",
}

LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"   # peft 0.5.0 naming (official)
MODERN_BASE = ".base_layer.weight"                                     # peft >= 0.7 alias of the base weight

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"


class CheckpointError(RuntimeError, UserError):
    """The checkpoint cannot be read or does not match the model; the message lists every offending key.
    `summary` (if set) is the same on one line with the first few keys of each kind, for command lines."""

    def __init__(self, message: str, summary: str | None = None):
        super().__init__(message)
        self.summary = summary


# ---------------------------------------------------------------------------------------------- names
def module_key(official: str) -> str | None:
    """Official key -> module key (None if no table row matches). LoRA/alias suffixes are not handled here."""
    for off, mod in KEY_TABLE:
        if off.endswith("."):
            if official.startswith(off):
                return mod + official[len(off):]
        elif official == off:
            return mod
    return None


def official_key(module: str) -> str:
    """Module key -> official key (inverse of `module_key`)."""
    for off, mod in KEY_TABLE:
        if (mod.endswith(".") and module.startswith(mod)) or module == mod:
            return off + module[len(mod):]
    raise KeyError(module)


def lora_targets(model: nn.Module, config: VideoChatConfig) -> dict[str, tuple[int, int]]:
    """Module keys of the LoRA-merged weights -> (out, in): `llm.*.{q,k,v,o,gate,up,down}_proj.weight`, lm_head."""
    if not config.llm.use_lora:
        return {}
    targets = set(config.llm.lora_target_modules)
    out = {}
    for name, mod in model.llm.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out[f"llm.{name}.weight"] = (mod.out_features, mod.in_features)
    return out


def official_layout(model: nn.Module, config: VideoChatConfig) -> dict[str, tuple[int, ...]]:
    """Every official key this model expects, with its shape (the model may be on the meta device)."""
    layout = {official_key(k): tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
    r = config.llm.lora_r
    for key, (n_out, n_in) in lora_targets(model, config).items():
        base = official_key(key)[: -len(".weight")]
        layout[base + LORA_A] = (r, n_in)
        layout[base + LORA_B] = (n_out, r)
    layout["project_down.weight"] = (config.qformer.hidden_size, config.llm.hidden_size)
    layout["project_down.bias"] = (config.qformer.hidden_size,)
    return layout


# ---------------------------------------------------------------------------------------------- files
def checkpoint_index(ckpt_dir: str | os.PathLike) -> dict[str, str]:
    """Official key -> absolute path of the safetensors file holding it."""
    ckpt_dir = os.fspath(ckpt_dir)
    index = os.path.join(ckpt_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            return {k: os.path.join(ckpt_dir, v) for k, v in weight_map.items()}
        except OSError as e:
            raise CheckpointError(f"cannot read {index}: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:   # not JSON / no {"weight_map": {k: file}}
            raise CheckpointError(f"{index} is not a valid safetensors index: {type(e).__name__}: {e}") from None
    single = os.path.join(ckpt_dir, SINGLE_FILE)
    if os.path.exists(single) and not os.path.isfile(single):
        raise CheckpointError(f"cannot read weight file {single}: not a regular file")
    if os.path.isfile(single):
        with open_weights(single) as f:
            return {k: single for k in f.keys()}
    listing = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else "(not a directory)"
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt_dir}; found: {listing}")


@contextmanager
def open_weights(path: str) -> Iterator:
    """`safe_open` of one weight file: the one place weight files are opened, so a file that is missing,
    truncated or not safetensors at all is a `CheckpointError` naming it (not a SafetensorError traceback)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"cannot read weight file {path}: {why}") from None


def read_tensor(path: str, key: str) -> torch.Tensor:
    """One tensor, copied out of the file; the file is closed (unmapped) again right away."""
    with open_weights(path) as f:
        return f.get_tensor(key)


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class LoadItem:
    target: str                 # module key
    base: str                   # official key of the stored tensor
    lora_a: str | None = None   # official keys of the LoRA factors (merged into `base`)
    lora_b: str | None = None


def plan_load(model: nn.Module, config: VideoChatConfig, shapes: dict[str, tuple[int, ...]]) -> list[LoadItem]:
    """Match the stored keys (official key -> stored shape) to the model; raise `CheckpointError` listing
    every missing, unexpected, mis-shaped or duplicated key."""
    expected = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
    lora = lora_targets(model, config)
    base: dict[str, str] = {}
    factors: dict[str, dict[str, str]] = {}
    unexpected, duplicates = [], []
    for key in sorted(shapes):
        if key in DROPPED:
            continue
        stem, part = key, None
        if key.endswith(LORA_A) or key.endswith(LORA_B):
            stem, part = key[: -len(LORA_A)] + ".weight", key[-len(LORA_A):][6]  # "A" / "B"
        elif key.endswith(MODERN_BASE):
            stem = key[: -len(MODERN_BASE)] + ".weight"
        target = module_key(stem)
        if target is None or target not in expected or (part is not None and target not in lora):
            unexpected.append(key)
        elif part is not None:
            factors.setdefault(target, {})[part] = key
        elif target in base:
            duplicates.append(f"{base[target]} and {key}")
        else:
            base[target] = key

    missing = [official_key(t) for t in expected if t not in base]
    mismatched = []
    for target, key in base.items():
        if shapes[key] != expected[target]:
            mismatched.append(f"{key}: checkpoint {list(shapes[key])} vs model {list(expected[target])}")
    r = config.llm.lora_r
    for target, (n_out, n_in) in lora.items():
        stem = official_key(target)[: -len(".weight")]
        got = factors.get(target, {})
        for part, suffix, want in (("A", LORA_A, (r, n_in)), ("B", LORA_B, (n_out, r))):
            if part not in got:
                missing.append(stem + suffix)
            elif shapes[got[part]] != want:
                mismatched.append(f"{got[part]}: checkpoint {list(shapes[got[part]])} vs model {list(want)}")
    problems = [(f"missing keys ({len(missing)})", missing), (f"unexpected keys ({len(unexpected)})", unexpected),
                (f"shape mismatches ({len(mismatched)})", mismatched), ("duplicate keys", duplicates)]
    if any(items for _, items in problems):
        lines = ["checkpoint does not match the model:"]
        for title, items in problems:
            if items:
                lines.append(f"  {title}:")
                lines.extend(f"    {x}" for x in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        summary = "; ".join(f"{title}: " + ", ".join(items[:3]) + (f", ... (+{len(items) - 3} more)"
                                                                   if len(items) > 3 else "")
                            for title, items in problems if items)
        raise CheckpointError("\n".join(lines), summary=f"checkpoint does not match the model: {summary}")
    return [LoadItem(t, base[t], factors.get(t, {}).get("A"), factors.get(t, {}).get("B")) for t in expected]


def stored_shapes(index: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Official key -> shape, read from the safetensors headers only."""
    shapes = {}
    for path in sorted(set(index.values())):
        with open_weights(path) as f:
            for k in f.keys():
                if index.get(k) == path:
                    shapes[k] = tuple(f.get_slice(k).get_shape())
    missing_files = [k for k in index if k not in shapes]
    if missing_files:
        raise CheckpointError(f"index lists keys absent from their shard: {missing_files[:20]}")
    return shapes


# ---------------------------------------------------------------------------------------------- load
def load_checkpoint(model: nn.Module, ckpt_dir: str | os.PathLike, config: VideoChatConfig, *,
                    dtype: torch.dtype, device: torch.device | str) -> None:
    """Fill a (meta-device) model from `ckpt_dir` strictly; floating tensors become `dtype` on `device`."""
    index = checkpoint_index(ckpt_dir)
    plan = plan_load(model, config, stored_shapes(index))
    scaling = config.llm.lora_scaling
    for item in plan:
        t = read_tensor(index[item.base], item.base).to(device)
        if t.is_floating_point():
            t = t.to(dtype)
        if item.lora_a is not None:
            a = read_tensor(index[item.lora_a], item.lora_a).to(device)
            b = read_tensor(index[item.lora_b], item.lora_b).to(device)
            merge_lora_(t, a, b, scaling)
            del a, b
        assign_tensor(model, item.target, t)


def merge_lora_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                chunk_rows: int = 4096) -> torch.Tensor:
    """In place: `weight += scaling * lora_b @ lora_a`, computed in float32 and cast back to weight's dtype,
    `chunk_rows` output rows at a time so the float32 temporary stays small (lm_head is 32768 x 4096).
    weight [out, in], lora_a [r, in], lora_b [out, r]."""
    a32 = lora_a.to(torch.float32)
    for start in range(0, weight.shape[0], chunk_rows):
        block = weight[start:start + chunk_rows]
        merged = block.to(torch.float32).addmm(lora_b[start:start + chunk_rows].to(torch.float32), a32, alpha=scaling)
        block.copy_(merged)
    return weight


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter/buffer `name` (possibly on meta) by `tensor` without copying."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:
        raise CheckpointError(f"model has no parameter or buffer {name}")


def official_stored_dtype(key: str) -> torch.dtype:
    """Stored dtype of an official key (docs/model.md, "Checkpoint loading"): LLM base weights bf16, LoRA A/B
    and everything else float32, the QFormer `position_ids` int64. Used by the memory benchmark to write a
    full-size synthetic checkpoint."""
    if key.endswith("position_ids"):
        return torch.int64
    if key.startswith("lm.") and ".lora_" not in key:
        return torch.bfloat16
    return torch.float32
