"""`videochat loadtest`: closed-loop concurrency sweeps and open-loop (Poisson) rate sweeps of multi-turn
sessions against the `videochat` ensemble, with a server-side view from Triton's Prometheus metrics.

A *session* is one conversation about one of the given videos (round robin) with `turns` questions; each turn
is one request (the whole video + history travel every turn: the server is stateless). A failed turn ends
its session (later turns would need its answer).

* closed loop, `concurrency=C`: C workers each run sessions back to back;
* open loop, `rate=R` (requests/s): sessions start as a Poisson process of rate R/turns, so the offered
  request rate is R; at most `max_inflight` sessions run at once (arrivals beyond wait, and are counted).

Metric names follow genai-perf/vLLM bench (request_throughput -> `requests_per_second`,
output_token_throughput -> `output_tokens_per_second`, request_latency -> `latency_ms`,
time_to_first_token -> `time_to_first_token_ms`, inter_token_latency -> `inter_token_latency_ms`).
Throughputs count successful requests over the level's wall time (first send to last completion)."""
from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import __version__
from ..aio import AsyncVideoChatClient
from ..errors import VideoChatError
from ..metrics import Scrape, server_view, try_scrape
from ..protocol import load_media
from ..retry import RetryPolicy
from .config import MAX_REQUESTS, LoadConfig
from .report import Record, summarize
from .server_info import fleet_scrape, model_config, scrape_all


@dataclass
class _Budget:
    """Request slots of one level: a count and a wall-clock limit. `take()` claims one slot."""

    remaining: int
    stop_at: float
    issued: int = 0

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.stop_at:
            return False
        self.remaining -= 1
        self.issued += 1
        return True


class _Progress:
    """One status line on stderr (carriage-return updates on a terminal, a final line otherwise)."""

    def __init__(self, label: str, total: Optional[int], *, stream=sys.stderr):
        self.label, self.total, self.stream = label, total, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.done = self.errors = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.errors += 0 if ok else 1
        now = time.perf_counter()
        if self.tty and now - self._last > 0.1:
            self._last = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def _line(self) -> str:
        el = time.perf_counter() - self.t0
        if self.total:
            width = 24
            filled = int(width * min(1.0, self.done / self.total))
            bar = "#" * filled + "." * (width - filled)
            return f"{self.label} [{bar}] {self.done}/{self.total} errors {self.errors} {el:6.1f}s"
        return f"{self.label} {self.done} requests, errors {self.errors} {el:6.1f}s"

    def close(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self._line() + "\n")
        self.stream.flush()


