"""What `serve` exposes and to whom: TLS / mutual TLS on Triton's gRPC port, Triton's admin APIs behind a key,
and where each port listens (docs/deployment.md, "Deploying safely").

* TLS: Triton's own `--grpc-use-ssl` (and `--grpc-use-ssl-mutual`: every client must present a certificate that
  `--grpc-root-cert` signed). Triton 2.51 has no TLS for its HTTP port, so with TLS on the HTTP port listens on
  loopback unless `--http-address` says otherwise: the launcher needs it (readiness, model reloads), nobody else.
* Admin APIs: model control (`model-repository`), shared-memory registration, and the logging and trace settings
  answer only requests that carry the key in the header `ADMIN_HEADER` (HTTP) or `GRPC_ADMIN_HEADER` (gRPC)
  (Triton's `--grpc-restricted-protocol` / `--http-restricted-api`). Inference, health, metadata, model config
  and statistics stay open. The supervisor reloads a dead model through model control, so the launcher holds
  the key: read from `--admin-key-file`, or a random one per start. Triton takes it on its command line, so
  processes of the same host (container) that may read /proc see it; nobody on the network does.
* The supervisor's own probe dials the local gRPC port with the same TLS settings (and, for mTLS, a client
  certificate: the server's own unless `--probe-cert` / `--probe-key` are given).
"""
from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Triton's names of the API groups that change the server rather than use it.
ADMIN_APIS = ("model-repository", "shared-memory", "logging", "trace")
ADMIN_HEADER = "videochat-admin-key"      # HTTP header (lower case: gRPC metadata keys are)
# Triton 2.51 prefixes the key of --grpc-restricted-protocol: gRPC callers send this one (measured)
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
LOOPBACK = "127.0.0.1"


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SecurityOptions:
    """The flags of `serve` that decide who can reach what (their defaults are these)."""

    grpc_ssl: bool = False                       # TLS on the gRPC port
    grpc_ssl_mutual: bool = False                # and require a client certificate signed by grpc_root_cert
    grpc_server_cert: Optional[Path] = None      # PEM
    grpc_server_key: Optional[Path] = None       # PEM
    grpc_root_cert: Optional[Path] = None        # PEM CA: verifies clients (mTLS) and, for the probe, the server
    probe_cert: Optional[Path] = None            # mTLS: the supervisor's client certificate (default: the server's)
    probe_key: Optional[Path] = None
    probe_host: str = ""                         # address the probe dials ("" = --host, 127.0.0.1 for a wildcard)
    admin_api: str = "restricted"                # "restricted": ADMIN_APIS need ADMIN_HEADER; "open": Triton's default
    admin_key_file: Optional[Path] = None        # the key (one line); None = a random key per start
    http_address: str = ""                       # "" = --host; with grpc_ssl: loopback (Triton's HTTP has no TLS)
    metrics_address: str = ""                    # "" = --host

    def __post_init__(self) -> None:
        if self.admin_api not in ("restricted", "open"):
            raise ValueError(f"admin_api must be 'restricted' or 'open', got {self.admin_api!r}")
        tls_files = {"--grpc-server-cert": self.grpc_server_cert, "--grpc-server-key": self.grpc_server_key}
        if self.grpc_ssl_mutual and not self.grpc_ssl:
            raise ValueError("--grpc-ssl-mutual needs --grpc-ssl")
        if self.grpc_ssl:
            missing = [flag for flag, path in tls_files.items() if path is None]
            if missing:
                raise ValueError(f"--grpc-ssl needs {' and '.join(missing)}")
        if self.grpc_ssl_mutual and self.grpc_root_cert is None:
            raise ValueError("--grpc-ssl-mutual needs --grpc-root-cert (the CA that signs client certificates)")
        if (self.probe_cert is None) != (self.probe_key is None):
            raise ValueError("give --probe-cert and --probe-key together")
        files = {**tls_files, "--grpc-root-cert": self.grpc_root_cert, "--probe-cert": self.probe_cert,
                 "--probe-key": self.probe_key, "--admin-key-file": self.admin_key_file}
        for flag, path in files.items():
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if self.admin_key_file is not None:
            self.admin_key()   # a malformed key fails with the other flags, before anything slow

    # -- where things listen ---------------------------------------------------------------------------------
    def http_host(self, host: str) -> str:
        if self.http_address:
            return self.http_address
        return LOOPBACK if self.grpc_ssl and not is_loopback(host) else host

    def metrics_host(self, host: str) -> str:
        return self.metrics_address or host

    def probe_target(self, host: str) -> str:
        return self.probe_host or (LOOPBACK if is_wildcard(host) else host)

    # -- the admin key ---------------------------------------------------------------------------------------
    def admin_key(self) -> Optional[str]:
        """The key for ADMIN_APIS (None when they are open). A new random one on each call without a key file:
        call once per server start."""
        if self.admin_api == "open":
            return None
        if self.admin_key_file is None:
            return secrets.token_urlsafe(32)
        key = Path(self.admin_key_file).read_text().strip()
        if not key or any(c.isspace() or c in ",:=" for c in key):
            raise ValueError(f"--admin-key-file {self.admin_key_file}: the key must be one word without "
                             f"',', ':' or '=' (Triton's flag syntax)")
        return key

    # -- tritonserver and the probe --------------------------------------------------------------------------
    def triton_args(self, admin_key: Optional[str]) -> list[str]:
        args = []
        if self.grpc_ssl:
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.grpc_server_cert).resolve()}",
                     f"--grpc-server-key={Path(self.grpc_server_key).resolve()}"]
            if self.grpc_root_cert is not None:
                args.append(f"--grpc-root-cert={Path(self.grpc_root_cert).resolve()}")
            if self.grpc_ssl_mutual:
                args.append("--grpc-use-ssl-mutual=true")
        if admin_key is not None:
            apis = ",".join(ADMIN_APIS)
            args += [f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}",
                     f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}"]
        return args

    def probe_client_kwargs(self) -> dict:
        """TLS keyword arguments of `videochat_client.VideoChatClient` for the supervisor's probe."""
        if not self.grpc_ssl:
            return {}
        # the CA that signed the server's certificate; without one, the certificate itself (self-signed)
        kwargs = {"ssl": True, "root_certificates": str(self.grpc_root_cert or self.grpc_server_cert)}
        if self.grpc_ssl_mutual:
            kwargs["private_key"] = str(self.probe_key or self.grpc_server_key)
            kwargs["certificate_chain"] = str(self.probe_cert or self.grpc_server_cert)
        return kwargs
