"""Triton-independent helpers for the model repository's python models.

The `model.py` files under `model_repository/` are thin adapters: they turn `pb_utils` tensors into the plain
numpy/dict views these modules take, call the native model, and turn the results back into tensors.
Everything here is importable and unit-testable without Triton.
"""
