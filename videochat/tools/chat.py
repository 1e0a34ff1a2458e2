"""`python -m videochat chat`: an offline multi-turn chat about one video (or image), like the model card.

Each answer is fed back as history for the next `--prompt`, exactly as the official `chat(..., return_history=True)`
loop. Greedy with 200 new tokens unless told otherwise (model card). Exit codes: 0 ok, 2 bad arguments, a
video that cannot be read or that the preprocessing rejects, or a checkpoint that does not load (one
`error: ...` line on stderr, raised as `UserError` and printed by `videochat.errors.run_cli`).

    python -m videochat chat --checkpoint DIR --video clip.mp4 --prompt "Describe the video." --prompt "Why?"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from videochat_client.schema import DEFAULTS

from videochat.errors import USER_ERRORS, UserError, one_line, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m videochat chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, weights, tokenizers)")
    p.add_argument("--video", required=True, help="video file (or an image file with --image)")
    p.add_argument("--image", action="store_true", help="treat the input as one image (T=1)")
    p.add_argument("--num-segments", type=int, default=DEFAULTS.num_segments,
                   help="frames sampled (default %(default)s)")
    p.add_argument("--hd-num", type=int, default=DEFAULTS.hd_num,
                   help="max HD tiles with --padding (default %(default)s)")
    p.add_argument("--padding", action="store_true", help="HD mode with padding")
    p.add_argument("--msg", default="", help="text after the media in the first [INST] block (model card: '')")
    p.add_argument("--instruction", default=None, help="QFormer/LLM instruction (prepended to the prompt)")
    p.add_argument("--prompt", action="append", required=True, help="a user turn; repeat for a conversation")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    p.add_argument("--repetition-penalty", type=float, default=DEFAULTS.repetition_penalty)
    p.add_argument("--seed", type=seed_arg, default=None, help="sampling seed (same for every turn)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    p.add_argument("--json", action="store_true",
                   help='print {"turns": [{"prompt", "text", "token_ids"}, ...]} instead of streaming text')
    return p


def seed_arg(text: str) -> int:
    """A seed torch.Generator.manual_seed takes (checked here: a bad one would fail mid-generation)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -(2 ** 63) <= seed < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must fit in 64 bits ([-2**63, 2**64)), got {seed}")
    return seed


def _checkpoint_error(checkpoint: str, exc: BaseException) -> UserError:
    return UserError(f"cannot load checkpoint {checkpoint}: {one_line(exc)}")


def _check_paths(args: argparse.Namespace) -> bytes:
    """The checks that need no torch, done before importing it (a typo or a truncated download fails at
    once): the checkpoint directory's files (`preflight`) and that the video file reads. Returns its bytes."""
    from videochat.model.preflight import check_checkpoint_files

    if not os.path.isdir(args.checkpoint):   # else config.py would read the path as a config.json file
        raise _checkpoint_error(args.checkpoint, UserError(
            "is not a directory" if os.path.exists(args.checkpoint) else "does not exist"))
    try:
        check_checkpoint_files(args.checkpoint)
    except USER_ERRORS as e:
        raise _checkpoint_error(args.checkpoint, e) from None
    try:
        with open(args.video, "rb") as f:
            return f.read()
    except OSError as e:   # missing, a directory, no permission
        raise UserError(f"cannot read video {args.video}: {e.strerror or e}") from None


def _load_media(args: argparse.Namespace, data: bytes):
    """Preprocess the file's bytes -> media [clips, T, 3, 224, 224]; a video it rejects is a UserError."""
    from preprocessing import preprocess

    try:
        result = preprocess(data, num_segments=args.num_segments, hd_num=args.hd_num, padding=args.padding,
                            image=args.image)
    except ValueError as e:   # VideoDecodeError (a ValueError) or an out-of-range preprocessing option
        raise UserError(f"{args.video}: {one_line(e)}") from None
    return result.pixel_values[0]


def _device(name: str):
    """--device -> torch.device, refusing names torch does not know and CUDA when no GPU is visible."""
    import torch

    from videochat.model.videochat_model import resolve_device

    try:
        device = resolve_device(name)
    except RuntimeError as e:  # torch: "Expected one of cpu, cuda, ... device type at start of device string"
        raise UserError(f"--device {name!r}: {one_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    data = _check_paths(args)
    from videochat.model.videochat_model import VideoChatModel
    from videochat.runtime.generation import generate_stream
    from videochat.runtime.types import ChatRequest, GenerationParams

    try:
        params = GenerationParams(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:   # out-of-range sampling flag
        raise UserError(str(e)) from None
    device = _device(args.device)
    media = _load_media(args, data)
    try:
        model = VideoChatModel.from_checkpoint(args.checkpoint, device=device)
        if args.instruction:   # the QFormer tokenizer loads lazily: fail now, not after "ASSISTANT:"
            model.qformer_tokenizer  # noqa: B018
    except USER_ERRORS as e:   # CheckpointError (keys, shapes), a corrupt tokenizer, unreadable files
        raise _checkpoint_error(args.checkpoint, e) from None
    history: tuple[tuple[str, str], ...] = ()
    turns = []
    for prompt in args.prompt:
        request = ChatRequest(media=media, media_type="image" if args.image else "video", prompt=prompt,
                              history=history, msg=args.msg, instruction=args.instruction, params=params)
        if not args.json:
            print(f"USER: {prompt}\nASSISTANT: ", end="", flush=True)
        text, token_ids = "", []
        for (event,) in generate_stream(model, [request]):
            text += event.text
            if event.token_id is not None:
                token_ids.append(event.token_id)
            if not args.json:
                print(event.text, end="", flush=True)
        if not args.json:
            print()
        history = history + ((prompt, text),)
        turns.append({"prompt": prompt, "text": text, "token_ids": token_ids})
    if args.json:
        print(json.dumps({"turns": turns}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
