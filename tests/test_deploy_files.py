"""Static checks of the deployment files (no Docker engine or cluster is needed).

docker-compose.yml, deploy/Dockerfile, deploy/.env.example, deploy/k8s/*.yaml and
docs/DEPLOY.md are read as text and YAML and checked against the code: commands name real
``capvst`` subcommands, ``CAPVST_*`` variables name real settings, grace periods exceed the
default task time limit, and no secret is written into any of them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from capvst.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / "deploy" / ".env.example"
K8S = REPO / "deploy" / "k8s"
DOC = REPO / "docs" / "DEPLOY.md"
K8S_FILES = ("redis.yaml", "scheduler.yaml", "worker.yaml", "flower.yaml", "keda.yaml",
             "config.yaml", "secrets.example.yaml", "monitoring.yaml", "keda-prometheus.yaml")
DASHBOARD = REPO / "deploy" / "grafana" / "capvst-dashboard.json"
SCRAPE = REPO / "deploy" / "prometheus" / "scrape-capvst.yaml"
# Prometheus metrics the workers and the scheduler serve (names, kinds and labels are a
# contract with dashboards and autoscalers).
METRICS = {
    "capvst_items_total": ("counter", {"mode", "status", "code"}),
    "capvst_stage_seconds": ("histogram", {"stage"}),
    "capvst_model_load_seconds": ("gauge", set()),
    "capvst_style_cache_hits_total": ("counter", set()),
    "capvst_style_cache_misses_total": ("counter", set()),
    "capvst_device_memory_bytes": ("gauge", set()),
    "capvst_jobs": ("gauge", {"state"}),
    "capvst_items_expanded_total": ("counter", set()),
}
LABEL_VALUES = {"status": {"succeeded", "failed", "skipped"},
                "stage": {"fetch", "decode", "model", "encode", "upload"},
                "state": {"queued", "running", "done", "cancelled"}}
# Labels Prometheus or the scrape configuration adds to every series.
TARGET_LABELS = {"instance", "job", "pod", "namespace", "component"}
STYLIZE_QUEUE = "capvst.stylize"  # capvst.broker.Queues.STYLIZE (importing celery is slow)

SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|BASIC_AUTH|CREDENTIAL|PRIVATE_KEY",
                         re.IGNORECASE)
# A compose reference without a default: ${NAME}, ${NAME:?message} or ${NAME?message}.
COMPOSE_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}$")
# Any reference a shell, compose or Kubernetes expands: $NAME, $$NAME, ${...}, $(NAME).
ANY_REF = re.compile(r"^\$+(?:[A-Za-z_][A-Za-z0-9_]*|\{[^}]+\}|\([A-Za-z_][A-Za-z0-9_]*\))$")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@:]*:([^\s@/]+)@", re.IGNORECASE)
CAPVST_VAR = re.compile(r"\bCAPVST_[A-Z0-9_]*[A-Z0-9]\b")
PLACEHOLDER = "REPLACE_ME"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _default_time_limit() -> int:
    return int(Settings.model_fields["task_time_limit"].default)


def _subcommands() -> tuple[argparse.ArgumentParser, set[str]]:
    from capvst.cli import _parser

    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return parser, set(action.choices)
    raise AssertionError("the capvst parser has no subcommands")


def _assert_capvst_argv(argv: list[str], where: str) -> None:
    """``capvst ARGV`` names an existing subcommand and parses."""
    parser, names = _subcommands()
    assert argv, f"{where}: capvst is started without a subcommand"
    assert argv[0] in names, f"{where}: {argv[0]!r} is not a capvst subcommand ({sorted(names)})"
    try:
        ns, _rest = parser.parse_known_args([str(a) for a in argv])
    except SystemExit as exc:  # argparse reports usage errors by exiting
        raise AssertionError(f"{where}: capvst {' '.join(argv)} does not parse") from exc
    assert ns.command == argv[0]


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _argv(value: Any) -> list[str]:
    """A compose command or entrypoint as a list (the shell form is split on spaces)."""
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def _seconds(duration: str | int | float) -> float:
    """A compose duration ("1900s", "31m40s", "1h") in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration.strip(), duration
    return sum(float(n) * units[u] for n, u in parts)


