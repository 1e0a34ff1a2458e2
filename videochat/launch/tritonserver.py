"""Find tritonserver, prepare the python backend stub for this interpreter, run and stop the server.

Two installations are supported:
* NVIDIA's image (`/opt/tritonserver`): used as is; its stub matches the image's python.
* the PyPI wheel nvidia-pytriton (`site-packages/pytriton/tritonserver`, server 2.51): copied once into a work
  directory, with `python_backend_stubs/<X.Y>/triton_python_backend_stub` put into `backends/python`.
The stub embeds libpython and takes `sys.prefix` from the first `python3` on PATH, so the environment puts this
interpreter's LIBDIR on LD_LIBRARY_PATH and its bin directory first on PATH (docs/serving.md,
"python -m videochat serve").
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from videochat.launch import logs
from videochat.launch.security import ADMIN_HEADER, SecurityOptions

NVIDIA_IMAGE_DIR = Path("/opt/tritonserver")
# tritonserver 2.51 logs this once every in-flight inference finished after SIGTERM; only unloading is left then
DRAINED_MARK = b"All models are stopped, unloading models"
UNLOAD_GRACE_S = 10.0


class LaunchError(RuntimeError):
    """The server could not be found, prepared or started; the message says what to do."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path
    lib_dirs: tuple[Path, ...]      # extra LD_LIBRARY_PATH entries


@dataclass(frozen=True)
class MemoryOptions:
    """How tritonserver and its python stubs use memory; why these values: docs/operations.md, "Memory and the
    soak test". Measured under a mixed load with the 2.51 wheel (bench/soak_bench.py)."""

    # Step by which the python backend grows a stub's /dev/shm region (Triton's default is 1 MiB). The backend
    # keeps every old mapping of a region alive in both the stub and tritonserver, so each growth adds the
    # region's touched pages to their RSS once more: 1 MiB steps made tritonserver's RSS climb ~110 MB per step.
    # A large step means few growths, hence few mappings; the cost is up to one step of unused region per stub.
    shm_growth_mb: int = 64
    # glibc: allocations of at least this many KiB are mmap'ed and returned to the OS when freed. glibc's default
    # (dynamic, up to 32 MiB) serves the ensemble's multi-MB intermediate tensors from its arenas, whose RSS then
    # creeps up with fragmentation (~10 KB per request). 0 = leave glibc's default. Inherited by the stubs.
    malloc_mmap_threshold_kb: int = 0

    def __post_init__(self) -> None:
        if self.shm_growth_mb < 1:
            raise ValueError(f"shm_growth_mb must be >= 1, got {self.shm_growth_mb}")
        if self.malloc_mmap_threshold_kb < 0:
            raise ValueError(f"malloc_mmap_threshold_kb must be >= 0, got {self.malloc_mmap_threshold_kb}")

    def env(self) -> dict[str, str]:
        if not self.malloc_mmap_threshold_kb:
            return {}
        return {"MALLOC_MMAP_THRESHOLD_": str(self.malloc_mmap_threshold_kb * 1024)}

    def args(self) -> list[str]:
        return [f"--backend-config=python,shm-growth-byte-size={self.shm_growth_mb * 1024 * 1024}"]


@dataclass(frozen=True)
class Endpoints:
    host: str = "127.0.0.1"          # gRPC (and, unless given below, HTTP and metrics) listen here
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    http_host: str = ""              # "" = host
    metrics_host: str = ""           # "" = host

    @property
    def http_bind(self) -> str:
        return self.http_host or self.host

    @property
    def metrics_bind(self) -> str:
        return self.metrics_host or self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_bind}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_bind}:{self.metrics_port}/metrics"


def find_triton(work_dir: Path) -> TritonInstall:
    """NVIDIA's image first, then the nvidia-pytriton wheel (prepared under work_dir/tritonserver)."""
    if (NVIDIA_IMAGE_DIR / "bin" / "tritonserver").is_file():
        return TritonInstall(NVIDIA_IMAGE_DIR / "bin" / "tritonserver", NVIDIA_IMAGE_DIR / "backends", ())
    try:
        import pytriton
    except ImportError:
        raise LaunchError("tritonserver not found: neither /opt/tritonserver nor the nvidia-pytriton wheel "
                          "(pip install nvidia-pytriton==0.7.0)") from None
    site = Path(pytriton.__file__).resolve().parents[1]
    return _prepare_wheel_server(site / "pytriton" / "tritonserver", site / "nvidia_pytriton.libs",
                                 Path(work_dir) / "tritonserver")


