"""The supervisor's decisions (HealthPolicy) and its view of the stub processes, without Triton."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from videochat.launch import launcher
from videochat.launch.supervisor import (EXIT_SERVER_DIED, EXIT_UNHEALTHY, STUB_NAME, Decision, HealthPolicy,
                                         Observation, Phase, SupervisorOptions, dead_stub_models, live_stubs,
                                         models_in_error, stub_model)
from videochat.launch.tritonserver import Endpoints, TritonInstall, server_args
from videochat_client.probe import ProbeResult

MODELS = ("preprocessing", "videochat_llm")
OK = ProbeResult(True, (30.0, 31.0), 2)
STUB_DEAD = ProbeResult(False, (1000.0,), 2, code="INTERNAL",
                        error="INTERNAL: in ensemble 'videochat', Stub process 'videochat_llm_0_0' is not healthy.")
REFUSED = ProbeResult(False, (2.0,), 2, code="UNAVAILABLE", error="UNAVAILABLE: failed to connect to all addresses")
SLOW = ProbeResult(False, (10000.0,), 2, code="DEADLINE_EXCEEDED", error="DEADLINE_EXCEEDED: Deadline Exceeded")
FULL = ProbeResult(False, (3.0,), 2, code="UNAVAILABLE",
                   error="UNAVAILABLE: in ensemble 'videochat', unavailable: the queue is full (2 waiting)")


def policy(**options) -> HealthPolicy:
    p = HealthPolicy(SupervisorOptions(**options), MODELS)
    assert p.phase is Phase.STARTING and not p.ready
    return p


def serving(**options) -> HealthPolicy:
    p = policy(**options)
    assert p.observe(Observation(probe=OK)) == Decision()
    assert p.ready
    return p


def test_not_ready_until_the_first_probe_passes():
    p = policy()
    p.observe(Observation())                       # no probe this tick
    assert not p.ready
    p.observe(Observation(probe=OK))
    assert p.ready and p.phase is Phase.SERVING


def test_a_dead_stub_makes_it_unready_and_reloads_that_model_at_once():
    p = serving(failures_before_unready=5)
    d = p.observe(Observation(dead_stubs=frozenset({"preprocessing"})))
    assert d.recover == {"preprocessing"} and d.exit_code is None
    assert not p.ready and "preprocessing" in p.reason


def test_error_answers_unready_after_n_checks_and_reload_the_model_named_in_the_error():
    p = serving(failures_before_unready=2)
    assert p.observe(Observation(probe=STUB_DEAD)) == Decision()
    assert p.ready, "one failed check is not enough"
    d = p.observe(Observation(probe=STUB_DEAD))
    assert not p.ready and d.recover == {"videochat_llm"}


def test_an_error_that_names_no_model_reloads_every_model():
    p = serving(failures_before_unready=1)
    failed = ProbeResult(False, (5.0,), 2, code="INTERNAL", error="INTERNAL: in ensemble 'videochat', boom")
    assert p.observe(Observation(probe=failed)).recover == set(MODELS)


def test_no_connection_is_like_a_timeout():
    p = serving(failures_before_unready=1)
    assert p.observe(Observation(probe=REFUSED)) == Decision() and not p.ready
    assert p.observe(Observation(probe=REFUSED)).recover == set(MODELS)


def test_a_full_queue_drains_but_never_reloads():
    """Backpressure's UNAVAILABLE is an answer from a live server: a reload would only cut its streams."""
    p = serving(failures_before_unready=2)
    for _ in range(10):
        assert p.observe(Observation(probe=FULL)) == Decision()
    assert not p.ready and p.phase is Phase.UNREADY
    p.observe(Observation(probe=OK))
    assert p.ready


def test_timeouts_drain_first_and_reload_only_if_they_go_on():
    p = serving(failures_before_unready=2)
    p.observe(Observation(probe=SLOW))
    assert p.observe(Observation(probe=SLOW)) == Decision() and not p.ready   # drained, no reload yet
    assert p.observe(Observation(probe=SLOW)) == Decision()
    assert p.observe(Observation(probe=SLOW)).recover == set(MODELS)        # 2 x N: a hang, not load


def test_an_overloaded_replica_comes_back_by_itself_once_drained():
    p = serving(failures_before_unready=2)
    p.observe(Observation(probe=SLOW))
    p.observe(Observation(probe=SLOW))
    assert not p.ready
    assert p.observe(Observation(probe=OK)) == Decision() and p.ready
    assert p.consecutive_failures == 0


def test_successful_recovery_is_ready_again():
    p = serving()
    p.observe(Observation(dead_stubs=frozenset({"videochat_llm"})))
    p.recovery_started({"videochat_llm"})
    assert p.phase is Phase.RECOVERING and not p.ready
    assert p.recovery_finished(True) == Decision()
    assert p.ready and p.recoveries == 1 and p.failed_recoveries == 0


def test_gives_up_after_max_recoveries_failed_in_a_row():
    p = serving(max_recoveries=3)
    for attempt in (1, 2):
        p.recovery_started(MODELS)
        assert p.recovery_finished(False, "load failed") == Decision()
        assert p.phase is Phase.UNREADY and p.failed_recoveries == attempt
    p.recovery_started(MODELS)
    d = p.recovery_finished(False, "load failed")
    assert d.exit_code == EXIT_UNHEALTHY and p.phase is Phase.FAILED and "3 times" in p.reason


def test_a_passing_check_between_failed_recoveries_starts_the_count_again():
    p = serving(max_recoveries=2)
    p.recovery_finished(False, "x")
    p.observe(Observation(probe=OK))
    assert p.ready and p.failed_recoveries == 0
    assert p.recovery_finished(False, "x") == Decision()        # 1 of 2 again, not 2 of 2


