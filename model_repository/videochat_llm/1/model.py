"""Triton adapter for the VideoChat model: a dynamic batch of requests -> one `generate_stream` call.

Decoupled (config `model_transaction_policy.decoupled: true`): every token event is sent as it comes, the last
response carries finish_reason and the FINAL flag. Not decoupled: one response per request, returned by execute.
Logic lives in videochat/serving/llm.py; this file only converts tensors, errors and flags.
"""
import triton_python_backend_utils as pb_utils

from videochat.serving.llm import batch_stats, build_chat_request, run_batch
from videochat.serving.metrics import LLMMetrics
from videochat.serving.requests import RequestError, invalid_argument
from videochat.serving.settings import LLMSettings

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from videochat.model import VideoChatModel

        self.settings = LLMSettings.from_args(args)
        self.logger = pb_utils.Logger
        dtype = None if self.settings.dtype == "auto" else getattr(torch, self.settings.dtype)
        self.model = VideoChatModel.from_checkpoint(self.settings.checkpoint, device=self.settings.device,
                                                    dtype=dtype)
        self.metrics = LLMMetrics(pb_utils, model=args["model_name"])
        self.logger.log_info(f"videochat_llm ready: {self.settings}")

    def execute(self, requests):
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
            chat_requests = [p.chat_request for p in parsed]
            should_stop = lambda j: requests[valid[j]].is_cancelled()  # noqa: E731 - checked between steps
            for reply in run_batch(self.model, chat_requests, should_stop=should_stop,
                                   streaming=senders is not None):
                i = valid[reply.index]
                if reply.error is not None:
                    self.logger.log_error(f"videochat_llm: {reply.error}")
                    respond(i, _error(reply.error, pb_utils.TritonError.INTERNAL))
                    continue
                if reply.final:
                    self.metrics.on_final(prompt_tokens=int(reply.arrays["PROMPT_TOKENS"][0, 0]),
                                          completion_tokens=int(reply.arrays["COMPLETION_TOKENS"][0, 0]))
                response = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, v) for k, v in reply.arrays.items()])
                if senders is not None and not reply.final:
                    senders[i].send(response)
                else:
                    respond(i, response)
        return None if senders is not None else responses

    def finalize(self):
        self.logger.log_info("videochat_llm finalized")


def _getter(request):
    def get(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()
    return get


def _error(message, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
