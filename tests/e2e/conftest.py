"""The e2e tests' shared server: ONE real tritonserver for the session (only if a test asks for it), rendered
and started with the launcher's own code: the tiny fixture checkpoint, CPU, free ports.

It serves the decoupled pair (`videochat` -> `videochat_llm`, streaming) and the unary pair
(`videochat_unary` -> `videochat_llm_unary`, `decoupled: false`) sharing one preprocessing model, so the
streaming-vs-unary test needs no second server.
"""
from __future__ import annotations

import pytest

from support.server import running_server


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    # stream_interval_ms 0: one response per token (tests check token-by-token delivery); the coalescing policy
    # itself is unit-tested in tests/unit/test_scheduler.py
    with running_server(tmp_path_factory.mktemp("triton"), max_batch_size=8, max_queue_delay_us=20000,
                        preprocess_instances=1, extra_unary_variant=True, stream_interval_ms=0) as handle:
        yield handle
