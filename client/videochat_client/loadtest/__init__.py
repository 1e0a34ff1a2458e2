"""`videochat loadtest`: the client's load generator (closed-loop concurrency sweeps, open-loop Poisson rate
sweeps of multi-turn sessions, with Triton's metrics as the server-side view). The docstring of `runner` tells
what a session is, how both loops work and where the metric names come from.

One job per module: `config` (LoadConfig, its limits), `runner` (sends the requests), `report` (statistics,
JSON/CSV/PNG outputs). The names below are re-exported so `from videochat_client.loadtest import X` keeps working."""
from .config import (DEFAULT_PROMPTS, MAX_CONCURRENCY, MAX_DURATION_S, MAX_INFLIGHT, MAX_LEVELS, MAX_RATE,
                     MAX_REQUESTS, MAX_TURNS, LoadConfig)
from .report import CSV_FIELDS, Record, csv_rows, plot_report, summarize, write_outputs
from .runner import run_loadtest
from .server_info import default_metrics_url

__all__ = [
    "DEFAULT_PROMPTS", "MAX_CONCURRENCY", "MAX_DURATION_S", "MAX_INFLIGHT", "MAX_LEVELS", "MAX_RATE", "MAX_REQUESTS",
    "MAX_TURNS", "LoadConfig",
    "CSV_FIELDS", "Record", "csv_rows", "plot_report", "summarize", "write_outputs",
    "default_metrics_url", "run_loadtest",
]
