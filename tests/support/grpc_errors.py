"""A grpc.RpcError with a chosen status and details, for the client's error classification (no server: the
real errors these stand for are quoted next to each use). Torch-free, so the client's tests run without it."""
from __future__ import annotations

import grpc


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details
