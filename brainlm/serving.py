"""The served form of a registered BrainLM: an MLflow "models from code" file.

`brainlm.registry.log_model` copies this file into every logged model; `mlflow.pyfunc.load_model` executes it
and calls `load_context`, which rebuilds the network from the model's `config.json` + `model.safetensors`.
So loading a served model runs this reviewed code and never unpickles anything. Nothing in the package
imports this module (importing it would register the model object with MLflow as a side effect).

    input   {"signals": float32 (B, P, T) robust-scaled parcel series, "coords": float32 (P, 3) MNI mm}
    output  {"cls": float32 (B, D)}  the unmasked encoder's CLS embedding, the recording-level representation
"""

from __future__ import annotations

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from brainlm.registry import build_model, predict_embedding


class BrainLMEmbedder(PythonModel):
    # Inputs are checked against the TensorSpec signature logged with the model. MLflow's other check, from
    # `list[...]` type hints on predict, cannot describe a dict of tensors, and would warn on every load.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.model, self.cfg = build_model(context.artifacts["config"], context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        return predict_embedding(self.model, model_input)


set_model(BrainLMEmbedder())
