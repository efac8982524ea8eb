"""The Kubernetes deployment (``deploy/k8s``, ``deploy/dagster/values.yaml``), checked without a
cluster.

- Every manifest against the Kubernetes API's JSON schema for ``K8S_VERSION``
  (kubernetes-validate, strict: an unknown or misspelled field fails).
- The manifests against the code: the gateway's command against its CLI, probe paths against
  its routes, ``ROADLOOP_*`` names against the settings, Secrets against the README.
- The Dagster chart values: keys against the chart's documented values (its schema models at
  the chart of this Dagster release; the schema itself ships in no package), the run launcher
  section against dagster-k8s's own config schema, and the GPU training run as the Job the
  launcher would build from it, validated like the manifests.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "deploy" / "k8s"
VALUES = REPO / "deploy" / "dagster" / "values.yaml"
DAGSTER_YAML = REPO / "deploy" / "dagster" / "dagster.yaml"
# The Kubernetes minor version the manifests are written for (and validated against).
K8S_VERSION = "1.31"


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def _resources() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S_DIR / name).read_text()) if d]
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _containers() -> list[dict[str, Any]]:
    return [c for d in _resources() if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]]


def test_every_manifest_validates_against_the_kubernetes_schema() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "every manifest is applied by the kustomization, and only those"
    docs = _resources()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "PersistentVolumeClaim"} <= kinds
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_the_validator_refuses_a_misspelled_field() -> None:
    deployment = copy.deepcopy(_one("Deployment", "fleet-gateway"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_gateway_command_ports_and_probes_match_the_code(tmp_path: Path) -> None:
    import typer

    from fleet.app import create_app
    from fleet.cli import gateway_app
    from fleet.config import GatewaySettings

    deployment = _one("Deployment", "fleet-gateway")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["roadloop", "gateway", "serve"]
    assert 'roadloop = "launch.cli:app"' in (REPO / "pyproject.toml").read_text()
    assert '"gateway": ("fleet.cli", "gateway_app"' in (REPO / "launch" / "cli.py").read_text()
    serve = typer.main.get_command(gateway_app).commands["serve"]  # type: ignore[attr-defined]
    known = {opt for p in serve.params for opt in p.opts}
    options = [a for a in command[3:] if a.startswith("--")]
    assert set(options) <= known, set(options) - known
    port = int(command[command.index("--port") + 1])
    assert command[command.index("--host") + 1] == "0.0.0.0"

    # One port everywhere: container, Service, Prometheus annotations.
    (http,) = container["ports"]
    assert http["containerPort"] == port
    service = _one("Service", "fleet-gateway")
    assert service["spec"]["ports"][0]["targetPort"] == http["name"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    labels = pod["metadata"]["labels"]
    for selector in (service["spec"]["selector"],
                     _one("PodDisruptionBudget", "fleet-gateway")["spec"]["selector"]["matchLabels"],
                     deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()

    # Probe paths are routes of the gateway; readiness needs the database, liveness does not.
    app = create_app(GatewaySettings(home=tmp_path / "home"))
    routes = {getattr(r, "path", None) for r in app.routes}
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe",
                                                   "livenessProbe")}
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] == http["name"]
    assert probes["readinessProbe"]["path"] == "/healthz"
    assert probes["livenessProbe"]["path"] != "/healthz"

    # The HPA scales this Deployment on CPU, relative to a request equal to the limit.
    hpa = _one("HorizontalPodAutoscaler", "fleet-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 100
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert hpa["spec"]["minReplicas"] > _one("PodDisruptionBudget", "fleet-gateway")[
        "spec"]["minAvailable"]

    # Several workers share one /metrics through PROMETHEUS_MULTIPROC_DIR on a memory volume.
    env = _one("ConfigMap", "fleet-gateway-env")["data"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]]["emptyDir"]["medium"] == "Memory"
    assert int(env["ROADLOOP_GATEWAY_WORKERS"]) >= 1


def test_roadloop_variables_name_real_settings() -> None:
    from fleet.config import GatewaySettings
    from roadloop.settings import Settings

    gateway = {f"ROADLOOP_GATEWAY_{f.upper()}" for f in GatewaySettings.model_fields}
    platform = {f"ROADLOOP_{f.upper()}" for f in Settings.model_fields}
    names = {k for d in _resources() if d["kind"] == "ConfigMap" for k in d["data"]}
    names |= {e["name"] for c in _containers() for e in c.get("env", [])}
    roadloop = {n for n in names if n.startswith("ROADLOOP_")}
    assert "ROADLOOP_GATEWAY_DATABASE_URL" in roadloop
    # ROADLOOP_IMAGE is no setting: the Dagster instance file reads it (job_image).
    unknown = roadloop - gateway - platform - _env_refs(yaml.safe_load(DAGSTER_YAML.read_text()))
    assert not unknown, f"not a setting: {sorted(unknown)}"


def test_every_secret_the_manifests_read_is_documented() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for c in _containers() for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"fleet-gateway", "mlflow", "fiftyone"} <= {name for name, _ in refs}
    for name, key in sorted(refs):
        assert re.search(rf"`{re.escape(name)}`[^\n]*`{re.escape(key)}`", readme), (name, key)
    # No Secret values in the repository: they are created as the README says.
    assert not [d for d in _resources() if d["kind"] == "Secret"]


def _env_refs(node: Any) -> set[str]:
    """Names a Dagster instance file reads from the environment (``{env: NAME}`` values)."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            return {node["env"]}
        return set().union(set(), *(_env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(set(), *(_env_refs(v) for v in node))
    return set()


def _secret_keys(name: str) -> set[str]:
    """The keys README.md's Secrets table lists for Secret ``name`` (it is created from it)."""
    rows = [line for line in (K8S_DIR / "README.md").read_text().splitlines()
            if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"Secret {name}: {len(rows)} rows in the README's table"
    return set(re.findall(r"`([A-Z][A-Z0-9_]*)`", rows[0].split("|")[2]))


def _pod_env(config_maps: list[str], secrets: list[str], env: list[Any] = ()) -> set[str]:
    """Variable names a pod gets from these ConfigMaps (their data), Secrets (their
    documented keys) and explicit variables."""
    names = {e["name"] if isinstance(e, dict) else str(e).split("=", 1)[0] for e in env}
    for name in config_maps:
        names |= set(_one("ConfigMap", name)["data"])
    for name in secrets:
        names |= _secret_keys(name)
    return names


def test_every_variable_the_code_requires_reaches_the_dagster_pods() -> None:
    """The code location (sensors) and the run pods, as the chart and as dagster.yaml
    configure them, get every variable the code reads without a default: the gateway admin
    token (``FleetResource``) and what the instance file reads (``{env: ...}``)."""
    from resources.fleet_resource import ADMIN_TOKEN_ENV

    values = _values()
    (location,) = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    instance = yaml.safe_load(DAGSTER_YAML.read_text())["run_launcher"]["config"]
    pods = {
        "code location (chart)": _pod_env(
            [c["name"] for c in location.get("envConfigMaps", [])],
            [c["name"] for c in location.get("envSecrets", [])],
            location.get("env") or []),
        "run pod (chart launcher)": _pod_env(
            [c["name"] for c in launcher.get("envConfigMaps", [])],
            [c["name"] for c in launcher.get("envSecrets", [])], launcher.get("envVars") or []),
        "run pod (dagster.yaml)": _pod_env(instance.get("env_config_maps", []),
                                           instance.get("env_secrets", []),
                                           instance.get("env_vars", [])),
    }
    required = {pod: {ADMIN_TOKEN_ENV} for pod in pods}
    # A run pod loads the instance file the launcher mounts: each {env: X} must resolve.
    required["run pod (dagster.yaml)"] |= _env_refs(yaml.safe_load(DAGSTER_YAML.read_text()))
    assert "ROADLOOP_IMAGE" in required["run pod (dagster.yaml)"]
    missing = {pod: sorted(required[pod] - pods[pod]) for pod in pods if required[pod] - pods[pod]}
    assert not missing, f"required but never supplied: {missing}"


def test_the_run_image_is_the_kustomization_image() -> None:
    (image,) = _kustomization()["images"]
    env = _one("ConfigMap", "roadloop-env")["data"]
    assert env["ROADLOOP_IMAGE"] == f"{image['newName']}:{image['newTag']}"


_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8}


def test_the_gateway_worker_count_is_stated_alike_everywhere() -> None:
    workers = int(_one("ConfigMap", "fleet-gateway-env")["data"]["ROADLOOP_GATEWAY_WORKERS"])
    word = next(w for w, n in _NUMBERS.items() if n == workers)
    for path in (K8S_DIR / "fleet-gateway.yaml", K8S_DIR / "README.md"):
        for m in re.finditer(rf"\b(\d+|{'|'.join(_NUMBERS)})\s+workers\b", path.read_text(),
                             re.IGNORECASE):
            said = m.group(1).lower()
            assert _NUMBERS.get(said, int(said) if said.isdigit() else -1) == workers, (
                path.name, m.group(0))
    assert f"the deployment's {word} workers" in (REPO / "docs" / "capacity.md").read_text()


# --------------------------------------------------------------------------- Dagster chart

# The chart's documented values (its schema models, helm/dagster/schema, at the chart of the
# Dagster 1.13 release) for the sections this file sets.
CHART_TOP = {"dagsterWebserver", "dagster-user-deployments", "postgresql",
             "generatePostgresqlPasswordSecret", "generateCeleryConfigSecret", "rabbitmq", "redis",
             "flower", "ingress", "imagePullSecrets", "computeLogManager", "scheduler",
             "runLauncher", "pythonLogs", "dagsterDaemon", "busybox", "migrate", "telemetry",
             "serviceAccount", "global", "retention", "additionalInstanceConfig"}
CHART_GLOBAL = {"postgresqlSecretName", "dagsterHome", "serviceAccountName",
                "celeryConfigSecretName"}
CHART_POSTGRESQL = {"image", "enabled", "postgresqlHost", "postgresqlUsername",
                    "postgresqlPassword", "postgresqlDatabase", "postgresqlParams",
                    "postgresqlScheme", "service"}
CHART_USER_DEPLOYMENTS = {"enabled", "enableSubchart", "imagePullSecrets", "deployments"}
CHART_USER_DEPLOYMENT = {"name", "image", "dagsterApiGrpcArgs", "codeServerArgs",
                         "includeConfigInLaunchedRuns", "deploymentNamespace", "port", "env",
                         "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity",
                         "tolerations", "podSecurityContext", "securityContext", "resources",
                         "livenessProbe", "readinessProbe", "startupProbe", "labels",
                         "volumeMounts", "volumes", "schedulerName", "initContainers",
                         "sidecarContainers"}
CHART_K8S_RUN_LAUNCHER = {"image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig",
                          "kubeconfigFile", "envConfigMaps", "envSecrets", "envVars",
                          "volumeMounts", "volumes", "labels", "failPodOnRunFailure",
                          "resources", "schedulerName", "securityContext", "runK8sConfig"}
CHART_RUN_K8S_CONFIG = {"containerConfig": "container_config",
                        "podSpecConfig": "pod_spec_config",
                        "podTemplateSpecMetadata": "pod_template_spec_metadata",
                        "jobSpecConfig": "job_spec_config", "jobMetadata": "job_metadata"}
CHART_QUEUED_COORDINATOR = {"maxConcurrentRuns", "tagConcurrencyLimits",
                            "dequeueIntervalSeconds", "dequeueNumWorkers", "dequeueUseThreads"}


def _values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def _launcher_config(values: dict[str, Any]) -> dict[str, Any]:
    """The chart's ``runLauncher.config.k8sRunLauncher`` as the instance's ``K8sRunLauncher``
    config (what the chart's template writes: snake_case keys, names of the env sources)."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    return {
        "image_pull_policy": k8s["imagePullPolicy"],
        "job_namespace": k8s["jobNamespace"],
        "load_incluster_config": k8s["loadInclusterConfig"],
        "env_config_maps": [s["name"] for s in k8s["envConfigMaps"]],
        "env_secrets": [s["name"] for s in k8s["envSecrets"]],
        "env_vars": k8s["envVars"],
        "volumes": k8s["volumes"],
        "volume_mounts": k8s["volumeMounts"],
        "service_account_name": values["global"]["serviceAccountName"],
        "run_k8s_config": {CHART_RUN_K8S_CONFIG[k]: v for k, v in k8s["runK8sConfig"].items()},
        # What the chart adds itself (release "dagster"): its instance ConfigMap and home.
        "instance_config_map": "dagster-instance",
        "dagster_home": "/opt/dagster/dagster_home",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
    }


def test_dagster_values_use_the_charts_documented_keys() -> None:
    values = _values()
    assert set(values) <= CHART_TOP, set(values) - CHART_TOP
    assert set(values["global"]) <= CHART_GLOBAL
    assert set(values["postgresql"]) <= CHART_POSTGRESQL
    assert values["postgresql"]["enabled"] is False
    assert values["generatePostgresqlPasswordSecret"] is False
    user = values["dagster-user-deployments"]
    assert set(user) <= CHART_USER_DEPLOYMENTS and user["enabled"]
    for deployment in user["deployments"]:
        assert set(deployment) <= CHART_USER_DEPLOYMENT, set(deployment) - CHART_USER_DEPLOYMENT
        assert {"name", "image", "port"} <= set(deployment)
        assert set(deployment["image"]) == {"repository", "tag", "pullPolicy"}
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher" and set(launcher["config"]) == {"k8sRunLauncher"}
    k8s = launcher["config"]["k8sRunLauncher"]
    assert set(k8s) <= CHART_K8S_RUN_LAUNCHER, set(k8s) - CHART_K8S_RUN_LAUNCHER
    assert set(k8s["runK8sConfig"]) <= set(CHART_RUN_K8S_CONFIG)
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    assert set(coordinator["config"]["queuedRunCoordinator"]) <= CHART_QUEUED_COORDINATOR


def test_dagster_values_agree_with_the_instance_file_and_the_manifests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    values = _values()
    config = _launcher_config(values)
    result = process_config(K8sRunLauncher.config_type(), config)
    assert result.success, [e.message for e in result.errors]

    monkeypatch.setenv("ROADLOOP_IMAGE", "unused")
    instance = yaml.safe_load(DAGSTER_YAML.read_text())
    launcher = instance["run_launcher"]["config"]
    for key in ("env_config_maps", "env_secrets", "job_namespace", "image_pull_policy",
                "service_account_name", "load_incluster_config"):
        assert config[key] == launcher[key], key
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queued["maxConcurrentRuns"] == instance["run_coordinator"]["config"][
        "max_concurrent_runs"]
    assert values["postgresql"]["postgresqlScheme"] == instance["storage"]["postgres"][
        "postgres_db"]["scheme"]

    env = _one("ConfigMap", "roadloop-env")["data"]
    assert values["postgresql"]["postgresqlHost"] == env["DAGSTER_PG_HOST"]
    assert values["postgresql"]["postgresqlDatabase"] == env["DAGSTER_PG_DB"]
    assert str(values["postgresql"]["service"]["port"]) == env["DAGSTER_PG_PORT"]
    assert config["env_config_maps"] == ["roadloop-env"]

    (deployment,) = values["dagster-user-deployments"]["deployments"]
    (image,) = _kustomization()["images"]
    assert (deployment["image"]["repository"], deployment["image"]["tag"]) == (
        image["newName"], image["newTag"])
    dockerfile_cmd = (REPO / "deploy" / "Dockerfile").read_text().split("CMD")[-1]
    assert json.loads(dockerfile_cmd)[-2:] == deployment["dagsterApiGrpcArgs"]
    claims = {d["metadata"]["name"] for d in _resources() if d["kind"] == "PersistentVolumeClaim"}
    for volume in config["volumes"] + deployment["volumes"]:
        assert volume["persistentVolumeClaim"]["claimName"] in claims
    # The queue's GPU limit counts the tag the training jobs carry.
    from roadloop.run_placement import GPU_TAG, TRAINING_RUN_TAGS

    (limit,) = queued["tagConcurrencyLimits"]
    assert (limit["key"], limit["value"], limit["limit"]) == (GPU_TAG, TRAINING_RUN_TAGS[GPU_TAG], 1)


@pytest.mark.parametrize("gpu", [True, False], ids=["training", "other"])
def test_run_pods_as_the_launcher_builds_them(gpu: bool) -> None:
    """The run pod's Job, built by dagster-k8s from the chart's launcher config and (for a
    training job) the run's tags, is a valid Kubernetes Job; only training asks for a GPU."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )
    from kubernetes.client import ApiClient

    from roadloop.run_placement import K8S_CONFIG_TAG, TRAINING_RUN_TAGS

    config = _launcher_config(_values())
    context = K8sContainerContext(
        image_pull_policy=config["image_pull_policy"], namespace=config["job_namespace"],
        env_config_maps=config["env_config_maps"], env_secrets=config["env_secrets"],
        volumes=config["volumes"], volume_mounts=config["volume_mounts"],
        service_account_name=config["service_account_name"],
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config["run_k8s_config"]))
    if gpu:  # as Dagster stores a job's dict-valued tag: JSON
        tags = {k: v if isinstance(v, str) else json.dumps(v) for k, v in TRAINING_RUN_TAGS.items()}
        context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(
            tags)))
        assert K8S_CONFIG_TAG in tags
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="registry.example.com/roadloop:0.1.0",
                            dagster_home="/opt/dagster/dagster_home",
                            instance_config_map="dagster-instance",
                            postgres_password_secret="roadloop-dagster-postgresql"),
        ["dagster", "api", "execute_run", "{}"], "dagster-run-0123456789",
        user_defined_k8s_config=context.run_k8s_config, component="run_worker",
        labels={"dagster/job": "learning_loop"})
    manifest = ApiClient().sanitize_for_serialization(job)
    assert kubernetes_validate.validate(manifest, K8S_VERSION, strict=True) == K8S_VERSION

    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    limits = container["resources"]["limits"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/data/roadloop" in mounts
    if gpu:
        assert limits["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists",
                "effect": "NoSchedule"} in pod["tolerations"]
        assert "/dev/shm" in mounts
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod


def test_the_training_jobs_carry_the_gpu_tags() -> None:
    """Read from jobs.py's source (importing the code location takes seconds)."""
    import ast

    tree = ast.parse((REPO / "jobs.py").read_text())
    tagged = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "define_asset_job"
        and any(k.arg == "tags" and isinstance(k.value, ast.Name)
                and k.value.id == "TRAINING_RUN_TAGS" for k in node.keywords)
    }
    assert tagged == {"learning_loop", "federated_learning_loop"}