def _prepare_wheel_server(src: Path, libs: Path, dst: Path) -> TritonInstall:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(f"no python backend stub for Python {version} in {src / 'python_backend_stubs'}")
    marker = dst / f".prepared-python{version}"
    if not marker.is_file():            # copy once; never modify the venv's copy
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, dst / "backends" / "python" / "triton_python_backend_stub")
        marker.write_text(str(stub) + "\n")
    return TritonInstall(dst / "bin" / "tritonserver", dst / "backends", (libs,))


def server_env(install: TritonInstall, base: dict[str, str] | None = None, *,
               memory: MemoryOptions = MemoryOptions()) -> dict[str, str]:
    """Environment for tritonserver and its python stubs: this interpreter's libpython and site-packages, and
    the allocator settings of `memory` (a value already in the environment wins: an operator's override)."""
    env = dict(os.environ if base is None else base)
    for key, value in memory.env().items():
        env.setdefault(key, value)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [p for p in [libdir, *map(str, install.lib_dirs), env.get("LD_LIBRARY_PATH", "")] if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env.pop("PYTHONHOME", None)
    return env


def server_args(install: TritonInstall, repository: Path, endpoints: Endpoints, *, shm_prefix: str,
                exit_timeout_s: int, log_verbose: int = 0, models: Sequence[str] = (),
                memory: MemoryOptions = MemoryOptions(), security: SecurityOptions = SecurityOptions(),
                admin_key: str | None = None) -> list[str]:
    """`models` given: explicit model control (only these are loaded, and `load_model` can reload one: the only
    way to replace a dead python stub in 2.51); empty: Triton loads the whole repository and no model can be
    reloaded. `security`: TLS and the admin APIs behind `admin_key` (security.py)."""
    control = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)] if models else []
    return [
        str(install.binary),
        f"--model-repository={Path(repository).resolve()}",
        f"--backend-directory={install.backends}",
        f"--grpc-address={endpoints.host}", f"--http-address={endpoints.http_bind}",
        f"--metrics-address={endpoints.metrics_bind}",
        f"--grpc-port={endpoints.grpc_port}", f"--http-port={endpoints.http_port}",
        f"--metrics-port={endpoints.metrics_port}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        *memory.args(),
        *security.triton_args(admin_key),
        f"--exit-timeout-secs={exit_timeout_s}",
        f"--log-verbose={log_verbose}",
        *control,
    ]


def _error_text(body: bytes) -> str:
    """The first line of Triton's JSON error (the rest is the model's Python traceback, in the server log)."""
    try:
        text = str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        text = body.decode(errors="replace")
    return text.strip().splitlines()[0][:300] if text.strip() else "(no detail)"


