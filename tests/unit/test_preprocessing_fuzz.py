"""Corrupt uploads: a mutated file either decodes or raises VideoDecodeError with a plain message -
nothing else, no hang. 60 seeded cases of bench/fuzz_preprocessing.py (the mutators and the worker
runner live there once; its long run is bench/results/fuzz_preprocessing.json), plus the inputs the
fuzzing found, as regression tests, and the guard's contract in decode.py."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import pytest

from support.paths import ROOT
from preprocessing import PreprocessResult, VideoDecodeError, preprocess
from preprocessing.decode import VideoSource, _user_bytes
from preprocessing.limits import Limits

VIDEOS = ROOT / "tests" / "data" / "videos"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_preprocessing", ROOT / "bench" / "fuzz_preprocessing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


fuzz = _load_bench()


def test_mutated_corpus_files_decode_or_raise_video_decode_error() -> None:
    # Each case runs in a worker process: a case over 10 s counts as a hang, a signal as a crash.
    summary = fuzz.fuzz(60, seed=12345, timeout_s=10.0)
    assert summary["bugs"] == []
    assert set(summary["counts"]) == {"decoded", "VideoDecodeError"}  # both outcomes exercised
    assert sum(summary["counts"].values()) == 60
    assert len(summary["by_source"]) == len(fuzz.CORPUS)


def test_cases_are_reproducible_from_seed_and_number() -> None:
    first = list(fuzz.cases(18, seed=5))
    assert first == list(fuzz.cases(18, seed=5))
    assert [c.data for c in first] != [c.data for c in fuzz.cases(18, seed=6)]
    originals = {name: (VIDEOS / name).read_bytes() for name in fuzz.CORPUS}
    assert sum(c.data != originals[c.source] for c in first) >= 16  # a mutation may undo itself, rarely


def _one_frame_mp4() -> bytes:
    return (VIDEOS / "idx_one_frame_h264_320x240.mp4").read_bytes()


def test_unknown_codec_is_a_video_decode_error() -> None:
    # Found by fuzzing: an unknown sample entry leaves PyAV without a codec context (None), which
    # escaped as AttributeError: 'NoneType' object has no attribute 'width'.
    data = _one_frame_mp4().replace(b"avc1", b"zzzz")
    with pytest.raises(VideoDecodeError, match="unsupported or unrecognizable video codec"):
        preprocess(data)


def test_undecodable_metadata_string_does_not_reject_a_valid_video() -> None:
    # Found by fuzzing: a non-UTF-8 tag value escaped as UnicodeDecodeError from av.open. The video
    # itself is fine (old files carry Latin-1 titles), so it must decode.
    data = _one_frame_mp4()
    at = data.index(b"Lavf")  # the encoder tag's value
    res = preprocess(data[:at] + b"\xe1" + data[at + 1:])
    assert isinstance(res, PreprocessResult) and res.metadata.num_frames == 1


def test_guard_turns_unexpected_exceptions_into_video_decode_error_keeping_the_cause(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="preprocessing.decode"):
        with pytest.raises(VideoDecodeError) as err:
            with _user_bytes():
                raise AttributeError("'NoneType' object has no attribute 'width'")
    assert isinstance(err.value.__cause__, AttributeError)  # not silent: chained and logged
    assert "unexpected AttributeError" in caplog.text
    assert "/" not in str(err.value) and "NoneType" not in str(err.value)


def test_exceptions_of_the_callers_convert_pass_through_unchanged() -> None:
    class Boom(RuntimeError):
        pass

    def convert(rgb: object) -> object:
        raise Boom("a bug in the caller's code, not bad input")

    for name in ("idx_one_frame_h264_320x240.mp4", "animated.gif"):  # selective and sequential
        with pytest.raises(Boom):
            VideoSource((VIDEOS / name).read_bytes(), limits=Limits()).read([0], convert=convert)
