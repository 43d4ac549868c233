"""The KubeRay manifests in cluster/ would be accepted by a cluster and would run Temper:

- every Kubernetes object in them (the PersistentVolumeClaim; each Ray pod template, as a v1
  PodTemplate) validates against the Kubernetes API schema with unknown fields refused
  (`kubernetes-validate`, which ships the schemas, so no cluster is needed);
- the RayJob and RayService objects follow the fields of KubeRay's `ray.io/v1` CRDs (the schema
  below, written from the CRD's field list: unknown fields refused, `rayStartParams` values strings
  as the CRD types them);
- what they name exists: the image is the one cluster/Dockerfile builds with our code in its
  working directory, every volume claim is defined, the Ray version is the tested one, the RayJob's
  entrypoint is a config our CLI accepts, and the RayService's serveConfigV2 is what `python -m app
  serve config` prints and what Ray Serve's own schema accepts;
- the cluster launcher config (`ray up`) passes Ray's own cluster-config schema after Ray fills in
  its defaults, and the commands it runs exist here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
K8S_VERSION = "1.33.0"
"""Kubernetes API version the manifests are checked against (a recent one kubernetes-validate ships)."""

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT = {"type": "object"}
_POD_TEMPLATE = {"type": "object"}  # checked separately against the Kubernetes schema
_HEAD_GROUP = {
    "type": "object", "additionalProperties": False, "required": ["template"],
    "properties": {"enableIngress": {"type": "boolean"}, "headService": _OBJECT, "rayStartParams": _STR_MAP,
                   "serviceType": {"type": "string"}, "template": _POD_TEMPLATE},
}
_WORKER_GROUP = {
    "type": "object", "additionalProperties": False, "required": ["groupName", "template"],
    "properties": {"groupName": {"type": "string"}, "idleTimeoutSeconds": {"type": "integer"},
                   "maxReplicas": {"type": "integer", "minimum": 0}, "minReplicas": {"type": "integer", "minimum": 0},
                   "numOfHosts": {"type": "integer", "minimum": 1}, "rayStartParams": _STR_MAP,
                   "replicas": {"type": "integer", "minimum": 0}, "scaleStrategy": _OBJECT, "suspend": {"type": "boolean"},
                   "template": _POD_TEMPLATE},
}
_RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {"autoscalerOptions": _OBJECT, "enableInTreeAutoscaling": {"type": "boolean"},
                   "gcsFaultToleranceOptions": _OBJECT, "headGroupSpec": _HEAD_GROUP,
                   "headServiceAnnotations": _STR_MAP, "managedBy": {"type": "string"},
                   "rayVersion": {"type": "string"}, "suspend": {"type": "boolean"},
                   "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP}},
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
CRD_SCHEMAS = {
    "RayJob": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _METADATA,
                       "spec": {"type": "object", "additionalProperties": False, "properties": {
                           "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": {"type": "integer"},
                           "clusterSelector": _STR_MAP, "deletionStrategy": _OBJECT, "entrypoint": {"type": "string"},
                           "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
                           "entrypointResources": {"type": "string"}, "jobId": {"type": "string"},
                           "managedBy": {"type": "string"}, "metadata": _STR_MAP, "rayClusterSpec": _RAY_CLUSTER_SPEC,
                           "runtimeEnvYAML": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                           "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                           "submitterConfig": _OBJECT, "submitterPodTemplate": _POD_TEMPLATE, "suspend": {"type": "boolean"},
                           "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0}}}},
    },
    "RayService": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"}, "metadata": _METADATA,
                       "spec": {"type": "object", "additionalProperties": False, "required": ["rayClusterConfig"], "properties": {
                           "excludeHeadPodFromServeSvc": {"type": "boolean"}, "managedBy": {"type": "string"},
                           "rayClusterConfig": _RAY_CLUSTER_SPEC, "rayClusterDeletionDelaySeconds": {"type": "integer"},
                           "serveConfigV2": {"type": "string"}, "serveService": _OBJECT, "upgradeStrategy": _OBJECT}}},
    },
}


def _objects() -> list[tuple[str, dict]]:
    """(file name, object) of every Kubernetes object in cluster/'s YAML files."""
    found = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                found.append((path.name, doc))
    return found


def _cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]["rayClusterConfig"]


