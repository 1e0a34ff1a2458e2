"""Bytes in memory -> the RGB frames at given indices, with PyAV (FFmpeg 8), frame-exact.

Frame numbering follows decord (the reference decoder): frame i is the i-th frame in presentation
order, and the frame count is the number of video packets. Frames are RGB24 via swscale's default
(BT.601) matrix, rotated by the display matrix with `np.rot90` like decord - bit-identical to
decord 0.6.0 on 8-bit content (docs/preprocessing.md, "Decoder").

Edit lists (MP4/MOV): frames an edit list hides (the pre-roll a stream-copy cut leaves before its
first shown frame) are frames here, because decord counts their packets. Frame i is the i-th coded
frame in presentation order, hidden ones first (negative `pts_seconds`), so `num_frames`, the sampled
indices, the card's message and decord's frame timestamps all equal the reference's. A player shows
fewer frames; following the edit list would change all of those. decord's pixels equal ours wherever
it seeks; inside the first GOP it returns frame i + hidden (its FFmpeg drops the hidden frames, its
counter does not), a decord bug we do not copy.

Two read strategies, both exact:
* selective (MP4/MOV, Matroska/WebM, whose packets carry real presentation timestamps): for each
  wanted frame, seek to the keyframe that starts its GOP, decode forward to it and drop the
  non-reference frames nobody asked for (`skip_frame="NONREF"`). Every wanted timestamp must come
  out of the decoder; if any seek lands wrong or a frame is missing we fall back to:
* sequential: decode every packet from the start and count output frames. Used for AVI, MPEG-TS,
  GIF, ... where timestamps are missing or in decode order.
"""

from __future__ import annotations

import bisect
import io
import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

import av
import numpy as np

from .errors import VideoDecodeError
from .limits import Limits

T = TypeVar("T")
_log = logging.getLogger(__name__)

# Demuxers whose packet pts are presentation timestamps we can seek to and match on.
_SEEKABLE_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"})
# Still-image demuxers (FFmpeg names them "<codec>_pipe" when probing bytes).
_IMAGE_FORMATS = frozenset({"image2", "image2pipe"})
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")


@dataclass(frozen=True)
class StreamInfo:
    """What the container header and the packet index say about the video stream."""

    container: str
    codec: str
    coded_width: int
    coded_height: int
    fps: float  # average frame rate, as decord's get_avg_fps()
    num_frames: int  # video packets, as decord's len(VideoReader)
    duration_s: float | None
    is_still_image: bool


@dataclass(frozen=True)
class _Packet:
    pts: int | None
    is_key: bool


def _is_still_image(fmt_name: str) -> bool:
    return fmt_name.endswith("_pipe") or fmt_name in _IMAGE_FORMATS


@contextmanager
def _user_bytes(passthrough: Collection[BaseException] = ()) -> Iterator[None]:
    """Every failure of PyAV/FFmpeg on the user's bytes leaves this block as VideoDecodeError.

    FFmpegError is the decoder saying the data is bad. Any other exception means a PyAV call
    returned or raised something this module did not expect for these bytes (a None codec context,
    an undecodable string, ...): from the caller's side still unusable input, so VideoDecodeError
    too, but logged with its traceback and kept as __cause__, so that a bug of ours is not
    silently reported as bad input. `passthrough`: exceptions of the caller's callback, not ours.
    """
    try:
        yield
    except VideoDecodeError:
        raise
    except av.error.FFmpegError as exc:
        raise VideoDecodeError(f"corrupt video data: {exc.strerror or 'decoder error'}") from exc
    except Exception as exc:
        if any(exc is e for e in passthrough):
            raise
        _log.warning("unexpected %s decoding user bytes, reported as corrupt input", type(exc).__name__,
                     exc_info=True)
        raise VideoDecodeError("corrupt or unsupported video data (the decoder failed)") from exc


