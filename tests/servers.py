"""Real servers for integration tests, started and stopped by the tests: Prefect, PostgreSQL, S3 (moto), MLflow,
Ray nodes.

Each is a context manager that starts the server on 127.0.0.1, waits until it answers, and on exit stops every
process it started, by PID or process group (never by name: other tests and other users' servers may be running
on the same machine). Ports are picked free at start.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Call `check()` until it returns a truthy value (returned) or `timeout` seconds pass (AssertionError).

    With `proc`, a process that exits first fails at once, with the end of its `log`.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: exited with {proc.returncode} before it was ready{_tail(log)}")
        with contextlib.suppress(OSError):  # refused / reset while the server starts
            if value := check():
                return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready after {timeout:.0f} s{_tail(log)}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


def _tail(log: Path | None, chars: int = 3000) -> str:
    return f"\n--- {log} ---\n{log.read_text(errors='replace')[-chars:]}" if log and log.exists() else ""


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # children that outlived their leader
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- Prefect


@contextlib.contextmanager
def prefect_server(root: Path, timeout: float = 180) -> Iterator[str]:
    """`prefect server start` on a free port, its database under `root`; yields the API URL (PREFECT_API_URL).

    A server of its own rather than the test harness's: it runs the services behind automations (events,
    triggers, actions) exactly as `make serve` does. No UI, no scheduler (nothing the tests schedule runs).
    """
    port = free_port()
    log = root / "prefect-server.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(root / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 str(port), "--no-ui", "--no-scheduler", "--no-late-runs"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    try:
        url = f"http://127.0.0.1:{port}/api"
        wait_for(lambda: http_ok(f"{url}/health"), "prefect server", timeout, proc, log)
        yield url
    finally:
        stop_group(proc)


# ---------------------------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def uri(self, database: str) -> str:
        """SQLAlchemy URI through psycopg2 (SQLAlchemy 2.1's bare `postgresql://` means psycopg 3)."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{database}"


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (Debian keeps them off PATH, under /usr/lib/postgresql/<major>/bin)."""
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None,
                                      key=lambda p: int(Path(p).parts[-3]))
    if found is None:
        raise AssertionError(f"PostgreSQL's {name} not found: install the server (apt-get install postgresql)")
    return found


@contextlib.contextmanager
def postgres(databases: tuple[str, ...]) -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a password-protected role owning `databases`.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user (in a folder of its
    own under the system temp dir, which that user can reach). TCP connections need the password
    (scram-sha-256); the set-up itself uses the cluster's private Unix socket.
    """
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="brainlm-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if as_root:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port, password = free_port(), secrets.token_urlsafe(16)
    log = root / "server.log"

    def run(*cmd: str) -> None:
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, cwd=root)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}{_tail(log)}"

    run(postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256", "--no-sync")
    run(postgres_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        psql = [postgres_bin("psql"), "-h", str(sock), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                "-q", "-c"]
        run(*psql, f"CREATE ROLE brainlm LOGIN PASSWORD '{password}'")
        for database in databases:
            run(*psql, f"CREATE DATABASE {database} OWNER brainlm")
        yield Postgres("127.0.0.1", port, "brainlm", password)
    finally:
        run(postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- S3 (moto)

S3_REGION = "us-east-1"


@contextlib.contextmanager
def s3(bucket: str) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with `bucket`; yields the endpoint and the credentials as environment
    variables (AWS_*), for the processes that should hold them."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        credentials = {"AWS_ACCESS_KEY_ID": "brainlm-test", "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(16),
                       "AWS_DEFAULT_REGION": S3_REGION}
        boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION,
                     aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, **credentials}
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- MLflow server


@dataclass(frozen=True)
class MlflowServer:
    url: str
    admin: str
    admin_password: str
    proc: subprocess.Popen


@contextlib.contextmanager
def mlflow_server(env: dict[str, str], log: Path, timeout: float = 180) -> Iterator[MlflowServer]:
    """infra/mlflow/server.sh, the deployments' own start script, with `env` (its MLFLOW_* / AWS_* settings) and
    a fresh admin password. Stopped with its whole process group (the server starts several processes)."""
    port, password = free_port(), secrets.token_urlsafe(16)
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))},
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        **env,
    }
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "infra" / "mlflow" / "server.sh")], env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{url}/health"), "mlflow server", timeout, proc, log)
        yield MlflowServer(url, "admin", password, proc)
    finally:
        stop_group(proc)


