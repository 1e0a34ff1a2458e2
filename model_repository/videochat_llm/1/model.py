"""Triton adapter for the VideoChat model (vision encoder + QFormer + LLM).

Decoupled + `batching: inflight` (the default): execute() parses the requests, hands them to the scheduler
(videochat/serving/scheduler.py) and returns None; the scheduler's thread merges them into the running batch
between decode steps and streams (coalesced) responses through each request's sender.
Decoupled + `batching: static`: one generate_stream per execute, every token sent as it comes.
Not decoupled: one generate per execute, one response per request returned by execute.
Logic lives in videochat/serving/{llm,scheduler}.py; this file only converts tensors, errors and flags.
"""
import triton_python_backend_utils as pb_utils

from videochat.serving.llm import CpuThreadsEngine, batch_stats, build_chat_request, run_batch
from videochat.serving.metrics import LLMMetrics
from videochat.serving.requests import RequestError, invalid_argument
from videochat.serving.scheduler import INVALID_ARG, UNAVAILABLE, Job, Scheduler
from videochat.serving.settings import LLMSettings

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_INTERVAL_MS = 20   # request.is_cancelled() is an IPC to the server: not on every decode step


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from videochat.model.videochat_model import VideoChatModel

        self.settings = LLMSettings.from_args(args)
        self.logger = pb_utils.Logger
        dtype = None if self.settings.dtype == "auto" else getattr(torch, self.settings.dtype)
        self.model = VideoChatModel.from_checkpoint(self.settings.checkpoint, device=self.settings.device,
                                                    dtype=dtype)
        self.metrics = LLMMetrics(pb_utils, model=args["model_name"], instance=args.get("model_instance_name", ""))
        self.scheduler = None
        if self.settings.inflight:
            from videochat.runtime.engine import GenerationEngine
            from videochat.runtime.visual_cache import VisualCache

            cache = VisualCache(self.settings.visual_cache_bytes) if self.settings.visual_cache_bytes else None
            threads = torch.get_num_threads()

            def make_engine():
                engine = GenerationEngine(self.model, visual_cache=cache)
                if self.settings.device == "cpu" and self.settings.decode_threads:
                    engine = CpuThreadsEngine(engine, add_threads=threads, step_threads=self.settings.decode_threads)
                return engine

            self.scheduler = Scheduler(make_engine, max_active=self.settings.max_active,
                                       stream_interval_ms=self.settings.stream_interval_ms,
                                       log_error=self.logger.log_error, on_progress=self._on_progress,
                                       cancel_check_interval_ms=CANCEL_CHECK_INTERVAL_MS)
            self.metrics.watch_scheduler(self.scheduler)
            if cache is not None:
                self.metrics.watch_visual_cache(cache)
            self.scheduler.start()
        self.logger.log_info(f"videochat_llm ready: {self.settings}")

    def execute(self, requests):
        if self.scheduler is not None:
            return self._enqueue(requests)
        return self._static(requests)

    def _enqueue(self, requests):
        jobs, parsed = [], []
        for request in requests:
            sink = _Sink(request.get_response_sender(), self.metrics)
            try:
                p = build_chat_request(_getter(request), max_new_tokens_limit=self.settings.max_new_tokens_limit)
            except RequestError as exc:   # this request only; its batch-mates go on
                self.metrics.rejected.increment(1)
                sink.fail(invalid_argument(exc), code=INVALID_ARG)
                continue
            parsed.append(p)
            jobs.append(Job(chat_request=p.chat_request, sink=sink, is_cancelled=request.is_cancelled))
        if jobs:
            self.metrics.on_batch(batch_stats(parsed))
            self.scheduler.submit(jobs)
        return None

    def _on_progress(self, scheduler):
        self.metrics.mirror.sync(force=not scheduler.num_active)

    def _static(self, requests):
        senders = [r.get_response_sender() for r in requests] if self.settings.decoupled else None
        responses = [None] * len(requests)

        def respond(i, response):
            if senders is not None:
                senders[i].send(response, flags=FINAL)
            else:
                responses[i] = response

        valid, parsed = [], []
        for i, request in enumerate(requests):
            try:
                parsed.append(build_chat_request(_getter(request),
                                                 max_new_tokens_limit=self.settings.max_new_tokens_limit))
                valid.append(i)
            except RequestError as exc:   # this request only; its batch-mates go on
                self.metrics.rejected.increment(1)
                respond(i, _error(invalid_argument(exc), pb_utils.TritonError.INVALID_ARG))

        if valid:
            self.metrics.on_batch(batch_stats(parsed))
            should_stop = lambda j: requests[valid[j]].is_cancelled()  # noqa: E731 - checked between steps
            for reply in run_batch(self.model, [p.chat_request for p in parsed], should_stop=should_stop,
                                   streaming=senders is not None):
                i = valid[reply.index]
                if reply.error is not None:
                    self.logger.log_error(f"videochat_llm: {reply.error}")
                    respond(i, _error(reply.error, pb_utils.TritonError.INTERNAL))
                    continue
                if reply.final:
                    self.metrics.on_final(prompt_tokens=int(reply.arrays["PROMPT_TOKENS"][0, 0]),
                                          completion_tokens=int(reply.arrays["COMPLETION_TOKENS"][0, 0]))
                response = _response(reply.arrays)
                if senders is not None and not reply.final:
                    senders[i].send(response)
                else:
                    respond(i, response)
        return None if senders is not None else responses

    def finalize(self):
        if self.scheduler is not None:
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
        codes = {INVALID_ARG: pb_utils.TritonError.INVALID_ARG, UNAVAILABLE: pb_utils.TritonError.UNAVAILABLE}
        self.sender.send(_error(message, codes.get(code, pb_utils.TritonError.INTERNAL)), flags=FINAL)


def _getter(request):
    def get(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()
    return get


def _response(arrays):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])


def _error(message, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
