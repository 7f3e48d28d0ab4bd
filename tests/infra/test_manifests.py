"""The deployable definitions in infra/ agree with the code and with each other.

Every manifest parses; every brainlm container runs the image infra/Dockerfile builds (third-party images are
pinned); the environment variables they set are ones brainlm, its start scripts or the tools read; the URLs one
service uses to reach another name that service and the port it listens on; secrets are references (compose
`${VAR:?}`, Kubernetes `secretKeyRef`), never values.
"""

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

import brainlm

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
IMAGE = f"brainlm:{brainlm.__version__}"
THIRD_PARTY = ("postgres:", "quay.io/minio/minio:", "quay.io/minio/mc:")
# Outside Kubernetes' manifests (managed services, or the compose services of the same names).
K8S_EXTERNAL = {"postgres": 5432, "minio": 9000}
# Read by the tools themselves (MLflow's client, boto3 / DVC, Prefect, the postgres and MinIO images, the `mc`
# job's shell), not by brainlm's code or scripts.
TOOL_ENV = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
            "PREFECT_SERVER_ANALYTICS_ENABLED", "POSTGRES_USER", "POSTGRES_PASSWORD", "MINIO_ROOT_USER",
            "MINIO_ROOT_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"}
# Every container that runs brainlm code needs these to find its home, the tracking server and its MLflow user.
BRAINLM_CLIENT_ENV = {"BRAINLM_HOME", "BRAINLM_MLFLOW_CONFIG", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
URL_ENV = {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "BRAINLM_DVC_S3_ENDPOINT",
           "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI",
           "PREFECT_API_DATABASE_CONNECTION_URL"}


@dataclass
class Container:
    where: str  # "compose mlflow", "k8s/prefect.yaml Deployment/prefect-worker"
    image: str
    command: list[str]
    env: dict[str, str | None]  # name -> value; None for a Kubernetes secretKeyRef
    secret_refs: set[str] = field(default_factory=set)  # names whose value comes from a secretKeyRef
    mounts: list[str] = field(default_factory=list)  # container paths of mounted volumes
    ports: set[int] = field(default_factory=set)  # ports the container listens on (declared)

    @property
    def runs_brainlm(self) -> bool:
        text = " ".join(self.command)
        return self.image == IMAGE and ("flows" in text or "prefect/worker.sh" in text or "ray" in self.command[:1]
                                        or self.where.startswith("k8s/ray-cluster.yaml"))


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def compose() -> dict:
    return load(INFRA / "compose.yaml")[0]


def compose_containers() -> list[Container]:
    out = []
    for name, service in compose()["services"].items():
        command = service.get("command") or []
        command = command if isinstance(command, list) else command.split()
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        ports = {int(p.split(":")[-1]) for p in service.get("ports", [])}
        out.append(Container(f"compose {name}", service["image"], [str(c) for c in command], env,
                             mounts=[v.split(":")[1] for v in service.get("volumes", [])], ports=ports))
    return out


def k8s_containers() -> list[Container]:
    out = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in load(path):
            for label, pod in _pod_templates(doc):
                for c in pod.get("containers", []):
                    env, secrets = {}, set()
                    for item in c.get("env", []):
                        if "valueFrom" in item:
                            assert "secretKeyRef" in item["valueFrom"], item
                            env[item["name"]] = None
                            secrets.add(item["name"])
                        else:
                            env[item["name"]] = str(item["value"])
                    out.append(Container(f"k8s/{path.name} {doc['kind']}/{doc['metadata']['name']} {label}",
                                         c["image"], [str(x) for x in c.get("command", [])], env, secrets,
                                         [m["mountPath"] for m in c.get("volumeMounts", [])],
                                         {p["containerPort"] for p in c.get("ports", [])}))
    return out


def _pod_templates(doc: dict):
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "Deployment":
        yield "pod", spec["template"]["spec"]
    elif kind == "RayCluster":
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield f"worker group {group['groupName']}", group["template"]["spec"]
    elif kind == "RayJob":
        yield "submitter", spec["submitterPodTemplate"]["spec"]


def containers() -> list[Container]:
    return compose_containers() + k8s_containers()


def env_read_by_brainlm() -> set[str]:
    """Variable names brainlm's code and infra/ scripts read (os.environ in Python, ${VAR} in shell, and the
    settings infra/mlflow/server.sh documents)."""
    names = set()
    for path in [*(REPO / "brainlm").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        text = path.read_text()
        names |= set(re.findall(r'os\.environ(?:\.get)?[(\[]\s*"([A-Z][A-Z0-9_]+)"', text))
        names |= set(re.findall(r'^[A-Z0-9_]*ENV = "([A-Z][A-Z0-9_]+)"', text, re.MULTILINE))
    for path in INFRA.rglob("*.sh"):
        text = path.read_text()
        names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", text))
        names |= set(re.findall(r"need ([A-Z][A-Z0-9_]+)", text))
        comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        names |= set(re.findall(r"\b((?:MLFLOW|AWS)_[A-Z0-9_]+)", comments))
    return names


# ------------------------------------------------------------------------------------------------- tests


def test_every_manifest_parses():
    files = {p.relative_to(INFRA).as_posix() for p in manifest_files()}
    assert {"compose.yaml", "mlflow.server.yaml", "k8s/mlflow.yaml", "k8s/prefect.yaml", "k8s/ray-cluster.yaml",
            "k8s/ray-job.yaml", "k8s/storage.yaml"} <= files
    for path in manifest_files():
        docs = load(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    kinds = {d["kind"] for p in (INFRA / "k8s").glob("*.yaml") for d in load(p)}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds


def test_the_server_profile_is_a_valid_mlflow_settings_file(monkeypatch):
    from brainlm.config import load_settings

    monkeypatch.setenv("BRAINLM_MLFLOW_CONFIG", str(INFRA / "mlflow.server.yaml"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_settings(REPO)
    assert settings.tracking_uri().startswith("http://") and settings.artifact_root() == "mlflow-artifacts:/brainlm"
    monkeypatch.delenv("BRAINLM_MLFLOW_CONFIG")
    laptop = load_settings(REPO).mlflow  # the repository's mlflow.yaml: the same experiments and model names
    assert {k: v for k, v in vars(settings.mlflow).items() if k not in ("tracking_uri", "artifact_root")} == {
        k: v for k, v in vars(laptop).items() if k not in ("tracking_uri", "artifact_root")}


def test_every_brainlm_container_runs_the_image_the_dockerfile_builds():
    dockerfile = (INFRA / "Dockerfile").read_text()
    torch_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("torch=="))
    assert torch_pin in dockerfile and "constraints.txt" in dockerfile and "pyproject.toml" in dockerfile
    for name, service in compose()["services"].items():
        if service["image"] == IMAGE:
            build = service["build"]
            assert (INFRA / build["context"]).resolve() == REPO and build["dockerfile"] == "infra/Dockerfile", name
    for c in containers():
        if c.image != IMAGE:
            assert c.image.startswith(THIRD_PARTY), f"{c.where}: {c.image} is neither {IMAGE} nor a known service"
            tag = c.image.rsplit(":", 1)[1]
            assert tag and tag != "latest", f"{c.where}: pin {c.image}"
    # What the image copies is what the containers run.
    for c in containers():
        if c.image == IMAGE and c.command[:1] == ["bash"]:
            assert (REPO / c.command[1]).is_file(), f"{c.where}: {c.command[1]} is not in the repository"
            assert f"COPY {c.command[1].split('/')[0]} " in dockerfile


def test_environment_variables_are_ones_the_code_or_the_tools_read():
    read = env_read_by_brainlm()
    assert {"BRAINLM_HOME", "BRAINLM_MLFLOW_CONFIG", "MLFLOW_TRACKING_URI", "BRAINLM_DVC_REMOTE",
            "BRAINLM_DVC_S3_ENDPOINT", "RAY_ADDRESS", "PREFECT_API_URL"} <= read  # the scan finds the code's reads
    for c in containers():
        unknown = set(c.env) - read - TOOL_ENV
        assert not unknown, f"{c.where} sets {sorted(unknown)}, which nothing reads (a typo?)"
        if c.runs_brainlm:
            missing = BRAINLM_CLIENT_ENV - set(c.env)
            assert not missing, f"{c.where} runs brainlm code without {sorted(missing)}"
            home = c.env["BRAINLM_HOME"]
            assert home in c.mounts, f"{c.where}: BRAINLM_HOME={home} is not a mounted (shared) volume"
            profile = c.env["BRAINLM_MLFLOW_CONFIG"]
            assert profile.startswith("/app/") and (REPO / profile.removeprefix("/app/")).is_file(), c.where
    mlflow_servers = [c for c in containers() if "infra/mlflow/server.sh" in c.command]
    needed = set(re.findall(r"^need ([A-Z0-9_]+)", (INFRA / "mlflow" / "server.sh").read_text(), re.MULTILINE))
    assert len(mlflow_servers) == 2 and needed
    for c in mlflow_servers:
        assert needed <= set(c.env), f"{c.where} lacks {sorted(needed - set(c.env))} (infra/mlflow/server.sh)"


def test_urls_name_the_services_and_their_ports():
    services = compose()["services"]
    listening = {  # compose service -> the port its process listens on, read from its own command / settings
        "postgres": 5432,
        "minio": int(_after(services["minio"]["command"], "--address").lstrip(":")),
        "mlflow": int(services["mlflow"]["environment"]["MLFLOW_PORT"]),
        "prefect-server": int(_after(services["prefect-server"]["command"], "--port")),
        "ray-head": int(_after(services["ray-head"]["command"], "--port")),
    }
    assert services["mlflow"]["ports"] == [f"{listening['mlflow']}:{listening['mlflow']}"]
    assert _after(services["ray-gpu-worker"]["command"], "--address") == f"ray-head:{listening['ray-head']}"
    for c in compose_containers():
        for name, value in c.env.items():
            if name in URL_ENV:
                host, port = _host_port(value)
                assert listening.get(host) == port, f"{c.where}: {name}={value} (listening: {listening})"

    k8s_services = {}
    for path in (INFRA / "k8s").glob("*.yaml"):
        for doc in load(path):
            if doc["kind"] == "Service":
                [port] = doc["spec"]["ports"]
                k8s_services[doc["metadata"]["name"]] = (port["port"], port["targetPort"], doc["spec"]["selector"])
            elif doc["kind"] == "RayCluster":  # KubeRay's head Service: <cluster>-head-svc, the head's ports
                head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                gcs = next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs")
                k8s_services[f"{doc['metadata']['name']}-head-svc"] = (gcs, gcs, None)
    by_name = {c.where.split()[1].split("/")[1]: c for c in k8s_containers() if c.where.endswith(" pod")}
    for service, (_, target, selector) in k8s_services.items():
        if selector is not None:
            pod = by_name[selector["app.kubernetes.io/name"]]
            assert target in pod.ports, f"Service {service} targets {target}; {pod.where} listens on {pod.ports}"
    assert by_name["mlflow"].env["MLFLOW_PORT"] == str(k8s_services["mlflow"][1])
    assert _after(by_name["prefect-server"].command, "--port") == str(k8s_services["prefect-server"][1])
    reachable = {name: port for name, (port, _, _) in k8s_services.items()} | K8S_EXTERNAL
    for c in k8s_containers():
        for name, value in c.env.items():
            if name in URL_ENV and value is not None:
                host, port = _host_port(value)
                assert reachable.get(host) == port, f"{c.where}: {name}={value} (services: {reachable})"
    assert K8S_EXTERNAL == {k: listening[k] for k in K8S_EXTERNAL}  # the same endpoints as in compose


def test_one_bucket_for_mlflow_artifacts_and_cohort_versions():
    buckets = set()
    for c in containers():
        for name in ("MLFLOW_ARTIFACTS_DESTINATION", "BRAINLM_DVC_REMOTE"):
            if c.env.get(name):
                assert c.env[name].startswith("s3://"), (c.where, name)
                buckets.add(urlparse(c.env[name]).netloc)
    assert len(buckets) == 1
    [bucket] = buckets
    assert f"store/{bucket}" in " ".join(compose()["services"]["minio-bucket"]["command"])


def test_secrets_are_references_never_values():
    for c in compose_containers():
        for name, value in c.env.items():
            if SECRET_NAME.search(name):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", value), (
                    f"{c.where}: {name} must be ${{VAR:?...}} from the environment, not {value!r}")
    for c in k8s_containers():
        for name in c.env:
            if SECRET_NAME.search(name):
                assert name in c.secret_refs, f"{c.where}: {name} must come from a secretKeyRef"
    for c in containers():
        for name, value in c.env.items():
            credentials = re.search(r"://[^/@:]+:([^@]+)@", value or "")
            if credentials:
                password = credentials.group(1)
                reference = re.fullmatch(r"\$\{([A-Z0-9_]+)(:\?[^}]*)?\}|\$\(([A-Z0-9_]+)\)", password)
                assert reference, f"{c.where}: {name} holds a literal password"
                if reference.group(3):
                    assert reference.group(3) in c.secret_refs, f"{c.where}: {name} uses $({reference.group(3)}), " \
                                                                "which is not from a secretKeyRef"
    literal = re.compile(r"(?i)(password|secret)[A-Z_]*\s*[:=]\s*['\"]?[A-Za-z0-9+/]{8,}")
    for path in [*manifest_files(), INFRA / "compose.env.example"]:
        assert not literal.search(path.read_text()), f"{path}: looks like a literal secret"


def _after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _host_port(value: str) -> tuple[str, int]:
    value = re.sub(r"//[^/@]*@", "//", value)  # credentials (references) do not parse as a URL's user:password
    parsed = urlparse(value if "://" in value else f"tcp://{value}")
    return parsed.hostname, parsed.port


@pytest.mark.parametrize("script", sorted(p.relative_to(REPO).as_posix() for p in INFRA.rglob("*.sh")))
def test_start_scripts_are_valid_bash(script):
    import subprocess

    assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0
