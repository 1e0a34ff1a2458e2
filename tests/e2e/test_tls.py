"""TLS, mutual TLS and the restricted admin APIs through `python -m videochat serve` (demo checkpoint, CPU), with
certificates the test makes (tests/support/certs.py), reached with the `videochat` CLI's own flags.

* TLS: `ask --ssl --root-certificates CA` answers; without the CA (the system roots), with another CA, or in
  plaintext the call fails with UNAVAILABLE (exit 3). The launcher's own probe passes over TLS (the replica
  says "ready:" only after it).
* mutual TLS: a client with a certificate signed by the CA answers; one without a certificate, or with one from
  another CA, is refused.
* admin APIs, restricted by default: without the key, model control (load/unload), shared-memory registration
  and the log / trace settings are refused on gRPC and HTTP and the model stays loaded; with `--admin-key-file`'s
  key they answer. The supervisor holds the key: a killed worker is still reloaded (over mutual TLS).

Both replicas start together (about a minute on 2 busy cores), then each test takes seconds; the recovery one
takes the reload's 15-40 s.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from support.certs import make_pki
from support.replica import VIDEO, Served, processes_under
from videochat.launch.security import ADMIN_HEADER, GRPC_ADMIN_HEADER
from videochat_client import cli

ADMIN_KEY = "test-admin-key-0123456789"
RECOVERY_WITHIN_S = 90.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, pki):
    """(tls, mtls): one replica with TLS and a random admin key, one with mutual TLS and a key file."""
    key_file = tmp_path_factory.mktemp("secret") / "admin-key"
    key_file.write_text(ADMIN_KEY + "\n")
    common = ["--grpc-ssl", "--grpc-server-cert", str(pki.server_cert), "--grpc-server-key", str(pki.server_key),
              "--grpc-root-cert", str(pki.ca), "--preprocess-instances", "1", "--probe-interval-s", "0.5"]
    tls = Served(tmp_path_factory.mktemp("tls"), *common)
    mtls = Served(tmp_path_factory.mktemp("mtls"), *common, "--grpc-ssl-mutual", "--admin-key-file", str(key_file),
                  "--old-stub-grace-s", "5")
    try:
        yield tls.wait_ready(), mtls.wait_ready()
    finally:
        codes = [s.stop() for s in (tls, mtls)]
        assert codes == [0, 0], (codes, tls.output(20), mtls.output(20))
        assert processes_under(tls.work_dir) == [] and processes_under(mtls.work_dir) == []


def ask(url: str, *tls_flags: str) -> int:
    return cli.main(["ask", "--url", url, "--retries", "0", "--timeout", "60", "--max-new-tokens", "4",
                     "--num-segments", "2", *tls_flags, str(VIDEO), "What happens?"])


def test_tls_ask_works_with_the_ca(replicas, pki, capsys):
    tls, _ = replicas
    assert ask(tls.url, "--ssl", "--root-certificates", str(pki.ca)) == 0
    assert capsys.readouterr().out.strip()
    # the probe of `videochat health` over TLS, like the launcher's own (which made the replica ready)
    assert cli.main(["health", "--probe", "--url", tls.url, "--ssl", "--root-certificates", str(pki.ca)]) == 0
    assert '"probe": {"ok": true' in capsys.readouterr().out
    assert tls.readiness()[0] == 200


@pytest.mark.parametrize("flags", [("--ssl",), ("--ssl", "--root-certificates", "OTHER_CA"), ()],
                         ids=["system-roots", "other-ca", "plaintext"])
def test_tls_refuses_a_client_that_cannot_verify_it(replicas, pki, capsys, flags):
    tls, _ = replicas
    flags = tuple(str(pki.other_ca) if f == "OTHER_CA" else f for f in flags)
    assert ask(tls.url, *flags) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err, err
    print(f"\n{flags or 'plaintext'}: {err.strip()[:300]}")
    assert tls.readiness()[0] == 200   # and the replica is unharmed


def test_mtls_ask_works_with_a_client_certificate(replicas, pki, capsys):
    _, mtls = replicas
    assert ask(mtls.url, "--ssl", "--root-certificates", str(pki.ca), "--private-key", str(pki.client_key),
               "--certificate-chain", str(pki.client_cert)) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("which", ["no-certificate", "other-ca-certificate"])
def test_mtls_refuses_a_client_without_a_trusted_certificate(replicas, pki, capsys, which):
    _, mtls = replicas
    cert = () if which == "no-certificate" else ("--private-key", str(pki.other_key),
                                                 "--certificate-chain", str(pki.other_cert))
    assert ask(mtls.url, "--ssl", "--root-certificates", str(pki.ca), *cert) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err, err
    print(f"\n{which}: {err.strip()[:300]}")


# -- the admin APIs ------------------------------------------------------------------------------------------------
def raw_client(served: Served, pki, *, mutual: bool):
    cert = dict(private_key=str(pki.client_key), certificate_chain=str(pki.client_cert)) if mutual else {}
    return grpcclient.InferenceServerClient(served.url, ssl=True, root_certificates=str(pki.ca), **cert)


ADMIN_CALLS = {   # one call of each restricted group; none would change the replica if it went through
    "model-repository: unload": lambda c, h: c.unload_model("videochat_missing", headers=h),
    "model-repository: load": lambda c, h: c.load_model("videochat_missing", headers=h),
    "shared-memory": lambda c, h: c.register_system_shared_memory("x", "/videochat_test_none", 64, headers=h),
    "logging": lambda c, h: c.update_log_settings({"log_verbose_level": 0}, headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
}


@pytest.mark.parametrize("call", list(ADMIN_CALLS))
def test_admin_apis_refuse_a_client_without_the_key(replicas, pki, call):
    tls, _ = replicas
    client = raw_client(tls, pki, mutual=False)
    with pytest.raises(InferenceServerException) as exc:
        ADMIN_CALLS[call](client, None)
    assert "restricted" in str(exc.value).lower() and f"'{GRPC_ADMIN_HEADER}'" in str(exc.value), str(exc.value)
    # what users need stays open: health, metadata, the model config the probe reads
    assert client.is_model_ready("preprocessing") and client.is_server_ready()
    assert client.get_model_config("videochat", as_json=True)["config"]["name"] == "videochat"


def test_admin_http_api_refuses_without_the_key(replicas):
    tls, _ = replicas
    request = urllib.request.Request(f"http://127.0.0.1:{tls.http_port}/v2/repository/models/preprocessing/unload",
                                     data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=10)
    body = exc.value.read().decode()
    assert exc.value.code in (401, 403) and f"'{ADMIN_HEADER}'" in body, (exc.value.code, body)
    print(f"\nHTTP {exc.value.code}: {body}")
    with urllib.request.urlopen(f"http://127.0.0.1:{tls.http_port}/v2/models/preprocessing/ready", timeout=10) as r:
        assert r.status == 200   # still loaded


def test_admin_key_unlocks_the_admin_apis(replicas, pki):
    _, mtls = replicas
    client = raw_client(mtls, pki, mutual=True)
    with pytest.raises(InferenceServerException):
        client.get_log_settings()
    with pytest.raises(InferenceServerException):   # the HTTP header's name is not the gRPC one
        client.get_log_settings(headers={ADMIN_HEADER: ADMIN_KEY})
    key = {GRPC_ADMIN_HEADER: ADMIN_KEY}
    settings = client.get_log_settings(headers=key, as_json=True)
    assert "log_verbose_level" in json.dumps(settings), settings
    index = client.get_model_repository_index(headers=key, as_json=True)
    assert {m["name"] for m in index["models"]} >= {"preprocessing", "videochat_llm", "videochat"}


def test_tls_recovery_still_works_with_the_admin_apis_restricted(replicas, pki, capsys):
    """The supervisor reloads a killed worker through model control (it holds the key) and probes it over
    mutual TLS with the server's own certificate."""
    _, mtls = replicas
    pid = mtls.kill_stub("preprocessing")
    unready_s = mtls.wait_readiness(False, 5)
    back_s = mtls.wait_readiness(True, RECOVERY_WITHIN_S)
    status = mtls.readiness()[1]
    print(f"\npreprocessing stub {pid} killed: /ready 503 after {unready_s:.2f} s, 200 again after "
          f"{back_s + unready_s:.1f} s; recoveries {status['recoveries']}")
    assert status["recoveries"] >= 1 and status["phase"] == "serving", status
    assert ask(mtls.url, "--ssl", "--root-certificates", str(pki.ca), "--private-key", str(pki.client_key),
               "--certificate-chain", str(pki.client_cert)) == 0
