"""What the model knows, checked against the synthetic cohort's planted answers.

A tiny model pretrained (self-supervised, no labels) on other subjects of the same synthetic population
(tests/fixtures_tasks.py, INTERPRETATION) must place the task cohort's parcels into the planted networks well
above chance and above the same architecture untrained; the task-against-rest CLS contrast and the rest→task
perturbation must both put the Visual network (the one the task drives) first. The references the model is
honestly compared with (FC, coordinates) are printed, not asserted: on synthetic data FC is near perfect (see
the report in `brainlm networks`).
"""

import numpy as np
import pytest
import torch
from fixtures_tasks import INTERPRETATION

from brainlm.config import AttentionConfig, NetworksConfig, PerturbConfig
from brainlm.tasks.attention import cls_contrast, network_labels_or_none, precision_at_k, split_groups
from brainlm.tasks.common import fixed_windows
from brainlm.tasks.networks import identify_networks
from brainlm.tasks.perturb import optimise_perturbation

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tiny(pretrained):
    return pretrained(INTERPRETATION)


def _visual(tiny):
    """Which parcels belong to the network the task drives (Visual)."""
    truth = tiny.truth
    return np.array(truth.parcel_networks(tiny.cohort().atlas.index)) == truth.task_network


def test_attention_places_parcels_in_the_planted_networks(tiny):
    result = identify_networks(tiny.model(), tiny.cohort(), NetworksConfig(max_recordings=8))
    scores = {m: s.balanced_accuracy for m, s in result.scores.items()}
    print(f"\nbalanced accuracy over {len(result.networks)} networks (chance {result.chance_balanced:.3f}):",
          {m: round(v, 3) for m, v in scores.items()}, f"pretrained in {tiny.seconds:.0f} s")
    assert result.column == "yeo7" and len(result.networks) == 7  # subcortex and cerebellum are unlabelled
    assert result.excluded_unlabelled == 10
    assert scores["attention"] >= result.chance_balanced + 0.2
    assert scores["attention"] >= scores["untrained"] + 0.15  # fails if pretraining taught the model nothing


def test_task_contrast_puts_the_visual_network_first(tiny):
    cohort = tiny.cohort()
    groups = split_groups(cohort, "condition", ("task", "rest"))
    cfg = AttentionConfig(resolution="time", permutations=999)
    result, _ = cls_contrast(tiny.model(), cohort, groups, cfg)
    ranked = result.networks
    visual = _visual(tiny)
    hits = precision_at_k(result.parcels["statistic"].to_numpy(), visual)
    print("\n" + ranked[["network", "statistic", "p", "p_fwer"]].round(3).to_string(), f"\nprecision: {hits}")
    assert result.scheme == "within participants"
    assert ranked["network"][0] == "Visual"  # ranked first; FWER significance varies with the pretraining
    assert ranked["statistic"][0] >= 1.2 * ranked["statistic"][1]
    assert hits >= 4 * visual.mean()  # chance: the visual share of the parcels (6 of 48)


def test_rest_to_task_perturbation_puts_the_visual_network_first(tiny):
    cohort, model = tiny.cohort(), tiny.model()
    groups = split_groups(cohort, "condition", ("rest", "task"))
    ids = np.array(groups.recording_ids)
    source, target = (torch.from_numpy(fixed_windows(cohort, ids[members].tolist(), model.cfg.window,
                                                     max_windows=1).signals) for members in (groups.in_a, ~groups.in_a))
    cfg = PerturbConfig(steps=50)  # matching the masked-patch reconstructions, sparsity 1
    result = optimise_perturbation(model, source, target, torch.from_numpy(cohort.atlas.coords), cfg,
                                   cohort.atlas.names, network_labels_or_none(cohort, "yeo7"))
    print("\n" + result.networks.round(4).to_string(), f"\nmatching loss {result.loss_end:.3f}")
    assert result.loss_end < 0.5
    assert result.networks["network"][0] == "Visual"
    # measured: 2.0 × the next network after the fixture's 1 200 pretraining steps (64 parcels: 1.9 ×; and 1.1-1.6 ×
    # after 900-1 000 steps, with Visual still first)
    assert result.networks["size"][0] >= 1.5 * result.networks["size"][1]
    visual = _visual(tiny)
    assert precision_at_k(result.size, visual) >= 2.5 * visual.mean()  # chance: 6 visual parcels of 48
