"""infra/: manifests that parse and match their kinds' fields, Dockerfiles that copy files that exist, a Ray
cluster config Ray accepts, entrypoints that name real jobs with valid overrides, submission scripts that build
the right commands, and no literal credentials anywhere."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.config import CONF_DIR, CompressConfig, config_file, load_config, preset_names

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
RAYJOB_FILE = KUBERAY / "rayjob-compress.yaml"
CRONJOB_FILE = KUBERAY / "cronjob-nightly.yaml"
SERVICE_ACCOUNT_FILE = KUBERAY / "serviceaccount.yaml"
IAM = INFRA / "iam"
CLUSTER_FILE = INFRA / "ray-cluster.yaml"
RUNBOOK = REPO / "docs" / "operations.md"
DOCKERFILES = [INFRA / "Dockerfile", INFRA / "Dockerfile.cpu"]
# Where infra/Dockerfile puts the project; manifests refer to files in the image under it.
IMAGE_ROOT = "/app"
# Jobs the manifests and scripts may run (they may be written later than these manifests).
INFRA_JOBS = {"compress", "gc"}
ALL_JOBS = INFRA_JOBS | {"make_corpus", "train_selector", "evaluate", "evaluate_vlm", "train_vlm", "demo"}
JOB_CONFIGS = {"compress": CompressConfig}


def yaml_files() -> list[Path]:
    return sorted(INFRA.rglob("*.yaml"))


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_docs(path)]


def single(path: Path, kind: str) -> dict:
    (doc,) = [d for d in load_docs(path) if d["kind"] == kind]
    return doc


# --------------------------------------------------------------------------------------------- schemas
# Only the fields of each kind that these manifests may use, closed with additionalProperties: false at every
# level written out, so a typo or a misplaced field fails. Levels kept open (probes, affinity) are ANY.

ANY = {"type": "object"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
COUNT = {"type": "integer", "minimum": 0}
POSITIVE = {"type": "integer", "minimum": 1}
NUMBER = {"type": "number", "minimum": 0}
DNS_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", "maxLength": 253}
QUANTITY = {"anyOf": [COUNT, {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|[kMGTPE]i?)?$"}]}
CRON = {"type": "string", "pattern": r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"}


def obj(required: tuple[str, ...] = (), **properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def array(items: dict, min_items: int = 0) -> dict:
    return {"type": "array", "items": items, "minItems": min_items}


def mapping(values: dict) -> dict:
    return {"type": "object", "additionalProperties": values}


def enum(*values: str) -> dict:
    return {"enum": list(values)}


METADATA = {
    **obj(name=DNS_NAME, generateName={"type": "string", "pattern": r"^[a-z0-9][-a-z0-9]*-$"}, namespace=DNS_NAME,
          labels=mapping(STR), annotations=mapping(STR)),
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
}
KEY_REF = obj(("name", "key"), name=DNS_NAME, key=STR, optional=BOOL)
ENV_VAR = {
    **obj(("name",), name=STR, value=STR,
          valueFrom=obj(secretKeyRef=KEY_REF, configMapKeyRef=KEY_REF, fieldRef=ANY, resourceFieldRef=ANY)),
    "not": {"required": ["value", "valueFrom"]},
}
RESOURCES = obj(limits=mapping(QUANTITY), requests=mapping(QUANTITY))
CONTAINER = obj(
    ("name", "image"),
    name=DNS_NAME, image=STR, imagePullPolicy=enum("Always", "IfNotPresent", "Never"),
    command=array(STR), args=array(STR), workingDir=STR, env=array(ENV_VAR), envFrom=array(ANY),
    ports=array(obj(("containerPort",), containerPort=POSITIVE, name=STR, protocol=enum("TCP", "UDP", "SCTP"))),
    resources=RESOURCES,
    volumeMounts=array(obj(("name", "mountPath"), name=DNS_NAME, mountPath=STR, readOnly=BOOL, subPath=STR)),
    securityContext=ANY, readinessProbe=ANY, livenessProbe=ANY, lifecycle=ANY,
)
VOLUME = obj(
    ("name",),
    name=DNS_NAME,
    emptyDir=obj(medium=enum("", "Memory"), sizeLimit=QUANTITY),
    configMap=obj(("name",), name=DNS_NAME, items=array(ANY), defaultMode=COUNT, optional=BOOL),
    secret=ANY, persistentVolumeClaim=ANY,
)
POD_SPEC = obj(
    ("containers",),
    containers=array(CONTAINER, 1), initContainers=array(CONTAINER), volumes=array(VOLUME),
    serviceAccountName=DNS_NAME, restartPolicy=enum("Always", "OnFailure", "Never"), nodeSelector=mapping(STR),
    tolerations=array(obj(key=STR, operator=enum("Exists", "Equal"), value=STR,
                          effect=enum("NoSchedule", "PreferNoSchedule", "NoExecute"), tolerationSeconds=COUNT)),
    affinity=ANY, securityContext=ANY, imagePullSecrets=array(obj(("name",), name=DNS_NAME)),
    terminationGracePeriodSeconds=COUNT, priorityClassName=STR,
)
POD_TEMPLATE = obj(("spec",), metadata=obj(labels=mapping(STR), annotations=mapping(STR)), spec=POD_SPEC)

# ray.io/v1 (KubeRay >= 1.5.1): rayStartParams is map[string]string, so `num-cpus: 0` (a number) is an error.
RAY_START_PARAMS = mapping(STR)
HEAD_GROUP = obj(("template",), rayStartParams=RAY_START_PARAMS, template=POD_TEMPLATE, serviceType=STR,
                 enableIngress=BOOL, headService=ANY)
WORKER_GROUP = obj(
    ("groupName", "template", "minReplicas", "maxReplicas"),
    groupName=DNS_NAME, replicas=COUNT, minReplicas=COUNT, maxReplicas=COUNT, numOfHosts=POSITIVE,
    rayStartParams=RAY_START_PARAMS, template=POD_TEMPLATE, scaleStrategy=ANY, idleTimeoutSeconds=COUNT, suspend=BOOL,
)
RAY_CLUSTER_SPEC = obj(
    ("headGroupSpec",),
    headGroupSpec=HEAD_GROUP, workerGroupSpecs=array(WORKER_GROUP), rayVersion=STR, enableInTreeAutoscaling=BOOL,
    autoscalerOptions=obj(idleTimeoutSeconds=COUNT, upscalingMode=enum("Default", "Aggressive", "Conservative"),
                          resources=RESOURCES, image=STR, imagePullPolicy=STR, env=array(ENV_VAR),
                          envFrom=array(ANY), volumeMounts=array(ANY), securityContext=ANY, version=enum("v1", "v2")),
    authOptions=obj(mode=enum("disabled", "token"), secretName=DNS_NAME),
    headServiceAnnotations=mapping(STR), suspend=BOOL, gcsFaultToleranceOptions=ANY, managedBy=STR,
)
RAYJOB = obj(
    ("apiVersion", "kind", "metadata", "spec"),
    apiVersion={"const": "ray.io/v1"}, kind={"const": "RayJob"}, metadata=METADATA,
    spec=obj(
        ("entrypoint", "rayClusterSpec"),
        entrypoint=STR, runtimeEnvYAML=STR, jobId=STR,
        submissionMode=enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
        shutdownAfterJobFinishes=BOOL, ttlSecondsAfterFinished=COUNT, activeDeadlineSeconds=POSITIVE,
        backoffLimit=COUNT, suspend=BOOL, rayClusterSpec=RAY_CLUSTER_SPEC, clusterSelector=mapping(STR),
        submitterPodTemplate=POD_TEMPLATE, submitterConfig=obj(backoffLimit=COUNT),
        entrypointNumCpus=NUMBER, entrypointNumGpus=NUMBER, entrypointResources=STR, metadata=mapping(STR),
        managedBy=STR, deletionStrategy=ANY,
    ),
)
CRONJOB = obj(
    ("apiVersion", "kind", "metadata", "spec"),
    apiVersion={"const": "batch/v1"}, kind={"const": "CronJob"}, metadata=METADATA,
    spec=obj(
        ("schedule", "jobTemplate"),
        schedule=CRON, timeZone=STR, concurrencyPolicy=enum("Allow", "Forbid", "Replace"),
        startingDeadlineSeconds=COUNT, successfulJobsHistoryLimit=COUNT, failedJobsHistoryLimit=COUNT, suspend=BOOL,
        jobTemplate=obj(
            ("spec",),
            metadata=obj(labels=mapping(STR), annotations=mapping(STR)),
            spec=obj(("template",), template=POD_TEMPLATE, backoffLimit=COUNT, activeDeadlineSeconds=POSITIVE,
                     ttlSecondsAfterFinished=COUNT, completions=POSITIVE, parallelism=COUNT),
        ),
    ),
)
RBAC = {"const": "rbac.authorization.k8s.io/v1"}
ROLE = obj(
    ("apiVersion", "kind", "metadata", "rules"),
    apiVersion=RBAC, kind={"const": "Role"}, metadata=METADATA,
    rules=array(obj(("verbs",), apiGroups=array(STR), resources=array(STR, 1), resourceNames=array(STR),
                    verbs=array(enum("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"), 1)),
                1),
)
ROLE_BINDING = obj(
    ("apiVersion", "kind", "metadata", "subjects", "roleRef"),
    apiVersion=RBAC, kind={"const": "RoleBinding"}, metadata=METADATA,
    subjects=array(obj(("kind", "name"), kind=enum("ServiceAccount", "User", "Group"), name=STR, namespace=DNS_NAME,
                       apiGroup=STR), 1),
    roleRef=obj(("apiGroup", "kind", "name"), apiGroup={"const": "rbac.authorization.k8s.io"},
                kind=enum("Role", "ClusterRole"), name=DNS_NAME),
)
SERVICE_ACCOUNT = obj(
    ("apiVersion", "kind", "metadata"),
    apiVersion={"const": "v1"}, kind={"const": "ServiceAccount"}, metadata=METADATA,
    automountServiceAccountToken=BOOL, imagePullSecrets=array(obj(("name",), name=DNS_NAME)),
)
SCHEMAS = {
    ("ray.io/v1", "RayJob"): RAYJOB,
    ("batch/v1", "CronJob"): CRONJOB,
    ("rbac.authorization.k8s.io/v1", "Role"): ROLE,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ROLE_BINDING,
    ("v1", "ServiceAccount"): SERVICE_ACCOUNT,
}


def schema_errors(doc: dict) -> list[str]:
    schema = SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return [f"no schema for apiVersion={doc.get('apiVersion')!r} kind={doc.get('kind')!r}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def test_schemas_are_valid_json_schemas():
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


# --------------------------------------------------------------------------------------------- YAML + Kubernetes


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses_into_mappings(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs)


def test_kubernetes_manifests_hold_the_expected_kinds():
    kinds = sorted(doc["kind"] for _, doc in kubernetes_docs())
    assert kinds == ["CronJob", "RayJob", "Role", "RoleBinding", "ServiceAccount", "ServiceAccount"]


@pytest.mark.parametrize("path,doc", kubernetes_docs(), ids=lambda v: v.get("kind") if isinstance(v, dict) else v.name)
def test_kubernetes_manifest_matches_its_kind(path, doc):
    assert schema_errors(doc) == []


def _rayjob_worker(doc):
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _rayjob_worker_container(doc):
    return _rayjob_worker(doc)["template"]["spec"]["containers"][0]


def _cron_pod(doc):
    return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


MUTATIONS = {
    "typo in RayJob spec": (RAYJOB_FILE, "RayJob", lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True)),
    "typo in worker group": (RAYJOB_FILE, "RayJob", lambda d: _rayjob_worker(d).__setitem__(
        "maxReplica", _rayjob_worker(d).pop("maxReplicas"))),
    "number in rayStartParams": (RAYJOB_FILE, "RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]
                                 ["rayStartParams"].__setitem__("num-cpus", 0)),
    "resources outside limits/requests": (RAYJOB_FILE, "RayJob", lambda d: _rayjob_worker_container(d)["resources"]
                                          .__setitem__("nvidia.com/gpu", 1)),
    "env with value and valueFrom": (RAYJOB_FILE, "RayJob", lambda d: _rayjob_worker_container(d)["env"][0]
                                     .__setitem__("value", "x")),
    "unknown submission mode": (RAYJOB_FILE, "RayJob", lambda d: d["spec"].__setitem__("submissionMode", "K8sJob")),
    "bad cron schedule": (CRONJOB_FILE, "CronJob", lambda d: d["spec"].__setitem__("schedule", "nightly")),
    "pod field one level too high": (CRONJOB_FILE, "CronJob", lambda d: d["spec"]["jobTemplate"]["spec"]
                                     .__setitem__("restartPolicy", "Never")),
    "unknown RBAC verb": (CRONJOB_FILE, "Role", lambda d: d["rules"][0]["verbs"].append("submit")),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_schemas_reject_a_broken_manifest(name):
    path, kind, mutate = MUTATIONS[name]
    doc = copy.deepcopy(single(path, kind))
    assert schema_errors(doc) == []
    mutate(doc)
    assert schema_errors(doc), f"the {kind} schema accepted a manifest with a {name}"


def test_rayjob_cleans_up_retries_and_is_bounded():
    spec = single(RAYJOB_FILE, "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1  # a retry resumes from the committed shards
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_rayjob_has_an_autoscaling_gpu_worker_group():
    cluster = single(RAYJOB_FILE, "RayJob")["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], f"{group['groupName']} cannot scale"
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            # Extended resources are requested through limits; requests, if given, must match.
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert resources.get("requests", {}).get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == \
                resources["limits"]["nvidia.com/gpu"]


def test_rayjob_pods_use_the_service_account_for_irsa_and_the_key_secret_only_if_it_exists():
    cluster = single(RAYJOB_FILE, "RayJob")["spec"]["rayClusterSpec"]
    account = single(SERVICE_ACCOUNT_FILE, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["optional"] is True, f"{container['name']}: {name} makes the Secret required"
    runbook = RUNBOOK.read_text()
    assert "IRSA" in runbook and "Pod Identity" in runbook and "serviceaccount.yaml" in runbook


# --------------------------------------------------------------------------------------------- entrypoints


def rayjob_entrypoint() -> list[str]:
    return shlex.split(single(RAYJOB_FILE, "RayJob")["spec"]["entrypoint"])


def job_invocations(text: str) -> set[str]:
    return set(re.findall(r"python -m jobs\.([a-z][a-z0-9_]*)\b", text))


def parse_entrypoint(argv: list[str]) -> tuple[str, str | None, list[str]]:
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), argv
    rest = argv[3:]
    config = None
    if rest[:1] == ["--config"]:
        config, rest = rest[1], rest[2:]
    assert all("=" in item and not item.startswith("-") for item in rest), f"not key=value overrides: {rest}"
    return argv[2].removeprefix("jobs."), config, rest


def in_repo(image_path: str) -> Path:
    """A path inside the image (absolute under IMAGE_ROOT, or relative to it) as a path in this checkout."""
    return REPO / Path(image_path).relative_to(IMAGE_ROOT) if image_path.startswith("/") else REPO / image_path


def test_dockerfile_installs_the_project_where_the_manifests_expect_it():
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (INFRA / "Dockerfile").read_text(), flags=re.M)
    assert workdirs[-1] == IMAGE_ROOT


def test_infra_only_runs_known_jobs():
    found = set()
    for path in INFRA.rglob("*"):
        if path.is_file():
            found |= job_invocations(path.read_text())
    assert found, "no `python -m jobs.NAME` found under infra/"
    assert found <= INFRA_JOBS, f"unknown jobs {found - INFRA_JOBS}"


@pytest.mark.parametrize("job", sorted(INFRA_JOBS))
def test_infra_jobs_exist(job):
    if not (REPO / "jobs" / f"{job}.py").exists():
        pytest.skip(f"jobs/{job}.py is not written yet")
    assert "run_job(" in (REPO / "jobs" / f"{job}.py").read_text()


def test_rayjob_entrypoint_config_and_overrides_are_valid():
    job, config, overrides = parse_entrypoint(rayjob_entrypoint())
    # A packaged config: found in the installed wheel whatever the driver's working directory.
    assert config is not None and not config.startswith("/") and config_file(config).parent == CONF_DIR
    assert preset_names("encoder")
    cfg = load_config(JOB_CONFIGS[job], config, overrides)
    assert cfg.input.path.startswith("s3://") and cfg.output.path.startswith("s3://")
    assert cfg.executor == "ray" and cfg.ray.num_gpus_per_actor > 0


def test_rayjob_actors_fit_the_gpu_worker_group():
    _, _, overrides = parse_entrypoint(rayjob_entrypoint())
    values = dict(item.split("=", 1) for item in overrides)
    gpus_wanted = int(values["ray.num_actors_max"]) * float(values["ray.num_gpus_per_actor"])
    worker_groups = single(RAYJOB_FILE, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus_available = sum(
        g["maxReplicas"] * sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in g["template"]["spec"]["containers"])
        for g in worker_groups
    )
    assert 0 < gpus_wanted <= gpus_available


# --------------------------------------------------------------------------------------------- nightly CronJob


def test_cronjob_runs_as_its_service_account_with_rights_to_create_rayjobs():
    cronjob, role, binding, account = (single(CRONJOB_FILE, k) for k in ("CronJob", "Role", "RoleBinding", "ServiceAccount"))
    assert _cron_pod(cronjob)["serviceAccountName"] == account["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]}.items() <= binding["subjects"][0].items()
    rules = [r for r in role["rules"] if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]]
    assert rules and {"create", "get", "list", "delete"} <= set(rules[0]["verbs"])
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_cronjob_reads_the_rayjob_from_the_configmap_the_script_creates():
    pod = _cron_pod(single(CRONJOB_FILE, "CronJob"))
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    script = (INFRA / "scripts" / "submit_kuberay.sh").read_text()
    assert f"create configmap {volume['configMap']['name']}" in script
    key = re.search(r"--from-file=([\w.-]+)=infra/kuberay/rayjob-compress\.yaml", script).group(1)
    assert f"{mount['mountPath']}/{key}" in container["args"][0]


# --------------------------------------------------------------------------------------------- Ray cluster launcher


def test_ray_cluster_config_is_accepted_by_rays_schema():
    import ray.autoscaler

    cluster = load_docs(CLUSTER_FILE)[0]
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"):
        assert key in cluster, f"{CLUSTER_FILE.name} lacks {key}"
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def iam_policy(name: str) -> list[dict]:
    return json.loads((IAM / f"{name}-policy.json").read_text())["Statement"]


def test_every_ray_cluster_node_has_an_instance_profile_with_a_policy_in_the_repo():
    cluster = load_docs(CLUSTER_FILE)[0]
    for name, node_type in cluster["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        profile = arn.rsplit("/", 1)[1]
        assert (IAM / f"{profile}-policy.json").exists(), f"{name}: no infra/iam/{profile}-policy.json"
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"]["Arn"].endswith("/atr-head")
    # The head logs Docker in to ECR with its own role (initialization_commands).
    assert any("ecr get-login-password" in c for c in cluster["initialization_commands"])


@pytest.mark.parametrize("role", ["atr-head", "atr-worker"])
def test_iam_policies_grant_least_privilege_s3_and_ecr_read(role):
    statements = iam_policy(role)
    actions = [a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    assert not [a for a in actions if a in ("*", "s3:*", "ecr:*", "iam:*") or a.endswith(":*")]
    assert {"ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"} <= set(actions)
    for statement in statements:
        resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
        if any(a.startswith("s3:") for a in ([statement["Action"]] if isinstance(statement["Action"], str)
                                             else statement["Action"])):
            assert all(r.startswith("arn:aws:s3:::") and r != "arn:aws:s3:::*" for r in resources), statement
            assert all("*" not in r.split(":::", 1)[1].split("/", 1)[0] for r in resources), "name the buckets"
    writes = [s for s in statements if "s3:PutObject" in s["Action"]]
    assert writes and all("/atr/compressed/" in r or "/atr/selector/" in r for s in writes for r in s["Resource"])
    if role == "atr-head":
        (pass_role,) = [s for s in statements if "iam:PassRole" in s["Action"]]
        assert pass_role["Resource"] == "arn:aws:iam::123456789012:role/atr-worker"


def test_ray_cluster_has_autoscaling_gpu_workers():
    cluster = load_docs(CLUSTER_FILE)[0]
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name} has no GPU resource"
        assert 0 <= node_type.get("min_workers", 0) < node_type["max_workers"] <= cluster["max_workers"]
        assert node_type["node_config"]["InstanceType"]
    assert cluster["docker"]["image"]


# --------------------------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(text: str) -> list[tuple[str, list[str]]]:
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def copy_sources(text: str) -> list[str]:
    """Sources of COPY/ADD from the build context (not --from another stage), in either syntax."""
    sources = []
    for keyword, rest in dockerfile_instructions(text):
        if keyword not in ("COPY", "ADD"):
            continue
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [a for a in args if not a.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def test_copy_sources_parser():
    text = 'FROM x\nCOPY --chown=ray a.toml \\\n  b.md ./\nADD ["c d", "/e"]\nCOPY --from=build /x /y\n# COPY nope /\n'
    assert copy_sources(text) == ["a.toml", "b.md", "c d"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_files_that_exist(dockerfile):
    sources = copy_sources(dockerfile.read_text())
    assert sources, f"{dockerfile.name} copies nothing"
    missing = [s for s in sources if not list(REPO.glob(s))]
    assert missing == [], f"{dockerfile.name} copies paths absent from the repository: {missing}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_the_install_needs(dockerfile):
    sources = {s.rstrip("/") for s in copy_sources(dockerfile.read_text())}
    # pyproject's readme and package list; the presets travel inside pipeline/ (package data).
    assert {"pyproject.toml", "README.md", "constraints.txt", "pipeline", "jobs"} <= sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_dependencies_with_constraints_before_copying_the_code(dockerfile):
    """A code change then rebuilds only the last layers, and resolution follows constraints.txt (fast)."""
    instructions = dockerfile_instructions(dockerfile.read_text())
    code_at = next(i for i, (k, rest) in enumerate(instructions) if k == "COPY" and re.search(r"\bpipeline\b", rest))
    deps = [i for i, (k, rest) in enumerate(instructions) if k == "RUN" and "-c constraints.txt" in rest]
    assert deps and deps[0] < code_at, "dependencies must be installed, with -c constraints.txt, before COPY pipeline"
    project = [rest for k, rest in instructions[code_at:] if k == "RUN" and re.search(r"pip install .*--no-deps", rest)]
    assert project, "the project itself is installed after the code is copied, with --no-deps"
    assert not any(re.search(r"pip install[^&]*\s-e\s", rest) for _, rest in instructions), "non-editable install"


def test_cpu_dockerfile_installs_the_cpu_torch_wheel_before_the_project():
    instructions = dockerfile_instructions((INFRA / "Dockerfile.cpu").read_text())
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "download.pytorch.org/whl/cpu" in r)
    project_at = next(i for i, r in enumerate(runs) if "-c constraints.txt" in r)
    assert torch_at < project_at


# --------------------------------------------------------------------------------------------- versions


def test_ray_has_an_upper_bound_the_installed_version_meets():
    """Ray 2.64 removes ``**ray_remote_args``, through which Ray Data (2.60) still takes ``max_restarts``,
    ``max_task_retries`` and ``max_retries``: the bound admits only releases tested here."""
    import importlib.metadata

    import tomllib
    from packaging.requirements import Requirement

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == "ray"]
    assert any(spec.operator == "<" for spec in ray_requirement.specifier), ray_requirement
    assert ray_requirement.specifier.contains(importlib.metadata.version("ray")), ray_requirement
    # The KubeRay cluster runs the same Ray as the image.
    ray_version = single(RAYJOB_FILE, "RayJob")["spec"]["rayClusterSpec"]["rayVersion"]
    assert ray_requirement.specifier.contains(ray_version)


# --------------------------------------------------------------------------------------------- credentials

CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?(?![$<{])[A-Za-z0-9/+]"),
    re.compile(r"(?i)aws_session_token\s*[:=]\s*[\"']?(?![$<{])[A-Za-z0-9/+]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
SECRET_ENV_NAME = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL)")


def literal_credentials(text: str) -> list[str]:
    return [m.group(0) for pattern in CREDENTIAL_PATTERNS for m in pattern.finditer(text)]


def test_credential_patterns_catch_planted_secrets():
    key_id = "AKIA" + "Q" * 16
    secret = "wJalrXUtnFEMI" + "/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    assert literal_credentials(f"id: {key_id}")
    assert literal_credentials(f"aws_secret_access_key: {secret}")
    assert literal_credentials(f"export AWS_SECRET_ACCESS_KEY={secret}")
    assert not literal_credentials("- name: AWS_SECRET_ACCESS_KEY\n  valueFrom: {secretKeyRef: {key: AWS_SECRET_ACCESS_KEY}}")
    assert not literal_credentials("AWS_SECRET_ACCESS_KEY=$(cat key)")


def scanned_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file()) + ([RUNBOOK] if RUNBOOK.exists() else [])


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_literal_credentials(path):
    assert literal_credentials(path.read_text()) == []


def _env_lists(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            yield from _env_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_lists(item)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_secret_like_env_vars_come_from_secrets(path):
    for doc in load_docs(path):
        for env in _env_lists(doc):
            for var in env:
                if SECRET_ENV_NAME.search(var["name"]):
                    assert "value" not in var, f"{path.name}: {var['name']} has a literal value"


# --------------------------------------------------------------------------------------------- scripts


def fake_command(bin_dir: Path, name: str, body: str) -> None:
    """A stand-in for `ray` / `kubectl` that logs its argv (one JSON list per line) and then runs ``body``."""
    path = bin_dir / name
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'{shlex.quote(sys.executable)} -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" >> "$FAKE_LOG"\n'
        f"{body}\n"
    )
    path.chmod(0o755)


def run_script(tmp_path: Path, args: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    log = tmp_path / "calls.log"
    full_env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
                "FAKE_LOG": str(log), **env}
    result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


@pytest.fixture
def bin_dir(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "home").mkdir()
    return tmp_path / "bin"


@pytest.mark.parametrize("token_on_disk", [True, False])
def test_submit_local_cluster_builds_the_ray_job_submit_command(tmp_path, bin_dir, token_on_disk):
    fake_command(bin_dir, "ray", 'echo "cwd=$PWD auth=${RAY_AUTH_MODE:-unset} address=$RAY_ADDRESS"')
    if token_on_disk:
        (tmp_path / "home" / ".ray").mkdir()
        (tmp_path / "home" / ".ray" / "auth_token").write_text("not-a-real-token")
    result, calls = run_script(
        tmp_path, [str(INFRA / "scripts" / "submit_local_cluster.sh"), "input.path=s3://b/in", "output.path=s3://b/out"],
        {"ATR_SUBMISSION_ID": "nightly-1"}, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"cwd={REPO} " in result.stdout
    assert f"auth={'token' if token_on_disk else 'unset'} " in result.stdout
    assert "address=http://127.0.0.1:8265" in result.stdout
    (argv,) = calls
    separator = argv.index("--")
    options = argv[:separator]
    assert options[:2] == ["job", "submit"]
    assert options[options.index("--submission-id") + 1] == "nightly-1"
    assert options[options.index("--working-dir") + 1] == "."
    runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
    assert {".git", ".venv"} <= set(runtime_env["excludes"])
    job, config, overrides = parse_entrypoint(argv[separator + 1:])
    assert (job, config, overrides) == ("compress", "conf/compress.yaml", ["input.path=s3://b/in", "output.path=s3://b/out"])


KUBECTL_FOR_SUBMIT = r"""
case "$*" in
  *"get serviceaccount atr-ray -o"*) printf '%s' "${FAKE_ROLE_ARN-arn:aws:iam::1:role/atr-worker}" ;;
  *"get serviceaccount"*) [ -z "${FAKE_NO_SERVICE_ACCOUNT:-}" ] ;;
  *"get secret"*) [ -z "${FAKE_NO_SECRET:-}" ] ;;
  *"create -f infra/kuberay/rayjob-compress.yaml -o name"*) echo rayjob.ray.io/atr-compress-x7k2p ;;
  *"create configmap"*) echo "kind: ConfigMap" ;;
  *"apply -f -"*) cat > "$FAKE_LOG.stdin" ;;
