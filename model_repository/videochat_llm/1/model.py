"""Triton adapter for the VideoChat model (vision encoder + QFormer + LLM).

Every request goes through one scheduler (videochat/serving/scheduler.py): execute() parses the requests and
submits them; the scheduler's thread merges them into the running batch between decode steps.
Decoupled: execute returns None and the scheduler streams (coalesced) responses through each request's sender.
Not decoupled: each job holds its whole answer in a BlockingSink, and execute returns them once all are done.
This file only converts tensors, errors and flags; the logic lives in videochat/serving/.
"""
import time

import triton_python_backend_utils as pb_utils

from videochat.serving.llm import (CpuThreadsEngine, MediaReferences, StreamCoalescer, arrival_on, batch_stats,
                                   build_chat_request)
from videochat.serving.logs import tagged
from videochat.serving.metrics import LLMMetrics
from videochat.serving.requests import MediaNotCached, RequestError, invalid_argument, not_cached, parse_timeout_ms
from videochat.serving.scheduler import (DEADLINE, INVALID_ARG, NOT_FOUND, UNAVAILABLE, BlockingSink, Job,
                                         Scheduler)
from videochat.serving.settings import LLMSettings

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_INTERVAL_MS = 20   # request.is_cancelled() is an IPC to the server: not on every decode step


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from videochat.model.videochat_model import VideoChatModel
        from videochat.runtime.engine import GenerationEngine
        from videochat.runtime.visual_cache import VisualCache

        self.settings = s = LLMSettings.from_args(args)
        self.logger = pb_utils.Logger
        dtype = None if s.dtype == "auto" else getattr(torch, s.dtype)
        self.model = VideoChatModel.from_checkpoint(s.checkpoint, device=s.device, dtype=dtype)
        self.metrics = LLMMetrics(pb_utils, model=args["model_name"],
                                  model_instance=args.get("model_instance_name", ""))
        cache = VisualCache(s.visual_cache_bytes) if s.visual_cache_bytes else None
        self.references = MediaReferences(cache)   # this instance's secret: keys are valid here only
        threads = torch.get_num_threads()

        def make_engine():
            engine = GenerationEngine(self.model, visual_cache=cache)
            if s.device == "cpu" and s.decode_threads:
                engine = CpuThreadsEngine(engine, add_threads=threads, step_threads=s.decode_threads)
            return engine

        self.scheduler = Scheduler(make_engine, max_active=s.max_active, stream_interval_ms=s.stream_interval_ms,
                                   log_error=self.logger.log_error, on_progress=self._on_progress,
                                   cancel_check_interval_ms=CANCEL_CHECK_INTERVAL_MS,
                                   join_running=s.batching == "inflight", max_queue=s.max_queue,
                                   request_timeout_s=s.request_timeout_s,
                                   log_request_error=lambda rid, m: self.logger.log_warn(tagged(rid, m)))
        self.metrics.watch_scheduler(self.scheduler)
        if cache is not None:
            self.metrics.watch_visual_cache(cache)
        self.metrics.watch_references(self.references)
        self.scheduler.start()
        self.logger.log_info(f"videochat_llm ready: {s}")

    def execute(self, requests):
        unary = not self.settings.decoupled
        jobs, parsed, sinks, missed = [], [], [], False
        for request in requests:
            sink = BlockingSink() if unary else _Sink(request.get_response_sender(), self.metrics)
            sinks.append(sink)
            request_id = request.request_id()
            try:
                p = build_chat_request(_getter(request), max_new_tokens_limit=self.settings.max_new_tokens_limit,
                                       references=self.references)
                timeout_ms = parse_timeout_ms(request.parameters())   # the ensemble passes them to every step
            except RequestError as exc:   # this request only; its batch-mates go on
                self.metrics.on_rejected()
                self.logger.log_warn(tagged(request_id, f"{INVALID_ARG}: {invalid_argument(exc)}"))
                sink.fail(invalid_argument(exc), code=INVALID_ARG)
                continue
            except MediaNotCached as exc:   # counted by self.references; the client resends with the bytes
                self.logger.log_info(tagged(request_id, f"{NOT_FOUND}: {not_cached(exc)}"))
                sink.fail(not_cached(exc), code=NOT_FOUND)
                missed = True
                continue
            parsed.append(p)
            arrived = arrival_on(self.scheduler.clock(), p.received_unix, now_unix=time.time())
            jobs.append(Job(chat_request=p.chat_request, sink=sink, is_cancelled=request.is_cancelled,
                            coalescer=StreamCoalescer(None, media_key=p.media_key) if unary else None,
                            timeout_ms=timeout_ms, request_id=request_id, arrived_at=arrived,
                            media_key=p.media_key))   # unary coalescer: only the final
        if jobs:
            self.metrics.on_batch(batch_stats(parsed))
            self.scheduler.submit(jobs)
        if missed:   # nothing may reach the scheduler, whose progress syncs the counters otherwise
            self.metrics.mirror.sync(force=True)
        return [self._unary_response(sink) for sink in sinks] if unary else None

    def _unary_response(self, sink):
        sink.wait()
        if sink.error is not None:
            message, code = sink.error
            return _error(message, _code(code))
        self.metrics.on_final(prompt_tokens=int(sink.arrays["PROMPT_TOKENS"][0, 0]),
                              completion_tokens=int(sink.arrays["COMPLETION_TOKENS"][0, 0]))
        return _response(sink.arrays)

    def _on_progress(self, scheduler):
        self.metrics.mirror.sync(force=not scheduler.num_active)

    def finalize(self):
        self.scheduler.stop()
        self.metrics.mirror.sync(force=True)
        self.logger.log_info("videochat_llm finalized")


class _Sink:
    """The scheduler's view of one response sender."""

    def __init__(self, sender, metrics):
        self.sender, self.metrics = sender, metrics

    def send(self, arrays, *, final):
        if final:
            self.metrics.on_final(prompt_tokens=int(arrays["PROMPT_TOKENS"][0, 0]),
                                  completion_tokens=int(arrays["COMPLETION_TOKENS"][0, 0]))
            self.sender.send(_response(arrays), flags=FINAL)
        else:
            self.sender.send(_response(arrays))

    def fail(self, message, *, code):
        self.sender.send(_error(message, _code(code)), flags=FINAL)


def _code(code):
    """The scheduler's error code -> Triton's (pb_utils.TritonError exists only once the stub runs a model).
    Triton has no DEADLINE_EXCEEDED: CANCELLED it is, and the message's "deadline exceeded: " prefix says why."""
    e = pb_utils.TritonError
    return {INVALID_ARG: e.INVALID_ARG, UNAVAILABLE: e.UNAVAILABLE, DEADLINE: e.CANCELLED,
            NOT_FOUND: e.NOT_FOUND}.get(code, e.INTERNAL)


def _getter(request):
    def get(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()
    return get


def _response(arrays):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])


def _error(message, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
