"""Mutation fuzzing of `preprocessing.preprocess` on corpus files: only two outcomes are allowed.

    .venv/bin/python bench/fuzz_preprocessing.py [--mutations 500] [--seed 0] [--timeout 20]
        [--corpus all|small] [--out bench/results/fuzz_preprocessing.json]

Each case mutates one corpus file (bit flips, overwritten chunks, truncation, duplicated ranges, 32-bit
fields set to extremes; 1-3 stacked) and runs `preprocess` on it in a worker process, so a hang is cut
off by the per-case timeout and a crash (signal) is seen instead of killing the run. A case must return
a PreprocessResult or raise VideoDecodeError with a plain one-line message; anything else (another
exception, a timeout, a crash) is a bug. Prints the counts by outcome and writes them as JSON, with
each failing case (seed + case number reproduce it: `cases(n, seed=...)`).

The mutators, `cases` and the runner live only here; tests/test_preprocessing_fuzz.py imports this
file and runs 60 seeded cases on the small corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import re
import select
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT / "tests" / "data" / "videos"
# Small files (< 100 KB) so a case takes tens of ms; one per container/codec family we accept.
CORPUS: tuple[str, ...] = (
    "idx_one_frame_h264_320x240.mp4",
    "idx_three_frames_h264_320x240.mp4",
    "editlist_hides5_h264_64x64_30f.mp4",
    "idx_solid_h264_320x240_300f.mp4",
    "idx_solid_av1_320x240_120f.mkv",
    "idx_solid_vp9_320x240_300f.webm",
    "idx_solid_mjpeg_320x240_150f.mov",
    "animated.gif",
    "image.png",
)
# The long run adds larger files (0.1-0.8 MB) for the paths the small ones miss: fragmented MP4,
# moov at the end, audio interleaved, AVI (sequential, B-frames), HEVC, live WebM without cues.
LARGE: tuple[str, ...] = (
    "fragmented_h264_640x360_5s.mp4",
    "moov_at_end_h264_640x360_6s.mp4",
    "audio_h264_aac_640x360_8s.mp4",
    "idx_solid_mpeg4_320x240_300f.avi",
    "idx_solid_hevc_320x240_300f.mkv",
    "live_nocues_vp8_opus_640x480_5s.webm",
)
IMAGES = frozenset({"image.png"})  # run with image=True (a still image is rejected otherwise)
NUM_SEGMENTS = 4  # fewer than the card's 8: cheaper per case, still several seeks per file
ALLOWED = ("decoded", "VideoDecodeError")  # anything else (timeout, other:..., crash:...) is a bug


# -- mutators: (data, rng) -> mutated bytes; pure, deterministic given the rng -----------------------

def _offset(data: bytes, rng: random.Random) -> int:
    """Half the time in the first 4 KiB, where headers (ftyp/moov, EBML, GIF/PNG header) live."""
    span = min(len(data), 4096) if rng.random() < 0.5 else len(data)
    return rng.randrange(max(span, 1))


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        out[_offset(data, rng)] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite_chunk(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    start = _offset(data, rng)
    size = min(rng.randint(1, 256), len(out) - start)
    fill = rng.choice(["random", "zero", "ff"])
    chunk = (rng.randbytes(size) if fill == "random" else bytes([0 if fill == "zero" else 0xFF]) * size)
    out[start:start + size] = chunk
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(1, max(len(data), 2))]


def duplicate_range(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    chunk = data[start:start + rng.randint(1, 4096)]
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        return data[:at] + chunk + data[at:]  # inserted: shifts every offset after it
    return data[:at] + chunk + data[at + len(chunk):]  # overwritten in place


def smash_int32(data: bytes, rng: random.Random) -> bytes:
    """A 32-bit big-endian field (MP4 box sizes, counts, offsets) set to an extreme value."""
    if len(data) < 4:
        return data
    at = min(_offset(data, rng), len(data) - 4)
    value = rng.choice([0, 1, 8, 0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32)])
    return data[:at] + struct.pack(">I", value) + data[at + 4:]


MUTATORS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    f.__name__: f for f in (flip_bits, overwrite_chunk, truncate, duplicate_range, smash_int32)}


@dataclass(frozen=True)
class Case:
    number: int
    source: str
    mutations: tuple[str, ...]
    data: bytes
    image: bool


def cases(count: int, *, seed: int, corpus: tuple[str, ...] = CORPUS) -> Iterator[Case]:
    """`count` mutated inputs, round-robin over `corpus`; case k depends only on (seed, k)."""
    originals = {name: (VIDEOS / name).read_bytes() for name in corpus}
    for k in range(count):
        rng = random.Random(seed * 1_000_003 + k)
        name = corpus[k % len(corpus)]
        data, names = originals[name], []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            mutator = rng.choice(sorted(MUTATORS))
            data = MUTATORS[mutator](data, rng)
            names.append(mutator)
        yield Case(number=k, source=name, mutations=tuple(names), data=data, image=name in IMAGES)


# -- runner: one worker process; a case past the timeout kills it (a fresh one takes over) ----------

def classify(data: bytes, *, image: bool) -> tuple[str, str]:
    """(outcome, detail) of `preprocess(data)`; runs in the worker.

    A VideoDecodeError that decode.py's guard made from an unexpected exception (neither FFmpegError
    nor ours) is allowed, but its detail starts with "unexpected <type>": the summary counts those,
    since each is a place where our code did not foresee what PyAV does with such bytes.
    """
    import av

    from preprocessing import PreprocessResult, VideoDecodeError, preprocess

    try:
        res = preprocess(data, num_segments=NUM_SEGMENTS, image=image)
    except VideoDecodeError as exc:
        msg = str(exc)
        if not msg or "\n" in msg or "/" in msg or ".c:" in msg or "Traceback" in msg:
            return "other:VideoDecodeError with an unplain message", msg[:300]
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, (av.error.FFmpegError, VideoDecodeError)):
            return "VideoDecodeError", f"unexpected {type(cause).__name__}: {cause}"[:300]
        return "VideoDecodeError", msg
    except Exception as exc:  # what the fuzzing looks for
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else "?"
        return f"other:{type(exc).__name__}", f"{exc} (at {where})"[:300]
    if not isinstance(res, PreprocessResult) or res.pixel_values.shape[:3] != (
            1, res.metadata.num_clips, 1 if image else NUM_SEGMENTS):
        return "other:bad result", repr(getattr(res, "pixel_values", res))[:300]
    return "decoded", res.metadata.decode_strategy


def _send(stream: Any, obj: object) -> None:
    blob = pickle.dumps(obj)
    stream.write(struct.pack(">Q", len(blob)) + blob)
    stream.flush()


def _recv_exact(fd: int, size: int, deadline: float | None) -> bytes | None:
    """`size` bytes from `fd`; None at EOF or when `deadline` (monotonic) passes."""
    buf = b""
    while len(buf) < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
        chunk = os.read(fd, size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _worker_main() -> None:
    """Serve cases on stdin/stdout (length-prefixed pickles). Stray prints go to stderr."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while True:
        head = _recv_exact(0, 8, None)
        if head is None:
            return
        data, image = pickle.loads(_recv_exact(0, struct.unpack(">Q", head)[0], None) or b"")
        _send(proto_out, classify(data, image=image))


