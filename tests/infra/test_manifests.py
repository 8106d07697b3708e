"""The deployment files agree with the code: every manifest parses; every job command in a manifest (the
training RayJobs as `kubectl kustomize` renders their overlays) or in the deployment docs is accepted by
that job's own parser; GPU requests match the workers that ask for them; services stay on loopback or
cluster-internal addresses; no credential is written into a file; each pod gets the credentials it uses,
and only those, from the one Secret (k8s) or .env (the node); Ray runs with token auth and MLflow with
basic auth; the network policies admit the project's pods and nothing else."""

from __future__ import annotations

import configparser
import copy
import functools
import importlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.secrets import is_secret_name, redact_text

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
TRAIN = K8S / "jobs" / "train"  # kustomize: base/ (a Component) and one overlay per training stage
NODE = ROOT / "infra" / "node"
SECRET = "hdm-credentials"  # the one Secret of the k8s deployment; its keys: infra/k8s/credentials.env.template
DOCS = {"node": ROOT / "docs" / "node.md", "kubernetes": ROOT / "docs" / "kubernetes.md"}
JOB_SCRIPT = re.compile(r"^(?:.*/)?jobs/(\w+)\.py$")
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
GPU = "nvidia.com/gpu"
# The jobs whose flags are checked (the DAG runner, jobs/run_pipeline.py, takes only a TOML path).
JOBS = ("precompute_latents", "train_vae", "train_stage", "sample", "ingest", "run_pipeline")


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def env_settings(path: Path) -> dict[str, str]:
    """NAME=VALUE lines of an env file (comments and blank lines skipped)."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def k8s_objects() -> list[dict]:
    return [doc for path in sorted(K8S.rglob("*.yaml")) for doc in yaml_documents(path)]


def of_kind(kind: str) -> list[dict]:
    """The objects of that kind the manifests apply: plain files as written, the training stages' overlays
    rendered (kustomize's inputs under TRAIN are not objects until then)."""
    plain = [doc for path in sorted(K8S.rglob("*.yaml")) if not path.is_relative_to(TRAIN)
             for doc in yaml_documents(path)]
    rendered = [doc for docs in train_overlays().values() for doc in docs] if kind == "RayJob" else []
    return [doc for doc in plain + rendered if doc.get("kind") == kind]


@functools.cache
def train_overlays() -> dict[str, list[dict]]:
    """{overlay folder name: the objects `kubectl kustomize` renders from it} for each training stage."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the training RayJobs are kustomize overlays (infra/k8s/jobs/train) "
                    "that `kubectl kustomize` renders")
    rendered = {}
    for path in sorted(TRAIN.glob("*/kustomization.yaml")):
        if yaml_documents(path)[0]["kind"] == "Kustomization":  # not base/, a Component they all include
            result = subprocess.run(["kubectl", "kustomize", str(path.parent)], capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 0, f"kubectl kustomize {path.parent}: {result.stderr}"
            rendered[path.parent.name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    return rendered


def job_invocations(command: str) -> list[tuple[str, list[str]]]:
    """(job name, its arguments) for each `python [DIR/]jobs/NAME.py ARGS` in a shell command line,
    including after `ray job submit ... --`."""
    words = shlex.split(command, comments=True)
    found = []
    for i, word in enumerate(words[1:], start=1):
        match = JOB_SCRIPT.match(word)
        if match and words[i - 1].startswith("python"):
            args = []
            for arg in words[i + 1:]:
                if arg in SHELL_SEPARATORS:
                    break
                args.append(arg)
            found.append((match.group(1), args))
    return found


def parse_job(name: str, args: list[str]):
    """The job's validated config, from the job's own parser (argparse errors exit: a test failure)."""
    module = importlib.import_module(f"jobs.{name}")
    if name == "run_pipeline":  # the DAG: --dry-run validates its config and every stage's job config
        assert module.main([*args, "--dry-run"]) == 0, f"jobs/run_pipeline.py {shlex.join(args)} --dry-run failed"
        return None
    try:
        return module.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"jobs/{name}.py rejects {shlex.join(args)} (exit {e.code})")


def doc_commands(path: Path) -> list[str]:
    """Shell command lines of the fenced code blocks (backslash continuations joined)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def doc_invocations(path: Path) -> list[tuple[str, list[str]]]:
    return [inv for line in doc_commands(path) for inv in job_invocations(line) if inv[0] in JOBS]


def cluster_gpus(cluster: dict) -> int:
    """GPUs of a RayCluster's worker groups: per-pod limit x replicas."""
    total = 0
    for group in cluster["spec"]["workerGroupSpecs"]:
        per_pod = sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0))
                      for c in group["template"]["spec"]["containers"])
        total += per_pod * group["replicas"]
    return total


