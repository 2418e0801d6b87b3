"""Offline validation of the deployment files: Dockerfile, docker-compose.yml, the
Kubernetes overlays under deploy/k8s, and the monitoring files under deploy/monitoring.

Nothing here needs Docker, a cluster or the network:
  - docker-compose.yml is validated against the compose specification (check-jsonschema's bundled
    copy), then its key fields are asserted;
  - every kustomization is rendered with `kubectl kustomize` and every object is validated strictly
    (unknown fields are errors) against the Kubernetes 1.30 schemas bundled in kubernetes-validate;
    an apiVersion/kind that 1.30 does not serve fails. The Prometheus Operator's CRDs (ServiceMonitor,
    PrometheusRule) are checked by hand below;
  - every metric that the dashboard, the alert rules, the prometheus-adapter rules and the HPAs
    reference must exist (docs/API.md's table + Triton 2.51's nv_* names, tests/support/deploy_metrics.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import kubernetes_validate
import pytest
import yaml

from minigpt5.launcher import process as server
from support import deploy_metrics as dm

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD_FILE = MONITORING / "grafana" / "dashboards" / "minigpt5.json"
ADAPTER_VALUES_FILE = MONITORING / "prometheus-adapter" / "values.yaml"

KUBERNETES_VERSION = "1.30.0"
KUSTOMIZATIONS = ["deploy/k8s/overlays/cpu-trial", "deploy/k8s/overlays/h100", "deploy/k8s/weights-fill"]
SERVER_OVERLAYS = ["deploy/k8s/overlays/cpu-trial", "deploy/k8s/overlays/h100"]
# Custom resources the Kubernetes schemas cannot know; checked field by field below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002
SERVER_LABELS = {"app.kubernetes.io/name": "minigpt5", "app.kubernetes.io/component": "server"}
SERVER, GATEWAY = "minigpt5", "minigpt5-gateway"  # the Deployments (and their HPAs and Services)
GATEWAY_PORT = 8080
# Time after SIGTERM that the server needs beyond --exit-timeout-secs (unloading the models): what
# `minigpt5 serve` waits for before it kills tritonserver.
UNLOAD_MARGIN_S = server.UNLOAD_MARGIN_S


# --- helpers ---------------------------------------------------------------------------------------


def parse_duration(text) -> float:
    """'90s', '15m', '1m30s', '1h', 2 (seconds) -> seconds (compose, Prometheus and Go durations)."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s|d|w|y)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * unit[u] for n, u in parts)


def parse_bytes(text) -> int:
    """'2gb', '64m', 1024 -> bytes (compose sizes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).lower())
    assert m, f"not a size: {text!r}"
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)]


def parse_quantity(text) -> float:
    """Kubernetes quantity ('8Gi', '500m', '2') -> a number (bytes or cores)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(text))
    assert m, f"not a quantity: {text!r}"
    mult = {
        None: 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }[m.group(2)]
    return float(m.group(1)) * mult


def exit_timeout_secs(args: list[str]) -> int:
    """The --exit-timeout-secs passed to tritonserver (after `--`), or Triton's default 30."""
    assert "--" in args, f"no tritonserver flags after `--`: {args}"
    for arg in args[args.index("--") + 1 :]:
        if arg.startswith("--exit-timeout-secs="):
            return int(arg.split("=", 1)[1])
    return 30


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