def _pod_templates(obj: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(obj)
    return [("head", spec["headGroupSpec"]["template"])] + [
        (f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]


def _ray_objects() -> list[tuple[str, dict]]:
    return [(name, obj) for name, obj in _objects() if obj["kind"] in CRD_SCHEMAS]


def test_there_are_rayjobs_and_a_rayservice():
    assert sorted(obj["kind"] for _, obj in _ray_objects()) == ["RayJob", "RayJob", "RayService"]


@pytest.mark.parametrize("name,obj", [o for o in _objects() if o[1]["kind"] not in CRD_SCHEMAS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kubernetes_objects_validate_strictly(name, obj):
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name,obj", _ray_objects(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kuberay_objects_follow_the_crd_and_their_pods_the_kubernetes_schema(name, obj):
    import kubernetes_validate

    jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
    for where, template in _pod_templates(obj):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{obj['metadata']['name']}-{where.split()[-1]}"},
               "template": template}
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name}: the {where} pod template: {str(err).splitlines()[0]}")
    for group in _cluster_spec(obj).get("workerGroupSpecs", []):
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31), group["groupName"]
        if group.get("minReplicas", 0) < group.get("maxReplicas", 0):  # a range only means something with the autoscaler on
            assert _cluster_spec(obj).get("enableInTreeAutoscaling") is True, f"{name}: {group['groupName']} scales but autoscaling is off"


def test_a_schema_mistake_is_caught():
    """The checks above refuse what a cluster would: a rayStartParams value that is not a string,
    a misspelled spec field, a misspelled container field."""
    import kubernetes_validate

    job = next(obj for _, obj in _ray_objects() if obj["kind"] == "RayJob")
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        jsonschema.validate(bad, CRD_SCHEMAS["RayJob"])
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(bad, CRD_SCHEMAS["RayJob"])
    template = yaml.safe_load(yaml.safe_dump(_pod_templates(job)[0][1]))
    template["spec"]["containers"][0]["workDir"] = "/app"
    with pytest.raises(kubernetes_validate.ValidationError, match="workDir"):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": template}, K8S_VERSION, strict=True)


def test_what_the_manifests_name_exists():
    import ray

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    [workdir] = re.findall(r"^WORKDIR\s+(\S+)", dockerfile, re.M)
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile).group(1)
    copied = set(re.findall(r"^COPY\s+(\S+)\s", dockerfile, re.M))
    import tomllib

    packages = {p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"configs"} <= copied, f"cluster/Dockerfile copies {sorted(copied)}, not every package {sorted(packages)}"
    claims = {obj["metadata"]["name"] for _, obj in _objects() if obj["kind"] == "PersistentVolumeClaim"}
    for name, obj in _ray_objects():
        assert _cluster_spec(obj)["rayVersion"] == ray.__version__, name
        for where, template in _pod_templates(obj):
            spec = template["spec"]
            for c in spec["containers"]:
                assert (c["image"], c["workingDir"]) == (tag, workdir), f"{name} {where}: {c['image']} in {c['workingDir']}"
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec["containers"]:
                for mount in c.get("volumeMounts", []):
                    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
                    assert claim in claims, f"{name} {where}: claim {claim!r} is defined by no manifest in cluster/"


def test_rayjob_entrypoints_are_configs_the_cli_accepts():
    """Each RayJob runs one of our job verbs on a config that validates, with its storage and
    registry on the shared claim; together they cover `run` and `tune`."""
    from app.config.jobs import load_config

    verbs = []
    for name, job in [o for o in _ray_objects() if o[1]["kind"] == "RayJob"]:
        argv = shlex.split(job["spec"]["entrypoint"])  # a shell runs it: quoted overrides are one word each
        assert argv[:3] == ["python", "-m", "app"] and argv[3] in ("run", "train", "tune"), (name, argv)
        verbs.append(argv[3])
        parsed = load_config(argv[3], ROOT / argv[4], argv[5:])
        assert parsed.storage_path.startswith("/shared/") and parsed.registry.db_url.startswith("sqlite:////shared/"), name
    assert sorted(verbs) == ["run", "tune"]


def test_rayservice_serve_config_is_the_clis_and_rays_schema_accepts_it():
    from ray.serve.schema import ServeDeploySchema

    from app.config.jobs import load_config
    from serve.deploy import serve_config_file

    [(_, service)] = [o for o in _ray_objects() if o[1]["kind"] == "RayService"]
    header = (CLUSTER / "rayservice-quickstart.yaml").read_text()
    command = re.search(r"^#\s+python -m app serve config (\S+) (.*)$", header, re.M)
    config, overrides = command.group(1), shlex.split(command.group(2))
    shipped = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert shipped == yaml.safe_load(yaml.safe_dump(serve_config_file(load_config("serve", ROOT / config, overrides))))
    ServeDeploySchema.model_validate(shipped)
    assert shipped["http_options"]["host"] == "0.0.0.0"  # reachable through the RayService's Kubernetes Service
    # non-loopback, so auth is on: every pod gets the API-key server secret the registry hashes keys with
    for where, template in _pod_templates(service):
        for c in template["spec"]["containers"]:
            assert "TEMPER_KEY_SECRET" in {e["name"] for e in c.get("env", [])}, where


def test_ray_up_config_passes_rays_own_schema():
    import copy

    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER / "ray-up-local.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's ray-schema.json, as `ray up` checks it
    bad = {**copy.deepcopy(config), "setup_comands": []}
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validate_config(prepare_config(bad))
    # what it runs: the repository synced to ~/temper, installed by the Makefile's install target
    assert config["file_mounts"] == {"~/temper": "."}
    assert config["setup_commands"] == ["cd ~/temper && make install"]
    assert re.search(r"^install:", (ROOT / "Makefile").read_text(), re.M)
    assert all(cmd.startswith("~/temper/.venv/bin/ray ") for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"])
