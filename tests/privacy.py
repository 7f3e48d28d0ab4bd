"""Privacy scan: everything a tracking store holds, searched for participant ids.

`find_participant_ids(settings, ids)` reads the whole store that `settings` names, through MLflow's API (so it
works the same on SQLite and on a tracking server):

    experiments   names, tags, artifact locations
    runs          (active and deleted) names, params, tags, metric names, dataset inputs
    logged models names, params, tags, metric names
    registry      registered models (names, descriptions, tags, aliases) and every version (tags, descriptions)
    artifacts     every file of every experiment's artifact location, its path and its bytes: walked on disk for
                  a local root, downloaded through MLflow (every run's and every logged model's) otherwise
    database      for a SQLite store, the database file's own bytes (whatever the API does not show)

An id counts where it stands as a token: not inside a longer run of letters and digits (so "sub-01" is found in
"run_sub-01", "sub-01.npy" and `{"id": "SUB-01"}`, and not in "sub-010"). File contents are searched as raw
bytes, which covers text and the text inside binary files (a safetensors header, a pickled string) alike;
compressed files are not unpacked. `assert_no_participant_ids` fails with every leak it found.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts, list_artifacts
from mlflow.entities import ViewType

from brainlm.config import Settings


@dataclass(frozen=True)
class Leak:
    participant: str
    where: str  # e.g. "run 3f2a… param cohort.note", "artifact models/m-…/artifacts/config.json"
    excerpt: str


def assert_no_participant_ids(settings: Settings, participant_ids: Iterable[str]) -> None:
    leaks = find_participant_ids(settings, participant_ids)
    assert not leaks, f"{len(leaks)} participant id(s) stored in MLflow ({settings.tracking_uri()}):\n" + "\n".join(
        f"  {leak.participant} in {leak.where}: {leak.excerpt!r}" for leak in leaks[:20])


def find_participant_ids(settings: Settings, participant_ids: Iterable[str]) -> list[Leak]:
    """Every place in `settings`' tracking store and artifacts where one of `participant_ids` appears."""
    patterns = {pid: _token_pattern(pid) for pid in sorted(set(participant_ids))}
    leaks = []
    for where, content in stored_items(settings):
        for pid, pattern in patterns.items():
            for text in (where.encode(), content):
                if match := pattern.search(text):
                    start = max(0, match.start() - 40)
                    excerpt = text[start:match.end() + 40].decode("utf-8", errors="replace")
                    leaks.append(Leak(pid, where, excerpt))
                    break
    return leaks


def stored_items(settings: Settings) -> Iterator[tuple[str, bytes]]:
    """(where, content) for everything the store holds: metadata as text, artifacts and the database as bytes."""
    client = MlflowClient(settings.tracking_uri())
    experiments = client.search_experiments(view_type=ViewType.ALL)
    assert experiments, f"no experiments in {settings.tracking_uri()}: nothing to scan"
    walked: set[Path] = set()  # experiments may share one local artifact root: read it once
    for experiment in experiments:
        yield f"experiment {experiment.experiment_id}", _text(experiment.name, experiment.artifact_location,
                                                              experiment.tags)
        runs = _all(lambda token, e=experiment: client.search_runs([e.experiment_id], run_view_type=ViewType.ALL,
                                                                   max_results=1000, page_token=token))
        for run in runs:
            where = f"run {run.info.run_id}"
            yield f"{where} name", _text(run.info.run_name)
            yield f"{where} params", _text(run.data.params)
            yield f"{where} tags", _text(run.data.tags)
            yield f"{where} metric names", _text(list(run.data.metrics))
            if run.inputs is not None:
                yield f"{where} inputs", _text([(d.dataset.name, d.dataset.source, d.dataset.schema, d.dataset.profile,
                                                 [(t.key, t.value) for t in d.tags]) for d in run.inputs.dataset_inputs])
        models = _all(lambda token, e=experiment: client.search_logged_models([e.experiment_id], max_results=100,
                                                                              page_token=token))
        for model in models:
            yield f"logged model {model.model_id}", _text(model.name, model.params, model.tags,
                                                          [m.key for m in model.metrics or []])
        yield from _artifacts(settings, experiment, runs, models, walked)
    for model in _all(lambda token: client.search_registered_models(max_results=100, page_token=token)):
        yield f"registered model {model.name}", _text(model.name, model.description, model.tags, model.aliases)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            yield (f"registered model {model.name} version {version.version}",
                   _text(version.description, version.tags, version.source))
    database = _sqlite_file(settings.tracking_uri())
    if database is not None:
        yield f"database {database}", database.read_bytes()


def _artifacts(settings: Settings, experiment, runs, models, walked: set[Path]) -> Iterator[tuple[str, bytes]]:
    root = _local_path(experiment.artifact_location)
    if root is not None:  # a local artifact root: every file under it, whoever wrote it
        if root not in walked and root.exists():
            walked.add(root)
            for path in (p for p in root.rglob("*") if p.is_file()):
                yield f"artifact {path.relative_to(root)}", path.read_bytes()
        return
    sources = [(f"run {r.info.run_id}", r.info.artifact_uri) for r in runs]
    sources += [(f"logged model {m.model_id}", m.artifact_location) for m in models]
    for where, uri in sources:
        if not list_artifacts(artifact_uri=uri, tracking_uri=settings.tracking_uri()):
            continue  # nothing logged there (downloading an empty root is an error on a server)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=settings.tracking_uri()))
            for path in (p for p in local.rglob("*") if p.is_file()):
                yield f"{where} artifact {path.relative_to(local)}", path.read_bytes()


def _all(search) -> list:
    """Every page of an MLflow search (`search(page_token)` returns a PagedList)."""
    items, token = [], None
    while True:
        page = search(token)
        items += list(page)
        token = page.token
        if not token:
            return items


def _token_pattern(pid: str) -> re.Pattern[bytes]:
    if len(pid) < 3 or pid.isdigit():
        raise ValueError(f"participant id {pid!r}: too short or only digits to search for in stored bytes")
    return re.compile(rb"(?<![A-Za-z0-9])" + re.escape(pid.encode()) + rb"(?![A-Za-z0-9])", re.IGNORECASE)


def _text(*values) -> bytes:
    return repr(values).encode()


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and os.path.isabs(uri):
        return Path(uri)
    return None


def _sqlite_file(tracking_uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix):]) if tracking_uri.startswith(prefix) else None