esac
"""


def test_submit_kuberay_once_creates_a_rayjob(tmp_path, bin_dir):
    fake_command(bin_dir, "kubectl", KUBECTL_FOR_SUBMIT)
    result, calls = run_script(tmp_path, [str(INFRA / "scripts" / "submit_kuberay.sh"), "once"], {"NAMESPACE": "ml"})
    assert result.returncode == 0, result.stderr
    assert ["--namespace", "ml", "create", "-f", "infra/kuberay/rayjob-compress.yaml", "-o", "name"] in calls
    assert "logs -f job/atr-compress-x7k2p" in result.stdout


def test_submit_kuberay_nightly_installs_configmap_and_cronjob(tmp_path, bin_dir):
    fake_command(bin_dir, "kubectl", KUBECTL_FOR_SUBMIT)
    result, calls = run_script(tmp_path, [str(INFRA / "scripts" / "submit_kuberay.sh"), "nightly"], {})
    assert result.returncode == 0, result.stderr
    assert ["apply", "-f", "infra/kuberay/cronjob-nightly.yaml"] in calls
    assert any(c[:3] == ["create", "configmap", "atr-rayjob-compress"] and "--dry-run=client" in c for c in calls)
    assert (tmp_path / "calls.log.stdin").read_text() == "kind: ConfigMap\n"


def test_submit_kuberay_stops_without_the_service_account(tmp_path, bin_dir):
    fake_command(bin_dir, "kubectl", KUBECTL_FOR_SUBMIT)
    result, calls = run_script(tmp_path, [str(INFRA / "scripts" / "submit_kuberay.sh"), "once"],
                               {"FAKE_NO_SERVICE_ACCOUNT": "1"})
    assert result.returncode == 2
    assert "atr-ray" in result.stderr and "infra/kuberay/serviceaccount.yaml" in result.stderr
    assert not any("create" in c for c in calls)


@pytest.mark.parametrize("role_arn", ["arn:aws:iam::1:role/atr-worker", ""])
def test_submit_kuberay_needs_no_key_secret(tmp_path, bin_dir, role_arn):
    fake_command(bin_dir, "kubectl", KUBECTL_FOR_SUBMIT)
    result, calls = run_script(tmp_path, [str(INFRA / "scripts" / "submit_kuberay.sh"), "once"],
                               {"FAKE_NO_SECRET": "1", "FAKE_ROLE_ARN": role_arn})
    assert result.returncode == 0, result.stderr
    assert ["create", "-f", "infra/kuberay/rayjob-compress.yaml", "-o", "name"] in calls
    assert ("Pod Identity" in result.stderr) == (role_arn == "")  # neither Secret nor IRSA: say what is left


KUBECTL_FOR_CRON = r"""
case "$*" in
  *jsonpath*) printf '%s' "$FAKE_STATUSES" ;;
  *"-o name"*"--sort-by"*|*"--sort-by"*"-o name"*) printf '%s' "$FAKE_NAMES" ;;
  "create -f /etc/atr/rayjob.yaml -o name") echo rayjob.ray.io/atr-compress-new ;;
