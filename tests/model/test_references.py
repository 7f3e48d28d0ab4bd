"""Reference predictors, scored by the engine's evaluate on the model's own masks; covariance from training
subjects only."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_cohort import make_cohort, write_cohort
from torch.utils.data import DataLoader

from brainlm import references
from brainlm.config import preset
from brainlm.data.atlas import Atlas
from brainlm.data.store import open_cohort
from brainlm.engine import MaskedWindows, evaluate, mask_noise
from brainlm.model import BrainLM
from brainlm.references import (
    SpatialReference,
    expand_mask,
    parcel_covariance,
    predict_temporal,
    predict_zero,
    reference_predictors,
    training_covariance,
)

CPU = torch.device("cpu")


class SpatialAsModel(BrainLM):
    """A BrainLM whose reconstruction is replaced by the spatial reference on the model's own mask."""

    def __init__(self, cfg, reference):
        super().__init__(cfg)
        self.reference = reference

    def forward(self, signals, coords, mask_ratio=None, noise=None, output_attentions=False):
        out = super().forward(signals, coords, mask_ratio, noise)
        out.pred = self.reference(signals, out.mask).reshape(out.pred.shape)
        return out


def test_a_model_that_predicts_the_spatial_reference_scores_exactly_its_mse():
    def coupled(n, t):  # parcel 1 follows parcel 0: something for the spatial reference to find
        x = torch.randn(n, 5, t)
        x[:, 1] = 0.8 * x[:, 0] + 0.2 * x[:, 1]
        return x

    x, cov = coupled(6, 40), parcel_covariance(coupled(4, 300))
    spatial = SpatialReference(cov)
    model = SpatialAsModel(preset("tiny", window=40), spatial).eval()
    loader = DataLoader(MaskedWindows(list(x), 20, seed=7), batch_size=4)  # two batches of different sizes
    coords = torch.randn(5, 3) * 50
    got = evaluate(model, loader, coords, CPU, 0.5, reference_predictors(cov))
    assert got["masked_mse"] == got["spatial_mse"] and got["masked_r2"] == got["spatial_r2"]
    assert got["spatial_mse"] < got["zero_mse"]  # and it is not a trivial case


def test_model_and_references_are_scored_on_the_models_mask():
    torch.manual_seed(0)
    model = BrainLM(preset("tiny", window=40)).eval()
    x, coords = torch.randn(3, 4, 40), torch.randn(4, 3) * 50
    got = evaluate(model, DataLoader(MaskedWindows(list(x), 20, seed=1), batch_size=3), coords, CPU, 0.5,
                   {"zero": predict_zero, "temporal": predict_temporal})
    noise = torch.stack([mask_noise(1, i, 8) for i in range(3)])
    with torch.no_grad():
        out = model(x, coords, mask_ratio=0.5, noise=noise)
    m = expand_mask(out.mask, 40)
    assert got["masked_mse"] == pytest.approx(((out.pred.reshape(3, 4, 40) - x)[m] ** 2).mean().item(), rel=1e-6)
    assert got["temporal_mse"] == pytest.approx(((predict_temporal(x, out.mask) - x)[m] ** 2).mean().item(),
                                                rel=1e-6)
    assert got["zero_mse"] == pytest.approx((x[m] ** 2).mean().item(), rel=1e-6)
    t = x[m].double()
    assert got["zero_r2"] == pytest.approx(1 - (t**2).sum().item() / ((t - t.mean()) ** 2).sum().item(), rel=1e-9)


def test_temporal_interpolation_is_exact_on_a_linear_signal_and_constant_at_the_edges():
    T, S = 100, 20
    t = torch.arange(T, dtype=torch.float32)
    x = torch.stack([2.0 * t - 30.0, -0.5 * t + 4.0, t])[None]  # (1, 3, 100)
    mask = torch.tensor([[[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1]]])
    pred = predict_temporal(x, mask)
    assert torch.allclose(pred[0, :2], x[0, :2], atol=1e-4)  # interior gaps: exact
    assert torch.equal(pred[0, 2], torch.zeros(T))  # nothing visible: 0, the median

    edge = torch.tensor([[[1, 0, 0, 0, 1]]])  # first and last patches masked: nearest visible value
    pred = predict_temporal(x[:, :1], edge)[0, 0]
    assert torch.all(pred[:S] == x[0, 0, S]) and torch.all(pred[-S:] == x[0, 0, T - S - 1])
    assert torch.equal(pred[S:-S], x[0, 0, S:-S])  # visible values are kept


