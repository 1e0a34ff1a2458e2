"""The LLM tokenizer (`SentencePieceLlamaTokenizer`, ours over sentencepiece) keeps the slow transformers-4.x
LlamaTokenizer's quirks that the official ids depend on (docs/model.md, quirks Q1-Q3), whatever transformers is installed:

* against golden.json: every turn's `input_ids` from the tokenizer of the tiny fixture and of the demo assets
  (the same files; asserted), with the quirks checked one by one so a regression names the quirk;
* against a recording of transformers 4.57.6's slow `LlamaTokenizer(legacy=False)` itself
  (`tests/data/tokenizer_parity.json`: seeded random strings and id lists, encode and decode with our decode
  settings and with the defaults). Re-record with a transformers 4.x venv: `PYTHONPATH=tests python tests/unit/test_tokenization_quirks.py`.
"""
from __future__ import annotations

import hashlib
import json
import random

import pytest

from support.paths import DATA, ROOT, TINY

FIXTURE = TINY
TOKENIZER_DIRS = {"tiny-fixture": FIXTURE / "llm_tokenizer",
                  "demo-assets": ROOT / "videochat" / "tools" / "demo_assets" / "llm_tokenizer"}
PARITY = DATA / "tokenizer_parity.json"
# what IncrementalDetokenizer / the reference's batch_decode use (videochat.runtime.detokenize.DECODE_KWARGS)
DECODE_KWARGS = dict(skip_special_tokens=True, spaces_between_special_tokens=False, clean_up_tokenization_spaces=False)
FRAGMENTS = ["[INST]", "[/INST]", " [INST] ", "</s>", "<s>", "<unk>", " ", "  ", "▁", "\n", "\t", "a", "Hello", " world",
             "<Video>", "</Video>", "<Image>", "é", "日本", "🙂", ".", "?", " .", "n't", "<", ">", "/", "[", "]", "INST",
             "s>", "the ", " kitchen", "Describe the action step by step.", "\r\n", "\u00a0", "\ufffd"]


def _turns():
    golden = json.loads((FIXTURE / "golden.json").read_text())
    return [(case, i) for case in golden["cases"] for i in range(len(case["turns"]))]


TURNS = _turns()
TOKENS_PER_CLIP = 96


@pytest.fixture(scope="module", params=list(TOKENIZER_DIRS))
def tokenizer(request):
    from videochat.model.tokenization import SentencePieceLlamaTokenizer
    return SentencePieceLlamaTokenizer.from_dir(str(TOKENIZER_DIRS[request.param]))


INST, INST_CLOSE = "[INST]", "[/INST]"


def _prompt(tokenizer, case, turn_index):
    from videochat.runtime.chat_format import build_prompt, normalize_history
    history = normalize_history(case["turns"][turn_index - 1]["chat_history_after"]) if turn_index else ()
    return build_prompt(tokenizer, media_type=case["media_type"], num_clips=case["preprocess"]["num_clips"],
                        tokens_per_clip=TOKENS_PER_CLIP, prompt=case["turns"][turn_index]["user_prompt"],
                        history=history, msg=case["msg"], instruction=case["instruction"]), history


def test_demo_assets_tokenizer_is_the_fixtures():
    """The demo checkpoint ships the fixture's tokenizer files, so golden.json's ids pin it too."""
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        digests = {key: hashlib.sha256((d / name).read_bytes()).hexdigest() for key, d in TOKENIZER_DIRS.items()}
        assert len(set(digests.values())) == 1, f"{name} differs between {digests}: give the demo its own golden ids"


