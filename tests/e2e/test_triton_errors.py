"""Every reject-file of the corpus and bad generation parameters come back as INVALID_ARGUMENT with a message
(streaming and unary), a bad request never fails its batch-mates, and the server keeps answering."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from tritonclient.utils import InferenceServerException
from videochat_client import InvalidArgument, VideoChatError

from support.paths import TINY, VIDEOS
from support.server import llm_inputs

MANIFEST = json.loads((VIDEOS / "manifest.json").read_text())
REJECTS = [f["file"] for f in MANIFEST["files"] if f["expected"].startswith("reject")]
GOOD = dict(video=(TINY / "videos" / "example1.mp4").read_bytes(), prompt="Describe the video.", max_new_tokens=3)
# (max_new_tokens=0 never leaves the client: GenerationOptions refuses it; and the client always sends history
# as valid JSON. The server's own checks of both are in tests/unit/test_serving_logic.py.)
BAD_PARAMS = [dict(max_new_tokens=10**6), dict(temperature=-1.0), dict(top_p=0.0),
              dict(top_k=-1), dict(repetition_penalty=0.0), dict(num_segments=0),
              dict(prompt="")]


def invalid_argument(call) -> str:
    """The client maps the error to InvalidArgument: from the gRPC status (unary), or from the message's
    "invalid argument: " prefix (inside a stream Triton sends only a message)."""
    with pytest.raises(InvalidArgument) as err:
        call()
    assert "invalid argument: " in err.value.message
    assert "Traceback" not in err.value.message
    return err.value.message


def test_reject_files_are_invalid_argument(triton):
    assert len(REJECTS) >= 4
    for name in REJECTS:
        message = invalid_argument(lambda: triton.stream(video=(VIDEOS / name).read_bytes(), prompt="Describe."))
        print(name, "->", message)
    assert triton.stream(**GOOD).usage.completion_tokens == 3


@pytest.mark.parametrize("bad", BAD_PARAMS, ids=[next(iter(b)) + "=" + str(next(iter(b.values()))) for b in BAD_PARAMS])
def test_bad_parameters_are_invalid_argument(triton, bad):
    invalid_argument(lambda: triton.infer(model="videochat_unary", **{**GOOD, **bad}))


def test_bad_request_does_not_fail_batch_mates(triton):
    jobs = [dict(GOOD, prompt=f"Question {i}?") for i in range(6)]
    jobs[2] = dict(GOOD, video=(VIDEOS / "random_bytes_64k.mp4").read_bytes())
    jobs[4] = dict(GOOD, temperature=-1.0)

    def run(fields):
        try:
            return triton.stream(**fields)
        except VideoChatError as exc:
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for i, res in enumerate(results):
        if i in (2, 4):
            assert isinstance(res, InvalidArgument) and "invalid argument: " in res.message
        else:
            assert not isinstance(res, Exception), res
            assert res.usage.completion_tokens == 3


def test_bad_request_inside_an_llm_batch_fails_alone(triton):
    """Straight to videochat_llm_unary (all inputs required): a request with bad MEDIA_INFO in the same dynamic
    batch as good ones gets INVALID_ARGUMENT; the others get their answers."""
    def run(media_info: bytes):
        try:
            return triton.client().infer("videochat_llm_unary", llm_inputs("What is the man holding?", 4,
                                                                           media_info)).as_numpy("TEXT")[0, 0]
        except InferenceServerException as exc:
            return exc

    infos = [b'{"media_type": "image"}'] * 6
    infos[1] = b'{"media_type": "audio"}'
    with ThreadPoolExecutor(len(infos)) as pool:
        results = list(pool.map(run, infos))
    assert isinstance(results[1], InferenceServerException) and "INVALID_ARGUMENT" in str(results[1].status())
    good = [r for i, r in enumerate(results) if i != 1]
    assert all(isinstance(r, bytes) for r in good) and len(set(good)) == 1, results