def test_tritonserver_gone_is_final():
    p = serving()
    d = p.observe(Observation(server_alive=False))
    assert d.exit_code == EXIT_SERVER_DIED and p.phase is Phase.FAILED and not p.ready
    assert p.observe(Observation(probe=OK)) == Decision() and p.phase is Phase.FAILED
    p.drain()
    assert p.phase is Phase.FAILED


def test_draining_is_final_and_never_ready():
    p = serving()
    p.drain()
    assert p.phase is Phase.DRAINING and not p.ready
    assert p.observe(Observation(server_alive=False)) == Decision()     # the exit we asked for
    assert p.observe(Observation(dead_stubs=frozenset({"preprocessing"}))) == Decision()
    assert p.recovery_finished(True) == Decision() and not p.ready


def test_models_in_error():
    assert models_in_error(STUB_DEAD.error, MODELS) == {"videochat_llm"}
    assert models_in_error("Failed to process the request(s) for model 'preprocessing_0_1', message: boom",
                           MODELS) == {"preprocessing"}
    assert models_in_error("Stub process 'other_0_0' is not healthy.", MODELS) == set()
    assert models_in_error("", MODELS) == set()


def test_options_are_checked_and_are_the_flag_defaults():
    for bad in (dict(probe_interval_s=0), dict(probe_timeout_s=-1), dict(probe_count=-1),
                dict(failures_before_unready=0), dict(max_recoveries=0), dict(health_port=70000)):
        with pytest.raises(ValueError):
            SupervisorOptions(**bad)
    args = launcher.build_parser().parse_args([])
    assert launcher.supervisor_options_from_args(args) == SupervisorOptions()
    flags = {a.dest for a in launcher.build_parser()._actions}
    assert {f.name for f in dataclasses.fields(SupervisorOptions)} <= flags


def test_server_args_explicit_model_control_only_with_models():
    install = TritonInstall(Path("/x/bin/tritonserver"), Path("/x/backends"), ())
    base = server_args(install, Path("/repo"), Endpoints(), shm_prefix="p_", exit_timeout_s=5)
    assert not any(a.startswith("--model-control-mode") for a in base)
    explicit = server_args(install, Path("/repo"), Endpoints(), shm_prefix="p_", exit_timeout_s=5,
                           models=("preprocessing", "videochat"))
    assert explicit[-3:] == ["--model-control-mode=explicit", "--load-model=preprocessing", "--load-model=videochat"]


# -- stub processes, on the real /proc ---------------------------------------------------------------------------
def test_stub_model_from_the_command_line():
    stub = f"/opt/tritonserver/backends/python/{STUB_NAME}"
    assert stub_model([stub, "/w/model_repository/videochat_llm/1/model.py", "shm", "1048576"]) == "videochat_llm"
    assert stub_model(["/usr/bin/python3", "/w/model_repository/videochat_llm/1/model.py"]) is None
    assert stub_model([""]) is None


def test_live_stubs_counts_children_and_not_zombies(tmp_path):
    """Two processes that look like stubs (argv[0] the stub's name, argv[1] <repo>/<model>/1/model.py), children
    of this process; one killed and not reaped (a zombie, as Triton leaves a dead stub) no longer counts."""
    procs = []
    for model in ("preprocessing", "preprocessing"):
        script = tmp_path / "repo" / model / "1" / "model.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text("import time\ntime.sleep(60)\n")
        procs.append(subprocess.Popen(["bash", "-c", f'exec -a "/b/{STUB_NAME}" "{sys.executable}" "{script}"']))
    try:
        deadline = time.monotonic() + 10
        while len(live_stubs(os.getpid()).get("preprocessing", ())) < 2:
            assert time.monotonic() < deadline, live_stubs(os.getpid())
            time.sleep(0.05)
        live = live_stubs(os.getpid())
        assert live["preprocessing"] == {p.pid for p in procs}
        assert dead_stub_models({"preprocessing": 2, "videochat_llm": 1}, live) == {"videochat_llm"}
        assert dead_stub_models({"preprocessing": 2}, live, ignore=[procs[0].pid]) == {"preprocessing"}
        os.kill(procs[0].pid, signal.SIGKILL)
        while procs[0].pid in live_stubs(os.getpid()).get("preprocessing", ()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert Path(f"/proc/{procs[0].pid}").exists(), "still a zombie: not reaped yet"
        assert live_stubs(os.getpid())["preprocessing"] == {procs[1].pid}
        assert live_stubs(procs[1].pid) == {}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_supervisor_that_cannot_ask_triton_fails_closed():
    """Nothing answers on the gRPC port (the config API fails): the replica must not say ready; it gives up."""
    import socket
    from types import SimpleNamespace

    from videochat.launch.supervisor import Supervisor
    from videochat_client import VideoChatClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["sleep", "30"])
    logs: list[str] = []
    try:
        with VideoChatClient(f"127.0.0.1:{port}", timeout=2) as client:
            sup = Supervisor(SimpleNamespace(proc=proc), client, SupervisorOptions(probe_timeout_s=1),
                             ensemble="videochat", log=logs.append).start()
            deadline = time.monotonic() + 20
            while sup.exit_code is None:
                assert time.monotonic() < deadline, logs
                time.sleep(0.05)
        status = sup.status()
        assert sup.exit_code == EXIT_UNHEALTHY and not status["ready"] and not status["live"], status
        assert any("supervisor failed" in line for line in logs), logs
    finally:
        proc.kill()
        proc.wait()
