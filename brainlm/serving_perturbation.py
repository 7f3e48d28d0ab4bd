"""The served in-silico perturbation model (`brainlm-perturbation`): an MLflow "models from code" file.

The same safetensors weights + JSON config as the pretrained model, answering a different question: how does
the frozen model's forecast change when a perturbation is added to a recording? `register_perturbation_model`
(brainlm/interpret.py) logs it with `registry.log_model(..., code=SERVING_PERTURBATION_CODE)`, the brainlm
modules this file imports travelling as the model's code; `mlflow.pyfunc.load_model` executes it and calls
`load_context`. Nothing is unpickled, and nothing in the package imports this module.

    input   {"signals": float32 (B, P, T) robust-scaled windows, "coords": float32 (P, 3) MNI mm,
             "perturbation": float32 (P, T) added to every window (zero rows: parcels left alone)}
    params  {"horizon": patches forecast at the end of each window (default 1)}
    output  {"forecast", "perturbed_forecast": float32 (B, P, horizon · patch), "change": float32 (B, P) rms}
"""

from __future__ import annotations

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from brainlm.registry import build_model
from brainlm.tasks.perturb import predict_perturbation


class BrainLMPerturbation(PythonModel):
    # Inputs are checked against the logged TensorSpec signature (a dict of tensors, which type hints cannot
    # describe), so MLflow's type-hint check is skipped as in serving.py.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.model, self.cfg = build_model(context.artifacts["config"], context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        return predict_perturbation(self.model, model_input, params)


set_model(BrainLMPerturbation())
