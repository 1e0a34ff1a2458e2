"""A throw-away PKI for the TLS tests, made with the `openssl` CLI (the commands docs/deployment.md shows): a CA,
a server certificate for localhost / 127.0.0.1 (usable as a client certificate too: the launcher's probe presents
it under mutual TLS), a client certificate signed by the CA, and a second CA nobody trusts."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]   # EC: fast to make


@dataclass(frozen=True)
class Pki:
    ca: Path              # CA certificate (PEM)
    server_cert: Path
    server_key: Path
    client_cert: Path     # signed by `ca`
    client_key: Path
    other_ca: Path        # a CA that signed nothing here
    other_cert: Path      # a client certificate signed by `other_ca`
    other_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", *KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=videochat test {name}", cwd=cwd)


def _signed(name: str, ca: str, extensions: str, cwd: Path) -> None:
    _openssl("req", *KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


def make_pki(directory: Path) -> Pki:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _ca("ca", d)
    _ca("other-ca", d)
    _signed("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                            "extendedKeyUsage=serverAuth,clientAuth\n", d)
    _signed("client", "ca", "extendedKeyUsage=clientAuth\n", d)
    _signed("other", "other-ca", "extendedKeyUsage=clientAuth\n", d)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "other-ca.pem", d / "other.pem", d / "other.key")
