"""The files under cluster/ are accepted by the tools that read them, checked offline.

KubeRay manifests are validated against the ray.io/v1 CRD schemas that a Kubernetes API server
would apply (from ../shared/kuberay-crds/; jsonschema checks the structural schema, not the
CRDs' CEL `x-kubernetes-validations`), and cluster-launcher configs against the schema that
`ray up` uses (ray/autoscaler/ray-schema.json). Each validator is also shown to reject a broken
copy, so a pass means something. No Ray cluster is started.
"""

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray  # only for its version and the launcher schema file shipped with it
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
LAUNCHER = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))
GPU_CLUSTERS = [REPO / "cluster" / "kuberay" / "raycluster.yaml", *LAUNCHER]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
HEAD_PORTS = {6379, 8265, 10001, 8000}  # GCS, dashboard / job API, Ray client, Serve HTTP


def load(path: Path):
    return yaml.safe_load(path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


RAYJOBS = [path for path in KUBERAY if load(path)["kind"] == "RayJob"]


@functools.cache
def crd_validator(kind: str):
    if not CRD_DIR.is_dir():
        pytest.skip("../shared/kuberay-crds not found: KubeRay manifests not validated")
    assert kind in CRD_FILES, f"unknown kind {kind!r}: expected one of {sorted(CRD_FILES)}"
    # safe_load's C twin: the CRDs are ~1 MB each and the pure-Python loader takes seconds.
    safe_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=safe_loader)
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


@functools.cache
def launcher_validator():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)]