@functools.cache
def render(kustomization: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: cannot render the kustomizations")
    proc = subprocess.run(
        [kubectl, "kustomize", str(ROOT / kustomization)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"{kustomization} renders nothing"
    return docs


def objects(kustomization: str, kind: str) -> list[dict]:
    return [d for d in render(kustomization) if d["kind"] == kind]


def the(kustomization: str, kind: str, name: str | None = None) -> dict:
    found = [d for d in objects(kustomization, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kustomization}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")


def all_containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def validate_k8s(obj: dict) -> None:
    """Strict validation against the Kubernetes 1.30 schema; raises on any problem. The strict schemas
    reject unknown fields, and each pins its apiVersion (kubernetes-validate finds the schema file by
    kind and the apiVersion without its domain, so `apps.example.com/v1` Deployment is checked against
    apps/v1's schema, whose apiVersion enum then rejects it)."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# --- docker-compose.yml ------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_specification():
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_triton_service(compose):
    triton = compose["services"]["triton"]
    assert triton["profiles"] == ["gpu"], "the GPU server is one profile, the CPU one the other"
    assert triton["build"]["target"] == "server"
    published = {int(p.split(":")[-1]) for p in triton["ports"]}
    assert published == {TRITON_HTTP, TRITON_GRPC, TRITON_METRICS}

    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)

    # python backend tensors go through /dev/shm: far more than Docker's 64 MB default
    assert parse_bytes(triton["shm_size"]) >= 1024**3
    assert triton["ulimits"]["memlock"] == -1
    assert triton["ulimits"]["stack"] == 67108864

    health = triton["healthcheck"]
    assert "http://localhost:8000/v2/health/ready" in health["test"]
    assert parse_duration(health["start_period"]) >= 10 * 60, "loading real weights takes minutes"

    # weights: a read-only mount at /weights, and the command serves them
    mounts = [v for v in triton["volumes"] if isinstance(v, dict) and v["target"] == "/weights"]
    assert len(mounts) == 1 and mounts[0]["read_only"] is True
    command = triton["command"]
    assert command[:2] == ["minigpt5", "serve"]
    assert command[command.index("--weights") + 1] == "/weights"

    # docker compose stop must wait for Triton's graceful shutdown
    assert parse_duration(triton["stop_grace_period"]) >= exit_timeout_secs(command) + UNLOAD_MARGIN_S


def test_compose_loadtest_profile_runs_distributed_locust(compose):
    master, worker = compose["services"]["locust-master"], compose["services"]["locust-worker"]
    for svc in (master, worker):
        assert svc["profiles"] == ["loadtest"]
        assert svc["build"]["target"] == "loadtest"
        cmd = svc["command"]
        assert cmd[cmd.index("-f") + 1] == "loadtest/locustfile.py"
        assert cmd[cmd.index("--host") + 1] == "http://triton:8000"
    assert "--master" in master["command"]
    assert "--worker" in worker["command"]
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"
    assert master["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "${MINIGPT5_BIND:-127.0.0.1}:8089:8089" in master["ports"]


def test_compose_monitoring_profile(compose):
    prometheus, grafana = compose["services"]["prometheus"], compose["services"]["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    # every host path mounted from the repository exists
    for svc in (prometheus, grafana):
        for volume in svc["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{source} is mounted but missing"

    config = load_yaml(MONITORING / "prometheus" / "prometheus.yml")
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"triton:{TRITON_METRICS}" in targets
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert any(
        v.startswith("./deploy/monitoring/prometheus/rules:/etc/prometheus/rules") for v in prometheus["volumes"]
    )

    datasources = load_yaml(MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = load_yaml(MONITORING / "grafana" / "provisioning" / "dashboards" / "minigpt5.yaml")
    path = providers["providers"][0]["options"]["path"]
    assert f"./deploy/monitoring/grafana/dashboards:{path}:ro" in grafana["volumes"]


# --- docker-compose.yml: profiles, interpolation, what each `--profile` starts ---------------------------
# No `docker compose` here (the docker CLI without its compose plugin): these helpers do the two steps of
# `docker compose --profile P config` the tests need: ${VAR:-default} interpolation and profile selection.

INTERPOLATION = re.compile(r"\$(?:\$|\{(\w+)(?:(:?-)([^}]*))?\})")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, applied to every string in `value`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.groups()
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return INTERPOLATION.sub(one, value)


def compose_services(compose_file: dict, profiles: set[str], env: dict[str, str] | None = None) -> dict[str, dict]:
    """The services `docker compose --profile ...` starts (those without profiles always), interpolated."""
    services = interpolate(compose_file["services"], env or {})
    return {name: svc for name, svc in services.items() if not svc.get("profiles") or profiles & set(svc["profiles"])}


def published(service: dict) -> list[tuple[str, int]]:
    """(host address, host port) of each "ADDRESS:HOST:CONTAINER" port."""
    out = []
    for port in service.get("ports", []):
        address, host, _container = port.rsplit(":", 2)
        out.append((address, int(host)))
    return out


PROFILE_SETS = [{"cpu"}, {"gpu"}, {"cpu", "monitoring", "loadtest"}, {"gpu", "monitoring", "loadtest"}]


def test_interpolation_helper():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET} $$HOME", env) == "x d  d  $HOME"


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(sorted(p)))
def test_every_dependency_of_a_profile_is_started_or_optional(compose, profiles):
    services = compose_services(compose, profiles)
    servers = {n for n in services if n.startswith("triton")}
    assert len(servers) == 1, f"--profile {profiles}: exactly one server, got {servers}"
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        depends = dict.fromkeys(depends, {}) if isinstance(depends, list) else depends
        for target, spec in depends.items():
            assert target in services or spec.get("required") is False, f"{name} needs {target}"
        assert not depends or set(depends) & set(services), f"{name} waits for nothing that runs"


def test_cpu_profile_needs_no_gpu_and_no_weights(compose, monkeypatch):
    services = compose_services(compose, {"cpu"})
    assert set(services) == {"triton-cpu", "gateway"}
    for name, svc in services.items():
        assert "devices" not in json.dumps(svc.get("deploy", {})), f"{name} reserves a device"
        for volume in svc.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            assert source.startswith("./deploy/"), f"{name} mounts {source}: only repository files"
    server = services["triton-cpu"]
    assert server["build"]["target"] == "server"
    assert server["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    args = serve_invocation(monkeypatch, server["command"][1:])
    assert args.weights is None and args.device == "cpu", "tiny weights on the CPU"
    # reachable as `triton`, the name the gateway, Prometheus and Locust use
    assert "triton" in server["networks"]["default"]["aliases"]
    assert "http://localhost:8000/v2/health/ready" in server["healthcheck"]["test"]  # what the others wait for
    assert parse_duration(server["stop_grace_period"]) >= exit_timeout_secs(server["command"]) + UNLOAD_MARGIN_S


def test_both_servers_share_everything_but_gpu_weights_and_image(compose):
    gpu, cpu = compose["services"]["triton"], compose["services"]["triton-cpu"]
    shared = {"ports", "networks", "shm_size", "ulimits", "init", "stop_grace_period", "environment"}
    for key in shared:
        assert gpu[key] == cpu[key], key
    assert cpu["image"] != gpu["image"], "a CPU build must not overwrite the CUDA image's tag"


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(sorted(p)))
def test_ports_are_published_on_localhost_unless_asked(compose, profiles):
    for env, address in (({}, "127.0.0.1"), ({"MINIGPT5_BIND": "0.0.0.0"}, "0.0.0.0")):
        ports = [p for svc in compose_services(compose, profiles, env).values() for p in published(svc)]
        assert ports and {a for a, _ in ports} == {address}, (env, ports)
        assert len({p for _, p in ports}) == len(ports), "two services on one host port"


def test_grafana_has_no_anonymous_access_and_no_default_password(compose):
    grafana = compose_services(compose, {"monitoring"})["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "", "no default: the operator must set it"
    entrypoint = " ".join(grafana["entrypoint"])
    # the container refuses to start without it ($$ is compose's escape for a literal $)
    assert '[ -z "${GF_SECURITY_ADMIN_PASSWORD}" ]' in entrypoint and "exit 64" in entrypoint
    assert entrypoint.endswith("exec /run.sh")
    assert "${GRAFANA_ADMIN_PASSWORD:-}" in json.dumps(compose["services"]["grafana"]["environment"])


def test_locust_reports_go_to_a_volume(compose):
    master = compose["services"]["locust-master"]
    (mount,) = [v for v in master["volumes"] if v.split(":")[1] == "/reports"]
    assert mount.split(":")[0] in compose["volumes"], "a named volume, kept between runs"
    env = interpolate(master["environment"], {})
    assert env["LOCUST_CSV"] == "/reports/run" and env["LOCUST_HTML"] == "/reports/run.html"
    assert env["LOCUST_CSV_FULL_HISTORY"] == "true"
    # the loadtest image runs as nobody: /reports must exist and be its (a new named volume copies it)
    instructions = dockerfile_instructions()
    froms = [n for n, i in enumerate(instructions) if i.cmd == "FROM"] + [len(instructions)]
    start = next(n for n in froms[:-1] if instructions[n].value[-1] == "loadtest")
    stage = instructions[start : froms[froms.index(start) + 1]]
    runs = " ".join(i.value[0] for i in stage if i.cmd == "RUN")
    assert "mkdir /reports && chown nobody:nogroup /reports" in runs
    assert [i.value[0] for i in stage if i.cmd == "USER"][-1] == "nobody"


# --- Dockerfile and .dockerignore ----------------------------------------------------------------------


def dockerfile_instructions() -> list:
    """The Dockerfile as parsed by BuildKit's own parser (the `dockerfile` package wraps it)."""
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def dockerfile_args() -> dict[str, str]:
    return dict(i.value[0].split("=", 1) for i in dockerfile_instructions() if i.cmd == "ARG" and "=" in i.value[0])


def final_stage() -> list:
    instructions = dockerfile_instructions()
    last_from = max(n for n, i in enumerate(instructions) if i.cmd == "FROM")
    return instructions[last_from:]


def stage_env(stage: list) -> dict[str, str]:
    env = {}
    for i in stage:
        if i.cmd == "ENV":
            env.update(zip(i.value[0::2], i.value[1::2]))
    return env


def final_cmd() -> list[str]:
    cmd = [i for i in final_stage() if i.cmd == "CMD"][-1]
    assert cmd.json, "exec form, so that signals reach the server"
    return list(cmd.value)


def test_dockerfile_server_stage_is_triton_2_51_and_the_default_target():
    assert dockerfile_args()["TRITON_IMAGE"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert final_stage()[0].value == ("${TRITON_IMAGE}", "AS", "server")


def test_dockerfile_installs_the_server_extra_with_cuda_torch_and_numpy_below_2():
    stage = final_stage()
    runs = " ".join(i.value[0] for i in stage if i.cmd == "RUN")
    args = dockerfile_args()
    assert args["TORCH_VERSION"] == "2.13.0"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert '".[server]"' in runs
    # numpy<2 and the torch pin hold for every later pip install (a constraints file)
    assert stage_env(stage)["PIP_CONSTRAINT"] == "/etc/minigpt5-constraints.txt"
    assert "numpy<2" in runs and "/etc/minigpt5-constraints.txt" in runs


def test_dockerfile_runs_as_non_root_and_keeps_the_triton_entrypoint():
    stage = final_stage()
    users = [i.value[0] for i in stage if i.cmd == "USER"]
    assert users, "the server stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes' runAsNonRoot can verify it"
    assert not [i for i in stage if i.cmd == "ENTRYPOINT"], "keep NVIDIA's entrypoint (CUDA compat setup)"
    cmd = final_cmd()
    assert cmd[:2] == ["minigpt5", "serve"] and cmd[cmd.index("--weights") + 1] == "/weights"


def test_dockerfile_never_bakes_weights_in():
    for i in dockerfile_instructions():
        text = " ".join(i.value)
        if i.cmd in ("COPY", "ADD"):
            assert not re.search(r"weights|\.safetensors|\.bin\b|\.pth?\b|\.ckpt", text), text
        assert not (
            i.cmd == "RUN" and re.search(r"weights (convert|download|tiny)|huggingface-cli|hf download", text)
        ), text


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore semantics, simplified: the last matching pattern wins, `!` re-includes,
    a pattern also matches everything under a matching directory, `**` spans directories."""
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        "weights/manifest.json",
        "weights/vicuna.safetensors",
        ".venv/bin/python",
        ".git/config",
        "minigpt5/stray_checkpoint.safetensors",
        "model_repository/minigpt5/1/model.pt",
        "minigpt5/__pycache__/cli.cpython-310.pyc",
        "tests/deploy/test_deploy.py",
    ],
)
def test_dockerignore_keeps_weights_and_clutter_out_of_the_build_context(path):
    assert dockerignore_excludes(path)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "minigpt5/__init__.py",
        "minigpt5/weights.py",
        "client/minigpt5_client/__init__.py",
        "bench/minigpt5_bench/__init__.py",
        "model_repository/minigpt5/config.pbtxt",
        "loadtest/locustfile.py",
    ],
)
def test_dockerignore_sends_what_the_images_need(path):
    assert not dockerignore_excludes(path)


def test_every_file_the_dockerfile_copies_by_name_is_in_the_build_context():
    for i in dockerfile_instructions():
        if i.cmd != "COPY" or any(f.startswith("--from") for f in i.flags):
            continue
        for source in i.value[:-1]:
            if source == ".":
                continue
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert not dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"


# --- Kubernetes: rendering and schema validation ----------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders(kustomization):
    docs = render(kustomization)
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_strictly_against_kubernetes_1_30(kustomization):
    problems = []
    for doc in render(kustomization):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # checked by test_servicemonitor / test_prometheusrule
        try:
            validate_k8s(doc)
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{name}: {err.message}")  # unknown or removed apiVersion
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{name}: {err.message} at {'/'.join(map(str, err.path))}")
    assert not problems, "\n".join(problems)


def test_the_validation_catches_what_it_must():
    """Negative controls: the checks above are only worth something if these fail."""
    deployment = the("deploy/k8s/overlays/h100", "Deployment", SERVER)
    validate_k8s(deployment)

    typo = json.loads(json.dumps(deployment))
    server_container(typo)["livenesProbe"] = {"httpGet": {"path": "/", "port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(typo)

    removed = dict(the("deploy/k8s/overlays/h100", "PodDisruptionBudget"), apiVersion="policy/v1beta1")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_k8s(removed)  # removed in 1.25

    hpa_v2beta2 = dict(
        the("deploy/k8s/overlays/h100", "HorizontalPodAutoscaler", SERVER), apiVersion="autoscaling/v2beta2"
    )
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_k8s(hpa_v2beta2)  # removed in 1.26

    impostor = dict(deployment, apiVersion="apps.example.com/v1")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(impostor)


@pytest.mark.parametrize(
    "kustomization,kinds",
    [
        (
            "deploy/k8s/overlays/cpu-trial",
            {
                "Namespace",
                "ServiceAccount",
                "Deployment",
                "Service",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "ConfigMap",
                "NetworkPolicy",
            },
        ),
        (
            "deploy/k8s/overlays/h100",
            {
                "Namespace",
                "ServiceAccount",
                "Deployment",
                "Service",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "PersistentVolumeClaim",
                "ServiceMonitor",
                "PrometheusRule",
                "ConfigMap",
                "NetworkPolicy",
                "Ingress",
            },
        ),
        ("deploy/k8s/weights-fill", {"PersistentVolumeClaim", "Job"}),
    ],
)
def test_each_kustomization_holds_the_expected_objects(kustomization, kinds):
    assert {d["kind"] for d in render(kustomization)} == kinds


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_everything_lands_in_one_namespace(kustomization):
    namespaces = {d["metadata"].get("namespace") for d in render(kustomization) if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces


# --- Kubernetes: the server Deployment -------------------------------------------------------------


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_probes_use_tritons_health_endpoints(overlay):
    container = server_container(the(overlay, "Deployment", SERVER))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": TRITON_HTTP, "grpc": TRITON_GRPC, "metrics": TRITON_METRICS}
    startup, ready, live = container["startupProbe"], container["readinessProbe"], container["livenessProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert ready["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert live["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # the startup probe must outlast model loading; liveness must not kill a merely busy server
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 10 * 60
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_dev_shm_is_a_memory_emptydir_within_the_memory_limit(overlay):
    pod = the(overlay, "Deployment", SERVER)["spec"]["template"]["spec"]
    container = server_container(the(overlay, "Deployment", SERVER))
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    shm = parse_quantity(volume["emptyDir"]["sizeLimit"])
    assert 1 * 2**30 <= shm < parse_quantity(container["resources"]["limits"]["memory"])


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_graceful_termination_matches_the_exit_timeout(overlay):
    pod = the(overlay, "Deployment", SERVER)["spec"]["template"]["spec"]
    container = server_container(the(overlay, "Deployment", SERVER))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + exit_timeout_secs(container["args"]) + UNLOAD_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_run_restricted(kustomization):
    for workload in objects(kustomization, "Deployment") + objects(kustomization, "Job"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        for c in all_containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]
    for namespace in objects(kustomization, "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_cpu_trial_has_no_gpu_and_no_weights_volume():
    deployment = the("deploy/k8s/overlays/cpu-trial", "Deployment", SERVER)
    container = server_container(deployment)
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container["resources"].get(section, {})
    assert "--weights" not in container["args"], "the trial builds tiny random weights"
    assert not any("persistentVolumeClaim" in v for v in deployment["spec"]["template"]["spec"]["volumes"])


def test_h100_deployment_takes_one_gpu_and_mounts_the_weights_read_only():
    overlay = "deploy/k8s/overlays/h100"
    deployment = the(overlay, "Deployment", SERVER)
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-H100")

    volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    pvc = the(overlay, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes mount it at once"
    for c in all_containers(pod):
        for m in c.get("volumeMounts", []):
            if m["name"] == volume["name"]:
                assert m["readOnly"] is True and m["mountPath"] == "/weights"

    # serve --weights $(WEIGHTS_DIR); the init container checks the same directory
    args = container["args"]
    assert args[args.index("--weights") + 1] == "$(WEIGHTS_DIR)"
    weights_dirs = {e["value"] for c in all_containers(pod) for e in c.get("env", []) if e["name"] == "WEIGHTS_DIR"}
    assert len(weights_dirs) == 1 and weights_dirs.pop().startswith("/weights/")
    assert [c["name"] for c in pod["initContainers"]] == ["weights-check"]
    assert exit_timeout_secs(args) >= 30


def test_weights_fill_job_writes_where_the_servers_read():
    job = the("deploy/k8s/weights-fill", "Job")
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    server_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in the("deploy/k8s/overlays/h100", "Deployment", SERVER)["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert server_claims <= claims
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    server_env = {
        e["name"]: e["value"] for e in server_container(the("deploy/k8s/overlays/h100", "Deployment", SERVER))["env"]
    }
    assert server_env["WEIGHTS_DIR"] == f"/weights/{env['WEIGHTS_VERSION']}"
    assert "minigpt5 weights convert" in pod["containers"][0]["command"][-1]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})
    assert (
        the("deploy/k8s/weights-fill", "Job")["metadata"]["namespace"]
        == the("deploy/k8s/overlays/h100", "Deployment", SERVER)["metadata"]["namespace"]
    )


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_services_and_pdb_select_the_server_pods(overlay):
    deployment = the(overlay, "Deployment", SERVER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == SERVER_LABELS
    container_ports = {p["name"] for p in server_container(deployment)["ports"]}
    ports_by_service = {}
    for service in objects(overlay, "Service"):
        if service["metadata"]["name"] == GATEWAY:
            continue  # test_gateway_deployment_service_and_hpa
        assert selects(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
        ports_by_service[service["metadata"]["name"]] = {p["port"] for p in service["spec"]["ports"]}
    assert ports_by_service == {"minigpt5": {TRITON_HTTP, TRITON_GRPC}, "minigpt5-metrics": {TRITON_METRICS}}
    pdb = the(overlay, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_hpa_scales_the_deployment_on_the_adapters_per_pod_metric(overlay):
    hpa = the(overlay, "HorizontalPodAutoscaler", SERVER)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": the(overlay, "Deployment", SERVER)["metadata"]["name"],
    }
    # in-flight requests (proportional to the load) and the decoder's waiting requests (queues form)
    names = []
    adapter = load_yaml(MONITORING / "prometheus-adapter" / "values.yaml")
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        name = metric["pods"]["metric"]["name"]
        names.append(name)
        rule = next(r for r in adapter["rules"]["custom"] if r["name"]["as"] == name)
        assert re.fullmatch(rule["name"]["matches"], name)
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        (series,) = dm.promql_metric_names(rule["seriesQuery"])
        assert dm.documented_metrics()[series] == "gauge", f"{series}: the signals are docs/API.md gauges"
    assert names == ["minigpt5_inflight_requests", "minigpt5_num_requests_waiting"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_h100_keeps_two_servers_at_least():
    hpa = the("deploy/k8s/overlays/h100", "HorizontalPodAutoscaler", SERVER)
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_replicas_are_left_to_the_hpa(overlay):
    """A `replicas` field would be re-applied by every `kubectl apply`, undoing the HPA's count."""
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in objects(overlay, "HorizontalPodAutoscaler")}
    assert scaled == {SERVER, GATEWAY}
    for name in scaled:
        assert "replicas" not in the(overlay, "Deployment", name)["spec"], name


# --- Kubernetes: exposure (Ingress), NetworkPolicy, images pinned by digest ----------------------------------

INFERENCE_HTTP_PATHS = {"/v2/models/minigpt5/generate", "/v2/models/minigpt5/generate_stream", "/v2/health/ready"}
INFERENCE_GRPC_PATHS = {
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/inference.GRPCInferenceService/ModelReady",
}
TRITON_HTTP_BODY_CRASH = 4_184_700  # docs/LIMITS.md: Triton 2.51's HTTP frontend dies on form bodies above this


def ingress_routes(overlay: str) -> list[tuple[dict, str, str, dict]]:
    """(ingress, path, pathType, backend service) for every path of every Ingress."""
    return [
        (ing, p["path"], p["pathType"], p["backend"]["service"])
        for ing in objects(overlay, "Ingress")
        for rule in ing["spec"]["rules"]
        for p in rule["http"]["paths"]
    ]


def test_ingress_routes_only_inference_and_the_gateway():
    overlay = "deploy/k8s/overlays/h100"
    routes = ingress_routes(overlay)
    assert routes
    services = {s["metadata"]["name"]: s for s in objects(overlay, "Service")}
    grpc_paths, http_paths = set(), set()
    for ingress, path, path_type, backend in routes:
        service = services[backend["service"]["name"] if "service" in backend else backend["name"]]
        port = next(p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"])
        assert service["metadata"]["name"] != "minigpt5-metrics", "metrics stay inside"
        if service["metadata"]["name"] == GATEWAY:
            assert port["port"] == GATEWAY_PORT
        elif port["port"] == TRITON_GRPC:
            assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
            assert path_type == "Exact"
            grpc_paths.add(path)
        else:
            assert port["port"] == TRITON_HTTP and path_type == "Exact", path
            http_paths.add(path)
    # only these of Triton: no /v2/repository, /v2/logging, /v2/trace, no RepositoryModelLoad & co.
    assert http_paths == INFERENCE_HTTP_PATHS and grpc_paths == INFERENCE_GRPC_PATHS


def test_every_ingress_has_tls_and_a_body_size_cap():
    for ingress in objects("deploy/k8s/overlays/h100", "Ingress"):
        name, annotations = ingress["metadata"]["name"], ingress["metadata"]["annotations"]
        hosts = {r["host"] for r in ingress["spec"]["rules"]}
        assert hosts <= {h for t in ingress["spec"]["tls"] for h in t["hosts"]} and all(
            t["secretName"] for t in ingress["spec"]["tls"]
        ), name
        assert annotations["nginx.ingress.kubernetes.io/ssl-redirect"] == "true", name
        cap = parse_bytes(annotations["nginx.ingress.kubernetes.io/proxy-body-size"])
        assert 0 < cap <= 64 * 2**20, name
        backends = {
            p["backend"]["service"]["port"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]
        }
        if name != GATEWAY and "http" in backends:  # Triton's own HTTP frontend
            assert cap < TRITON_HTTP_BODY_CRASH, name
        if "grpc" not in backends:  # streams (SSE) must not be buffered
            assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off", name
        assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 300, name


def policy_rules(overlay: str, name: str) -> tuple[dict, list[dict]]:
    policy = the(overlay, "NetworkPolicy", name)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return policy, policy["spec"]["ingress"]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_network_policy_keeps_metrics_and_triton_inside(overlay):
    server_pods = the(overlay, "Deployment", SERVER)["spec"]["template"]["metadata"]["labels"]
    policy, rules = policy_rules(overlay, "minigpt5-server")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], server_pods)
    by_port = {}
    for rule in rules:
        for port in rule["ports"]:
            by_port[port["port"]] = rule["from"]
    container_ports = {p["name"] for p in server_container(the(overlay, "Deployment", SERVER))["ports"]}
    assert set(by_port) == container_ports == {"http", "grpc", "metrics"}

    def namespaces(sources):
        return {
            s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for s in sources
            if "namespaceSelector" in s
        }

    # metrics: Prometheus' namespace only, not even this namespace's pods
    assert namespaces(by_port["metrics"]) == {"monitoring"} and len(by_port["metrics"]) == 1
    for port in ("http", "grpc"):
        assert namespaces(by_port[port]) == {"ingress-nginx"}
        assert {"podSelector": {}} in by_port[port], "the gateway and in-cluster clients"
    for source in [s for sources in by_port.values() for s in sources]:
        assert source, "an empty `from` entry would admit every source"

    gateway_pods = the(overlay, "Deployment", GATEWAY)["spec"]["template"]["metadata"]["labels"]
    policy, (rule,) = policy_rules(overlay, "minigpt5-gateway")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], gateway_pods)
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert namespaces(rule["from"]) == {"ingress-nginx"}


def test_images_can_be_pinned_by_digest(tmp_path):
    """kustomize's images: digest turns every image of the overlay into NAME@sha256:..."""
    digest = "sha256:" + "ab" * 32
    overlay = ROOT / "deploy/k8s/overlays/h100"
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(overlay, tmp_path)],  # kustomize takes no absolute bases
                "images": [
                    {"name": f"registry.example.com/minigpt5/{n}", "digest": digest}
                    for n in ("minigpt5-triton", "minigpt5-gateway")
                ],
            }
        )
    )
    proc = subprocess.run(
        [shutil.which("kubectl") or "kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    images = [
        c["image"]
        for d in yaml.safe_load_all(proc.stdout)
        if d and d["kind"] in ("Deployment", "Job")
        for c in all_containers(d["spec"]["template"]["spec"])
    ]
    assert images and all(i.endswith("@" + digest) for i in images), images
    names = {i.split("@")[0] for i in images}
    assert names == {"registry.example.com/minigpt5/minigpt5-triton", "registry.example.com/minigpt5/minigpt5-gateway"}


# --- Prometheus Operator custom resources (no schema in kubernetes-validate) -------------------------

SERVICEMONITOR_SPEC_FIELDS = {
    "selector",
    "endpoints",
    "namespaceSelector",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
    "sampleLimit",
}
SERVICEMONITOR_ENDPOINT_FIELDS = {
    "port",
    "path",
    "interval",
    "scrapeTimeout",
    "scheme",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}
RULE_GROUP_FIELDS = {"name", "interval", "rules", "labels", "limit"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def check_rule_groups(groups: list[dict]) -> None:
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "rule group names must be unique"
    for group in groups:
        assert group.keys() <= RULE_GROUP_FIELDS and group["rules"], group["name"]
        for rule in group["rules"]:
            assert rule.keys() <= RULE_FIELDS, rule
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            dm.promql_metric_names(rule["expr"])  # parses
            if "for" in rule:
                parse_duration(rule["for"])
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"info", "warning", "critical"}
                assert rule["annotations"]["summary"]


def test_servicemonitor():
    overlay = "deploy/k8s/overlays/h100"
    monitor = the(overlay, "ServiceMonitor")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    spec = monitor["spec"]
    assert {"selector", "endpoints"} <= spec.keys() <= SERVICEMONITOR_SPEC_FIELDS
    services = [
        s for s in objects(overlay, "Service") if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["minigpt5-metrics"]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert endpoint.keys() <= SERVICEMONITOR_ENDPOINT_FIELDS
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert parse_duration(endpoint["scrapeTimeout"]) < parse_duration(endpoint["interval"])
    assert monitor["metadata"]["namespace"] == services[0]["metadata"]["namespace"]


def test_prometheusrule():
    rule = the("deploy/k8s/overlays/h100", "PrometheusRule")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"].keys() == {"groups"}
    check_rule_groups(rule["spec"]["groups"])


def test_compose_and_kubernetes_alert_rules_are_the_same():
    k8s = load_yaml(MONITORING / "prometheusrule.yaml")["spec"]["groups"]
    files = sorted((MONITORING / "prometheus" / "rules").glob("*.yml"))
    assert files
    compose_groups = [g for f in files for g in load_yaml(f)["groups"]]
    check_rule_groups(compose_groups)
    assert compose_groups == k8s


def test_prometheus_config_and_alert_rules_with_promtool(tmp_path):
    """promtool (Prometheus' own checker; Debian/Ubuntu package `prometheus`) loads the compose config
    and the rules, and runs the alert unit tests in deploy/monitoring/prometheus/tests/."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (scripts/bootstrap.sh installs Debian's prometheus package)")
    prometheus = MONITORING / "prometheus"
    # the config names the rules by their in-container path: point it at the repository's copy
    config = (prometheus / "prometheus.yml").read_text().replace("/etc/prometheus/rules/", f"{prometheus / 'rules'}/")
    (tmp_path / "prometheus.yml").write_text(config)
    for cmd in (
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        [promtool, "check", "rules", *map(str, sorted((prometheus / "rules").glob("*.yml")))],
        [promtool, "test", "rules", *map(str, sorted((prometheus / "tests").glob("*.yml")))],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd[1:3])}:\n{proc.stdout}{proc.stderr}"


def test_dashboard_configmap_carries_the_dashboard_file():
    configmap = the("deploy/k8s/overlays/h100", "ConfigMap", "minigpt5-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["minigpt5.json"]) == json.loads(DASHBOARD_FILE.read_text())


# --- metrics: every name referenced exists ----------------------------------------------------------


@pytest.mark.parametrize(
    "expr,names",
    [
        (
            'sum(rate(minigpt5_requests_total{job=~"$job", outcome="error"}[$__rate_interval]))',
            {"minigpt5_requests_total"},
        ),
        ("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m]))) / on (job) group_left b", {"a_bucket", "b"}),
        ('{__name__="c"} + max_over_time(d[10m:1m] offset 5m)', {"c", "d"}),
        ("sum without (instance) (e) > bool 3 and f unless g or vector(1)", {"e", "f", "g"}),
        ("rate(h[${__rate_interval}]) * 2", {"h"}),
        ("time() - 1e3", set()),
    ],
)
def test_promql_metric_names(expr, names):
    assert dm.promql_metric_names(expr) == names


def test_promql_metric_names_rejects_what_it_cannot_check():
    with pytest.raises(ValueError):
        dm.promql_metric_names("sum(rate(x[5m])")  # does not parse
    with pytest.raises(ValueError):
        dm.promql_metric_names('{__name__=~"nv_.*"}')  # names picked by a regex


def test_template_and_adapter_expressions_are_extracted():
    dashboard = {
        "templating": {
            "list": [
                {"type": "query", "query": {"query": 'label_values(nv_inference_count{model="minigpt5"}, job)'}},
                {"type": "query", "query": "label_values(instance)"},
                {"type": "datasource", "query": "prometheus"},
            ]
        },
        "panels": [{"type": "row", "panels": [{"targets": [{"expr": "x_total"}]}]}],
    }
    assert sorted(dm.dashboard_exprs(dashboard)) == ['nv_inference_count{model="minigpt5"}', "x_total"]
    adapter = {
        "rules": {
            "custom": [
                {
                    "seriesQuery": 'y{namespace!="",pod!=""}',
                    "metricsQuery": "sum by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})",
                }
            ]
        }
    }
    exprs = dm.adapter_rule_exprs(adapter)
    assert set().union(*map(dm.promql_metric_names, exprs)) == {"y"}


def test_hpa_metrics_are_followed_through_the_adapter(tmp_path):
    assert dm.hpa_metric_series() == {"minigpt5_inflight_requests", "minigpt5_num_requests_waiting"}
    assert dm.hpa_metric_series() <= dm.referenced_metric_names()
    adapter = tmp_path / "deploy" / "monitoring" / "prometheus-adapter" / "values.yaml"
    adapter.parent.mkdir(parents=True)
    adapter.write_text(ADAPTER_VALUES_FILE.read_text())
    hpa = tmp_path / "deploy" / "k8s" / "hpa.yaml"
    hpa.parent.mkdir(parents=True)
    hpa.write_text(
        yaml.safe_dump(
            {
                "kind": "HorizontalPodAutoscaler",
                "spec": {
                    "metrics": [
                        {"type": "Pods", "pods": {"metric": {"name": "minigpt5_num_requests_waiting"}}},
                        {"type": "Resource", "resource": {"name": "cpu"}},
                    ]
                },
            }
        )
    )
    assert dm.hpa_metric_series(tmp_path) == {"minigpt5_num_requests_waiting"}
    hpa.write_text(
        yaml.safe_dump(
            {
                "kind": "HorizontalPodAutoscaler",
                "spec": {"metrics": [{"type": "Pods", "pods": {"metric": {"name": "triton_pending_requests"}}}]},
            }
        )
    )
    with pytest.raises(ValueError, match="triton_pending_requests"):
        dm.hpa_metric_series(tmp_path)


def test_api_md_metric_table_is_read():
    documented = dm.documented_metrics()
    assert documented["minigpt5_inflight_requests"] == "gauge"
    assert documented["minigpt5_time_to_first_token_seconds"] == "histogram"
    assert "minigpt5_time_to_first_token_seconds_bucket" in dm.documented_metric_series()
    assert len(documented) >= 9


def test_every_referenced_metric_exists():
    referenced = dm.referenced_metric_names()
    unknown = referenced - dm.known_metric_names()
    assert not unknown, f"metrics referenced but neither in docs/API.md nor in Triton 2.51: {sorted(unknown)}"
    assert referenced & dm.TRITON_251_METRICS and referenced & dm.documented_metric_series()


def test_the_dashboard_shows_every_custom_metric_and_tritons():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    used = set().union(*map(dm.promql_metric_names, dm.dashboard_exprs(dashboard)))
    for family, kind in dm.documented_metrics().items():
        assert used & dm.series_names(family, kind), f"the dashboard does not show {family}"
    for name in (
        "nv_inference_request_success",
        "nv_inference_exec_count",
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
    ):
        assert name in used
    # zero by construction: `minigpt5`'s execute returns at once and it calls each stage model one
    # batch at a time, so requests never queue in Triton (they wait in the decoder and the image
    # queue, which the minigpt5_* metrics show)
    for name in (
        "nv_inference_pending_request_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
    ):
        assert name not in used, name


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(dm._walk_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_exposition_parser():
    text = """# HELP minigpt5_inflight_requests requests
# TYPE minigpt5_inflight_requests gauge
minigpt5_inflight_requests{model="minigpt5"} 1
minigpt5_time_to_first_token_seconds_bucket{model="minigpt5",le="+Inf"} 3
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
"""
    assert dm.exposition_series_names(text) == {
        "minigpt5_inflight_requests",
        "minigpt5_time_to_first_token_seconds_bucket",
        "nv_gpu_utilization",
    }


# --- the commands the deployment runs, parsed by the project's real command line ----------------------


def serve_invocation(monkeypatch, argv: list[str]):
    """The argparse namespace `minigpt5 <argv>` hands to serve_forever (which is not run)."""
    import minigpt5.cli as cli
    import minigpt5.commands.serve as server

    captured = []
    monkeypatch.setattr(server, "serve_forever", lambda args: captured.append(args) or 0)
    assert cli.main(argv) == 0
    (args,) = captured
    return args


def expand_k8s_vars(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def serve_commands(compose_file: dict) -> dict[str, tuple[list[str], str | None]]:
    """Every `minigpt5 serve` command line the deployment runs: {where: (argv, weights dir or None)}."""
    commands = {}
    commands["Dockerfile CMD"] = (final_cmd(), "/weights")
    commands["docker-compose triton"] = (compose_file["services"]["triton"]["command"], "/weights")
    commands["docker-compose triton-cpu"] = (compose_file["services"]["triton-cpu"]["command"], None)
    for overlay in SERVER_OVERLAYS:
        container = server_container(the(overlay, "Deployment", SERVER))
        env = {e["name"]: e["value"] for e in container["env"]}
        commands[overlay] = (expand_k8s_vars(container["args"], env), env.get("WEIGHTS_DIR"))
    return commands


def test_every_serve_command_parses_with_the_real_cli(monkeypatch, compose):
    for where, (argv, weights) in serve_commands(compose).items():
        assert argv[0] == "minigpt5", where
        args = serve_invocation(monkeypatch, argv[1:])
        assert (str(args.weights) if args.weights else None) == weights, where
        assert (args.http_port, args.grpc_port, args.metrics_port) == (TRITON_HTTP, TRITON_GRPC, TRITON_METRICS)
        assert args.host == "0.0.0.0", f"{where}: must listen beyond localhost in a container"
        after_dashes = argv[argv.index("--") + 1 :] if "--" in argv else []
        assert args.tritonserver_args == after_dashes, where
        for flag in args.tritonserver_args:
            assert flag.startswith("--") and "=" in flag, f"{where}: tritonserver flag {flag!r}"


def test_the_weights_job_calls_the_converter_with_flags_it_accepts():
    import argparse
    import shlex

    import minigpt5.weights.convert_args as convert_args

    job = the("deploy/k8s/weights-fill", "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    parser = argparse.ArgumentParser(prog="minigpt5 weights convert")
    convert_args.add_convert_arguments(parser)
    args = parser.parse_args(shlex.split(env["CONVERT_ARGS"]) + ["--out", f"/weights/{env['WEIGHTS_VERSION']}.partial"])
    for name, value in vars(args).items():
        if isinstance(value, Path) and name != "out":
            assert str(value).startswith("/upstream/"), f"--{name} must read from the upstream volume"


# --- the gateway: compose service, image, Kubernetes Deployment/Service/HPA --------------------------

GATEWAY_LABELS = {"app.kubernetes.io/name": "minigpt5", "app.kubernetes.io/component": "gateway"}
UVICORN_GRACEFUL_S = 30  # timeout_graceful_shutdown in minigpt5_client/gateway/command.py


def gateway_invocation(monkeypatch, argv: list[str]):
    """The argparse namespace `minigpt5 <argv>` hands to run_gateway (which is not run)."""
    import minigpt5.cli as cli
    import minigpt5_client.gateway.command as command

    captured = []
    monkeypatch.setattr(command, "run_gateway", lambda args: captured.append(args) or 0)
    assert cli.main(argv) == 0
    (args,) = captured
    return args


def test_compose_gateway_service(compose, monkeypatch):
    from minigpt5_client.gateway.handoff_config import load_handoff_config

    gateway = compose["services"]["gateway"]
    assert set(gateway["profiles"]) == {"cpu", "gpu"} and gateway["build"]["target"] == "gateway"
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    assert gateway["command"][:2] == ["minigpt5", "gateway"]
    args = gateway_invocation(monkeypatch, gateway["command"][1:])
    assert args.url == f"triton:{TRITON_GRPC}" and args.host == "0.0.0.0"
    assert f"${{MINIGPT5_BIND:-127.0.0.1}}:{args.port}:{args.port}" in gateway["ports"]
    (mount,) = [v for v in gateway["volumes"] if v.split(":")[1] == str(args.handoff_config)]
    config = load_handoff_config(ROOT / mount.split(":")[0])  # mounted from the repository, and valid
    variables = {"MINIGPT5_GATEWAY_API_KEYS"} | {t.api_key_env for t in config.targets.values() if t.api_key_env}
    assert variables <= gateway["environment"].keys()
    assert parse_duration(gateway["stop_grace_period"]) >= UVICORN_GRACEFUL_S + 5


def test_dockerfile_gateway_stage_has_no_torch_and_runs_as_non_root():
    instructions = dockerfile_instructions()
    froms = [n for n, i in enumerate(instructions) if i.cmd == "FROM"] + [len(instructions)]
    start = next(n for n in froms[:-1] if instructions[n].value[-1] == "gateway")
    stage = instructions[start : froms[froms.index(start) + 1]]
    runs = " ".join(i.value[0] for i in stage if i.cmd == "RUN")
    assert 'pip install ".[gateway]"' in runs and "'torch' not in sys.modules" in runs
    assert "[server]" not in runs and "index-url" not in runs
    uid = [i.value[0] for i in stage if i.cmd == "USER"][-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    cmd = [i for i in stage if i.cmd == "CMD"][-1]
    assert cmd.json and list(cmd.value[:2]) == ["minigpt5", "gateway"]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_gateway_deployment_service_and_hpa(overlay, monkeypatch):
    from minigpt5_client.gateway.handoff_config import parse_handoff_config

    deployment = the(overlay, "Deployment", GATEWAY)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    assert container["args"][:2] == ["minigpt5", "gateway"]
    args = gateway_invocation(monkeypatch, container["args"][1:])
    assert args.host == "0.0.0.0" and args.api_key_file is None

    # it reaches the servers through their Service's gRPC port
    host, port = args.url.rsplit(":", 1)
    server_service = the(overlay, "Service", host)
    assert int(port) == TRITON_GRPC in {p["port"] for p in server_service["spec"]["ports"]}
    assert selects(
        server_service["spec"]["selector"], the(overlay, "Deployment", SERVER)["spec"]["template"]["metadata"]["labels"]
    )

    # its own Service selects only gateway pods, on the port it listens on
    service = the(overlay, "Service", GATEWAY)
    assert service["spec"]["selector"] == GATEWAY_LABELS
    (service_port,) = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[service_port["targetPort"]] == args.port == GATEWAY_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": service_port["targetPort"]}

    # the hand-off configuration comes from the generated ConfigMap and is valid
    mount = next(m for m in container["volumeMounts"] if str(args.handoff_config).startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = the(overlay, "ConfigMap", volume["configMap"]["name"])
    config = parse_handoff_config(json.loads(configmap["data"][args.handoff_config.name]))
    assert config.targets and config.routes

    # API keys from a Secret that must exist; hand-off keys from it when present
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["MINIGPT5_GATEWAY_API_KEYS"]["name"] == GATEWAY and not env["MINIGPT5_GATEWAY_API_KEYS"].get("optional")
    for target in config.targets.values():
        assert env[target.api_key_env]["optional"] is True

    # scaled on CPU, which it requests; stopped gracefully
    hpa = the(overlay, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert parse_quantity(container["resources"]["requests"]["cpu"]) > 0
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + UVICORN_GRACEFUL_S