class Runner:
    """Runs cases in a worker process: `run(case)` -> (outcome, detail, seconds)."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        # stderr discarded: FFmpeg logs every corrupt NAL unit there.
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                cwd=ROOT)

    def run(self, case: Case) -> tuple[str, str, float]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
            self._warm_up()
        proc = self._proc
        start = time.monotonic()
        try:
            _send(proc.stdin, (case.data, case.image))
            reply = self._reply(start + self.timeout_s)
        except BrokenPipeError:
            reply = None
        seconds = time.monotonic() - start
        if reply is not None:
            return reply[0], reply[1], seconds
        try:
            code = proc.wait(timeout=1.0)  # no answer because the worker died...
        except subprocess.TimeoutExpired:  # ...or because it is still busy: a hang (or far too slow)
            self.close()
            return "timeout", f"> {self.timeout_s:g} s", seconds
        self._proc = None
        return f"crash:exit {code}", "worker died (negative exit = signal)", seconds

    def _warm_up(self) -> None:
        """Imports (torch, PyAV) happen before the first timed case."""
        _send(self._proc.stdin, (b"", False))
        if self._reply(time.monotonic() + 120) is None:
            raise RuntimeError("fuzz worker did not start")

    def _reply(self, deadline: float) -> tuple[str, str] | None:
        fd = self._proc.stdout.fileno()
        head = _recv_exact(fd, 8, deadline)
        if head is None:
            return None
        body = _recv_exact(fd, struct.unpack(">Q", head)[0], deadline)
        return None if body is None else pickle.loads(body)

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fuzz(count: int, *, seed: int, timeout_s: float, corpus: tuple[str, ...] = CORPUS,
         progress: Callable[[int, str], None] | None = None) -> dict:
    """Run `count` cases; the JSON-able summary (counts by outcome, by mutator, bugs with repro)."""
    by_outcome: Counter[str] = Counter()
    guard_caught: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    by_source: dict[str, Counter[str]] = {}
    bugs: list[dict] = []
    seconds: list[float] = []
    with Runner(timeout_s=timeout_s) as runner:
        for case in cases(count, seed=seed, corpus=corpus):
            outcome, detail, took = runner.run(case)
            seconds.append(took)
            by_outcome[outcome] += 1
            by_source.setdefault(case.source, Counter())[outcome] += 1
            if outcome == "VideoDecodeError" and detail.startswith("unexpected "):
                guard_caught[detail.split(":")[0].removeprefix("unexpected ")] += 1
            elif outcome == "VideoDecodeError":
                messages[re.sub(r"\b\d+\b", "N", detail)] += 1  # "only N of N frames"
            if outcome not in ALLOWED:
                bugs.append({"case": case.number, "source": case.source, "mutations": list(case.mutations),
                             "outcome": outcome, "detail": detail})
            if progress:
                progress(case.number, outcome)
    return {
        "mutations": count, "seed": seed, "timeout_s": timeout_s, "num_segments": NUM_SEGMENTS,
        "counts": dict(sorted(by_outcome.items())),
        "guard_caught": dict(sorted(guard_caught.items())),  # VideoDecodeError made from these (see classify)
        "error_messages": dict(messages.most_common()),
        "by_source": {k: dict(sorted(v.items())) for k, v in by_source.items()},
        "bugs": bugs, "max_case_s": max(seconds, default=0.0), "total_case_s": sum(seconds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutations", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--corpus", choices=["all", "small"], default="all",
                    help="small: the test's files only; all: plus the larger ones")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_preprocessing.json")
    args = ap.parse_args()

    def progress(k: int, outcome: str) -> None:
        if outcome not in ALLOWED:
            print(f"case {k}: {outcome}", flush=True)
        elif (k + 1) % 100 == 0:
            print(f"{k + 1} cases done", flush=True)

    corpus = CORPUS + (LARGE if args.corpus == "all" else ())
    start = time.monotonic()
    result = fuzz(args.mutations, seed=args.seed, timeout_s=args.timeout, corpus=corpus, progress=progress)
    result = {
        "command": f"python bench/fuzz_preprocessing.py --mutations {args.mutations} --seed {args.seed} "
                   f"--timeout {args.timeout:g} --corpus {args.corpus}",
        "what": "mutated corpus files -> preprocess(num_segments=4) in a worker process; allowed outcomes: "
                "decoded, VideoDecodeError (plain one-line message); timeout = no answer within the limit",
        "corpus": list(corpus), "wall_s": round(time.monotonic() - start, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        **result,
    }
    print("counts by outcome:")
    for outcome in ("decoded", "VideoDecodeError", "timeout"):
        print(f"  {outcome:<18} {result['counts'].get(outcome, 0)}")
    others = {k: v for k, v in result["counts"].items() if k not in (*ALLOWED, "timeout")}
    print(f"  {'other':<18} {sum(others.values())}" + (f"  {others}" if others else ""))
    print(f"VideoDecodeError via the catch-all guard: {sum(result['guard_caught'].values())} "
          f"{result['guard_caught'] or ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        main()