def _open(data: bytes) -> av.container.InputContainer:
    if len(data) == 0:
        raise VideoDecodeError("empty input (0 bytes)")
    try:
        # "replace": a title in Latin-1 is no reason to refuse a video (strict raises UnicodeDecodeError).
        return av.open(io.BytesIO(data), mode="r", metadata_errors="replace")
    except av.error.FFmpegError as exc:
        if data[4:8] in _MP4_BOXES:
            raise VideoDecodeError(
                "truncated or corrupt MP4 or MOV file: the container index (moov) cannot be read") from exc
        raise VideoDecodeError("not a recognizable video or image format") from exc


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    try:
        stream = container.streams.best("video")  # decord's choice on multi-stream files
    except (ValueError, av.error.FFmpegError):
        stream = None
    if stream is None:
        raise VideoDecodeError("no video stream in the input (audio-only or empty container?)")
    if stream.codec_context is None:  # PyAV has no decoder for the codec id (unknown or corrupt header)
        raise VideoDecodeError("unsupported or unrecognizable video codec")
    return stream


def _fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _header_duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * Fraction(stream.time_base))
    if container.duration:
        return container.duration / av.time_base
    return None


def _index_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                   *, limits: Limits) -> list[_Packet]:
    """Demux (no decoding) to list the video packets in decode order; enforce the frame limit."""
    packets: list[_Packet] = []
    try:
        for pkt in container.demux(stream):
            if pkt.size == 0:  # PyAV's end-of-stream marker
                continue
            packets.append(_Packet(pts=pkt.pts, is_key=bool(pkt.is_keyframe)))
            if len(packets) > limits.max_frames:
                limits.check_length(num_frames=len(packets))
    except av.error.FFmpegError as exc:
        raise VideoDecodeError("truncated or corrupt video data (demuxing failed)") from exc
    if not packets:
        raise VideoDecodeError("video stream has no frames")
    return packets


# High-bit-depth 4:2:0 -> the 4:2:2 format `_rgb_as_ffmpeg41` rebuilds it in.
_DEEP_420_AS_422 = {"yuv420p10le": "yuv422p10le", "yuv420p12le": "yuv422p12le"}