def _env_map(env: Any) -> dict[str, str]:
    if isinstance(env, list):  # compose's list form NAME=value
        return dict(str(e).split("=", 1) if "=" in str(e) else (str(e), "") for e in env)
    return {str(k): "" if v is None else str(v) for k, v in (env or {}).items()}


def _password_args(argv: list[str]) -> Iterator[tuple[str, str]]:
    """(flag, value) for flags that carry a secret, in both --flag value and --flag=value."""
    for i, a in enumerate(argv):
        for flag in ("--requirepass", "--basic-auth", "--basic_auth"):
            if a == flag and i + 1 < len(argv):
                yield flag, argv[i + 1]
            elif a.startswith(flag + "="):
                yield flag, a.split("=", 1)[1]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for name in K8S_FILES:
        path = K8S / name
        assert path.is_file(), f"deploy/k8s/{name} is missing"
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"deploy/k8s/{name} has no document"
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(d), f"{name}: incomplete object"
            assert "namespace" not in d["metadata"], f"{name}: manifests are namespace-agnostic"
        out[name] = docs
    return out


def _objects(k8s: dict[str, list[dict[str, Any]]], kind: str,
             file: str | None = None) -> list[dict[str, Any]]:
    return [d for f, docs in k8s.items() if file in (None, f) for d in docs if d["kind"] == kind]


