"""Watch one replica, drain it when it breaks, heal it, give up when healing does not work.

Why: Triton 2.51 never restarts a python stub that died, and the model stays READY while every request to that
instance fails (`Stub process 'preprocessing_0_0' is not healthy.`), so `/v2/health/ready` keeps a load balancer
sending traffic to a broken replica forever. The supervisor thread of `python -m videochat serve`:

* watches the stub processes (children of tritonserver named `triton_python_backend_stub`; the model is the
  `<repo>/<model>/<version>/model.py` in their command line): a model with fewer live stubs than instances has a
  dead one. Seen within `STUB_CHECK_INTERVAL_S`, whatever the traffic;
* probes every `probe_interval_s` with a real 1-token inference through the ensemble (`videochat_client.probe`),
  which also catches a worker that hangs or answers errors;
* watches the tritonserver process itself.

`HealthPolicy` is the decision logic (no Triton, no threads: unit-tested); `Supervisor` runs it against the
server: it marks the replica unready at once (the launcher's `/ready` answers 503, so a load balancer drains it),
reloads the broken model with `load_model` (a reload starts a new stub; the ensemble is reloaded after its
steps), probes again, and marks it ready. After `max_recoveries` failed recoveries in a row it asks the launcher
to stop the server and exit non-zero, so the orchestrator replaces the replica.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from videochat_client.probe import ProbeResult, instance_counts, probe

STUB_NAME = "triton_python_backend_stub"
STUB_CHECK_INTERVAL_S = 0.5       # /proc scan: cheap, so much more often than a probe
EXIT_SERVER_DIED = 1              # tritonserver exited without being asked to
EXIT_UNHEALTHY = 3                # recovery failed max_recoveries times in a row


@dataclass(frozen=True)
class SupervisorOptions:
    """The flags of `serve` that govern health and recovery (their defaults are these)."""

    health_port: int = 8003               # the launcher's GET /ready and /live
    probe_interval_s: float = 2.0         # between the end of one check and the start of the next
    probe_timeout_s: float = 10.0         # deadline of one probe (a 1-token answer; queueing under load included)
    probe_count: int = 0                  # probes per check; 0 = one per instance of the most replicated model
    failures_before_unready: int = 2      # consecutive failed checks before the replica is drained
    max_recoveries: int = 3               # failed recoveries in a row before the launcher exits
    recovery_timeout_s: float = 600.0     # one load_model + stubs back (a real checkpoint loads for minutes)
    old_stub_grace_s: float = 60.0        # after a reload, old-version stubs still alive this long are killed

    def __post_init__(self) -> None:
        if not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be a port number, got {self.health_port}")
        for name in ("probe_interval_s", "probe_timeout_s", "recovery_timeout_s", "old_stub_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.probe_count < 0:
            raise ValueError(f"probe_count must be >= 0, got {self.probe_count}")
        for name in ("failures_before_unready", "max_recoveries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Phase(str, Enum):
    STARTING = "starting"       # no successful check yet
    SERVING = "serving"         # the only ready phase
    UNREADY = "unready"         # checks fail or a stub died; waiting to (re)try recovery
    RECOVERING = "recovering"   # reloading models
    DRAINING = "draining"       # SIGTERM: in-flight work finishes, no new work
    FAILED = "failed"           # giving up; the launcher exits


@dataclass(frozen=True)
class Observation:
    server_alive: bool = True
    dead_stubs: frozenset = frozenset()       # models with fewer live stub processes than instances
    probe: Optional[ProbeResult] = None       # None: no check this tick


@dataclass(frozen=True)
class Decision:
    recover: frozenset = frozenset()          # models to reload now
    exit_code: Optional[int] = None           # set: stop the server and exit with it


# `Stub process 'videochat_llm_0_0' is not healthy.` / `... for model 'preprocessing_0_1', message: ...`
_INSTANCE_IN_ERROR = re.compile(r"(?:Stub process|for model) '([A-Za-z0-9_.-]+?)_\d+_\d+'")


# Why a check failed decides whether a reload can help.
BROKEN = "broken"   # an error answer (a dead or failing worker, a model gone): reload
SLOW = "slow"       # no answer in time, or no connection: drain first, reload only if it goes on
BUSY = "busy"       # the server answered "not now" (UNAVAILABLE: queue full, stopping): drain, never reload
_NO_CONNECTION = re.compile(r"failed to connect|connection refused|socket closed|connection reset|unreachable", re.I)


def failure_kind(result: ProbeResult) -> str:
    if result.code == "DEADLINE_EXCEEDED":
        return SLOW
    if result.code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        return SLOW if _NO_CONNECTION.search(result.error or "") else BUSY
    return BROKEN


def models_in_error(message: str, models: Iterable[str]) -> frozenset:
    """The models whose instance names (`<model>_<group>_<index>`) appear in a Triton error message."""
    known = set(models)
    return frozenset(m for m in _INSTANCE_IN_ERROR.findall(message or "") if m in known)


class HealthPolicy:
    """Decisions from observations. Not thread-safe: the Supervisor holds a lock around it.

    * a dead stub: unready and recover that model at once (a dead stub never comes back by itself);
    * `failures_before_unready` failed checks in a row: unready. An error answer also recovers at once (the
      models named in the error, else every model); a timeout (or no connection) recovers only after twice as
      many, because a replica that is just overloaded catches up once the load balancer has drained it; an
      UNAVAILABLE answer (backpressure's full queue) never recovers: the server is alive and says so;
    * a successful check: ready (and the failed-recovery count starts again);
    * a failed recovery: stay unready and try again on the next failure; `max_recoveries` in a row: give up;
    * tritonserver gone: give up. SIGTERM (`drain`): not ready, and nothing is decided any more.
    """

    def __init__(self, options: SupervisorOptions, models: Iterable[str]) -> None:
        self.options = options
        self.models = tuple(models)
        self.phase = Phase.STARTING
        self.reason = "waiting for the first successful probe"
        self.consecutive_failures = 0
        self.failed_recoveries = 0        # in a row
        self.recoveries = 0               # successful, in total

    @property
    def ready(self) -> bool:
        return self.phase is Phase.SERVING

    @property
    def final(self) -> bool:
        return self.phase in (Phase.DRAINING, Phase.FAILED)

    def observe(self, obs: Observation) -> Decision:
        if self.final:
            return Decision()
        if not obs.server_alive:
            return self.fail(EXIT_SERVER_DIED, "tritonserver exited")
        if obs.dead_stubs:
            self._set(Phase.UNREADY, f"stub process of {', '.join(sorted(obs.dead_stubs))} died")
            return Decision(recover=frozenset(obs.dead_stubs))
        if obs.probe is None:
            return Decision()
        if obs.probe.ok:
            self.consecutive_failures = 0
            self.failed_recoveries = 0
            if self.phase is not Phase.SERVING:
                self._set(Phase.SERVING, "")
            return Decision()
        self.consecutive_failures += 1
        needed = self.options.failures_before_unready
        if self.consecutive_failures < needed:
            return Decision()
        self._set(Phase.UNREADY, f"{self.consecutive_failures} failed probes in a row: {obs.probe.error}")
        kind = failure_kind(obs.probe)
        if kind == BUSY or (kind == SLOW and self.consecutive_failures < 2 * needed):
            return Decision()
        return Decision(recover=models_in_error(obs.probe.error or "", self.models) or frozenset(self.models))

    def recovery_started(self, models: Iterable[str]) -> Decision:
        if not self.final:
            self._set(Phase.RECOVERING, f"reloading {', '.join(sorted(models))} ({self.reason})")
        return Decision()

    def recovery_finished(self, ok: bool, detail: str = "") -> Decision:
        if self.final:
            return Decision()
        if ok:
            self.recoveries += 1
            self.consecutive_failures = 0
            self.failed_recoveries = 0
            self._set(Phase.SERVING, "")
            return Decision()
        self.failed_recoveries += 1
        if self.failed_recoveries >= self.options.max_recoveries:
            return self.fail(EXIT_UNHEALTHY, f"recovery failed {self.failed_recoveries} times in a row: {detail}")
        self._set(Phase.UNREADY, f"recovery failed ({self.failed_recoveries}/{self.options.max_recoveries}): {detail}")
        return Decision()

    def drain(self) -> None:
        if self.phase is not Phase.FAILED:
            self._set(Phase.DRAINING, "SIGTERM: finishing in-flight requests")

    def fail(self, code: int, reason: str) -> Decision:
        self._set(Phase.FAILED, reason)
        return Decision(exit_code=code)

    def _set(self, phase: Phase, reason: str) -> None:
        self.phase, self.reason = phase, reason


# -- stub processes ----------------------------------------------------------------------------------------
def stub_model(argv: list[str]) -> Optional[str]:
    """The model a python backend stub serves, from its command line (argv[1] = <repo>/<model>/<version>/model.py)."""
    if len(argv) < 2 or Path(argv[0]).name != STUB_NAME:
        return None
    return Path(argv[1]).parent.parent.name or None


def _stat(pid_dir: Path) -> tuple[str, int]:
    """(state, ppid) from /proc/<pid>/stat; the command name may hold spaces and parentheses."""
    fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def live_stubs(server_pid: int, proc: Path = Path("/proc")) -> dict[str, set[int]]:
    """{model: pids of its live stub processes} among the children of tritonserver. A killed stub stays a zombie
    (Triton does not reap it) whose command line is empty, so it simply stops counting."""
    stubs: dict[str, set[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = _stat(entry)
            if ppid != server_pid or state in ("Z", "X"):
                continue
            model = stub_model((entry / "cmdline").read_bytes().decode(errors="replace").split("\0"))
        except (OSError, ValueError, IndexError):   # the process went away while we looked
            continue
        if model:
            stubs.setdefault(model, set()).add(int(entry.name))
    return stubs


def dead_stub_models(expected: Mapping[str, int], live: Mapping[str, Iterable[int]],
                     ignore: Iterable[int] = ()) -> frozenset:
    """Models with fewer live stubs than instances; `ignore`: stubs of old versions (not serving)."""
    skip = set(ignore)
    return frozenset(m for m, n in expected.items() if len(set(live.get(m, ())) - skip) < n)


# -- the thread --------------------------------------------------------------------------------------------
@dataclass
class _Status:
    last_probe: Optional[dict] = None
    probe_count: int = 0
    instances: dict = field(default_factory=dict)
    last_recovery_s: Optional[float] = None


class Supervisor:
    """Runs HealthPolicy against one TritonServer (its `proc` and gRPC endpoint) in a daemon thread.

    `client` is a `videochat_client.VideoChatClient` for the server; `ensemble` the public model whose steps
    are watched. `exit_code` is set when the launcher must stop the server and exit."""

    def __init__(self, server, client, options: SupervisorOptions, *, ensemble: str,
                 log: Callable[[str], None] = print) -> None:
        self.server = server
        self.client = client
        self.options = options
        self.ensemble = ensemble
        self.log = log
        self.policy = HealthPolicy(options, ())
        self.exit_code: Optional[int] = None
        self.became_ready = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._status = _Status()
        self._expected: dict[str, int] = {}
        self._old_stubs: dict[int, float] = {}    # pid -> when to kill it (see _reload)
        self._thread = threading.Thread(target=self._run, name="videochat-supervisor", daemon=True)

    # -- used by the launcher and the readiness endpoint -----------------------------------------------------
    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def drain(self) -> None:
        """SIGTERM: not ready from now on; the loop stops deciding (the server's exit is expected).
        Safe in a signal handler: no lock, no output (the main thread may hold either)."""
        self._draining.set()
        self._stop.set()

    @property
    def ready(self) -> bool:
        return bool(self.status()["ready"])

    def status(self) -> dict:
        with self._lock:
            p = self.policy
            phase, reason = p.phase, p.reason
            if self._draining.is_set() and phase is not Phase.FAILED:
                phase, reason = Phase.DRAINING, "SIGTERM: finishing in-flight requests"
            return {"ready": phase is Phase.SERVING, "live": phase is not Phase.FAILED, "phase": phase.value,
                    "reason": reason, "consecutive_failures": p.consecutive_failures,
                    "failed_recoveries": p.failed_recoveries, "recoveries": p.recoveries, **asdict(self._status)}

    # -- the loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._setup()
            next_probe = 0.0
            while not self._stop.is_set():
                obs = self._observe(probe_now=time.monotonic() >= next_probe)
                if obs.probe is not None:
                    next_probe = time.monotonic() + self.options.probe_interval_s
                self._apply(self._decide(lambda p: p.observe(obs)))
                self._stop.wait(STUB_CHECK_INTERVAL_S)
        except Exception as exc:  # noqa: BLE001 - a supervisor bug must not leave a replica that says "ready"
            self.log(f"health: supervisor failed: {type(exc).__name__}: {exc}")
            reason = f"supervisor failed: {exc}"
            self._apply(self._decide(lambda p: p.fail(EXIT_UNHEALTHY, reason)))

    def _setup(self) -> None:
        """Instances per model from Triton's config API (the server is ready when we start)."""
        with self.client.triton() as raw:
            self._expected = instance_counts(raw, model_name=self.ensemble, timeout=self.options.probe_timeout_s)
        count = self.options.probe_count or max(self._expected.values())
        with self._lock:
            self.policy = HealthPolicy(self.options, tuple(self._expected))
            self._status.instances = dict(self._expected)
            self._status.probe_count = count

    def _observe(self, *, probe_now: bool) -> Observation:
        alive = self.server.proc.poll() is None
        dead = frozenset()
        if alive:
            live = live_stubs(self.server.proc.pid)
            self._kill_old_stubs(live)
            dead = dead_stub_models(self._expected, live, ignore=self._old_stubs)
        if not alive or dead or not probe_now:
            return Observation(server_alive=alive, dead_stubs=dead)
        result = self._probe()
        return Observation(server_alive=self.server.proc.poll() is None, probe=result)

    def _probe(self) -> ProbeResult:
        result = probe(self.client, count=self._status.probe_count, timeout=self.options.probe_timeout_s)
        with self._lock:
            self._status.last_probe = result.to_dict()
        return result

    def _decide(self, step: Callable[[HealthPolicy], Decision]) -> Decision:
        with self._lock:
            if self._draining.is_set():
                self.policy.drain()
            before = (self.policy.phase, self.policy.reason)
            decision = step(self.policy)
            after = (self.policy.phase, self.policy.reason)
        if after != before:
            self.log(f"health: {after[0].value}" + (f" ({after[1]})" if after[1] else ""))
            if after[0] is Phase.SERVING:
                self.became_ready.set()
        return decision

    def _apply(self, decision: Decision) -> None:
        while decision.recover and not self._stop.is_set():
            decision = self._recover(decision.recover)
        if decision.exit_code is not None:
            self.exit_code = decision.exit_code
            self._stop.set()

    def _recover(self, models: frozenset) -> Decision:
        self._decide(lambda p: p.recovery_started(models))
        t0 = time.monotonic()
        reloaded = None
        try:
            self._reload(models)
            reloaded = time.monotonic()
            result = self._probe_after_reload(t0 + self.options.recovery_timeout_s)
            ok, detail = result.ok, result.error or ""
        except Exception as exc:  # noqa: BLE001 - any failure of a reload is a failed recovery
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        took = time.monotonic() - t0
        with self._lock:
            self._status.last_recovery_s = round(took, 2)
        split = f" (reload {reloaded - t0:.1f} s, first probes {t0 + took - reloaded:.1f} s)" if reloaded else ""
        self.log(f"health: recovery of {', '.join(sorted(models))} {'succeeded' if ok else 'failed'} "
                 f"in {took:.1f} s{split}" + (f": {detail}" if detail else ""))
        return self._decide(lambda p: p.recovery_finished(ok, detail))

    def _reload(self, models: frozenset) -> None:
        """Reload the broken models (new stubs; Triton reloads the ensemble after its steps by itself), wait
        until every model has its stubs again. Reloading the ensemble explicitly would reload every step whose
        files changed since its last load (the stubs write __pycache__), so it is not done."""
        deadline = time.monotonic() + self.options.recovery_timeout_s
        before = live_stubs(self.server.proc.pid)
        old = {pid for m in models for pid in before.get(m, ())} | set(self._old_stubs)
        for model in [m for m in self._expected if m in models]:
            self.server.reload_model(model, timeout_s=max(1.0, deadline - time.monotonic()))
        while dead_stub_models(self._expected, live_stubs(self.server.proc.pid), ignore=old):
            if self.server.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError("stub processes did not come back")
            time.sleep(0.1)
        # Measured on 2.51: a request that a dead stub failed keeps the old version referenced, so Triton never
        # unloads it and its surviving stubs (a whole model copy, for a GPU model) live on. They serve nothing
        # (new requests go to the new version): once in-flight work had time to finish, they are killed.
        kill_at = time.monotonic() + self.options.old_stub_grace_s
        self._old_stubs = {pid: self._old_stubs.get(pid, kill_at) for pid in old}

    def _kill_old_stubs(self, live: Mapping[str, Iterable[int]]) -> None:
        alive = {pid for pids in live.values() for pid in pids}
        now = time.monotonic()
        for pid, kill_at in list(self._old_stubs.items()):
            if pid not in alive:                 # Triton unloaded the old version after all (or it was dead)
                del self._old_stubs[pid]
            elif now >= kill_at:
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.log(f"health: killed stub {pid} of an old model version that Triton did not unload")
                except OSError:
                    pass
                del self._old_stubs[pid]

    def _probe_after_reload(self, deadline: float) -> ProbeResult:
        """The first requests of a fresh model are slow (empty caches, lazy initialisation): a timed-out probe is
        repeated until the recovery deadline; any other failure ends the recovery."""
        while True:
            result = self._probe()
            if result.ok or not result.timed_out or time.monotonic() > deadline:
                return result
