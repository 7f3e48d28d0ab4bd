"""The Prefect event a new cohort version sends, and the automation that re-evaluates the champion on it.

    ingest flow ──announce──┐
                            ├──> event brainlm.cohort.versioned ──> automation of evaluate/default (flows/serve.py)
    brainlm ingest ──hook───┘    resource labels: brainlm.cohort, brainlm.data_version        ──> evaluate flow run

`cohort_versioned` is the library's `brainlm.cohort_versioned` hook (brainlm/hooks.py, registered in pyproject.toml):
`brainlm ingest` calls it after recording a new version, and it tells the Prefect server that PREFECT_API_URL (or
the active Prefect profile) names; with none configured there is nobody to tell and it does nothing. The ingest
flow announces through `announce` itself, to whatever server runs it.

The event's id is a function of the cohort and its data version, so the same version announced twice is one
event to the server, which ignores an id it has seen; and ingest announces only a version that is new.
"""

from __future__ import annotations

import uuid

from brainlm.hooks import CohortVersioned, HookError

EVENT = "brainlm.cohort.versioned"
COHORT_LABEL = "brainlm.cohort"
DATA_VERSION_LABEL = "brainlm.data_version"
_NAMESPACE = uuid.UUID("5b0c8a38-3f0e-4d55-9a57-2f1f0c1e7a11")  # ids of brainlm events


def resource(version: CohortVersioned) -> dict[str, str]:
    """The event's resource: the cohort, labelled with its name and data version (labels must be strings)."""
    return {"prefect.resource.id": f"brainlm.cohort.{version.cohort}", "prefect.resource.name": version.cohort,
            COHORT_LABEL: version.cohort, DATA_VERSION_LABEL: version.data_version}


def event_id(version: CohortVersioned) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{version.cohort}@{version.data_version}")


def payload(version: CohortVersioned) -> dict[str, int]:
    return {"recordings": version.recordings, "participants": version.participants}


def announce(version: CohortVersioned) -> str:
    """Emit the event from a flow run (Prefect links it to the run, and the run's end sends it)."""
    from prefect.events import emit_event

    emit_event(event=EVENT, resource=resource(version), payload=payload(version), id=event_id(version))
    return f"announced {EVENT} for cohort {version.cohort} (data version {version.data_version})"


def cohort_versioned(version: CohortVersioned) -> str | None:
    """The `brainlm ingest` hook: send the event to the configured Prefect server now, or raise HookError."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None  # no Prefect server configured: no automation to tell
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    event = Event(event=EVENT, resource=resource(version), payload=payload(version), id=event_id(version))

    async def send() -> None:
        # checkpoint_every=1: wait for the server to confirm the event before the process goes on (and exits)
        async with get_events_client(reconnection_attempts=2, checkpoint_every=1) as client:
            await client.emit(event)

    try:
        run_coro_as_sync(send())
    except Exception as e:  # whatever the websocket client raised: the version is recorded, the event is not
        raise HookError(f"data version {version.data_version} of cohort {version.cohort} is recorded, but the "
                        f"Prefect server at {url} did not take the event {EVENT} ({type(e).__name__}: {e}); "
                        f"start it, or run `prefect deployment run evaluate/default -p cohort={version.cohort}`"
                        ) from e
    return f"told Prefect ({url}): {EVENT} for cohort {version.cohort}"