def _plane_u16(plane: av.video.plane.VideoPlane) -> np.ndarray:
    """A [rows, width] uint16 view of a 10/12-bit plane (no copy; writable for a new frame)."""
    return np.frombuffer(plane, np.uint16).reshape(plane.height, plane.line_size // 2)[:, :plane.width]


def _rgb_as_ffmpeg41(frame: av.VideoFrame) -> np.ndarray | None:
    """RGB24 of a 10/12-bit 4:2:0 frame bit-identical to decord 0.6.0's; None where not covered.

    Why: 8-bit 4:2:0 takes swscale's unscaled yuv2rgb path, the same in decord's FFmpeg 4.1 and our
    FFmpeg 8. Deeper input takes the scaler (decord: its "scale" filter's default flags, bilinear), and
    there 4.1's vertical chroma step (yuv2packed1 with a 2-tap filter) does not interpolate: a row whose
    second weight is < 1/2 takes one line, the others the mean of two. So row 2k+1 takes chroma line k,
    row 2k the mean of lines k-1 and k, row 0 line 0 and the last row the mean of the last two lines.
    FFmpeg 8 applies the 1/4-3/4 weights and honours the frame's chroma siting (left): up to 190 RGB
    levels off decord at colour edges (mean 1.0 on the corpus HEVC Main10 clip).
    We build 4.1's chroma rows (a 4:2:2 frame: one chroma line per row, which swscale does not filter
    vertically) and let FFmpeg 8 convert that: its horizontal and YUV->RGB steps equal 4.1's. Bit-exact
    vs FFmpeg 4.1 on random planes (scripts/check_deep420_vs_ffmpeg41.py: every even width 2-128 and
    height 8-78, and 720p to 4K) and vs decord on 10- and 12-bit files (tests/test_preprocessing_tenbit.py).
    Odd sizes and heights < 8 take other 4.1 code paths; they keep FFmpeg 8's conversion.
    """
    fmt = _DEEP_420_AS_422.get(frame.format.name)
    width, height = frame.width, frame.height
    if fmt is None or width % 2 or height % 2 or height < 8:
        return None
    out = av.VideoFrame(width, height, fmt)
    out.colorspace, out.color_range = frame.colorspace, frame.color_range  # same matrix and range as decord
    src, dst = [_plane_u16(p) for p in frame.planes], [_plane_u16(p) for p in out.planes]
    dst[0][:] = src[0]
    for s, d in zip(src[1:], dst[1:]):  # s: height/2 chroma lines, d: height lines
        d[1::2] = s
        d[0] = s[0]
        np.add(s[:-1], s[1:], out=d[2::2])  # <= 2 * 4095: no uint16 overflow
        d[2::2] >>= 1
        d[-1] = (s[-2] + s[-1]) >> 1
    return out.to_ndarray(format="rgb24")


def _to_rgb(frame: av.VideoFrame, *, limits: Limits) -> np.ndarray:
    """RGB24 [H, W, 3] uint8 in display orientation (decord applies the display matrix too)."""
    limits.check_frame_size(width=frame.width, height=frame.height)
    rgb = _rgb_as_ffmpeg41(frame)  # 10/12-bit 4:2:0; None for 8-bit and everything else
    if rgb is None:
        rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = (frame.rotation or 0) // 90
    if quarter_turns % 4:
        rgb = np.ascontiguousarray(np.rot90(rgb, quarter_turns))
    return rgb


class VideoSource:
    """An opened input: header checked against `limits`, packets indexed; `read` decodes frames.

    Not shared between threads: each `preprocess` call opens its own.
    """

    def __init__(self, data: bytes, *, limits: Limits) -> None:
        limits.check_bytes(size=len(data))
        self._data = data
        self._limits = limits
        with _user_bytes(), _open(data) as container:
            stream = _video_stream(container)
            cc = stream.codec_context
            if cc.width and cc.height:  # 0 when only the decoder knows; checked per frame then
                limits.check_frame_size(width=cc.width, height=cc.height)
            duration_s = _header_duration_s(container, stream)
            limits.check_length(num_frames=stream.frames or None, duration_s=duration_s)
            fmt = container.format.name
            self._packets = _index_packets(container, stream, limits=limits)
            self.info = StreamInfo(
                container=fmt, codec=cc.name, coded_width=cc.width, coded_height=cc.height,
                fps=_fps(stream), num_frames=len(self._packets), duration_s=duration_s,
                is_still_image=_is_still_image(fmt))
            self._stream_index = stream.index
            self._time_base = Fraction(stream.time_base) if stream.time_base else None
        self.pts_seconds: dict[int, float | None] = {}
        self.strategy = ""  # "selective" or "sequential" after read(), for tests and metadata

    def read(self, indices: list[int], *, convert: Callable[[np.ndarray], T]) -> list[T]:
        """`convert(rgb)` of the frame at each index (in the order given; repeats decoded once)."""
        wanted = sorted(set(indices))
        if wanted[0] < 0 or wanted[-1] >= self.info.num_frames:
            raise ValueError(f"frame index out of range 0..{self.info.num_frames - 1}: {indices}")
        convert_errors: list[BaseException] = []

        def checked(rgb: np.ndarray) -> T:  # the caller's exceptions are not decoder failures
            try:
                return convert(rgb)
            except BaseException as exc:
                convert_errors.append(exc)
                raise

        out: dict[int, T] | None = None
        with _user_bytes(passthrough=convert_errors):
            if self.info.container in _SEEKABLE_FORMATS and self._has_unique_pts():
                out = self._read_selective(wanted, checked)
                self.strategy = "selective"
            if out is None:
                out = self._read_sequential(wanted, checked)
                self.strategy = "sequential"
        return [out[i] for i in indices]

    # -- strategies -----------------------------------------------------------------------------

    def _has_unique_pts(self) -> bool:
        pts = [p.pts for p in self._packets]
        return None not in pts and len(set(pts)) == len(pts)

    def _container(self) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
        container = _open(self._data)
        stream = next(s for s in container.streams if s.index == self._stream_index)
        stream.codec_context.thread_count = 1  # skip_frame is switched per packet
        return container, stream

    def _read_selective(self, wanted: list[int], convert: Callable[[np.ndarray], T]) -> dict[int, T] | None:
        by_pts = sorted(p.pts for p in self._packets)
        want_pts = {by_pts[i]: i for i in wanted}
        ranges = _decode_ranges(self._packets, set(want_pts))
        pos_of_pts = {p.pts: k for k, p in enumerate(self._packets)}
        got: dict[int, T] = {}
        container, stream = self._container()
        with container:
            cc = stream.codec_context
            for start, end in ranges:
                try:
                    container.seek(self._packets[start].pts, stream=stream, backward=True, any_frame=False)
                except av.error.FFmpegError:
                    return None  # sequential decoding may still read it
                frames: list[av.VideoFrame] = []
                landed = False
                for pkt in _demux(container, stream):
                    pos = pos_of_pts.get(pkt.pts)
                    if pos is None:
                        return None  # a packet the index did not see: do not trust the mapping
                    if not landed and pos > start:
                        return None  # seek overshot the GOP start
                    landed = True
                    if pos < start:
                        continue
                    cc.skip_frame = "DEFAULT" if pkt.pts in want_pts else "NONREF"
                    frames.extend(_decode(cc, pkt))
                    if pos >= end:
                        break
                cc.skip_frame = "DEFAULT"
                frames.extend(_decode(cc, None))  # drain the reorder buffer
                cc.flush_buffers()
                for frame in frames:
                    if frame.pts in want_pts and want_pts[frame.pts] not in got:
                        got[want_pts[frame.pts]] = convert(_to_rgb(frame, limits=self._limits))
                        self.pts_seconds[want_pts[frame.pts]] = self._seconds(frame.pts)
        return got if len(got) == len(wanted) else None

    def _seconds(self, pts: int | None) -> float | None:
        return float(pts * self._time_base) if pts is not None and self._time_base else None

    def _read_sequential(self, wanted: list[int], convert: Callable[[np.ndarray], T]) -> dict[int, T]:
        want = set(wanted)
        got: dict[int, T] = {}
        container, stream = self._container()
        with container:
            cc = stream.codec_context
            i = 0
            for pkt in _demux(container, stream, flush=True):
                for frame in _decode(cc, pkt):
                    if i in want:
                        got[i] = convert(_to_rgb(frame, limits=self._limits))
                        self.pts_seconds[i] = self._seconds(frame.pts)
                    i += 1
                if i > wanted[-1]:
                    break
        if len(got) != len(wanted):
            raise VideoDecodeError(
                f"truncated or corrupt video: only {i} of {self.info.num_frames} frames decodable")
        return got


def _demux(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
           *, flush: bool = False) -> Iterator[av.Packet]:
    """Packets of `stream`; the final empty packet (decoder flush) only if `flush`."""
    try:
        for pkt in container.demux(stream):
            if pkt.size or flush:
                yield _undiscarded(pkt) if pkt.is_discard else pkt
    except av.error.FFmpegError as exc:
        raise VideoDecodeError("truncated or corrupt video data (demuxing failed)") from exc


def _undiscarded(pkt: av.Packet) -> av.Packet:
    """`pkt` without the discard flag, so the decoder outputs its frame instead of dropping it.

    The MP4 demuxer flags the frames an edit list hides (pre-roll before the first shown frame);
    they are packets decord counts, so they are frames here too (module docstring). PyAV cannot
    clear the flag in place, hence a copy (only of the hidden packets).
    """
    copy = av.Packet(bytes(pkt))
    copy.pts, copy.dts, copy.duration, copy.time_base = pkt.pts, pkt.dts, pkt.duration, pkt.time_base
    copy.is_keyframe = pkt.is_keyframe
    for side_data in pkt.iter_sidedata():
        copy.set_sidedata(side_data)
    return copy


def _decode(cc: av.codec.context.CodecContext, pkt: av.Packet | None) -> list[av.VideoFrame]:
    try:
        return cc.decode(pkt)
    except av.error.EOFError:
        return []
    except av.error.FFmpegError as exc:
        raise VideoDecodeError(f"corrupt video data: {exc.strerror or 'decoder error'}") from exc


def _decode_ranges(packets: list[_Packet], want_pts: set[int]) -> list[tuple[int, int]]:
    """Merged [start, end] packet ranges (decode order) that decode every wanted frame.

    A frame's range starts at the last keyframe before its packet whose pts is not after the
    frame's pts: an open-GOP leading picture (pts before its keyframe's) needs the previous GOP.
    """
    keys = [k for k, p in enumerate(packets) if p.is_key] or [0]
    spans: list[tuple[int, int]] = []
    for pos, pkt in enumerate(packets):
        if pkt.pts not in want_pts:
            continue
        k = bisect.bisect_right(keys, pos) - 1
        while k > 0 and packets[keys[k]].pts > pkt.pts:
            k -= 1
        spans.append((keys[max(k, 0)] if k >= 0 else 0, pos))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
