"""Installed as `videochat.launch.model_repository` (package data: the templates and thin model.py adapters).
The launcher renders it into a self-contained repository; Triton never reads this directory directly."""
