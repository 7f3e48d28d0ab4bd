"""Flows tests: a Prefect test server for the tests that run flows, and a check of what MLflow stored."""

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server + database for the session (starting one takes 10–20 s).

    Not autouse: only tests that run a flow pay for it. The startup timeout comes from
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (tests/conftest.py), generous for a busy machine.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture
def assert_no_participant_ids():
    """The privacy scan of tests/privacy.py: everything MLflow stored (runs, registry, logged models, every
    artifact's path and bytes, the SQLite file) must be free of the given participant ids."""
    from privacy import assert_no_participant_ids as check

    return check
