"""`python -m videochat serve`: one command from a checkpoint to a running Triton endpoint.

    python -m videochat serve [--checkpoint DIR] [--device auto|cpu|cuda] [--host 127.0.0.1]
        [--grpc-port 8001 --http-port 8000 --metrics-port 8002] [--max-batch-size N] [--instances N]
        [--decoupled-mode true|false] [--batching inflight|static] [--stream-interval-ms 20]
        [--media-cache-mb 512] [--visual-cache-mb 256] [--max-queue N] [--request-timeout-s S]
        [--decode-isolation true|false] [--decode-timeout-s 120] [--decode-memory-mb 4096] [--work-dir DIR]
        [--health-port 8003 --probe-interval-s 2 --probe-timeout-s 10 --failures-before-unready 2 --max-recoveries 3]
        [--grpc-ssl --grpc-server-cert PEM --grpc-server-key PEM [--grpc-root-cert PEM] [--grpc-ssl-mutual]]
        [--admin-api restricted|open --admin-key-file FILE] [--http-address ADDR] [--metrics-address ADDR]

Steps: find tritonserver (NVIDIA image or the nvidia-pytriton wheel) and prepare the python stub for this
interpreter; render model_repository/ for the device and checkpoint into <work-dir>/model_repository; serve
GET /ready and /live on --health-port; start the server (loopback by default, explicit model control); wait until
ready; supervise it (supervisor.py: probes, stub processes, reloads); print the endpoints once the first probe
passed; on SIGTERM or Ctrl-C mark unready, forward SIGTERM, wait for the drain, remove our leftover /dev/shm
regions. Without --checkpoint a tiny random demo checkpoint is created on first use. Importing this module does
not import torch.

Exit codes: 0 stopped by SIGTERM/Ctrl-C after a clean drain; 2 bad input (a flag value, a checkpoint without a
readable config.json, a work dir that cannot be created, a port already in use: checked before tritonserver
starts, so it fails in a second); 1 tritonserver not found, or it exited / was not ready in time / died;
3 the replica stayed unhealthy (recovery failed --max-recoveries times in a row, docs/operations.md). Errors are
one `error: ...` line on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from videochat_client import VideoChatClient

from videochat.errors import EXIT_FAILURE, UserError, report
from videochat.launch.logs import LOG_FORMATS, install_json_stdio
from videochat.launch.readiness import ReadinessServer
from videochat.launch.render import ENSEMBLE, LLM, PREPROCESSING, RepoOptions, render_repository
from videochat.launch.security import SecurityOptions
from videochat.launch.shm import shm_bytes_needed, shm_size
from videochat.launch.supervisor import EXIT_SERVER_DIED, Supervisor, SupervisorOptions
from videochat.launch.tritonserver import (UNLOAD_GRACE_S, Endpoints, LaunchError, MemoryOptions, TritonServer,
                                           find_triton)
from videochat.model.preflight import check_checkpoint_files
from videochat.serving.settings import BATCHING_MODES, DEFAULT_QUEUE_PER_ACTIVE, DTYPES

DEFAULT_WORK_DIR = Path.home() / ".cache" / "videochat" / "serve"


def _default(option: str, options: type = RepoOptions):
    """The flag's default is the dataclass's (one place for each)."""
    return next(f.default for f in dataclasses.fields(options) if f.name == option)


def _health(option: str):
    return _default(option, SupervisorOptions)


def _security(option: str):
    return _default(option, SecurityOptions)


def port_arg(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {port}")
    return port


def check_ports_free(endpoints: Endpoints, health_port: int | None = None) -> None:
    """Raise UserError naming the flag if a port is taken or repeated. tritonserver would only find out after
    loading every model (minutes for the real one) and then exit with a log full of unrelated lines."""
    ports = {"--http-port": endpoints.http_port, "--grpc-port": endpoints.grpc_port,
             "--metrics-port": endpoints.metrics_port}
    hosts = {"--http-port": (endpoints.http_bind, "--http-address" if endpoints.http_host else "--host"),
             "--metrics-port": (endpoints.metrics_bind, "--metrics-address" if endpoints.metrics_host else "--host")}
    if health_port is not None:
        ports["--health-port"] = health_port
    if len(set(ports.values())) < len(ports):
        raise UserError(", ".join(ports) + " must differ, got "
                        + ", ".join(f"{flag} {port}" for flag, port in ports.items()))
    for flag, port in ports.items():
        host, host_flag = hosts.get(flag, (endpoints.host, "--host"))
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as e:
            raise UserError(f"{host_flag} {host!r}: {e.strerror}") from None
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR: a port with only TIME_WAIT leftovers is free for tritonserver too; a listener is not
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UserError(f"port {port} ({flag}) is already in use on {host}; stop what "
                                    f"listens there or choose another {flag}") from None
                raise UserError(f"cannot listen on {host}:{port} ({flag}): {e.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m videochat serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint directory (official layout); default: a demo checkpoint made on first use")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda if torch sees a GPU, else cpu (KIND_GPU without a GPU fails to load)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--http-port", type=port_arg, default=8000)
    p.add_argument("--grpc-port", type=port_arg, default=8001)
    p.add_argument("--metrics-port", type=port_arg, default=8002)
    p.add_argument("--http-address", default=_security("http_address"),
                   help="where Triton's HTTP port listens (default --host; with --grpc-ssl 127.0.0.1, since "
                        "Triton's HTTP has no TLS: the launcher alone needs it)")
    p.add_argument("--metrics-address", default=_security("metrics_address"),
                   help="where the Prometheus metrics port listens (default --host)")
    p.add_argument("--max-batch-size", type=int, default=_default("max_batch_size"), help="1 turns dynamic batching off")
    p.add_argument("--max-queue-delay-us", type=int, default=_default("max_queue_delay_us"),
                   help="how long the dynamic batcher waits for batch-mates")
    p.add_argument("--instances", type=int, default=_default("instances"), help="videochat_llm instances (per GPU with cuda)")
    p.add_argument("--preprocess-instances", type=int, default=min(4, os.cpu_count() or 1),
                   help="CPU video-decoding instances")
    p.add_argument("--decoupled-mode", choices=("true", "false"), default="true",
                   help="true: stream tokens (stream_infer); false: one response per request (plain ModelInfer)")
    p.add_argument("--batching", choices=BATCHING_MODES, default=_default("batching"),
                   help="inflight = new requests join the running batch between decode steps; "
                        "static = they join only an idle batch, which runs to its longest answer (a baseline)")
    p.add_argument("--max-active", type=int, default=_default("max_active"),
                   help="in-flight batching: most sequences in the running batch (default: --max-batch-size)")
    p.add_argument("--max-queue", type=int, default=_default("max_queue"),
                   help="per videochat_llm instance: requests that may wait beyond the free slots; one more is "
                        f"refused at once with UNAVAILABLE (default 0 = {DEFAULT_QUEUE_PER_ACTIVE} x --max-active)")
    p.add_argument("--request-timeout-s", type=float, default=_default("request_timeout_s"),
                   help="server-side deadline of a request, counted from its arrival at videochat_llm: a queued "
                        "one is never started, a running one is stopped, both with DEADLINE_EXCEEDED "
                        "(0 = none; clients also send their own budget, see docs/operations.md)")
    p.add_argument("--stream-interval-ms", type=int, default=_default("stream_interval_ms"),
                   help="in-flight streaming: first token at once, then merge tokens for at least this long "
                        "per response (0 = one response per token)")
    p.add_argument("--media-cache-mb", type=int, default=_default("media_cache_mb"),
                   help="per preprocessing instance: LRU of decoded videos by content hash (0 = off)")
    p.add_argument("--visual-cache-mb", type=int, default=_default("visual_cache_mb"),
                   help="per videochat_llm instance: LRU of visual tokens by content hash, skips ViT + QFormer "
                        "for a repeated video (0 = off)")
    p.add_argument("--decode-threads", type=int, default=_default("decode_threads"),
                   help="CPU, in-flight: torch intra-op threads of a decode step (vision/prefill keep torch's "
                        "default); 0 = torch's default for both")
    p.add_argument("--decode-isolation", choices=("true", "false"),
                   default=str(_default("decode_isolation")).lower(),
                   help="decode uploads in a worker process per preprocessing instance: a crash, hang or runaway "
                        "allocation fails that request alone (docs/operations.md, 'Decode isolation')")
    p.add_argument("--decode-timeout-s", type=float, default=_default("decode_timeout_s"),
                   help="decode isolation: wall-clock limit of one decode; the worker is killed and replaced")
    p.add_argument("--decode-memory-mb", type=int, default=_default("decode_memory_mb"),
                   help="decode isolation: memory one decode may allocate on top of the idle worker")
    p.add_argument("--dtype", choices=DTYPES, default=_default("dtype"))
    p.add_argument("--max-new-tokens-limit", type=int, default=_default("max_new_tokens_limit"),
                   help="largest max_new_tokens accepted")
    p.add_argument("--max-video-bytes", type=int, default=_default("max_video_bytes"),
                   help="largest upload accepted (bytes)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help=f"rendered repository, server copy, logs and demo checkpoint (default {DEFAULT_WORK_DIR})")
    p.add_argument("--exit-timeout-secs", type=int, default=30, help="graceful drain limit on SIGTERM")
    p.add_argument("--shm-growth-mb", type=int, default=_default("shm_growth_mb", MemoryOptions),
                   help="step by which a python stub's /dev/shm region grows; every growth leaves one more mapping "
                        "counted in RSS, so fewer, larger steps keep RSS honest (docs/operations.md)")
    p.add_argument("--malloc-mmap-threshold-kb", type=int, default=_default("malloc_mmap_threshold_kb", MemoryOptions),
                   help="glibc MALLOC_MMAP_THRESHOLD_ for tritonserver and the stubs: larger blocks are "
                        "mmap'ed and returned when freed (0 = glibc's dynamic default)")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                   help="json: one JSON object per line on stdout (tritonserver's lines and ours; a request's "
                        "lines carry its request_id), docs/observability.md")
    p.add_argument("--render-only", action="store_true", help="render the repository, print its path, exit")
    h = p.add_argument_group("health and recovery (docs/operations.md)")
    h.add_argument("--health-port", type=port_arg, default=_health("health_port"),
                   help="the launcher's HTTP GET /ready (200/503) and /live: point load balancers and Kubernetes here, "
                        "not at Triton's /v2/health/ready (which stays 200 with a dead worker)")
    h.add_argument("--probe-interval-s", type=float, default=_health("probe_interval_s"),
                   help="seconds between health checks (a 1-token inference of a tiny image through the ensemble)")
    h.add_argument("--probe-timeout-s", type=float, default=_health("probe_timeout_s"), help="deadline of one probe")
    h.add_argument("--probe-count", type=int, default=_health("probe_count"),
                   help="probes per check; 0 = one per instance of the most replicated model")
    h.add_argument("--failures-before-unready", type=int, default=_health("failures_before_unready"),
                   help="failed checks in a row before the replica reports unready (a dead worker process: at once)")
    h.add_argument("--max-recoveries", type=int, default=_health("max_recoveries"),
                   help="failed recoveries (model reloads) in a row before the launcher stops the server and exits 3")
    h.add_argument("--recovery-timeout-s", type=float, default=_health("recovery_timeout_s"),
                   help="limit of one recovery (reload + workers back)")
    h.add_argument("--old-stub-grace-s", type=float, default=_health("old_stub_grace_s"),
                   help="after a reload, worker processes of the old model version that Triton kept alive (it does "
                        "when a request failed on the dead one) are killed this long after it (time for their "
                        "in-flight requests to finish)")
    s = p.add_argument_group("security (docs/deployment.md, 'Deploying safely')")
    s.add_argument("--grpc-ssl", action="store_true", default=_security("grpc_ssl"),
                   help="TLS on the gRPC port (needs --grpc-server-cert and --grpc-server-key)")
    s.add_argument("--grpc-server-cert", type=Path, default=_security("grpc_server_cert"), metavar="PEM")
    s.add_argument("--grpc-server-key", type=Path, default=_security("grpc_server_key"), metavar="PEM")
    s.add_argument("--grpc-root-cert", type=Path, default=_security("grpc_root_cert"), metavar="PEM",
                   help="CA certificate(s): verify client certificates (--grpc-ssl-mutual), and the server's "
                        "certificate for the launcher's own probe (without it the server certificate itself)")
    s.add_argument("--grpc-ssl-mutual", action="store_true", default=_security("grpc_ssl_mutual"),
                   help="mutual TLS: refuse clients without a certificate signed by --grpc-root-cert")
    s.add_argument("--probe-cert", type=Path, default=_security("probe_cert"), metavar="PEM",
                   help="mutual TLS: the launcher's probe presents this client certificate (default: the server's)")
    s.add_argument("--probe-key", type=Path, default=_security("probe_key"), metavar="PEM")
    s.add_argument("--probe-host", default=_security("probe_host"),
                   help="address the launcher's probe dials; with TLS a name in the server certificate "
                        "(default --host, 127.0.0.1 for 0.0.0.0)")
    s.add_argument("--admin-api", choices=("restricted", "open"), default=_security("admin_api"),
                   help="restricted: Triton's model control, shared-memory, logging and trace APIs need the "
                        "header videochat-admin-key (gRPC and HTTP); open: anyone who reaches a port may call them")
    s.add_argument("--admin-key-file", type=Path, default=_security("admin_key_file"), metavar="FILE",
                   help="the admin key (one word); default: a random key per start, known only to the launcher")
    return p


def resolve_device(device: str) -> str:
    """auto -> cuda if torch sees a GPU (checked in a subprocess so this process stays torch-free)."""
    if device != "auto":
        return device
    probe = subprocess.run([sys.executable, "-c", "from videochat.model.videochat_model import resolve_device; "
                            "print(resolve_device('auto').type)"], capture_output=True, text=True)
    return "cuda" if probe.stdout.strip() == "cuda" else "cpu"


def ensure_demo_checkpoint(path: Path) -> Path:
    """Create the seeded tiny demo checkpoint once (atomically: built in a temp dir, then renamed)."""
    if (path / "config.json").is_file():
        return path
    from videochat.tools.demo_checkpoint import make_demo_checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    make_demo_checkpoint(tmp, seed=0)
    try:
        tmp.rename(path)
    except OSError:  # someone else made it meanwhile
        if not (path / "config.json").is_file():
            raise
    print(f"created demo checkpoint (tiny random weights) at {path}", flush=True)
    return path


def options_from_args(args: argparse.Namespace, checkpoint: Path) -> RepoOptions:
    return RepoOptions(checkpoint=checkpoint, device=resolve_device(args.device),
                       max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                       instances=args.instances, preprocess_instances=args.preprocess_instances,
                       decoupled=args.decoupled_mode == "true", dtype=args.dtype,
                       max_new_tokens_limit=args.max_new_tokens_limit, max_video_bytes=args.max_video_bytes,
                       batching=args.batching,
                       max_active=args.max_active, max_queue=args.max_queue,
                       request_timeout_s=args.request_timeout_s, stream_interval_ms=args.stream_interval_ms,
                       media_cache_mb=args.media_cache_mb, visual_cache_mb=args.visual_cache_mb,
                       decode_threads=args.decode_threads, decode_isolation=args.decode_isolation == "true",
                       decode_timeout_s=args.decode_timeout_s, decode_memory_mb=args.decode_memory_mb)


def supervisor_options_from_args(args: argparse.Namespace) -> SupervisorOptions:
    return SupervisorOptions(health_port=args.health_port, probe_interval_s=args.probe_interval_s,
                             probe_timeout_s=args.probe_timeout_s, probe_count=args.probe_count,
                             failures_before_unready=args.failures_before_unready,
                             max_recoveries=args.max_recoveries, recovery_timeout_s=args.recovery_timeout_s,
                             old_stub_grace_s=args.old_stub_grace_s)


def security_from_args(args: argparse.Namespace) -> SecurityOptions:
    return SecurityOptions(grpc_ssl=args.grpc_ssl, grpc_ssl_mutual=args.grpc_ssl_mutual,
                           grpc_server_cert=args.grpc_server_cert, grpc_server_key=args.grpc_server_key,
                           grpc_root_cert=args.grpc_root_cert, probe_cert=args.probe_cert, probe_key=args.probe_key,
                           probe_host=args.probe_host, admin_api=args.admin_api, admin_key_file=args.admin_key_file,
                           http_address=args.http_address, metrics_address=args.metrics_address)


def memory_from_args(args: argparse.Namespace) -> MemoryOptions:
    return MemoryOptions(shm_growth_mb=args.shm_growth_mb, malloc_mmap_threshold_kb=args.malloc_mmap_threshold_kb)


def warn_small_shm(opts: RepoOptions, memory: MemoryOptions, path: str = "/dev/shm") -> bool:
    """Say so when /dev/shm is smaller than this configuration may need (a container's 64 MB default): requests
    would fail with `Failed to increase the shared memory pool size` under load, long after the start."""
    need = shm_bytes_needed(preprocess_instances=opts.preprocess_instances, instances=opts.instances,
                            max_batch_size=opts.max_batch_size, max_video_bytes=opts.max_video_bytes,
                            growth_mb=memory.shm_growth_mb)
    have = shm_size(path)
    if have is None or have >= need:
        return False
    print(f"warning: {path} is {have / 2**20:.0f} MiB, but this configuration may need up to {need / 2**20:.0f} MiB "
          f"(docker: --shm-size; Kubernetes: a memory emptyDir; docs/deployment.md, 'Shared memory sizing')",
          file=sys.stderr, flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run `serve`; user errors are raised as UserError/OSError for `videochat.errors.run_cli` to print."""
    args = build_parser().parse_args(argv)
    if args.log_format == "json":
        install_json_stdio()      # first: every line after this, errors included, is a JSON record
    try:
        security = security_from_args(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    http_host, metrics_host = security.http_host(args.host), security.metrics_host(args.host)
    endpoints = Endpoints(args.host, args.http_port, args.grpc_port, args.metrics_port,   # "" = same as --host
                          http_host="" if http_host == args.host else http_host,
                          metrics_host="" if metrics_host == args.host else metrics_host)
    if not args.render_only:
        check_ports_free(endpoints, args.health_port)   # first: it costs nothing, everything after takes seconds
    work_dir = (args.work_dir or DEFAULT_WORK_DIR).resolve()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --work-dir {work_dir}: {e.strerror or e}") from None
    try:
        if args.checkpoint is not None:
            checkpoint = args.checkpoint.resolve()
        else:
            demo = (work_dir / "demo-checkpoint") if args.work_dir else (DEFAULT_WORK_DIR.parent / "demo")
            checkpoint = ensure_demo_checkpoint(demo)
        opts = options_from_args(args, checkpoint)   # checks the flag values and that config.json exists
        health = supervisor_options_from_args(args)
        memory = memory_from_args(args)
        check_checkpoint_files(checkpoint)           # torch-free: a broken file fails now, not in a stub
        repo = render_repository(opts, work_dir / "model_repository")
        if args.render_only:
            print(repo)
            return 0
        install = find_triton(work_dir)
        warn_small_shm(opts, memory)
    except ValueError as exc:   # RepoOptions validation (ConfigError and the rest are UserErrors already)
        raise UserError(str(exc)) from None
    except LaunchError as exc:  # tritonserver missing or its stub cannot be prepared: not a usage error
        return report(exc, EXIT_FAILURE)

    return serve(opts, health, install, repo, endpoints, exit_timeout_s=args.exit_timeout_secs, memory=memory,
                 log_format=args.log_format, security=security)


def serve(opts: RepoOptions, health: SupervisorOptions, install, repo: Path, endpoints: Endpoints, *,
          exit_timeout_s: int, memory: MemoryOptions = MemoryOptions(), log_format: str = "text",
          security: SecurityOptions = SecurityOptions()) -> int:
    """Run tritonserver under the supervisor until SIGTERM/Ctrl-C (0), its death (1) or giving up (3)."""
    try:
        server = TritonServer(install, repo, endpoints, exit_timeout_s=exit_timeout_s,
                              models=(PREPROCESSING, LLM, ENSEMBLE), memory=memory, log_format=log_format,
                              security=security)
    except ValueError as exc:   # an unusable --admin-key-file
        raise UserError(str(exc)) from None
    # the probe dials the local gRPC port as any client would: with TLS, and for mTLS with a client certificate
    client = VideoChatClient(f"{security.probe_target(endpoints.host)}:{endpoints.grpc_port}",
                             timeout=health.probe_timeout_s, max_retries=0, **security.probe_client_kwargs())
    supervisor = Supervisor(server, client, health, ensemble=ENSEMBLE, log=lambda m: print(m, flush=True))
    try:
        readiness = ReadinessServer(endpoints.host, health.health_port, supervisor.status).start()
    except OSError as exc:
        raise UserError(f"cannot listen on {endpoints.host}:{health.health_port} (--health-port): "
                        f"{exc.strerror or exc}") from None
    stopping = []

    def on_signal(signum, _frame):  # no locks, no output here: the main thread may hold them
        stopping.append(signum)
        supervisor.drain()          # /ready 503 at once, so load balancers stop sending new work
        server.terminate()          # graceful: in-flight requests and streams complete

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"starting tritonserver ({opts.device}, checkpoint {opts.checkpoint}, repository {repo}); "
          f"readiness on http://{endpoints.host}:{health.health_port}/ready; {_exposure(endpoints, security)}",
          flush=True)
    try:
        server.start()
        try:
            server.wait_ready(timeout_s=600)
        except LaunchError as exc:
            rc = 0 if stopping else report(exc, EXIT_FAILURE)   # say why before the (up to exit-timeout) stop
            server.stop()
            return rc
        if not stopping:
            supervisor.start()
        return _supervise(server, supervisor, endpoints, opts, stopping)
    finally:
        supervisor.stop()
        readiness.close()
        client.close()


def _exposure(endpoints: Endpoints, security: SecurityOptions) -> str:
    """One line for the log: what a client on the network meets."""
    tls = "mutual TLS" if security.grpc_ssl_mutual else "TLS" if security.grpc_ssl else "plaintext"
    return (f"grpc {tls} on {endpoints.host}, http on {endpoints.http_bind}, metrics on {endpoints.metrics_bind}, "
            f"admin APIs {security.admin_api}")


def _supervise(server: TritonServer, supervisor: Supervisor, endpoints: Endpoints, opts: RepoOptions,
               stopping: list) -> int:
    announced = drain_logged = forced = False
    while True:
        try:
            rc = server.wait(timeout_s=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if stopping and not drain_logged:
            drain_logged = True
            print("health: draining (SIGTERM): readiness is false, in-flight requests finish", flush=True)
        if stopping and not forced and server.unload_stuck():
            forced = True   # the drain is done; only a model version 2.51 never unloads keeps it waiting
            print(f"serve: every request finished, but tritonserver still unloads {UNLOAD_GRACE_S:.0f} s later "
                  f"(a model version it never releases); stopping it", flush=True)
            server.kill()
        if not announced and supervisor.became_ready.is_set():
            announced = True
            print(f"ready: model '{ENSEMBLE}' on grpc {endpoints.grpc_url}, http {endpoints.http_url}, "
                  f"metrics {endpoints.metrics_url} "
                  f"(streaming: {'on' if opts.decoupled else 'off'})", flush=True)
        if supervisor.exit_code is not None and not stopping:
            print(f"serve: giving up ({supervisor.status()['reason']}); stopping tritonserver", file=sys.stderr,
                  flush=True)
            rc = server.stop()
            print(f"tritonserver exited with code {rc}", flush=True)
            return supervisor.exit_code
    server.kill_leftovers()
    leftovers = server.cleanup_shm()
    if leftovers:
        print(f"removed {len(leftovers)} leftover shared-memory region(s)", flush=True)
    print(f"tritonserver exited with code {rc}" + (" (killed after the drain)" if forced else ""), flush=True)
    if stopping:
        return 0 if forced or rc in (0, -signal.SIGTERM) else 1
    print("serve: tritonserver exited unexpectedly", file=sys.stderr, flush=True)
    return EXIT_SERVER_DIED
