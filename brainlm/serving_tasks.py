"""The served form of a registered task model (forecasting or clinical, BrainLM or baseline): MLflow "models from
code", like serving.py for the pretrained model.

`brainlm.registry.log_model(..., code=SERVING_TASKS_CODE)` copies this file into every logged task model;
`mlflow.pyfunc.load_model` executes it, and `load_context` rebuilds the model from its `config.json` +
`model.safetensors` (brainlm/tasks/saved.py), so nothing is unpickled. Nothing in the package imports this module.

    forecast   {"context": float32 (B, P, window − horizon), "coords": float32 (P, 3)} → {"forecast": (B, P, horizon)}
    clinical   {"signals": float32 (B, P, T), "coords": float32 (P, 3)}                → {"score": (B,), "value": (B,)}
"""

from __future__ import annotations

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from brainlm.tasks.saved import load_task_model


class TaskModel(PythonModel):
    _skip_type_hint_validation = True  # the TensorSpec signature logged with the model checks the inputs

    def load_context(self, context) -> None:
        self.model = load_task_model(context.artifacts["config"], context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        return self.model.predict(model_input)


set_model(TaskModel())
