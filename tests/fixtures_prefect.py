"""Reading runs back from Prefect's API (the test server of tests/flows/conftest.py's `prefect_harness`)."""

from __future__ import annotations

from uuid import UUID


def flow_run_states(flow_run_id: UUID) -> tuple[str, str, dict[str, str]]:
    """(flow name, flow run state type, {task name: task run state type}) of one flow run, as Prefect records it.

    A task run is named `<task name>-<suffix>`; each task of the flow must have run once.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        flow = client.read_flow(flow_run.flow_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    tasks = {t.name.rsplit("-", 1)[0]: t.state.type.value for t in task_runs}
    assert len(tasks) == len(task_runs), f"a task ran more than once in flow run {flow_run_id}: {task_runs}"
    return flow.name, flow_run.state.type.value, tasks