def test_spatial_reference_is_the_gaussian_conditional_mean():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    cov = torch.as_tensor(A @ A.T + np.eye(6))
    x = torch.randn(2, 6, 40, dtype=torch.float64)
    mask = torch.tensor([[[1, 0], [0, 0], [1, 1], [0, 1], [0, 0], [1, 0]],
                         [[0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [1, 0]]])
    ref = SpatialReference(cov, ridge=0.1)
    pred = ref(x, mask)
    lam = 0.1 * float(torch.diagonal(cov).mean())
    for b in range(2):
        for n in range(2):
            h = mask[b, :, n].bool()
            v = ~h
            seg = slice(20 * n, 20 * n + 20)
            expected = cov[h][:, v] @ torch.linalg.solve(cov[v][:, v] + lam * torch.eye(int(v.sum())),
                                                         x[b, v, seg])
            assert torch.allclose(pred[b, h, seg], expected, atol=1e-10)
            assert torch.equal(pred[b, v, seg], x[b, v, seg])


def _cohort_with_different_val_covariance(path):
    """Train participants: parcel 1 = + parcel 0; validation participants: parcel 1 = − parcel 0."""
    atlas = Atlas(name="fixture", index=np.arange(1, 5), names=[f"P{i}" for i in range(4)],
                  coords=np.zeros((4, 3), dtype=np.float32))
    people = [f"sub-{s + 1:04d}" for s in range(10)]
    manifest = pd.DataFrame({"recording": [f"{p}_task-rest_run-1" for p in people], "participant": people,
                             "condition": "rest"})
    phenotypes = pd.DataFrame({"participant_id": people, "age": 30, "sex": "F"})

    def write(sign_of):
        rng = np.random.default_rng(0)
        recordings = {}
        for rec, person in zip(manifest["recording"], people, strict=True):
            z = rng.standard_normal((200, 4))
            z[:, 1] = sign_of(person) * z[:, 0] + 0.1 * z[:, 1]
            recordings[rec] = z
        return open_cohort(write_cohort(path, recordings, manifest, atlas, phenotypes))

    split = write(lambda person: 1.0).split(0.2, 0.1, seed=0)
    val_people = {r.split("_")[0] for r in split["val"] + split["test"]}
    return write(lambda person: -1.0 if person in val_people else 1.0), split


def test_spatial_covariance_comes_from_training_subjects_only(tmp_path):
    cohort, split = _cohort_with_different_val_covariance(tmp_path / "c")
    cov = training_covariance(cohort, split)
    assert torch.allclose(cov, parcel_covariance(cohort.recording(r) for r in split["train"]))
    assert cov[0, 1] > 0.5 * cov[0, 0]  # the training subjects' sign, not the validation subjects'
    everyone = parcel_covariance(cohort.recording(r) for r in cohort.recording_ids)
    assert not torch.allclose(cov, everyone)
    # On validation windows the (training) reference is confidently wrong about parcel 1: the sign flipped.
    val = torch.stack([torch.from_numpy(np.array(cohort.recording(r))) for r in split["val"]])
    mask = torch.zeros(len(val), 4, 10)
    mask[:, 1] = 1
    pred = SpatialReference(cov)(val, mask)
    assert torch.corrcoef(torch.stack([pred[:, 1].flatten(), val[:, 1].flatten()]))[0, 1] < -0.9


def test_a_large_training_split_is_sampled_evenly_for_the_covariance(tmp_path, monkeypatch):
    cohort, split = _cohort_with_different_val_covariance(tmp_path / "c")
    train = split["train"]
    monkeypatch.setattr(references, "COVARIANCE_RECORDINGS", len(train) // 2)
    picked = train[:: math.ceil(len(train) / (len(train) // 2))]
    assert 1 < len(picked) < len(train)
    assert torch.equal(training_covariance(cohort, split), parcel_covariance(cohort.recording(r) for r in picked))


def test_training_covariance_refuses_a_split_that_shares_participants(tmp_path):
    cohort, split = _cohort_with_different_val_covariance(tmp_path / "c")
    leaky = {**split, "train": split["train"] + split["val"]}
    with pytest.raises(ValueError, match="held-out"):
        training_covariance(cohort, leaky)


def test_references_on_a_structured_cohort_beat_zero(tmp_path):
    cohort = open_cohort(make_cohort(tmp_path / "c", n_participants=6, parcels=12, timepoints=200))
    split = cohort.split(0.2, 0.0, seed=0)
    refs = reference_predictors(training_covariance(cohort, split))
    x = torch.stack([torch.from_numpy(np.array(cohort.recording(r)))[:, :100] for r in split["val"]])
    mask = (torch.rand(len(x), 12, 5, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    m = expand_mask(mask, 100)
    mse = {name: ((predict(x, mask) - x)[m] ** 2).mean().item() for name, predict in refs.items()}
    assert mse["spatial"] < 0.5 * mse["zero"]  # latent mixtures: other parcels predict a lot