class _Runner:
    def __init__(self, cfg: LoadConfig, clients: Sequence[Tuple[str, AsyncVideoChatClient]], videos: List[bytes]):
        self.cfg, self.clients, self.videos = cfg, list(clients), videos
        self._next_video = 0
        self._next_client = 0
        self.rng = random.Random(cfg.seed)

    def _client(self) -> Tuple[str, AsyncVideoChatClient]:
        """Sessions spread round robin over the replicas (--url several times)."""
        pair = self.clients[self._next_client % len(self.clients)]
        self._next_client += 1
        return pair

    def _video(self) -> bytes:
        v = self.videos[self._next_video % len(self.videos)]
        self._next_video += 1
        return v

    async def session(self, budget: _Budget, records: List[Record], t0: float, progress: Optional[_Progress]):
        replica, client = self._client()
        conv = client.conversation(self._video(), media_reference=self.cfg.media_reference,
                                   **asdict(self.cfg.media))
        for turn in range(self.cfg.turns):
            if not budget.take():
                return
            question = self.cfg.prompts[turn % len(self.cfg.prompts)]
            start = time.perf_counter()
            rec = Record(start=start - t0, end=0.0, turn=turn, replica=replica)
            try:
                if self.cfg.stream:
                    stream = conv.ask_stream(question, max_new_tokens=self.cfg.max_new_tokens)
                    async for _ in stream:
                        pass
                    answer = stream.answer
                else:
                    answer = await conv.ask(question, max_new_tokens=self.cfg.max_new_tokens)
                rec.latency_ms = answer.timings.latency_ms
                rec.ttft_ms = answer.timings.time_to_first_token_ms
                rec.itl_ms = answer.timings.inter_token_latency_ms
                rec.prompt_tokens = answer.usage.prompt_tokens
                rec.output_tokens = answer.usage.completion_tokens
                rec.request_id, rec.finish_reason = answer.request_id, answer.finish_reason
                rec.video_bytes_sent = answer.video_bytes_sent
                rec.reuploaded = answer.reuploaded
            except VideoChatError as e:
                rec.error, rec.error_message = e.code, e.message
                rec.request_id = e.request_id or ""
            rec.end = time.perf_counter() - t0
            records.append(rec)
            if progress:
                progress.update(rec.error is None)
            if rec.error is not None:
                return

    async def closed_loop(self, concurrency: int, budget: _Budget, progress: Optional[_Progress]):
        records: List[Record] = []
        t0 = time.perf_counter()

        async def worker():
            while budget.remaining > 0 and time.perf_counter() < budget.stop_at:
                await self.session(budget, records, t0, progress)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, {}

    async def open_loop(self, rate: float, budget: _Budget, progress: Optional[_Progress]):
        records: List[Record] = []
        t0 = time.perf_counter()
        slots = asyncio.Semaphore(self.cfg.max_inflight)
        waited = 0
        tasks = []
        session_rate = rate / self.cfg.turns
        next_at = t0

        async def run():
            try:
                await self.session(budget, records, t0, progress)
            finally:
                slots.release()

        while budget.remaining > 0:
            next_at += self.rng.expovariate(session_rate)
            delay = next_at - time.perf_counter()
            if next_at >= budget.stop_at:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            if slots.locked():
                waited += 1
            await slots.acquire()
            tasks.append(asyncio.ensure_future(run()))
            # Do not start sessions whose first turn cannot claim a slot.
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return records, {"arrivals_delayed_by_max_inflight": waited}



async def _settled_scrape(urls: Sequence[str], before: Optional[Scrape], successes: int, *, model: str = "videochat",
                          wait_s: float = 3.0):
    """Scrape every replica after a level -> (each replica's scrape, the fleet's sum, an error). Triton counts a
    decoupled request when it is released, which can be a moment after the client saw its final response, so
    poll briefly until the fleet's success counter of the model caught up."""
    stop = time.perf_counter() + wait_s
    while True:
        afters, errors = scrape_all(urls, try_scrape)
        after, err = fleet_scrape(afters), next((e for e in errors if e), None)
        if after is None or before is None or time.perf_counter() >= stop:
            return afters, after, err
        done = after.get("nv_inference_request_success", model=model) - before.get("nv_inference_request_success",
                                                                                    model=model)
        if done >= successes:
            return afters, after, err
        await asyncio.sleep(0.25)


def _client_for(cfg: LoadConfig, url: str) -> AsyncVideoChatClient:
    return AsyncVideoChatClient(url, timeout=cfg.timeout, model_name=cfg.model_name, connections=cfg.connections,
                                retry_policy=RetryPolicy(max_retries=cfg.retries, initial_backoff=0.1),
                                ssl=cfg.ssl, root_certificates=cfg.root_certificates, private_key=cfg.private_key,
                                certificate_chain=cfg.certificate_chain, headers=dict(cfg.headers))


def _server_configs(cfg: LoadConfig, clients) -> Dict[str, object]:
    """Each replica's model configuration (Triton's model-config API), taken before the first level."""
    return {url: model_config(client.config.tritonclient_kwargs(url), cfg.model_name) for url, client in clients}