class TritonServer:
    """One tritonserver process: start, wait until ready, stop with SIGTERM (then SIGKILL), clean its shm."""

    def __init__(self, install: TritonInstall, repository: Path, endpoints: Endpoints, *,
                 log_path: Path | None = None, exit_timeout_s: int = 30, models: Sequence[str] = (),
                 memory: MemoryOptions = MemoryOptions(), log_verbose: int = 0, log_format: str = "text",
                 security: SecurityOptions = SecurityOptions()) -> None:
        self.endpoints = endpoints
        self.security = security
        self.admin_key = security.admin_key()   # held here for reloads; Triton gets it on its command line
        self.repository = Path(repository).resolve()
        self.exit_timeout_s = exit_timeout_s
        self.shm_prefix = f"videochat_{uuid.uuid4().hex[:12]}_"
        self.args = server_args(install, repository, endpoints, shm_prefix=self.shm_prefix,
                                exit_timeout_s=exit_timeout_s, log_verbose=log_verbose, models=models, memory=memory,
                                security=security, admin_key=self.admin_key)
        self.env = server_env(install, memory=memory)
        self.log_path = log_path
        self.log_format = log_format     # "json": each line becomes a JSON record (videochat.launch.logs)
        self.proc: subprocess.Popen | None = None
        self.inference_done_at: float | None = None   # when the drain after SIGTERM had no inference left

    def start(self) -> "TritonServer":
        # own session: Ctrl-C in a terminal reaches only us, and we forward SIGTERM
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        threading.Thread(target=self._pump, args=(self.proc.stdout,), name="tritonserver-log", daemon=True).start()
        return self

    def _pump(self, pipe) -> None:
        """Copy the server's output to its log file (or our stdout), noting when its drain finished."""
        sink = open(self.log_path, "ab") if self.log_path else getattr(sys.stdout, "buffer", None)
        try:
            for line in iter(pipe.readline, b""):
                if DRAINED_MARK in line:
                    self.inference_done_at = time.monotonic()
                try:
                    if self.log_format == "json":
                        record = logs.triton_record(line.decode(errors="replace"))
                        if self.log_path and sink is not None:
                            sink.write(logs.dumps(record).encode())
                            sink.flush()
                        else:
                            logs.emit(record)
                    elif sink is None:
                        print(line.decode(errors="replace"), end="", flush=True)
                    else:
                        sink.write(line)
                        sink.flush()
                except (OSError, ValueError):   # our stdout went away: keep reading, or the server blocks
                    pass
        finally:
            pipe.close()
            if self.log_path and sink is not None:
                sink.close()

    def unload_stuck(self, grace_s: float | None = None) -> bool:
        """After SIGTERM: every inference finished more than `grace_s` ago, yet the server still runs. Measured on
        2.51: after a request failed on a dead stub (or, rarely, after a refused request) a model version stays
        referenced and never unloads, so the server waits out --exit-timeout-secs and exits 1 with nothing left
        to do. A normal unload takes ~4 s."""
        grace = UNLOAD_GRACE_S if grace_s is None else grace_s
        done = self.inference_done_at
        return (done is not None and self.proc is not None and self.proc.poll() is None
                and time.monotonic() - done > grace)

    def kill(self) -> None:
        """SIGKILL the server and its stubs (its own process group)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise LaunchError(f"tritonserver exited with code {self.proc and self.proc.returncode} before it was "
                                  f"ready{self._log_hint()}")
            try:
                with urllib.request.urlopen(f"{self.endpoints.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise LaunchError(f"tritonserver not ready after {timeout_s:.0f} s{self._log_hint()}")

    def reload_model(self, name: str, timeout_s: float = 600.0) -> None:
        """Replace a model's instances with new ones (new python stubs): the only cure for a dead stub in 2.51.

        Needs explicit model control (`models=`). Measured on 2.51: `load` of a loaded model whose files did not
        change since its last load is a no-op, and one where only config.pbtxt changed keeps the old instances
        (a config update), so the version directory's files are touched first; that forces a full reload.
        Triton then reloads the ensembles that use the model by itself. Raises LaunchError if the load fails."""
        now = time.time()
        for path in (self.repository / name).glob("[0-9]*/**/*"):
            if path.is_file():
                os.utime(path, (now, now))
        request = urllib.request.Request(f"{self.endpoints.http_url}/v2/repository/models/{name}/load", data=b"",
                                         method="POST", headers=self.admin_headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                pass
        except urllib.error.HTTPError as exc:
            raise LaunchError(f"reloading {name} failed: HTTP {exc.code}: {_error_text(exc.read())}") from None
        except OSError as exc:
            raise LaunchError(f"reloading {name} failed: {exc}") from None

    def admin_headers(self) -> dict[str, str]:
        """Headers that unlock Triton's admin APIs (model control, ...) on this server; {} when they are open."""
        return {ADMIN_HEADER: self.admin_key} if self.admin_key else {}

    def terminate(self) -> None:
        """Ask for a graceful stop (in-flight requests finish)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self) -> int:
        """SIGTERM, wait the server's exit timeout (+ margin), SIGKILL if needed (or as soon as only a stuck unload
        is left, see unload_stuck); clean our shm regions."""
        rc = 0
        if self.proc is not None:
            self.terminate()
            deadline = time.monotonic() + self.exit_timeout_s + 15
            while True:
                try:
                    rc = self.proc.wait(0.2)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline or self.unload_stuck():
                        self.kill()
            self.kill_leftovers()
        self.cleanup_shm()
        return rc

    def kill_leftovers(self) -> None:
        """After the server exited: SIGKILL what is left of its process group. Stubs exit with their server, but
        one still initializing does not (seen once: tritonserver crashed on SIGTERM during a reload)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.kill()

    def cleanup_shm(self) -> list[str]:
        """Remove /dev/shm regions with this server's prefix (left behind only by crashed stubs)."""
        leftovers = glob.glob(f"/dev/shm/{self.shm_prefix}*")
        for path in leftovers:
            try:
                os.unlink(path)
            except OSError:
                pass
        return leftovers

    def _log_hint(self) -> str:
        if not self.log_path or not Path(self.log_path).is_file():
            return ""
        tail = Path(self.log_path).read_text(errors="replace").splitlines()[-25:]
        return f"; last log lines ({self.log_path}):\n" + "\n".join(tail)
