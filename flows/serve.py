"""`make serve` (infra/local/serve.sh): serve the brainlm flows as deployments of a running Prefect server.

    ingest/default     a lab's folder → validated, versioned cohort; a new version sends `brainlm.cohort.versioned`
    pretrain/default   pretrain (tiny preset on the demo cohort unless told otherwise) → the new challenger
    evaluate/default   the champion on every task a cohort supports; runs by itself on every new cohort version
                       (automation on `brainlm.cohort.versioned`) and nightly at 03:00 UTC once switched on
    promote/default    gated promotion of the challenger on a cohort's held-out participants

Needs PREFECT_API_URL pointing at the server; serve.sh starts one and sets it. Then, from another shell:

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    .venv/bin/prefect deployment run ingest/default -p src=/path/to/lab-folder -p cohort=lab --watch
    .venv/bin/prefect deployment run pretrain/default -p cohort=lab -p preset=13M -p steps=5000 -p use_gpu=true
    .venv/bin/prefect deployment run promote/default -p cohort=lab --watch

Default parameters and schedules come from `brainlm.config.ServeConfig`: `BRAINLM_SERVE_CONFIG=serve.yaml` changes
them (e.g. `evaluate: {active: true}` switches the nightly evaluation on). The flows persist their results
(`persist_result=True`), so `run_deployment(...).state.result()` works from another process.
"""

from __future__ import annotations

import inspect

from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from brainlm import pipelines
from brainlm.config import DeploymentConfig, ServeConfig, load_serve_config
from brainlm.errors import ConfigError
from flows import events
from flows.evaluate import evaluate
from flows.ingest import ingest
from flows.pretrain import DEFAULT_COHORT, pretrain
from flows.promote import promote


def deployments(cfg: ServeConfig | None = None) -> list[RunnerDeployment]:
    """The four deployments, with ServeConfig's parameters and schedules over the defaults below."""
    cfg = cfg or load_serve_config()
    reevaluate = [reevaluate_on_new_version()] if cfg.reevaluate else []
    return [
        deployment(ingest, cfg.ingest, {},
                   "Validate, store and version a lab's folder as a cohort; announce a new data version."),
        deployment(pretrain, cfg.pretrain,
                   {"cohort": DEFAULT_COHORT, "preset": "tiny", "steps": pipelines.DEMO_TRAIN.steps,
                    "eval_every": pipelines.DEMO_TRAIN.eval_every},
                   "Pretrain BrainLM on a stored cohort and register it as the new challenger."),
        deployment(evaluate, cfg.evaluate, {"cohort": DEFAULT_COHORT},
                   "Evaluate the champion on every task a cohort supports, beside the baselines; runs on every "
                   "new cohort version.", triggers=reevaluate),
        deployment(promote, cfg.promote, {"cohort": DEFAULT_COHORT},
                   "Promote the challenger only if it beats the champion and the references on held-out data."),
    ]


def deployment(flow: Flow, cfg: DeploymentConfig, defaults: dict, description: str,
               triggers: list | None = None) -> RunnerDeployment:
    """`flow` as the deployment `<flow>/default`: `defaults` updated by `cfg.parameters`, `cfg`'s schedule if any."""
    parameters = {**defaults, **cfg.parameters}
    unknown = set(parameters) - set(inspect.signature(flow.fn).parameters)
    if unknown:
        raise ConfigError(f"ServeConfig.{flow.name}.parameters: the flow {flow.name} has no parameters "
                          f"{sorted(unknown)}; it has {list(inspect.signature(flow.fn).parameters)}")
    schedules = []
    if cfg.cron is not None:
        try:
            schedules.append(Cron(cfg.cron, timezone=cfg.timezone, active=cfg.active))
        except ValueError as e:
            raise ConfigError(f"ServeConfig.{flow.name}.cron {cfg.cron!r} / timezone {cfg.timezone!r}: {e}") from e
    return flow.to_deployment(name="default", parameters=parameters, description=description, tags=["brainlm"],
                              schedules=schedules, triggers=triggers or [])


def reevaluate_on_new_version() -> DeploymentEventTrigger:
    """An automation: every `brainlm.cohort.versioned` event runs the deployment with the event's cohort and data
    version (the other parameters keep the deployment's defaults; `model` None is the champion)."""
    return DeploymentEventTrigger(
        name="evaluate the champion on a new cohort version",
        expect={events.EVENT},
        parameters={"cohort": f"{{{{ event.resource['{events.COHORT_LABEL}'] }}}}",
                    "data_version": f"{{{{ event.resource['{events.DATA_VERSION_LABEL}'] }}}}"},
    )


if __name__ == "__main__":
    try:
        served = deployments()
    except ConfigError as e:  # a bad serve config: one line, naming the file and the setting
        raise SystemExit(f"flows.serve: error: {' '.join(str(e).split())}") from None
    # Stopping leaves the schedules as they are (an active nightly evaluation stays active for the next start).
    serve(*served, pause_on_shutdown=False)
