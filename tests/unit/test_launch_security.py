"""`serve`'s security flags without a server (tests/e2e/test_tls.py runs them for real): what tritonserver is
told, where each port listens, how the launcher's probe connects, each bad combination of flags as one `error:`
line and exit 2; and the /dev/shm sizing rule with its start-up warning."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support.paths import ROOT, TINY
from videochat.launch.launcher import warn_small_shm
from videochat.launch.render import RepoOptions
from videochat.launch.security import ADMIN_APIS, ADMIN_HEADER, SecurityOptions
from videochat.launch.shm import request_pixel_bytes, shm_bytes_needed, shm_size
from videochat.launch.tritonserver import MemoryOptions

MiB = 2**20


@pytest.fixture
def pem(tmp_path):
    for name in ("cert.pem", "key.pem", "ca.pem", "probe.pem", "probe.key"):
        (tmp_path / name).write_text("not checked here: tritonserver reads it\n")
    return tmp_path


def test_defaults_plaintext_with_admin_apis_restricted():
    sec = SecurityOptions()
    key = sec.admin_key()
    assert key and key != sec.admin_key()          # random, one per start
    assert sec.triton_args(key) == [f"--grpc-restricted-protocol={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={key}",
                                    f"--http-restricted-api={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={key}"]
    assert sec.http_host("0.0.0.0") == "0.0.0.0" and sec.metrics_host("0.0.0.0") == "0.0.0.0"
    assert sec.probe_client_kwargs() == {}
    assert SecurityOptions(admin_api="open").admin_key() is None and SecurityOptions().triton_args(None) == []


def test_tls_arguments_http_on_loopback_and_the_probe(pem):
    sec = SecurityOptions(grpc_ssl=True, grpc_server_cert=pem / "cert.pem", grpc_server_key=pem / "key.pem")
    args = sec.triton_args(None)
    assert args == ["--grpc-use-ssl=true", f"--grpc-server-cert={pem / 'cert.pem'}",
                    f"--grpc-server-key={pem / 'key.pem'}"]
    assert sec.http_host("0.0.0.0") == "127.0.0.1"      # Triton's HTTP has no TLS
    assert sec.http_host("127.0.0.1") == "127.0.0.1"
    assert SecurityOptions(grpc_ssl=True, grpc_server_cert=pem / "cert.pem", grpc_server_key=pem / "key.pem",
                           http_address="10.1.2.3").http_host("0.0.0.0") == "10.1.2.3"
    assert sec.probe_target("0.0.0.0") == "127.0.0.1" and sec.probe_target("10.0.0.5") == "10.0.0.5"
    # no CA given: the probe trusts the (self-signed) server certificate itself
    assert sec.probe_client_kwargs() == {"ssl": True, "root_certificates": str(pem / "cert.pem")}


def test_mutual_tls_and_the_probes_client_certificate(pem):
    common = dict(grpc_ssl=True, grpc_ssl_mutual=True, grpc_server_cert=pem / "cert.pem",
                  grpc_server_key=pem / "key.pem", grpc_root_cert=pem / "ca.pem", probe_host="localhost")
    sec = SecurityOptions(**common)
    assert sec.triton_args(None)[-2:] == [f"--grpc-root-cert={pem / 'ca.pem'}", "--grpc-use-ssl-mutual=true"]
    assert sec.probe_target("0.0.0.0") == "localhost"
    assert sec.probe_client_kwargs() == {"ssl": True, "root_certificates": str(pem / "ca.pem"),
                                         "private_key": str(pem / "key.pem"),
                                         "certificate_chain": str(pem / "cert.pem")}
    own = SecurityOptions(**common, probe_cert=pem / "probe.pem", probe_key=pem / "probe.key").probe_client_kwargs()
    assert (own["certificate_chain"], own["private_key"]) == (str(pem / "probe.pem"), str(pem / "probe.key"))


def test_admin_key_file(tmp_path):
    good = tmp_path / "key"
    good.write_text("s3cret-Key_1\n")
    assert SecurityOptions(admin_key_file=good).admin_key() == "s3cret-Key_1"
    for bad in ("", "two words", "a:b", "a=b", "a,b"):
        good.write_text(bad)
        with pytest.raises(ValueError, match="one word"):
            SecurityOptions(admin_key_file=good)


@pytest.mark.parametrize("flags, message", [
    (["--grpc-ssl"], "--grpc-ssl needs --grpc-server-cert and --grpc-server-key"),
    (["--grpc-ssl-mutual"], "--grpc-ssl-mutual needs --grpc-ssl"),
    (["--grpc-ssl", "--grpc-ssl-mutual", "--grpc-server-cert", "{pem}/cert.pem", "--grpc-server-key",
      "{pem}/key.pem"], "--grpc-ssl-mutual needs --grpc-root-cert"),
    (["--grpc-ssl", "--grpc-server-cert", "{pem}/missing.pem", "--grpc-server-key", "{pem}/key.pem"],
     "--grpc-server-cert {pem}/missing.pem: no such file"),
    (["--probe-cert", "{pem}/probe.pem"], "give --probe-cert and --probe-key together"),
    (["--admin-key-file", "{pem}/nokey"], "--admin-key-file {pem}/nokey: no such file"),
    (["--admin-key-file", "{pem}/cert.pem"], "the key must be one word"),
    (["--admin-api", "none"], "invalid choice"),
], ids=["no-cert", "mutual-without-ssl", "mutual-without-ca", "missing-file", "probe-cert-alone", "no-key-file",
        "bad-key", "admin-api"])
def test_bad_security_flags_exit_2_with_one_error_line(pem, flags, message):
    argv = [f.format(pem=pem) for f in flags]
    result = subprocess.run([sys.executable, "-m", "videochat", "serve", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message.format(pem=pem) in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_shm_rule():
    step = 64 * MiB
    assert request_pixel_bytes() == 7 * 8 * 3 * 224 * 224 * 2          # 6 tiles + the global view, 8 frames
    need = shm_bytes_needed(preprocess_instances=4, instances=1, max_batch_size=8, max_video_bytes=512 * MiB)
    # 4 x (1.4 x 512 MiB + 16.9 MB -> 12 steps + 1) + (8 x 16.9 MB -> 3 steps + 1)
    assert need == 4 * 13 * step + 4 * step and 3 * 2**30 < need <= 4 * 2**30
    laptop = shm_bytes_needed(preprocess_instances=1, instances=1, max_batch_size=4, max_video_bytes=64 * MiB)
    assert laptop == 3 * step + 3 * step and laptop <= 2**30


def test_small_shm_warning(capsys):
    have = shm_size("/dev/shm")
    assert have and have > 64 * MiB
    ok = RepoOptions(checkpoint=TINY, device="cpu", preprocess_instances=1, max_video_bytes=64 * MiB)
    assert warn_small_shm(ok, MemoryOptions()) is False and capsys.readouterr().err == ""
    # a configuration that needs more than this machine's /dev/shm (uploads of its whole size)
    big = RepoOptions(checkpoint=TINY, device="cpu", preprocess_instances=2, max_video_bytes=have)
    assert warn_small_shm(big, MemoryOptions()) is True
    err = capsys.readouterr().err
    assert err.startswith("warning: /dev/shm is ") and "Shared memory sizing" in err, err


def test_each_port_listens_on_its_own_address(pem):
    from videochat.launch.tritonserver import Endpoints, TritonInstall, server_args

    endpoints = Endpoints("0.0.0.0", 8000, 8001, 8002, http_host="127.0.0.1", metrics_host="10.0.0.7")
    install = TritonInstall(pem / "tritonserver", pem, ())
    args = server_args(install, pem, endpoints, shm_prefix="x_", exit_timeout_s=30, security=SecurityOptions(),
                       admin_key="k")
    assert {"--grpc-address=0.0.0.0", "--http-address=127.0.0.1", "--metrics-address=10.0.0.7"} <= set(args)
    assert f"--grpc-restricted-protocol={','.join(ADMIN_APIS)}:{ADMIN_HEADER}=k" in args
    assert endpoints.http_url == "http://127.0.0.1:8000" and endpoints.metrics_url == "http://10.0.0.7:8002/metrics"


def test_a_taken_port_is_named_with_its_address():
    import socket

    from videochat.errors import UserError
    from videochat.launch.launcher import check_ports_free
    from videochat.launch.tritonserver import Endpoints

    from support.replica import free_ports

    with socket.socket() as taken:
        taken.bind(("127.0.0.2", 0))   # taken on the metrics address only
        taken.listen()
        port = taken.getsockname()[1]
        http_port, grpc_port = free_ports(2)
        ports = dict(http_port=http_port, grpc_port=grpc_port, metrics_port=port)
        with pytest.raises(UserError, match=f"port {port} \\(--metrics-port\\) is already in use on 127.0.0.2"):
            check_ports_free(Endpoints("127.0.0.1", metrics_host="127.0.0.2", **ports))
        with pytest.raises(UserError, match="--metrics-address 'no.such.host.invalid'"):
            check_ports_free(Endpoints("127.0.0.1", metrics_host="no.such.host.invalid", **ports))
