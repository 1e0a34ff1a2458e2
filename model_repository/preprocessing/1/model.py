"""Triton adapter: video/image bytes + sampling options -> PIXEL_VALUES (fp16) + MEDIA_INFO + REQ_* fields.

Logic lives in videochat/serving/preprocess.py; this file only converts tensors and errors.
"""
import time

import triton_python_backend_utils as pb_utils

from videochat.serving.decode_worker import open_decoder
from videochat.serving.logs import tagged
from videochat.serving.metrics import PreprocessMetrics
from videochat.serving.preprocess import MediaCache, preprocess_request, warm_up
from videochat.serving.requests import RequestError, invalid_argument
from videochat.serving.settings import PreprocessSettings


class TritonPythonModel:
    def initialize(self, args):
        self.settings = PreprocessSettings.from_args(args)
        self.logger = pb_utils.Logger
        self.cache = MediaCache(self.settings.media_cache_bytes)
        self.metrics = PreprocessMetrics(pb_utils, model=args["model_name"],
                                         model_instance=args.get("model_instance_name", ""), cache=self.cache)
        # decode isolation: user bytes are decoded in a worker process that may crash, hang or blow up alone
        self.decoder = open_decoder(self.settings, log=self.logger.log_warn)
        if self.decoder.stats is not None:
            self.metrics.watch_decode_pool(self.decoder.stats)
        warm_up(self.settings, self.decoder.decode)   # a new instance is warm when Triton calls it READY
        self.logger.log_info(f"preprocessing ready: {self.settings}")

    def execute(self, requests):
        responses = [self._one(request) for request in requests]
        self.metrics.mirror.sync(force=True)
        return responses

    def _one(self, request):
        def get(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        t0, received = time.perf_counter(), time.time()
        request_id = request.request_id()
        try:
            arrays = preprocess_request(get, self.settings, self.cache, self.decoder.decode, received_unix=received,
                                        on_upload=self.metrics.on_upload)
        except RequestError as exc:
            self.metrics.on_request(time.perf_counter() - t0, "INVALID_ARGUMENT")
            self.logger.log_warn(tagged(request_id, f"invalid_arg: {invalid_argument(exc)}"))
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(invalid_argument(exc), pb_utils.TritonError.INVALID_ARG))
        except Exception as exc:  # noqa: BLE001 - a bug: INTERNAL for this request only, logged
            self.metrics.on_request(time.perf_counter() - t0, "INTERNAL")
            self.logger.log_error(tagged(request_id, f"preprocessing failed: {type(exc).__name__}: {exc}"))
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}", pb_utils.TritonError.INTERNAL))
        self.metrics.on_request(time.perf_counter() - t0)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])

    def finalize(self):
        self.decoder.close()
        self.logger.log_info("preprocessing finalized")