async def run_loadtest(cfg: LoadConfig, *, progress_stream=sys.stderr,
                       records_sink: Optional[Callable[[Dict[str, object], List[Record]], None]] = None
                       ) -> Dict[str, object]:
    """Run the sweep; `records_sink(level key, records)` gets each level's per-request records."""
    cfg.validate()
    videos = [load_media(v) for v in cfg.videos]
    n_requests = cfg.requests if cfg.requests is not None else (MAX_REQUESTS if cfg.duration else 32)
    per_level_s = cfg.duration if cfg.duration is not None else cfg.level_timeout
    levels: List[Dict[str, object]] = []
    metrics_urls = list(cfg.metrics_urls) or ([cfg.metrics_url] if cfg.metrics_url else [])
    clients = [(url, _client_for(cfg, url)) for url in cfg.replicas]
    server_config = await asyncio.get_running_loop().run_in_executor(None, _server_configs, cfg, clients)
    try:
        runner = _Runner(cfg, clients, videos)
        if cfg.warmup:
            budget = _Budget(cfg.warmup, time.perf_counter() + per_level_s)
            width = min(cfg.warmup, max(cfg.concurrency or [1]))
            p = _Progress("warmup", cfg.warmup, stream=progress_stream) if progress_stream else None
            await runner.closed_loop(width, budget, p)
            if p:
                p.close()
        sweep = [("concurrency", c) for c in cfg.concurrency] + [("rate", r) for r in cfg.rate]
        for kind, value in sweep:
            befores, errors_before = scrape_all(metrics_urls, try_scrape)
            before, scrape_error = fleet_scrape(befores), next((e for e in errors_before if e), None)
            budget = _Budget(n_requests, time.perf_counter() + per_level_s)
            total = n_requests if cfg.requests is not None or not cfg.duration else None
            p = _Progress(f"{kind}={value}", total, stream=progress_stream) if progress_stream else None
            if kind == "concurrency":
                records, extra = await runner.closed_loop(int(value), budget, p)
            else:
                records, extra = await runner.open_loop(float(value), budget, p)
            if p:
                p.close()
            afters, after, err2 = await _settled_scrape(metrics_urls, before, sum(r.error is None for r in records),
                                                        model=cfg.model_name)
            level: Dict[str, object] = {kind: value, "mode": "closed" if kind == "concurrency" else "open"}
            level.update(summarize(records, percentiles=cfg.percentiles, slos=cfg.goodput))
            level.update(extra)
            if before is not None and after is not None:
                level["server"] = server_view(before, after)
            elif metrics_urls:
                level["server"] = {"error": scrape_error or err2}
            if len(metrics_urls) > 1:   # and each replica's own view
                level["servers"] = {url: server_view(b, a) if b is not None and a is not None
                                    else {"error": "scrape failed"}
                                    for url, b, a in zip(metrics_urls, befores, afters)}
            levels.append(level)
            if records_sink is not None:
                records_sink({kind: value}, records)
    finally:
        for _, client in clients:
            await client.close()
    return {
        "tool": "videochat loadtest",
        "client_version": __version__,
        "started_unix": time.time(),
        "config": {
            "url": cfg.url, "videos": list(cfg.videos), "turns": cfg.turns, "max_new_tokens": cfg.max_new_tokens,
            "stream": cfg.stream, "warmup": cfg.warmup, "requests_per_level": cfg.requests,
            "duration_s_per_level": cfg.duration, "timeout_s": cfg.timeout, "retries": cfg.retries,
            "prompts": list(cfg.prompts), "media": asdict(cfg.media), "metrics_url": cfg.metrics_url,
            "max_inflight": cfg.max_inflight, "seed": cfg.seed, "media_reference": cfg.media_reference,
            "connections": cfg.connections,
            "urls": list(cfg.replicas), "metrics_urls": metrics_urls, "model": cfg.model_name,
            "percentiles": list(cfg.percentiles), "goodput_slos": cfg.goodput or None, "ssl": cfg.ssl,
            "header_names": sorted(k for k, _ in cfg.headers),   # names only: values may be credentials
        },
        "server_config": server_config,
        "levels": levels,
    }
