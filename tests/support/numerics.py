"""Float comparisons for the suite: tolerances scale with the magnitude of the values compared.

Reduction order (BLAS kernels, thread count, SIMD width) differs between CPUs, and the noise it causes
grows with the values' size, so an absolute bound that held on one machine fails on another. Each test
states a relative bound `rel`; the absolute slack is `rel * max|expected|`.
"""
from __future__ import annotations

import torch


def scale_of(expected: torch.Tensor) -> float:
    """The magnitude the noise scales with: the largest |value| (1.0 for an all-zero tensor)."""
    peak = expected.detach().abs().max().item() if expected.numel() else 0.0
    return peak or 1.0


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, *, rel: float, msg: str | None = None) -> None:
    """Elementwise |actual - expected| <= rel * max|expected|, dtype and shape as torch.testing checks them."""
    expected = torch.as_tensor(expected)
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale_of(expected), msg=msg)
