"""A fake VideoChat model for the runtime tests: the real LLM code (`videochat.model.llm`) with tiny seeded
weights, the fixture's tokenizer, and a deterministic stand-in for the vision path; plus request builders."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from transformers import MistralConfig, MistralForCausalLM

from support.paths import TINY
from videochat.model.config import VideoChatConfig
from videochat.model.llm import build_llm
from videochat.model.tokenization import SentencePieceLlamaTokenizer
from videochat.runtime.types import ChatRequest, GenerationParams

FIXTURE = TINY
RAW_CONFIG = json.loads((FIXTURE / "config.json").read_text())["model_config"]
BRIDGE = RAW_CONFIG["bridge"]
TOKENS_PER_CLIP = BRIDGE["num_query_token"] + BRIDGE["extra_num_query_token"]
LM_HEAD_GAIN = 60.0  # random init gives ~1e-3 logit gaps; a large gain makes greedy choices clear-cut
FRAME = 8            # tiny frames: the fake vision only pools them


class FakeModel:
    """The attributes `generation` uses: config, llm, tokenizer, device, dtype, encode_media. `reference` is
    transformers' MistralForCausalLM with the same (seeded) weights, for comparisons with HF `generate`."""

    def __init__(self):
        torch.manual_seed(0)
        self.config = SimpleNamespace(num_visual_tokens_per_clip=TOKENS_PER_CLIP)
        self.reference = MistralForCausalLM(MistralConfig(**RAW_CONFIG["llm"]["config"])).eval()
        with torch.no_grad():
            self.reference.lm_head.weight.mul_(LM_HEAD_GAIN)
        self.llm = build_llm(VideoChatConfig.from_dict(RAW_CONFIG).llm).eval()
        self.llm.load_state_dict(self.reference.state_dict())   # same module names: strict
        self.tokenizer = SentencePieceLlamaTokenizer.from_dir(str(FIXTURE / "llm_tokenizer"))
        self.device, self.dtype = torch.device("cpu"), torch.float32
        hidden = self.llm.config.hidden_size
        self._proj = torch.randn(3, TOKENS_PER_CLIP * hidden, generator=torch.Generator().manual_seed(1))
        self.encode_calls = 0

    def encode_media(self, media, media_types, instructions):
        """Deterministic per request: [clips*96, H] from the per-clip channel means (and the instruction)."""
        self.encode_calls += 1
        hidden = self.llm.config.hidden_size
        out = []
        for m, instruction in zip(media, instructions):
            pooled = m.mean(dim=(1, 3, 4)) + (len(instruction) if instruction else 0)
            out.append(torch.tanh(pooled @ self._proj).reshape(-1, hidden))
        return out


def media(clips: int, seed: int, frames: int = 2) -> torch.Tensor:
    return torch.randn(clips, frames, 3, FRAME, FRAME, generator=torch.Generator().manual_seed(seed))


def request(clips=3, seed=0, prompt="What happens?", history=(), max_new_tokens=8, **params) -> ChatRequest:
    return ChatRequest(media=media(clips, seed), prompt=prompt, history=history,
                       params=GenerationParams(max_new_tokens=max_new_tokens, **params))


MIXED = [
    dict(clips=3, seed=0, prompt="Describe the action step by step.", max_new_tokens=10),
    dict(clips=5, seed=1, prompt="What is she wearing?", history=(("Describe it.", "A woman in a kitchen"),),
         max_new_tokens=4),
    dict(clips=1, seed=2, prompt="Why?", max_new_tokens=12),
    dict(clips=7, seed=3, prompt="Where does this take place? Be precise.",
         history=(("q1", "a1"), ("A longer second question about the video", "and its answer")), max_new_tokens=6),
]


class ListSink:
    """A scheduler `Sink` that records every response (tests/unit/test_scheduler.py, test_backpressure.py)."""

    def __init__(self):
        self.responses = []   # ("ok", arrays, final) | ("error", message, code)

    def send(self, arrays, *, final):
        self.responses.append(("ok", arrays, final))

    def fail(self, message, *, code):
        self.responses.append(("error", message, code))

    @property
    def finals(self):
        return [r for r in self.responses if r[0] == "error" or r[2]]

    def text(self):
        return "".join(r[1]["TEXT"][0, 0].decode() for r in self.responses if r[0] == "ok")

    def ids(self):
        return [i for r in self.responses if r[0] == "ok" for i in r[1]["TOKEN_IDS"][0].tolist()]