@pytest.mark.parametrize("case,turn_index", TURNS, ids=[f"{c['id']}-t{i}" for c, i in TURNS])
def test_golden_ids_and_each_quirk(tokenizer, case, turn_index):
    turn = case["turns"][turn_index]
    prompt, history = _prompt(tokenizer, case, turn_index)
    ids, golden = prompt.input_ids.tolist(), turn["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    lone, inst, close = tokenizer.convert_tokens_to_ids(["▁", "[INST]", "[/INST]"])
    golden_starts = [0] + [end for _, end in turn["visual_placeholder_spans"]]
    assert [golden[i] for i in golden_starts] == [bos] * len(golden_starts), "golden: one BOS per piece"
    piece_starts = [0] + [end for _, end in prompt.spans]
    assert [ids[i] for i in piece_starts] == [bos] * len(piece_starts), \
        "Q1 per-piece BOS: every piece between placeholders is tokenised on its own and starts with <s>"
    assert ids.count(bos) == case["preprocess"]["num_clips"] + 1, "Q1: N clips -> N+1 BOS"
    if not case["instruction"]:
        assert ids[1:3] == [lone, inst], "Q2 lone ▁: a piece starting with [INST] gives <s> ▁ [INST]"
    spaced = prompt.conversation.count(f" {INST}") + prompt.conversation.count(f" {INST_CLOSE}")
    lone_before_tag = sum(a == lone and b in (inst, close) for a, b in zip(ids, ids[1:]))
    assert lone_before_tag == spaced + (not case["instruction"]), \
        "Q2: every ' [INST]' / ' [/INST]' gives a standalone ▁ before the tag (plus the leading one)"
    assert ids.count(eos) == len(history), "Q3 history: the literal '</s>' after each answer is the EOS id"
    assert ids == golden, "the official input_ids"


# --------------------------------------------------------------------------------------------- 4.57 recording

def _random_texts(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 8))) for _ in range(n)]


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[list[int]]:
    """Mostly uniform ids (byte-fallback pieces included) with extra control ids (<unk> <s> </s> [INST] [/INST])."""
    return [[rng.randrange(vocab) if rng.random() < 0.7 else rng.randrange(5) for _ in range(rng.randint(0, 12))]
            for _ in range(n)]


def test_matches_recorded_slow_llama_tokenizer():
    from videochat.model.tokenization import SentencePieceLlamaTokenizer
    recorded = json.loads(PARITY.read_text())
    tok = SentencePieceLlamaTokenizer.from_dir(str(ROOT / recorded["tokenizer"]))
    assert len(tok) == recorded["len"] and tok.all_special_ids == recorded["all_special_ids"]
    for text, ids, ids_plain in recorded["encode"]:
        assert tok(text)["input_ids"] == ids, f"encode {text!r}"
        assert tok(text, add_special_tokens=False)["input_ids"] == ids_plain, f"encode (no specials) {text!r}"
    for ids, ours_kwargs, defaults in recorded["decode"]:
        assert tok.decode(ids, **DECODE_KWARGS) == ours_kwargs, f"decode {ids} with DECODE_KWARGS"
        assert tok.decode(ids) == defaults, f"decode {ids} with the defaults"


def record(n: int = 300, seed: int = 0) -> None:
    """Write tokenizer_parity.json with transformers 4.x's slow LlamaTokenizer (the reference's tokenizer)."""
    import transformers
    from transformers import LlamaTokenizer

    rel = "tests/data/tiny-videochat/llm_tokenizer"
    ref = LlamaTokenizer.from_pretrained(str(ROOT / rel), legacy=False)
    assert not getattr(ref, "is_fast", False), "needs transformers 4.x: its LlamaTokenizer is the slow one"
    rng = random.Random(seed)
    data = {"recorded_with": f"transformers {transformers.__version__} LlamaTokenizer (slow, legacy=False)",
            "tokenizer": rel, "len": len(ref), "all_special_ids": ref.all_special_ids,
            "encode": [[t, ref(t)["input_ids"], ref(t, add_special_tokens=False)["input_ids"]]
                       for t in _random_texts(rng, n)],
            "decode": [[ids, ref.decode(ids, **DECODE_KWARGS), ref.decode(ids)]
                       for ids in _random_ids(rng, n, len(ref))]}
    lines = [json.dumps({k: v for k, v in data.items() if k not in ("encode", "decode")}, ensure_ascii=False)[:-1]]
    for key in ("encode", "decode"):   # one case per line: reviewable diffs
        cases = ",\n".join(json.dumps(c, ensure_ascii=False) for c in data[key])
        lines.append(f', "{key}": [\n{cases}\n]')
    PARITY.write_text("\n".join(lines) + "}\n", encoding="utf-8")
    print(f"wrote {PARITY} ({len(data['encode'])} encode, {len(data['decode'])} decode cases)")


if __name__ == "__main__":
    record()