def test_every_manifest_parses_and_names_its_kind():
    paths = sorted(K8S.rglob("*.yaml")) + sorted(NODE.glob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        docs = yaml_documents(path)
        assert docs, path
        if path.is_relative_to(K8S):
            assert all({"apiVersion", "kind"} <= doc.keys() for doc in docs), path
    assert {"RayCluster", "RayJob", "Deployment", "Service"} <= {doc["kind"] for doc in k8s_objects()}


def test_rayjob_entrypoints_are_accepted_by_the_jobs():
    jobs = of_kind("RayJob")
    assert {job["metadata"]["name"] for job in jobs} >= {"hdm-precompute", "hdm-train-256", "hdm-train-512",
                                                          "hdm-train-768", "hdm-train-1024"}
    for job in jobs:
        invocations = job_invocations(job["spec"]["entrypoint"])
        assert len(invocations) == 1, job["metadata"]["name"]
        parse_job(*invocations[0])


def test_each_stage_asks_for_the_gpus_its_cluster_has():
    clusters = {c["metadata"]["name"]: c for c in of_kind("RayCluster")}
    for job in of_kind("RayJob"):
        cluster = clusters[job["spec"]["clusterSelector"]["ray.io/cluster"]]
        gpus = cluster_gpus(cluster)
        name, args = job_invocations(job["spec"]["entrypoint"])[0]
        config = parse_job(name, args)
        if name == "train_stage":
            assert config.workers == gpus and config.use_gpu, job["metadata"]["name"]
        elif name == "precompute_latents":
            assert config.encoders * config.gpus_per_encoder == gpus, job["metadata"]["name"]
        else:
            pytest.fail(f"no GPU check for jobs/{name}.py")


def test_gpu_requests_equal_limits_and_the_head_claims_none():
    for cluster in of_kind("RayCluster"):
        head = cluster["spec"]["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0"
        for container in head["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
        for group in cluster["spec"]["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            for container in group["template"]["spec"]["containers"]:
                assert container["resources"]["requests"][GPU] == container["resources"]["limits"][GPU] == "4"


def test_k8s_services_stay_inside_the_cluster_and_read_credentials_from_secrets():
    assert not of_kind("Ingress")
    for service in of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    for obj in k8s_objects():
        for env in _container_envs(obj):
            if is_secret_name(env["name"]) or "STORE_URI" in env["name"]:
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], env["name"]


def _container_envs(obj) -> list[dict]:
    """Every `env` entry of every container below a manifest object."""
    if isinstance(obj, dict):
        found = list(obj["env"]) if isinstance(obj.get("env"), list) else []
        return found + [e for v in obj.values() for e in _container_envs(v)]
    if isinstance(obj, list):
        return [e for v in obj for e in _container_envs(v)]
    return []


def test_node_ray_head_gpus_match_the_documented_stages():
    compose = yaml_documents(NODE / "compose.yaml")[0]
    head = compose["services"]["ray-head"]
    num_gpus = int(next(a for a in head["command"] if a.startswith("--num-gpus=")).split("=")[1])
    reserved = head["deploy"]["resources"]["reservations"]["devices"][0]["count"]
    assert num_gpus == reserved == 4
    trains = [parse_job(name, args) for name, args in doc_invocations(DOCS["node"]) if name == "train_stage"]
    assert [c.res for c in trains] == [256, 512, 768, 1024]
    assert all(c.workers == num_gpus and c.use_gpu for c in trains)


def test_node_services_bind_loopback_and_hold_no_secret():
    compose = yaml_documents(NODE / "compose.yaml")[0]
    text = (NODE / "compose.yaml").read_text()
    assert "0.0.0.0" not in text
    for name, service in compose["services"].items():
        assert service["network_mode"] == "host" and "ports" not in service, name
        command = " ".join(service.get("command", []))
        for flag in ("--host", "--node-ip-address", "--dashboard-host", "listen_addresses"):
            if flag in command:
                assert re.search(rf"{flag}[= ]127\.0\.0\.1", command), (name, flag)
        for key, value in service.get("environment", {}).items():
            if is_secret_name(key) or "STORE_URI" in key:
                assert "${" in value and not re.search(r"://[^:/]+:[^$@/]+@", value), (name, key)


def test_env_template_leaves_every_secret_empty():
    settings = env_settings(NODE / "env.template")
    secrets = [k for k in settings if is_secret_name(k)]
    assert {"POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(secrets)
    assert all(settings[k] == "" for k in secrets)
    assert "/infra/node/.env" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_doc_job_commands_are_accepted_by_the_jobs(doc):
    invocations = doc_invocations(DOCS[doc])
    assert {"precompute_latents", "train_stage"} <= {name for name, _ in invocations}
    for name, args in invocations:
        parse_job(name, args)


def test_train_jobs_differ_only_in_name_res_init_from_and_steps():
    """The four training RayJobs: one base, and per stage what the DAG's recipe (hdm_xut_base.toml) says."""
    from pipelines.config import load_config
    from pipelines.dag.spec import DagConfig

    overlays = train_overlays()
    assert sorted(overlays) == ["train-1024", "train-256", "train-512", "train-768"]
    dag = load_config(DagConfig, ROOT / "pipelines" / "dag" / "configs" / "hdm_xut_base.toml")
    recipe_steps = {s.params["res"]: s.params["steps"] for s in dag.stages.values() if s.kind == "train"}
    shared = []
    for name, docs in sorted(overlays.items()):
        assert [doc["kind"] for doc in docs] == ["RayJob"], name  # the overlay's ConfigMap stays local
        job = copy.deepcopy(docs[0])
        words = shlex.split(job["spec"]["entrypoint"])
        values = {flag: words[words.index(flag) + 1] for flag in ("--res", "--init-from", "--steps")}
        res = int(values["--res"])
        assert job["metadata"]["name"] == f"hdm-{name}" == f"hdm-train-{res}"
        assert values["--init-from"] == ("none" if res == min(recipe_steps) else "auto"), name
        assert int(values["--steps"]) == recipe_steps[res], name
        for flag in values:
            words[words.index(flag) + 1] = "<stage>"
        job["metadata"]["name"], job["spec"]["entrypoint"] = "<stage>", shlex.join(words)
        shared.append(job)
    assert all(job == shared[0] for job in shared)


def test_kubernetes_doc_runs_what_the_rayjobs_run():
    entrypoints = {shlex.join(shlex.split(job["spec"]["entrypoint"])) for job in of_kind("RayJob")}
    documented = [line for line in doc_commands(DOCS["kubernetes"]) if line.startswith("python /app/jobs/")]
    assert documented and all(shlex.join(shlex.split(line)) in entrypoints for line in documented)


def test_image_pins_match_the_tested_set():
    def pins(path: Path) -> dict[str, str]:
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return {re.sub(r"\[.*\]", "", name): version
                for name, _, version in (line.partition("==") for line in lines if line)}

    image, tested = pins(ROOT / "infra" / "docker" / "requirements.txt"), pins(ROOT / "requirements-cpu.txt")
    shared = image.keys() & tested.keys()
    assert {"torch", "ray", "mlflow", "pyarrow"} <= shared
    assert {name: image[name] for name in shared} == {name: tested[name] for name in shared}
    assert "psycopg2-binary" in image  # the MLflow server's PostgreSQL driver
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert f"pytorch/pytorch:{tested['torch']}-cuda" in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, flags=re.M)


# --- credentials, authentication and network policies (issue 17) ---

# The Secret keys each long-lived pod reads, by its environment variable: only what it uses.
NEEDS = {
    "mlflow": {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
               "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "hdm-head": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "HF_TOKEN"},
}
NEEDS["hdm-gpu4"] = NEEDS["hdm-head"]
OPTIONAL_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"}  # IAM roles; public models
# The .env variables (secret ones) each node service reads.
NODE_NEEDS = {
    "postgres": {"POSTGRES_PASSWORD"},
    "mlflow": {"POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_FLASK_SERVER_SECRET_KEY"},
    "ray-head": {"RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"},
}
PROJECT = {"app.kubernetes.io/part-of": "hdm"}
OUTSIDER = {"app.kubernetes.io/name": "someone-else"}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}  # the KubeRay Helm chart's pod label


def pods() -> dict[str, tuple[dict, dict]]:
    """{name: (pod template, the labels its pods carry)} of every long-lived pod: the Deployments' and each
    RayCluster's head and worker groups, with the labels KubeRay adds to its pods (ray-operator's labelPod)."""
    found = {d["metadata"]["name"]: (d["spec"]["template"], d["spec"]["template"]["metadata"]["labels"])
             for d in of_kind("Deployment")}
    for cluster in of_kind("RayCluster"):
        name, spec = cluster["metadata"]["name"], cluster["spec"]
        groups = [("head", "headgroup", spec["headGroupSpec"])] + [
            ("worker", g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for node_type, group, group_spec in groups:
            template = group_spec["template"]
            labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/cluster": name,
                      "ray.io/node-type": node_type, "ray.io/group": group, "app.kubernetes.io/name": "kuberay"}
            found[f"{name}-{'head' if node_type == 'head' else group}"] = (template, labels)
    return found


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"] + template["spec"].get("initContainers", [])


def test_each_pod_reads_the_credentials_it_uses_and_only_those_from_the_one_secret():
    keys = env_settings(K8S / "credentials.env.template")
    assert all(value == "" for key, value in keys.items() if is_secret_name(key))
    found = pods()
    assert set(found) == set(NEEDS)
    used = set()
    for name, (template, _) in found.items():
        for container in containers(template):
            assert "envFrom" not in container, (name, container["name"])  # a whole Secret: more than it needs
            refs = {}
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    assert not is_secret_name(env["name"]) and "STORE_URI" not in env["name"], (name, env["name"])
                    continue
                assert ref["name"] == SECRET and ref["key"] in keys, (name, env["name"])
                assert ref.get("optional", False) == (ref["key"] in OPTIONAL_KEYS), (name, env["name"])
                refs[env["name"]] = ref["key"]
            assert set(refs) == (NEEDS[name] if container is template["spec"]["containers"][0] else set()), name
            used |= set(refs.values())
    assert set(keys) == used | {"auth_token"}  # auth_token: the Ray token, read by KubeRay (authOptions)


def test_no_manifest_holds_a_credential_or_passes_one_on_a_command_line():
    objects = k8s_objects() + [doc for docs in train_overlays().values() for doc in docs]
    assert not [obj for obj in objects if obj["kind"] == "Secret"]
    for config_map in of_kind("ConfigMap"):
        for text in config_map.get("data", {}).values():
            for line in text.splitlines():
                assert not is_secret_name(line.split("=")[0].strip()) and redact_text(line, set()) == line, line
    for job in of_kind("RayJob"):
        runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML", "{}"))
        assert not [k for k in runtime_env.get("env_vars", {}) if is_secret_name(k)], job["metadata"]["name"]
    compose = yaml_documents(NODE / "compose.yaml")[0]
    lines = [job["spec"]["entrypoint"] for job in of_kind("RayJob")]
    lines += [" ".join(c.get("command", []) + c.get("args", [])) for _, (t, _) in pods().items() for c in containers(t)]
    lines += [" ".join(service.get("command", [])) for service in compose["services"].values()]
    for line in lines:
        assert redact_text(line, set()) == line, line  # no URI with a password
        referenced = re.findall(r"\$\(?\{?(\w+)", line)  # $(VAR) expands into the argv the node shows
        assert not [v for v in referenced if is_secret_name(v) or "STORE_URI" in v], line


def test_ray_runs_with_token_auth_on_every_node():
    for cluster in of_kind("RayCluster"):
        # KubeRay >= 1.6 reads key auth_token of this Secret into RAY_AUTH_TOKEN of the head, the workers and
        # the RayJob submitters, sets RAY_AUTH_MODE=token there, and calls the job API with the token.
        assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": SECRET}
        assert tuple(int(p) for p in cluster["spec"]["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth
    assert "auth_token" in env_settings(K8S / "credentials.env.template")
    for name, (template, _) in pods().items():
        for container in containers(template):  # a container's own value would win over KubeRay's
            assert not [e for e in container.get("env", []) if e["name"].startswith("RAY_AUTH")], name
    head = yaml_documents(NODE / "compose.yaml")[0]["services"]["ray-head"]
    assert head["environment"]["RAY_AUTH_MODE"] == "token"
    assert head["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def _auth_store_on_volume(config_text: str, volume_paths: set[str]) -> None:
    """MLflow's basic-auth config keeps its user store in sqlite on a persistent volume, and holds no login."""
    config = configparser.ConfigParser()
    config.read_string(config_text)
    database = config["mlflow"]["database_uri"]
    assert database.startswith("sqlite:////") and str(Path(database[len("sqlite:///"):]).parent) in volume_paths
    assert config["mlflow"]["default_permission"] in {"READ", "NO_PERMISSIONS"}
    assert not [k for k in config["mlflow"] if is_secret_name(k)]


def test_mlflow_runs_behind_basic_auth_with_a_persistent_user_store():
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert "--app-name basic-auth" in " ".join(container["command"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    config_dir, config_file = env["MLFLOW_AUTH_CONFIG_PATH"].rsplit("/", 1)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_volume = next(n for n, path in mounts.items() if path == config_dir)
    config_map = next(c for c in of_kind("ConfigMap")
                      if c["metadata"]["name"] == volumes[config_volume]["configMap"]["name"])
    claims = {c["metadata"]["name"] for c in of_kind("PersistentVolumeClaim")}
    on_claims = {mounts[n] for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") in claims}
    _auth_store_on_volume(config_map["data"][config_file], on_claims)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one pod at a time on the ReadWriteOnce claim

    compose = yaml_documents(NODE / "compose.yaml")[0]
    mlflow = compose["services"]["mlflow"]
    assert "--app-name basic-auth" in " ".join(mlflow["command"])
    binds = dict(v.rsplit(":", 1)[0].split(":", 1) for v in mlflow["volumes"] if v.endswith(":ro"))
    named = dict(v.split(":", 1) for v in mlflow["volumes"] if not v.endswith(":ro"))
    source = next(src for src, target in binds.items() if target == mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"])
    assert set(named) <= set(compose["volumes"])
    _auth_store_on_volume((NODE / source).read_text(), set(named.values()))
    admin = {k: v for k, v in mlflow["environment"].items() if k.startswith("MLFLOW_AUTH_ADMIN")}
    assert admin == {"MLFLOW_AUTH_ADMIN_USERNAME": compose["services"]["ray-head"]["environment"]
                     ["MLFLOW_TRACKING_USERNAME"],
                     "MLFLOW_AUTH_ADMIN_PASSWORD": compose["services"]["ray-head"]["environment"]
                     ["MLFLOW_TRACKING_PASSWORD"]}  # the jobs log in as the admin the server creates


def test_node_services_get_only_the_credentials_they_use():
    compose = yaml_documents(NODE / "compose.yaml")[0]
    settings = env_settings(NODE / "env.template")
    for name, service in compose["services"].items():
        referenced = {v for value in service.get("environment", {}).values()
                      for v in re.findall(r"\$\{(\w+)", str(value))}
        assert referenced <= set(settings), name
        assert {v for v in referenced if is_secret_name(v)} == NODE_NEEDS[name], name


def _matches(selector: dict, labels: dict) -> bool:
    """Kubernetes' label selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    tests = {"In": lambda e: labels.get(e["key"]) in e["values"], "NotIn": lambda e: labels.get(e["key"]) not in
             e["values"], "Exists": lambda e: e["key"] in labels, "DoesNotExist": lambda e: e["key"] not in labels}
    return all(tests[e["operator"]](e) for e in selector.get("matchExpressions", []))


def _peer_admits(peer: dict, source: dict, same_namespace: bool) -> bool:
    if "ipBlock" in peer:
        return True  # addresses: anyone, as far as this test can tell
    if "namespaceSelector" not in peer and not same_namespace:
        return False
    # a namespaceSelector is taken to match every namespace (their labels are not known here)
    return _matches(peer.get("podSelector", {}), source)


def admitted(source: dict, target: dict, port: int, *, same_namespace: bool = True) -> bool:
    """Whether the namespace's NetworkPolicies let a pod labelled `source` connect to a pod labelled `target`
    on `port`: the union of the ingress rules of every policy that selects the target (none: not isolated)."""
    policies = [p["spec"] for p in of_kind("NetworkPolicy")
                if "Ingress" in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"], target)]
    if not policies:
        return True
    for rule in (rule for policy in policies for rule in policy.get("ingress", [])):
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        if "from" not in rule or any(_peer_admits(peer, source, same_namespace) for peer in rule["from"]):
            return True
    return False


def test_network_policies_admit_the_projects_pods_and_nothing_else():
    found = {name: labels for name, (_, labels) in pods().items()}
    head, worker, mlflow = found["hdm-head"], found["hdm-gpu4"], found["mlflow"]
    assert all(PROJECT.items() <= labels.items() for labels in found.values())
    submitters = [{"batch.kubernetes.io/job-name": job["metadata"]["name"], "job-name": job["metadata"]["name"]}
                  for job in of_kind("RayJob")]
    assert len(submitters) >= 5
    for port in (8265, 6379, 10001):  # job API and dashboard, GCS, Ray client
        assert admitted(PROJECT, head, port) and admitted(worker, head, port)
        assert not admitted(OUTSIDER, head, port) and not admitted(OUTSIDER, head, port, same_namespace=False)
        assert admitted(OPERATOR, head, port, same_namespace=False) == (port == 8265)
        assert all(admitted(submitter, head, port) == (port == 8265) for submitter in submitters)
        assert not admitted(PROJECT, head, port, same_namespace=False)
    assert admitted(head, worker, 40000) and not admitted(mlflow, worker, 40000)
    assert not admitted(OUTSIDER, worker, 6379)
    assert admitted(head, mlflow, 5000) and admitted(worker, mlflow, 5000) and admitted(PROJECT, mlflow, 5000)
    assert not admitted(OUTSIDER, mlflow, 5000) and not admitted(submitters[0], mlflow, 5000)
    assert not admitted(OPERATOR, mlflow, 5000, same_namespace=False)
    assert not admitted(PROJECT, mlflow, 22) and not admitted(PROJECT, OUTSIDER, 80)  # default deny
