"""`make serve` (infra/local/serve.sh): serve the brainlm flows as deployments of a running Prefect server.

    pretrain/default   pretrain the tiny preset on the demo cohort (any parameter can be overridden with -p)

Needs PREFECT_API_URL pointing at the server; serve.sh starts one and sets it. Then, from another shell:

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run pretrain/default --watch
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run pretrain/default \
        -p cohort=mylab -p preset=13M -p steps=5000 -p use_gpu=true -p num_workers=4

The flows persist their results (`persist_result=True`), so `run_deployment(...).state.result()` works from
another process. More deployments (ingest, evaluate, promote) go in `deployments()` beside this one.
"""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from brainlm import pipelines
from flows.pretrain import DEFAULT_COHORT, pretrain


def deployments() -> list[RunnerDeployment]:
    return [
        pretrain.to_deployment(
            name="default",
            parameters={"cohort": DEFAULT_COHORT, "preset": "tiny", "steps": pipelines.DEMO_TRAIN.steps,
                        "eval_every": pipelines.DEMO_TRAIN.eval_every},
            description="Pretrain BrainLM on a stored cohort and register it as the new challenger.",
            tags=["brainlm"],
        ),
    ]


if __name__ == "__main__":
    # Nothing here is scheduled, so there are no schedules to pause on the way out (and no API calls to make
    # while serve.sh stops the server right after this process).
    serve(*deployments(), pause_on_shutdown=False)
