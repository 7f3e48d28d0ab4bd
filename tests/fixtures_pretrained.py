"""A tiny BrainLM pretrained on a synthetic cohort, once per test session (a plain torch loop, no Ray).

The interpretation tests need a model that has learnt something, and a cohort whose answers are known: the
synthetic generator plants Yeo-7 networks (+ subcortex and cerebellum groups), a block task into the Visual
network, and phenotype effects (brainlm/data/synthetic.py). The model is the `tiny` preset with a 100-TR
window and a 64-wide decoder (head size 16, which learns faster than 8), trained self-supervised on every
recording of the cohort — no label is ever seen. `pretrained(root)` trains once per process and returns the
same object afterwards, whichever test module asks first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fixtures_cohort import store_folder

from brainlm.config import ModelConfig, SynthConfig, TrainConfig, preset
from brainlm.data.store import Cohort, open_cohort
from brainlm.data.synthetic import GroundTruth, load_ground_truth, synthesize
from brainlm.model import BrainLM
from brainlm.train import build_optimizer, lr_lambda, save_checkpoint, train_step

SYNTH = SynthConfig(subjects=24, timepoints=300, max_parcels=64, seed=0)  # 48 recordings, 64 parcels, 9 networks
MODEL = preset("tiny", window=100, decoder_hidden=64)
TRAIN = TrainConfig(lr=3e-3, warmup_fraction=0.05, batch_size=16, seed=0)
STEPS = 1200


@dataclass(frozen=True)
class Pretrained:
    source: Path  # the synthetic input folder (recordings, participants.tsv, atlas.tsv, ground truth)
    cohort_path: Path  # the same recordings as a stored cohort
    checkpoint: Path  # a trainer checkpoint folder (model.safetensors, state.json, ...)
    cfg: ModelConfig
    model: BrainLM  # eval mode
    seconds: float  # pretraining time

    @property
    def cohort(self) -> Cohort:
        return open_cohort(self.cohort_path)

    @property
    def truth(self) -> GroundTruth:
        return load_ground_truth(self.source)


_TRAINED: dict[str, Pretrained] = {}


def pretrained(root: Path) -> Pretrained:
    """Synthesise, store and pretrain under `root` on the first call; later calls return the first result."""
    if "tiny" not in _TRAINED:
        _TRAINED["tiny"] = _pretrain(Path(root))
    return _TRAINED["tiny"]


def _pretrain(root: Path) -> Pretrained:
    source = synthesize(root / "synthetic", SYNTH)
    cohort = open_cohort(store_folder(source, root / "cohort" / "synthetic"))
    coords = torch.from_numpy(cohort.atlas.coords)
    data = torch.stack([torch.from_numpy(np.array(cohort.recording(r))) for r in cohort.recording_ids])
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN.seed)
        model = BrainLM(MODEL)
        optimizer = build_optimizer(model, TRAIN, "cpu")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(STEPS, TRAIN))
        generator = torch.Generator().manual_seed(TRAIN.seed)
        for _ in range(STEPS):  # random 100-TR crops of random recordings, as the trainer draws them
            rows = torch.randint(0, len(data), (TRAIN.batch_size,), generator=generator)
            starts = torch.randint(0, data.shape[2] - MODEL.window + 1, (TRAIN.batch_size,), generator=generator)
            batch = torch.stack([data[r, :, s : s + MODEL.window] for r, s in zip(rows.tolist(), starts.tolist(),
                                                                                     strict=True)])
            train_step(model, batch, coords, optimizer, scheduler, TRAIN, torch.device("cpu"))
    seconds = time.perf_counter() - started
    checkpoint = save_checkpoint(root / "checkpoint", model, optimizer, scheduler, epoch=1, step=STEPS,
                                 model_cfg=MODEL, train_cfg=TRAIN, metrics={"train_loss": 0.0})
    return Pretrained(source=source, cohort_path=cohort.path, checkpoint=checkpoint, cfg=MODEL,
                      model=model.eval(), seconds=seconds)