# ------------------------------------------------------------------------------------------- Ray cluster

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
_RAY_OBJECT_STORE_BYTES = str(200 * 1024**2)


@dataclass
class RayNode:
    """One `ray start --block` process and everything it started (raylet, agents, the node's workers)."""

    proc: subprocess.Popen
    log: Path

    def processes(self) -> list:
        import psutil

        try:
            leader = psutil.Process(self.proc.pid)
            return [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> list[int]:
        """SIGKILL every process of this node, by PID (as if its machine died): returns the PIDs."""
        import psutil

        processes = self.processes()
        for p in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(processes, timeout=30)
        self.proc.wait(timeout=10)
        return [p.pid for p in processes]

    def stop(self) -> None:
        """The end of a test's cluster: no need to be gentle (`ray start --block` takes its time over SIGTERM)."""
        self.kill()


@dataclass
class RayCluster:
    address: str  # host:port of the head's GCS, for RAY_ADDRESS
    head: RayNode
    workers: list[RayNode]
    root: Path

    def add_worker(self, cpus: int = 1, timeout: float = 120) -> RayNode:
        """Start another worker node (`ray start --address ...`) and wait until the cluster counts it."""
        before = alive_nodes(self.address)
        log = self.root / f"worker-{len(self.workers)}.log"
        node = _ray_start(["--address", self.address, "--num-cpus", str(cpus)], log)
        self.workers.append(node)
        wait_for(lambda: alive_nodes(self.address) - before, "ray worker node", timeout, node.proc, log)
        return node


def alive_nodes(address: str) -> set[str]:
    """Ids of the alive nodes of the cluster at `address`: through this process's Ray connection if it has one
    (a callback while `fit` runs), else through one opened for the question only."""
    import logging

    import ray

    if ray.is_initialized():
        return {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()


# The head's GCS declares a node dead after this many missed health checks of this period (defaults: 5 × 3 s).
_RAY_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}


def _ray_start(args: list[str], log: Path) -> RayNode:
    with log.open("w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats",
                                 "--object-store-memory", _RAY_OBJECT_STORE_BYTES, *args],
                                env={**os.environ, **RAY_ENV, **_RAY_HEALTH_CHECKS}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return RayNode(proc, log)


@contextlib.contextmanager
def ray_cluster(head_cpus: int = 1, worker_cpus: int = 1, timeout: float = 120) -> Iterator[RayCluster]:
    """A Ray cluster on this machine: a head node and one worker node, each its own `ray start` (as on two
    machines), with their own temp folder; every process they start is stopped on exit, by PID.

    `ray stop` is never used: it would end every Ray on the machine, other tests' and other users' included.
    """
    root = Path(tempfile.mkdtemp(prefix="brl-ray-"))  # short: Ray's socket paths live under it
    port = free_port()
    head = _ray_start(["--head", "--port", str(port), "--num-cpus", str(head_cpus), "--include-dashboard", "false",
                       "--temp-dir", str(root)], root / "head.log")
    cluster = RayCluster(f"127.0.0.1:{port}", head, [], root)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close() or True, "ray head node",
                 timeout, head.proc, head.log)
        wait_for(lambda: alive_nodes(cluster.address), "ray head node", timeout, head.proc, head.log)
        cluster.add_worker(worker_cpus, timeout)
        yield cluster
    finally:
        for node in [*cluster.workers, head]:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
