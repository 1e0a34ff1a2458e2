"""`python -m videochat chat`: an offline multi-turn chat about one video (or image), like the model card.

Each answer is fed back as history for the next `--prompt`, exactly as the official `chat(..., return_history=True)`
loop. Greedy with 200 new tokens unless told otherwise (model card). Exit codes: 0 ok, 2 bad arguments, a
video the preprocessing rejects or a checkpoint that does not load (one-line error on stderr).

    python -m videochat chat --checkpoint DIR --video clip.mp4 --prompt "Describe the video." --prompt "Why?"
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from videochat_client.schema import DEFAULTS

EXIT_USAGE = 2


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
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same for every turn)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    p.add_argument("--json", action="store_true",
                   help='print {"turns": [{"prompt", "text", "token_ids"}, ...]} instead of streaming text')
    return p


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _load_media(args: argparse.Namespace):
    """Preprocess the file -> media [clips, T, 3, 224, 224]; raises ValueError (incl. VideoDecodeError)."""
    from preprocessing import preprocess

    with open(args.video, "rb") as f:
        data = f.read()
    result = preprocess(data, num_segments=args.num_segments, hd_num=args.hd_num, padding=args.padding,
                        image=args.image)
    return result.pixel_values[0]


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from videochat.runtime.generation import generate_stream
    from videochat.runtime.types import ChatRequest, GenerationParams
    from videochat.model.videochat_model import VideoChatModel

    try:
        params = GenerationParams(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)
        media = _load_media(args)
    except (OSError, ValueError) as e:
        return _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    try:
        model = VideoChatModel.from_checkpoint(args.checkpoint, device=args.device)
    except (OSError, ValueError) as e:  # missing/inconsistent checkpoint (ConfigError is a ValueError)
        return _error(f"cannot load checkpoint {args.checkpoint}: {str(e).splitlines()[0] if str(e) else e!r}")
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
    sys.exit(main(sys.argv[1:]))
