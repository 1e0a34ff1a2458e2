#!/usr/bin/env python3
"""Does this environment (e.g. the GPU image: its own torch/transformers) run our model exactly?

    python scripts/check_device_image.py [--device auto|cpu|cuda] [--case A5_image_example1_nopad]

Prints the versions, imports the model and runtime modules, loads the tiny fixture (float32, so the official
tokens must come out exactly), runs one golden turn of tests/data/tiny-videochat/golden.json through the engine
(prompt ids, first-step top-5, greedy tokens and text) and the same request joined with another one (batch
invariance), one PASS/FAIL line each, then PASS or FAIL; exit code 0 only if all passed. Needs nothing but the
repository and its requirements (no network, no GPU: on a machine without CUDA it checks the CPU).
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "tiny-videochat"
MODULES = (
    "videochat.model.config",
    "videochat.model.llm",
    "videochat.model.tokenization",
    "videochat.runtime.chat_format",
    "videochat.model.checkpoint",
    "videochat.model.videochat_model",
    "videochat.runtime.generation",
    "videochat.runtime.engine",
    "videochat.runtime.visual_cache",
    "videochat.serving.requests",
    "videochat.serving.llm",
    "videochat.serving.scheduler",
    "videochat.runtime.types",
    "videochat.runtime.sampling",
    "videochat.runtime.detokenize",
    "videochat.runtime.batch",
)
# first-step logits: |delta| <= this fraction of the largest golden logit (the golden tests' 1e-3 on logits ~35)
LOGITS_REL_TOL = 3e-5


class Report:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {what}{f'  ({detail})' if detail else ''}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


def versions() -> None:
    import torch
    print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name in ("transformers", "tokenizers", "sentencepiece", "safetensors", "numpy", "av"):
        try:
            print(f"{name} {importlib.import_module(name).__version__}")
        except Exception as e:   # report, the checks below say whether it matters
            print(f"{name} not importable: {type(e).__name__}: {e}")


def import_modules(report: Report) -> None:
    for name in MODULES:
        try:
            importlib.import_module(name)
            report.check(True, f"import {name}")
        except Exception as e:
            report.check(False, f"import {name}", f"{type(e).__name__}: {e}")


def golden_media(case: dict):
    """The case's media from the preprocessing package (exact), else the fixture's float16 copy of A5's."""
    import numpy as np
    import torch
    try:
        from preprocessing import preprocess
        p = case["preprocess"]
        result = preprocess((FIXTURE / case["video"]).read_bytes(), num_segments=p["num_segments"],
                            resolution=p["resolution"], hd_num=p["hd_num"], padding=p["padding"],
                            image=case["media_type"] == "image")
        return result.pixel_values[0], "preprocessing package"
    except Exception as e:
        if not case["id"].startswith("A5"):
            raise
        print(f"note: preprocessing unavailable ({type(e).__name__}: {e}); using the fixture's float16 media")
        return torch.from_numpy(np.load(FIXTURE / "media_A5_image_example1_nopad_full_fp16.npy")).float(), "npy"


def golden_turn(report: Report, model, golden: dict, case_id: str) -> None:
    import torch
    from videochat.runtime.generation import first_step_logits, generate
    from videochat.runtime.types import ChatRequest, GenerationParams

    case = {c["id"]: c for c in golden["cases"]}[case_id]
    turn = case["turns"][0]
    media, source = golden_media(case)
    params = GenerationParams(max_new_tokens=golden["generation_config"]["max_new_tokens"])
    request = ChatRequest(media=media, media_type=case["media_type"], prompt=turn["user_prompt"], msg=case["msg"],
                          instruction=case["instruction"], params=params)

    from videochat.runtime.chat_format import build_prompt
    prompt = build_prompt(model.tokenizer, media_type=case["media_type"], num_clips=request.num_clips,
                          tokens_per_clip=model.config.num_visual_tokens_per_clip, prompt=turn["user_prompt"],
                          msg=case["msg"], instruction=case["instruction"])
    report.check(prompt.input_ids.tolist() == turn["input_ids"], f"{case_id}: prompt ids == golden input_ids")

    top = first_step_logits(model, [request])[0].topk(len(turn["first_step_top5"]["ids"]))
    want = torch.tensor(turn["first_step_top5"]["logits"])
    delta = float((top.values.cpu() - want).abs().max())
    report.check(top.indices.tolist() == turn["first_step_top5"]["ids"], f"{case_id}: first-step top-5 ids")
    report.check(delta <= LOGITS_REL_TOL * float(want.abs().max()), f"{case_id}: first-step top-5 logits",
                 f"max |delta| {delta:.2e} on logits up to {float(want.abs().max()):.1f}; media from {source}")

    alone = generate(model, [request])[0]
    report.check(alone.token_ids == turn["generated_ids"], f"{case_id}: greedy tokens == golden",
                 f"{alone.token_ids}")
    report.check(alone.text == turn["response"], f"{case_id}: text == golden", repr(alone.text))
    other = ChatRequest(media=media[:1], media_type=case["media_type"], prompt="Another, longer question here?",
                        params=params)
    batched = generate(model, [other, request])[1]
    report.check(batched.token_ids == alone.token_ids, f"{case_id}: same tokens when batched with another request")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--case", action="append", help="golden.json case id, repeatable (turn 0 is run); default: "
                    "A5 (image) and A3 (instruction: the QFormer's BertTokenizer, our one runtime use of transformers)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    versions()
    report = Report()
    import_modules(report)
    if not report.failed:
        import torch
        from videochat.model.videochat_model import VideoChatModel
        golden = json.loads((FIXTURE / "golden.json").read_text())
        model = VideoChatModel.from_checkpoint(FIXTURE, device=args.device, dtype=torch.float32)
        report.check(True, f"load the tiny fixture on {model.device} (float32)")
        for case_id in args.case or ["A5_image_example1_nopad", "A3_example1_pad_instruction"]:
            try:
                golden_turn(report, model, golden, case_id)
            except Exception as e:
                report.check(False, f"{case_id}: golden turn", f"{type(e).__name__}: {e}")
    print("PASS" if not report.failed else f"FAIL ({len(report.failed)}: {', '.join(report.failed)})")
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