def cluster_spec(doc):
    """The RayClusterSpec in a RayCluster, RayJob or RayService (None: a RayJob on an existing cluster)."""
    spec = doc["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]]


def containers(group):
    return group["template"]["spec"]["containers"]


def gpu_limits(spec):
    """Resource limits of the first worker group's container (the gpu-8x pod in raycluster.yaml)."""
    return containers(spec["workerGroupSpecs"][0])[0]["resources"]["limits"]


def gpu_worker_groups(path: Path):
    """(gpus per node, min nodes, max nodes) for each GPU worker group in a KubeRay or launcher file."""
    doc = load(path)
    if "kind" in doc:
        for group in cluster_spec(doc)["workerGroupSpecs"]:
            gpus = max(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers(group))
            if gpus:
                yield gpus, group["minReplicas"], group["maxReplicas"]
    else:
        for name, node in doc["available_node_types"].items():
            if node["resources"].get("GPU") and name != doc["head_node_type"]:
                yield node["resources"]["GPU"], node.get("min_workers", 0), node["max_workers"]


def images(node):
    """Every container image named anywhere in a manifest (`image`, `head_image`, `worker_image`)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("image") and isinstance(value, str):
                yield value
            yield from images(value)
    elif isinstance(node, list):
        for item in node:
            yield from images(item)


@pytest.mark.parametrize("path", KUBERAY, ids=rel)
def test_kuberay_manifest_passes_its_crd_schema(path):
    doc = load(path)
    assert errors(crd_validator(doc["kind"]), doc) == []


def test_crd_schema_accepts_resource_quantities_as_int_or_string():
    doc = load(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    for quantity in (8, "8", "1000Gi"):
        gpu_limits(doc["spec"])["nvidia.com/gpu"] = quantity
        assert errors(crd_validator("RayCluster"), doc) == [], quantity


@pytest.mark.parametrize(
    "break_it",
    [
        lambda spec: spec["workerGroupSpecs"][0].update(replicas="many"),
        lambda spec: gpu_limits(spec).update({"nvidia.com/gpu": "eight"}),
        lambda spec: spec["workerGroupSpecs"][0].pop("groupName"),
    ],
    ids=["replicas-not-an-integer", "gpu-quantity-not-a-quantity", "worker-group-without-name"],
)
def test_crd_schema_rejects_a_broken_raycluster(break_it):
    doc = copy.deepcopy(load(REPO / "cluster" / "kuberay" / "raycluster.yaml"))
    break_it(doc["spec"])
    assert errors(crd_validator("RayCluster"), doc) != []


@pytest.mark.parametrize("path", LAUNCHER, ids=rel)
def test_launcher_config_passes_ray_up_schema(path):
    assert errors(launcher_validator(), load(path)) == []


@pytest.mark.parametrize(
    "change",
    [{"max_workers": "lots"}, {"max_worker": 130}],
    ids=["max-workers-not-an-integer", "misspelt-top-level-key"],
)
def test_launcher_schema_rejects_a_broken_config(change):
    assert launcher_validator().schema.get("additionalProperties") is False  # so a misspelt key is an error
    config = {**load(LAUNCHER[0]), **change}
    assert errors(launcher_validator(), config) != []


@pytest.mark.parametrize("path", RAYJOBS, ids=rel)
def test_rayjob_entrypoint_names_a_job_script_and_config_in_the_repo(path):
    entrypoint = load(path)["spec"]["entrypoint"]
    match = re.search(r"\bpython3?\s+(jobs/\S+\.py)\s+(\S+\.ya?ml)\b", entrypoint)
    assert match, f"{rel(path)}: entrypoint {entrypoint!r} is not `python jobs/STAGE.py CONFIG ...`"
    missing = [name for name in match.groups() if not (REPO / name).is_file()]
    assert missing == [], f"{rel(path)}: entrypoint refers to files missing from the repo: {missing}"


@pytest.mark.parametrize("path", KUBERAY + LAUNCHER, ids=rel)
def test_ray_images_and_versions_match_installed_ray(path):
    doc = load(path)
    ray_images = [image for image in images(doc) if image.startswith("rayproject/ray")]
    assert ray_images, f"{rel(path)} names no rayproject/ray image"
    for image in ray_images:
        tag = image.partition(":")[2]
        version = ray.__version__
        assert tag == version or tag.startswith(version + "-"), f"{image} is not Ray {version}"
    if "kind" in doc:
        assert cluster_spec(doc)["rayVersion"] == ray.__version__


@pytest.mark.parametrize("path", GPU_CLUSTERS, ids=rel)
def test_gpu_worker_group_scales_from_8_to_at_least_1000_gpus(path):
    groups = list(gpu_worker_groups(path))
    assert groups, f"{rel(path)} has no GPU worker group"
    assert min(gpus * low for gpus, low, _ in groups) == 8
    assert sum(gpus * high for gpus, _, high in groups) >= 1000
    cluster_cap = load(path).get("max_workers")  # launcher only: a cap on all worker nodes together
    if cluster_cap is not None:
        assert cluster_cap >= max(high for _, _, high in groups), "max_workers cuts the GPU group short"


@pytest.mark.parametrize("path", KUBERAY, ids=rel)
def test_head_exposes_gcs_dashboard_client_and_serve_ports(path):
    spec = cluster_spec(load(path))
    ports = {p["containerPort"] for c in containers(spec["headGroupSpec"]) for p in c.get("ports", [])}
    assert HEAD_PORTS <= ports, f"head of {rel(path)} lacks ports {sorted(HEAD_PORTS - ports)}"


@pytest.mark.parametrize("path", KUBERAY, ids=rel)
def test_every_kuberay_pod_runs_with_token_auth(path):
    spec = cluster_spec(load(path))
    if spec.get("authOptions", {}).get("mode") == "token":
        return  # KubeRay generates the token and sets it on every pod
    mode = {"name": "RAY_AUTH_MODE", "value": "token"}
    secret = {"name": "ray-auth-token", "key": "token"}
    token = {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": secret}}
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    envs = [c.get("env", []) for group in groups for c in containers(group)]
    envs.append(spec.get("autoscalerOptions", {}).get("env", []))
    for env in envs:
        assert mode in env and token in env, env


@pytest.mark.parametrize("path", LAUNCHER, ids=rel)
def test_launcher_starts_every_node_with_token_auth(path):
    doc = load(path)
    commands = doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]
    starts = [command for command in commands if "ray start" in command]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in command for command in starts), starts
