"""brainlm on its production backends, all started by the test on 127.0.0.1 and stopped afterwards.

    PostgreSQL (two databases: MLflow's runs + registry, and its auth app's users)
    S3 (moto's server): MLflow's artifacts under s3://brainlm/mlflow, DVC's remote under s3://brainlm/dvc
    MLflow tracking server: infra/mlflow/server.sh (the deployments' start script), basic auth, proxied artifacts

The client side is configured exactly as a lab machine would be: `BRAINLM_MLFLOW_CONFIG=infra/mlflow.server.yaml`,
`MLFLOW_TRACKING_URI`, and the MLflow user in `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`. The
MLflow client holds no S3 keys and no database password (the server does); DVC holds the S3 keys, from the
environment only.
"""

import base64
import urllib.error
import urllib.request
from dataclasses import dataclass

import boto3
import pytest
import sqlalchemy
import torch
from fixtures_model import register_fresh_model
from mlflow.exceptions import MlflowException
from privacy import assert_no_participant_ids
from servers import REPO, S3_REGION, MlflowServer, Postgres, mlflow_server, postgres, s3

from brainlm import registry
from brainlm.config import IngestConfig, SynthConfig, load_settings
from brainlm.data import versioning
from brainlm.data.ingest import ingest
from brainlm.data.store import open_cohort
from brainlm.data.synthetic import synthesize

pytestmark = pytest.mark.slow

BUCKET = "brainlm"
SERVER_PROFILE = REPO / "infra" / "mlflow.server.yaml"
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Stack:
    postgres: Postgres
    s3: dict[str, str]
    mlflow: MlflowServer

    def bucket_keys(self, prefix: str) -> list[str]:
        client = boto3.client("s3", endpoint_url=self.s3["endpoint"], region_name=S3_REGION,
                              aws_access_key_id=self.s3["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=self.s3["AWS_SECRET_ACCESS_KEY"])
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with postgres(("mlflow", "mlflow_auth")) as pg, s3(BUCKET) as bucket:
        env = {
            "MLFLOW_BACKEND_STORE_URI": pg.uri("mlflow"),
            "MLFLOW_AUTH_DATABASE_URI": pg.uri("mlflow_auth"),
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
            "MLFLOW_S3_ENDPOINT_URL": bucket["endpoint"],
            **{key: bucket[key] for key in AWS_KEYS},
        }
        with mlflow_server(env, log) as server:
            yield Stack(pg, bucket, server)


@pytest.fixture
def client_env(stack, home, monkeypatch):
    """A lab machine pointed at the server: the server profile, its URL, and no credentials yet."""
    monkeypatch.setenv("BRAINLM_MLFLOW_CONFIG", str(SERVER_PROFILE))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow.url)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE", *AWS_KEYS):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_server_refuses_clients_without_valid_credentials(stack, client_env):
    url = f"{stack.mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(url) == 401
    assert status(url, stack.mlflow.admin, "not-the-password") == 401
    assert status(url, stack.mlflow.admin, stack.mlflow.admin_password) == 200

    settings = load_settings()  # brainlm's own client, with the profile but no MLflow user in the environment
    assert settings.tracking_uri() == stack.mlflow.url
    with pytest.raises(MlflowException, match="401|[Uu]nauthori[sz]ed|credentials"):
        registry.configure(settings)


def test_ingest_register_promote_and_load_through_the_server(stack, client_env, home, tmp_path):
    # DVC pushes the cohort to the same S3 (credentials from the environment, as the AWS chain reads them).
    for key in AWS_KEYS:
        client_env.setenv(key, stack.s3[key])
    client_env.setenv(versioning.REMOTE_ENV, f"s3://{BUCKET}/dvc")
    client_env.setenv(versioning.S3_ENDPOINT_ENV, stack.s3["endpoint"])
    src = synthesize(tmp_path / "raw", SynthConfig(subjects=3, timepoints=200, max_parcels=18,
                                                    recordings_per_subject=1, seed=3), overwrite=True)
    ingest(src, "lab", cfg=IngestConfig(workers=1), settings=load_settings())
    dvc_objects = stack.bucket_keys("dvc/")
    assert dvc_objects and all(k.startswith("dvc/files/md5/") for k in dvc_objects)
    assert stack.s3["AWS_SECRET_ACCESS_KEY"] not in "".join(p.read_text() for p in (home / ".dvc").glob("config*"))
    data_version = versioning.current_version(home).tag

    # MLflow: the client holds its MLflow user only; artifacts go through the server to S3.
    for key in AWS_KEYS:
        client_env.delenv(key)
    client_env.setenv("MLFLOW_TRACKING_USERNAME", stack.mlflow.admin)
    client_env.setenv("MLFLOW_TRACKING_PASSWORD", stack.mlflow.admin_password)
    settings = load_settings()
    assert settings.artifact_root() == "mlflow-artifacts:/brainlm"
    cohort = open_cohort("lab", settings)
    registered = register_fresh_model(settings, cohort, tmp_path / "ckpt", data_version=data_version)
    name = settings.mlflow.pretrained_model
    registry.promote(name, registered.version.version, settings=settings)

    [row] = registry.list_models(settings=settings)
    assert (row["version"], row["aliases"], row["data_version"]) == ("1", ["challenger", "champion"], data_version)
    loaded, cfg = registry.load_model(name, settings=settings)  # @champion, downloaded through the server
    assert cfg == registered.cfg
    signals, coords = torch.randn(2, cohort.atlas.n_parcels, cfg.window), torch.from_numpy(cohort.atlas.coords)
    with torch.no_grad():
        assert torch.equal(loaded.embed(signals, coords).cls, registered.model.embed(signals, coords).cls)

    # Where it all landed: artifacts in S3 under the profile's root, runs and the registry in PostgreSQL.
    assert any(k.startswith("mlflow/brainlm/") and k.endswith("model.safetensors")
               for k in stack.bucket_keys("mlflow/"))
    engine = sqlalchemy.create_engine(stack.postgres.uri("mlflow"))
    try:
        with engine.connect() as db:
            models = db.execute(sqlalchemy.text("SELECT name FROM registered_models")).scalars().all()
            runs = db.execute(sqlalchemy.text("SELECT run_uuid FROM runs")).scalars().all()
    finally:
        engine.dispose()
    assert models == [name] and registered.run_id in runs

    # Nothing the server stores (runs, registry, every artifact downloaded back through it) names a participant.
    assert_no_participant_ids(settings, cohort.participants)