def _one(k8s: dict[str, list[dict[str, Any]]], kind: str, file: str) -> dict[str, Any]:
    found = _objects(k8s, kind, file)
    assert len(found) == 1, f"{file}: expected one {kind}, found {len(found)}"
    return found[0]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def _workloads(k8s: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, docs in k8s.items() for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(obj)
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def _config_data(k8s: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    return {str(k): str(v) for k, v in _one(k8s, "ConfigMap", "config.yaml")["data"].items()}


def _secret(k8s: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return _one(k8s, "Secret", "secrets.example.yaml")


def _is_capvst_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":", 1)[0] == "capvst"


# ---------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------
def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "minio", "minio-init", "scheduler", "worker", "flower"} <= set(services)


def test_compose_redis_requires_a_password_from_the_environment(
        services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    argv = _argv(redis["command"])
    i = argv.index("--requirepass")
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", argv[i + 1]), argv[i + 1]
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert redis.get("healthcheck", {}).get("test")


def test_compose_broker_url_carries_the_password_reference(
        services: dict[str, dict[str, Any]]) -> None:
    for name in ("scheduler", "worker", "flower"):
        env = _env_map(services[name].get("environment"))
        url = env["CAPVST_BROKER_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:?") and "@redis:6379/" in url, name
        assert env["CAPVST_S3_ENDPOINT_URL"] == "http://minio:9000", name
        for key in ("CAPVST_CHECKPOINT_PHOTOREALISTIC", "CAPVST_CHECKPOINT_ARTISTIC"):
            m = re.fullmatch(rf"\$\{{{key}:-(s3://[^}}]+)\}}", env[key])
            assert m, f"{name}: {key} should default to an s3:// URI: {env[key]}"


def test_compose_flower_needs_basic_auth_and_listens_on_localhost(
        services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert _argv(flower["entrypoint"])[:4] == ["celery", "-A", "worker", "flower"]
    auth = [v for f, v in _password_args(_argv(flower["command"])) if "basic" in f]
    assert len(auth) == 1 and re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", auth[0]), auth
    assert flower.get("ports"), "flower publishes its port (to 127.0.0.1)"


def test_compose_publishes_ports_on_localhost_only(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} publicly"


def test_compose_worker_gets_one_gpu_and_a_long_grace_period(
        services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and devices[0]["count"] == 1
    assert "gpu" in devices[0]["capabilities"]
    assert "CUDA_VISIBLE_DEVICES" in _env_map(worker.get("environment"))
    limit = _default_time_limit()
    for name in ("worker", "scheduler"):
        grace = services[name].get("stop_grace_period")
        assert grace is not None, f"{name} has no stop_grace_period"
        assert _seconds(grace) > limit, f"{name}: stop_grace_period {grace} <= {limit} s"


def test_compose_minio_init_creates_the_bucket(services: dict[str, dict[str, Any]]) -> None:
    init = services["minio-init"]
    assert str(init["image"]).startswith("minio/mc")
    script = " ".join(_argv(init.get("entrypoint")) + _argv(init.get("command")))
    assert "mc mb" in script
    assert services["minio"].get("healthcheck", {}).get("test")
    for name in ("scheduler", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_commands_name_real_capvst_subcommands(
        services: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for name, svc in services.items():
        if not _is_capvst_image(str(svc.get("image", ""))):
            continue
        entry = _argv(svc.get("entrypoint"))
        command = _argv(svc.get("command"))
        if not entry:  # the image's ENTRYPOINT ["capvst"]
            _assert_capvst_argv(command, f"compose service {name}")
            checked += 1
        elif entry[0] == "capvst":
            _assert_capvst_argv(entry[1:] + command, f"compose service {name}")
            checked += 1
        else:
            assert entry[:3] == ["celery", "-A", "worker"], f"{name}: {entry}"
    assert checked >= 2  # scheduler and worker


def test_compose_has_no_literal_secrets(compose: dict[str, Any],
                                        services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for key, value in _env_map(svc.get("environment")).items():
            if SECRET_NAME.search(key):
                assert COMPOSE_REF.match(value), f"{name}: {key} must be ${{VAR:?...}}: {value}"
        for flag, value in _password_args(_argv(svc.get("command")) +
                                          _argv(svc.get("entrypoint"))):
            assert COMPOSE_REF.match(value), f"{name}: {flag} takes a literal value"
    for text in _strings(compose):
        for pw in URL_PASSWORD.findall(text):
            assert ANY_REF.match(pw), f"a URL in docker-compose.yml has a literal password: {text}"


def test_env_example_has_no_real_secrets() -> None:
    seen = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        seen.add(key)
        if SECRET_NAME.search(key):
            assert value in ("", PLACEHOLDER) or PLACEHOLDER in value, f"{key}={value}"
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", COMPOSE.read_text()))
    assert required <= seen, f"deploy/.env.example lacks {sorted(required - seen)}"


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------
def _dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_installs_the_video_extra() -> None:
    installs = [ln for ln in _dockerfile_lines() if ln.startswith("RUN pip install")
                and "TORCH" not in ln]
    assert installs, "the Dockerfile installs no capvst"
    assert any(re.search(r"""pip install ["']?\.\[([a-z,]*,)?video(,[a-z]*)*\]""", ln)
               for ln in installs), installs
    assert any("import" in ln and " av" in ln and "cv2" in ln for ln in installs), installs


def test_dockerfile_runs_capvst_as_a_non_root_user() -> None:
    lines = _dockerfile_lines()
    users = [ln.split(None, 1)[1].strip() for ln in lines if ln.upper().startswith("USER ")]
    assert users, "the Dockerfile sets no USER"
    final = users[-1].split(":", 1)[0]
    assert final not in ("root", "0"), f"the image runs as {users[-1]}"
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    assert any(ln.upper().startswith("USER ") for ln in lines[last_from:]), \
        "USER must be set in the final stage"
    assert 'ENTRYPOINT ["capvst"]' in lines
    assert any(re.search(r"""pip install\b.*\s["']?\.(\[[a-z,]+\])?["']?(\s|$)""", ln)
               for ln in lines), "pip install ."
    assert not any("[dev]" in ln or "pip install -e" in ln for ln in lines)
    assert any(ln.upper().startswith("LABEL ") for ln in lines)


def test_dockerfile_puts_no_secrets_into_the_image() -> None:
    for ln in _dockerfile_lines():
        word = ln.split(None, 1)[0].upper()
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=", ln.split(None, 1)[1]):
                assert not SECRET_NAME.search(name), f"Dockerfile: {ln}"
            assert "CAPVST_BROKER_URL" not in ln, f"the broker URL holds a password: {ln}"
        if word in ("COPY", "ADD"):
            assert ".env" not in ln.split(), f"Dockerfile copies an env file: {ln}"
    ignored = {ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()}
    for entry in (".git", ".venv", ".env", "capvst-demo", ".pytest_cache"):
        assert entry in ignored, f".dockerignore lacks {entry}"


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------
def test_k8s_has_every_object(k8s: dict[str, list[dict[str, Any]]]) -> None:
    _one(k8s, "StatefulSet", "redis.yaml")
    _one(k8s, "Service", "redis.yaml")
    _one(k8s, "Deployment", "scheduler.yaml")
    _one(k8s, "Deployment", "worker.yaml")
    _one(k8s, "Deployment", "flower.yaml")
    _one(k8s, "Service", "flower.yaml")
    _one(k8s, "ScaledObject", "keda.yaml")
    _one(k8s, "ConfigMap", "config.yaml")
    _secret(k8s)
    for _f, obj in _workloads(k8s):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_redis_has_a_password_persistence_and_noeviction(
        k8s: dict[str, list[dict[str, Any]]]) -> None:
    sts = _one(k8s, "StatefulSet", "redis.yaml")
    (c,) = _pod_spec(sts)["containers"]
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    script = " ".join(c.get("command", []) + c.get("args", []))
    assert "requirepass" in script and "$REDIS_PASSWORD" in script
    assert re.search(r"--maxmemory-policy\s+noeviction", script)
    assert re.search(r"--appendonly\s+yes", script)
    assert sts["spec"].get("volumeClaimTemplates"), "Redis needs a persistent volume"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/data" in mounts
    assert c.get("readinessProbe") and c.get("livenessProbe")


def test_k8s_worker_has_one_gpu_and_a_long_grace_period(
        k8s: dict[str, list[dict[str, Any]]]) -> None:
    dep = _one(k8s, "Deployment", "worker.yaml")
    spec = _pod_spec(dep)
    (c,) = spec["containers"]
    res = c["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1"
    assert str(res["requests"]["nvidia.com/gpu"]) == str(res["limits"]["nvidia.com/gpu"])
    limit = _default_time_limit()
    for file in ("worker.yaml", "scheduler.yaml"):
        grace = _pod_spec(_one(k8s, "Deployment", file)).get("terminationGracePeriodSeconds")
        assert grace is not None and int(grace) > limit, f"{file}: grace {grace} <= {limit}"
    refs = {r.get("configMapRef", {}).get("name") for r in c.get("envFrom", [])}
    assert _one(k8s, "ConfigMap", "config.yaml")["metadata"]["name"] in refs
    assert any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", []))
    # the worker is the only GPU consumer
    for file, obj in _workloads(k8s):
        if file != "worker.yaml":
            for cont in _containers(obj):
                assert "nvidia.com/gpu" not in (cont.get("resources") or {}).get("limits", {})


def test_k8s_flower_is_authenticated_and_internal(k8s: dict[str, list[dict[str, Any]]]) -> None:
    dep = _one(k8s, "Deployment", "flower.yaml")
    spec = _pod_spec(dep)
    (c,) = spec["containers"]
    assert c["command"][:4] == ["celery", "-A", "worker", "flower"]
    auth = [v for f, v in _password_args(c["command"] + c.get("args", [])) if "basic" in f]
    assert auth == ["$(FLOWER_BASIC_AUTH)"], auth
    env = {e["name"]: e for e in c.get("env", [])}
    assert "secretKeyRef" in env["FLOWER_BASIC_AUTH"]["valueFrom"]
    # Flower takes FLOWER_* variables as options; Service links would inject FLOWER_PORT
    assert spec.get("enableServiceLinks") is False
    svc = _one(k8s, "Service", "flower.yaml")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    for obj in _objects(k8s, "Service"):
        assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
        for port in obj["spec"]["ports"]:
            assert "nodePort" not in port
    assert not _objects(k8s, "Ingress"), "an Ingress for Flower must be the operator's choice"


def test_k8s_keda_scales_the_worker_on_the_stylize_list(
        k8s: dict[str, list[dict[str, Any]]]) -> None:
    so = _one(k8s, "ScaledObject", "keda.yaml")
    worker = _one(k8s, "Deployment", "worker.yaml")
    assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    lo, hi = so["spec"].get("minReplicaCount", 0), so["spec"]["maxReplicaCount"]
    assert 0 <= lo <= hi
    triggers = [t for t in so["spec"]["triggers"] if t["type"] == "redis"]
    assert len(triggers) == 1
    meta = triggers[0]["metadata"]
    assert meta["listName"] == STYLIZE_QUEUE
    assert int(meta["listLength"]) >= 1
    assert "password" not in meta, "the Redis password must come from a secret"
    (container,) = _pod_spec(worker)["containers"]
    defined = {e["name"] for e in container.get("env", [])} | set(_config_data(k8s))
    if "addressFromEnv" in meta:
        assert meta["addressFromEnv"] in defined
    else:
        assert "address" in meta or "host" in meta
    if "passwordFromEnv" in meta:
        assert meta["passwordFromEnv"] in defined
    else:
        ref = triggers[0]["authenticationRef"]["name"]
        auths = [a for a in _objects(k8s, "TriggerAuthentication", "keda.yaml")
                 if a["metadata"]["name"] == ref]
        assert len(auths) == 1, f"no TriggerAuthentication {ref}"
        params = {p["parameter"]: p for p in auths[0]["spec"]["secretTargetRef"]}
        secret = _secret(k8s)
        assert params["password"]["name"] == secret["metadata"]["name"]
        assert params["password"]["key"] in secret["stringData"]


def test_k8s_commands_name_real_capvst_subcommands(
        k8s: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for file, obj in _workloads(k8s):
        for c in _containers(obj):
            if not _is_capvst_image(c["image"]):
                continue
            command, args = c.get("command"), list(c.get("args") or [])
            where = f"{file} container {c['name']}"
            if command is None:
                _assert_capvst_argv(args, where)
                checked += 1
            elif command[0] == "capvst":
                _assert_capvst_argv(command[1:] + args, where)
                checked += 1
            else:
                assert command[:3] == ["celery", "-A", "worker"], f"{where}: {command}"
    assert checked >= 2  # scheduler and worker


def test_k8s_references_resolve(k8s: dict[str, list[dict[str, Any]]]) -> None:
    """Every ConfigMap, Secret key and $(VAR) a container uses is defined."""
    config = _one(k8s, "ConfigMap", "config.yaml")
    data = _config_data(k8s)
    secret = _secret(k8s)
    for file, obj in _workloads(k8s):
        assert _pod_spec(obj).get("enableServiceLinks") is False, file
        for c in _containers(obj):
            defined: set[str] = set()
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] == config["metadata"]["name"], file
                    defined |= set(data)
                if "secretRef" in src:
                    assert src["secretRef"]["name"] == secret["metadata"]["name"], file
                    defined |= set(secret["stringData"])
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                if "secretKeyRef" in src:
                    assert src["secretKeyRef"]["name"] == secret["metadata"]["name"], file
                    assert src["secretKeyRef"]["key"] in secret["stringData"], file
                if "configMapKeyRef" in src:
                    assert src["configMapKeyRef"]["name"] == config["metadata"]["name"], file
                    assert src["configMapKeyRef"]["key"] in data, file
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                    assert ref in defined, f"{file}: {e['name']} uses $({ref}) before it is set"
                defined.add(e["name"])
            for arg in list(c.get("command") or []) + list(c.get("args") or []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert ref in defined, f"{file}: $({ref}) is not in the environment"


def test_k8s_has_no_literal_secrets(k8s: dict[str, list[dict[str, Any]]]) -> None:
    for file, obj in _workloads(k8s):
        for c in _containers(obj):
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert "value" not in e, f"{file}: {e['name']} has a literal value"
                    assert "secretKeyRef" in e["valueFrom"], f"{file}: {e['name']}"
            for flag, value in _password_args(list(c.get("command") or []) +
                                              list(c.get("args") or [])):
                assert ANY_REF.match(value), f"{file}: {flag} takes a literal value"
    for key in _config_data(k8s):
        assert not SECRET_NAME.search(key), f"config.yaml holds a secret-like key {key}"
    secret = _secret(k8s)
    assert "data" not in secret, "the Secret template uses stringData placeholders"
    for key, value in secret["stringData"].items():
        assert PLACEHOLDER in str(value), f"secrets.example.yaml: {key} is not a placeholder"
    for file, docs in k8s.items():
        if file != "secrets.example.yaml":
            assert not [d for d in docs if d["kind"] == "Secret"], f"{file} defines a Secret"
        for text in _strings(docs):
            for pw in URL_PASSWORD.findall(text):
                assert ANY_REF.match(pw), f"{file}: a URL has a literal password: {text}"


def test_k8s_config_is_valid_settings(k8s: dict[str, list[dict[str, Any]]]) -> None:
    values = {k[len("CAPVST_"):].lower(): v for k, v in _config_data(k8s).items()
              if k.startswith("CAPVST_")}
    s = Settings(**values)
    assert s.task_time_limit < s.visibility_timeout
    worker = _pod_spec(_one(k8s, "Deployment", "worker.yaml"))
    assert int(worker["terminationGracePeriodSeconds"]) > s.task_time_limit


# ---------------------------------------------------------------------------------------------
# all files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [COMPOSE, DOCKERFILE, ENV_EXAMPLE, DOC] +
                         [K8S / f for f in K8S_FILES], ids=lambda p: p.name)
def test_capvst_variables_are_real_settings(path: Path) -> None:
    fields = set(Settings.model_fields)
    names = set(CAPVST_VAR.findall(path.read_text()))
    unknown = sorted(n for n in names if n[len("CAPVST_"):].lower() not in fields)
    assert not unknown, f"{path.name} names variables capvst does not read: {unknown}"


# ---------------------------------------------------------------------------------------------
# metrics: Prometheus scraping, the Grafana dashboard, KEDA on Prometheus
# ---------------------------------------------------------------------------------------------
_SERIES = re.compile(r"\b(capvst_[a-z_]+)(\{[^}]*\})?")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r'([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _metric(name: str) -> str:
    """The metric a series name belongs to (a histogram's _bucket, _sum and _count)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and METRICS.get(base, ("",))[0] == "histogram":
            return base
    return name


def _check_query(expr: str, where: str) -> set[str]:
    """The metrics ``expr`` reads; fails on unknown names, labels or label values."""
    used = set()
    labels_in_query: set[str] = set()
    for name, selector in _SERIES.findall(expr):
        metric = _metric(name)
        assert metric in METRICS, f"{where}: {name} is not a capvst metric ({expr})"
        if name.endswith("_bucket"):
            labels_in_query.add("le")
        used.add(metric)
        for label, op, value in _MATCHER.findall(selector or ""):
            assert label in METRICS[metric][1] | TARGET_LABELS, f"{where}: {metric}{{{label}}}"
            if label in LABEL_VALUES and op in ("=", "!="):
                assert value in LABEL_VALUES[label], f"{where}: {label}={value!r}"
            if label in LABEL_VALUES and op in ("=~", "!~"):
                assert set(value.split("|")) <= LABEL_VALUES[label], f"{where}: {value!r}"
    known = set().union(*(METRICS[m][1] for m in used)) | TARGET_LABELS | labels_in_query
    for group in _BY.findall(expr):
        for label in (g.strip() for g in group.split(",") if g.strip()):
            assert label in known, f"{where}: grouping by {label!r}, which {sorted(used)} lack"
    assert used, f"{where}: the query reads no capvst metric: {expr}"
    return used


def _pod_port(obj: dict[str, Any], name: str) -> int:
    (c,) = _pod_spec(obj)["containers"]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"{obj['metadata']['name']} has no container port {name!r}"
    return int(ports[name])


def test_dashboard_is_valid_and_reads_only_our_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids, used, cells = set(), set(), set()
    for panel in dash["panels"]:
        assert panel["id"] not in ids, f"panel id {panel['id']} twice"
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used |= _check_query(t["expr"], f"dashboard panel {panel['title']!r}")
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_workers_and_scheduler_expose_the_metrics_port(
        k8s: dict[str, list[dict[str, Any]]]) -> None:
    port = int(_config_data(k8s)["CAPVST_METRICS_PORT"])
    for file in ("worker.yaml", "scheduler.yaml"):
        dep = _one(k8s, "Deployment", file)
        assert _pod_port(dep, "metrics") == port, file
        notes = dep["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", file
        assert int(notes["prometheus.io/port"]) == port, file
        assert notes.get("prometheus.io/path") == "/metrics", file


def test_pod_monitor_selects_the_workers_and_the_scheduler(
        k8s: dict[str, list[dict[str, Any]]]) -> None:
    pm = _one(k8s, "PodMonitor", "monitoring.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    sel = pm["spec"]["selector"]

    def selects(labels: dict[str, str]) -> bool:
        if not sel.get("matchLabels", {}).items() <= labels.items():
            return False
        for e in sel.get("matchExpressions", []):
            assert e["operator"] == "In", e
            if labels.get(e["key"]) not in e["values"]:
                return False
        return True

    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint.get("path", "/metrics") == "/metrics"
    for file, obj in _workloads(k8s):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        if file in ("worker.yaml", "scheduler.yaml"):
            assert selects(labels), f"the PodMonitor misses {file}"
            _pod_port(obj, endpoint["port"])
        else:
            assert not selects(labels), f"the PodMonitor also selects {file}"


def test_plain_prometheus_scrape_config_follows_the_annotations(
        k8s: dict[str, list[dict[str, Any]]]) -> None:
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    rules = job["relabel_configs"]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in rules if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "capvst"
    assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    address = next(r for r in rules if r.get("target_label") == "__address__")
    assert "__meta_kubernetes_pod_annotation_prometheus_io_port" in address["source_labels"]
    assert re.fullmatch(address["regex"], "10.0.0.7:8080;9808")
    assert re.sub(address["regex"], address["replacement"].replace("$", "\\"),
                  "10.0.0.7:8080;9808") == "10.0.0.7:9808"
    assert any(r.get("target_label") == "__metrics_path__" for r in rules)


def test_keda_on_prometheus(k8s: dict[str, list[dict[str, Any]]]) -> None:
    plain = _one(k8s, "ScaledObject", "keda.yaml")
    so = _one(k8s, "ScaledObject", "keda-prometheus.yaml")
    # the same object, so that applying this file replaces keda.yaml's
    assert so["metadata"]["name"] == plain["metadata"]["name"]
    assert so["spec"]["scaleTargetRef"] == plain["spec"]["scaleTargetRef"]
    triggers = {t["type"]: t for t in so["spec"]["triggers"]}
    assert set(triggers) == {"redis", "prometheus"}
    assert triggers["redis"] == next(t for t in plain["spec"]["triggers"] if t["type"] ==
                                     "redis")
    assert _one(k8s, "TriggerAuthentication", "keda-prometheus.yaml") == \
        _one(k8s, "TriggerAuthentication", "keda.yaml")
    meta = triggers["prometheus"]["metadata"]
    assert meta["serverAddress"].startswith(("http://", "https://"))
    assert float(meta["threshold"]) > 0
    assert _check_query(meta["query"], "keda-prometheus.yaml") == {"capvst_jobs"}


def test_celery_is_new_enough_for_the_engine() -> None:
    """The engine relies on Celery 5.7 behaviour (hard time limits reach Task.on_failure)."""
    import re

    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"celery\[redis\]>=(\d+)\.(\d+)', text)
    assert m and (int(m.group(1)), int(m.group(2))) >= (5, 7)
    assert '"lua/*.lua"' in text  # the job-state scripts ship with the package