esac
"""


def run_cron_script(tmp_path: Path, statuses: list[str], names: list[str]) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    container = _cron_pod(single(CRONJOB_FILE, "CronJob"))["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    env["FAKE_STATUSES"] = "".join(s + "\n" for s in statuses)
    env["FAKE_NAMES"] = "".join(n + "\n" for n in names)
    fake_command(tmp_path / "bin", "kubectl", KUBECTL_FOR_CRON)
    return run_script(tmp_path, [*container["command"], *container["args"]], env, cwd=tmp_path)


def test_nightly_script_skips_while_a_compress_run_is_active(tmp_path, bin_dir):
    result, calls = run_cron_script(tmp_path, ["Complete", "Running"], ["rayjob.ray.io/a", "rayjob.ray.io/b"])
    assert result.returncode == 0, result.stderr
    assert "still active" in result.stdout
    assert not any(c[0] in ("create", "delete") for c in calls)


def test_nightly_script_treats_a_just_created_rayjob_as_active(tmp_path, bin_dir):
    result, calls = run_cron_script(tmp_path, [""], ["rayjob.ray.io/a"])
    assert result.returncode == 0, result.stderr
    assert not any(c[0] == "create" for c in calls)


def test_nightly_script_prunes_old_runs_then_creates_one(tmp_path, bin_dir):
    keep = int({e["name"]: e["value"] for e in _cron_pod(single(CRONJOB_FILE, "CronJob"))["containers"][0]["env"]}
               ["KEEP_FINISHED"])
    names = [f"rayjob.ray.io/atr-compress-{i:02d}" for i in range(keep + 2)]
    result, calls = run_cron_script(tmp_path, ["Complete"] * len(names), names)
    assert result.returncode == 0, result.stderr
    assert ["delete", names[0], names[1]] in calls
    assert calls[-1] == ["create", "-f", "/etc/atr/rayjob.yaml", "-o", "name"]


def test_nightly_script_creates_the_first_run(tmp_path, bin_dir):
    result, calls = run_cron_script(tmp_path, [], [])
    assert result.returncode == 0, result.stderr
    assert not any(c[0] == "delete" for c in calls)
    assert calls[-1] == ["create", "-f", "/etc/atr/rayjob.yaml", "-o", "name"]


# --------------------------------------------------------------------------------------------- runbook


def test_runbook_names_only_known_jobs_and_existing_infra_files():
    if not RUNBOOK.exists():
        pytest.skip("docs/operations.md is not written yet")
    text = RUNBOOK.read_text()
    assert job_invocations(text) <= ALL_JOBS
    referenced = set(re.findall(r"\binfra/[\w./-]*\w", text))
    assert referenced, "the runbook names no infra/ file"
    assert [p for p in sorted(referenced) if not (REPO / p).exists()] == []
