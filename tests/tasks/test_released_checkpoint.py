"""Released BrainLM checkpoints (Hugging Face ViTMAE layout) as backbones: the image layout, the forecast mask,
and `brainlm evaluate --model DIR` end to end on a randomly initialised model of that layout."""

import sys

import numpy as np
import pytest
import torch

from brainlm.config import SynthConfig, load_settings
from brainlm.data.atlas import load_atlas
from brainlm.released import PAD_VALUE, VALUE_SCALE, ReleasedModelError, load_released

transformers = pytest.importorskip("transformers")  # the [hf] extra; installed in dev


@pytest.fixture
def released_dir(tmp_path):
    """A randomly initialised ViTMAE of the released layout (432 × 432, 16 × 16 patches, 3 channels), tiny widths."""
    cfg = transformers.ViTMAEConfig(
        image_size=432, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, mask_ratio=0.75,
    )
    torch.manual_seed(0)
    transformers.ViTMAEForPreTraining(cfg).save_pretrained(tmp_path / "released")
    return tmp_path / "released"


def test_image_layout_is_the_released_one(released_dir):
    backbone = load_released(released_dir)
    atlas = load_atlas("A424")
    coords = torch.as_tensor(atlas.coords)
    signals = torch.randn(2, 424, 200)
    image = backbone.to_image(signals, coords)
    assert image.shape == (2, 3, 432, 432)
    order = np.argsort(atlas.coords[:, 1], kind="stable")  # rows sorted by centroid y
    inner = image[:, :, 4:428, 116:316]
    assert torch.allclose(inner[:, 0], signals[:, order] / VALUE_SCALE)
    assert torch.equal(inner[:, 0], inner[:, 2])  # the same values in all 3 channels
    assert (image[:, :, :4] == PAD_VALUE).all() and (image[:, :, :, 316:] == PAD_VALUE).all()
    assert torch.allclose(backbone.from_image(image, coords, 424, 200), signals, atol=1e-5)


def test_forecast_masks_every_patch_column_over_the_horizon(released_dir):
    backbone = load_released(released_dir)
    masks = []
    backbone.model.vit.register_forward_hook(lambda module, args, out: masks.append(out.mask))
    coords = torch.as_tensor(load_atlas("A424").coords)
    with torch.no_grad():
        pred = backbone.forecast(torch.randn(2, 424, 180), coords)
    assert pred.shape == (2, 424, 20)
    grid = masks[0].reshape(2, 27, 27)
    # TRs 180-199 sit in pixel columns 296-315: patch columns 18 and 19, every row
    assert grid[:, :, 18:20].eq(1).all() and grid.sum() == 2 * 27 * 2
    assert backbone.model.config.mask_ratio == 0.75  # restored after the call


def test_weights_that_do_not_fit_and_missing_extra_are_one_line_errors(released_dir, monkeypatch):
    (released_dir / "model.safetensors").unlink()
    with pytest.raises(ReleasedModelError, match="neither model.safetensors nor pytorch_model.bin"):
        load_released(released_dir)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the [hf] extra were not installed
    with pytest.raises(ReleasedModelError, match=r"pip install 'brainlm\[hf\]'"):
        load_released(released_dir)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_evaluate_command_accepts_a_released_checkpoint_folder(released_dir, home, capsys):
    from fixtures_tasks import synthetic_stores

    from brainlm.cli import main

    _, task_cohort, _ = synthetic_stores(home / "synth", SynthConfig(subjects=4, timepoints=200,
                                                                   recordings_per_subject=1, seed=1), 3)
    code = main(["evaluate", "--task", "forecast", "--cohort", str(task_cohort), "--model", str(released_dir),
                 "--steps", "1", "--models", "brainlm", "scratch", "persistence"])
    out, err = capsys.readouterr()
    assert code == 0, err
    table = out[out.index("model "):]
    assert [line.split()[0] for line in table.splitlines()[2:5]] == ["brainlm", "scratch", "persistence"]
    assert "brainlm-forecast" in out and "baseline-forecast-scratch" in out
    from brainlm import registry

    [row] = registry.list_models("brainlm-forecast", settings=load_settings())
    assert row["data_version"] == registry.UNVERSIONED


def test_evaluate_command_without_the_extra_says_how_to_install_it(released_dir, home, monkeypatch, capsys):
    from brainlm.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)
    code = main(["evaluate", "--task", "forecast", "--cohort", "nowhere", "--model", str(released_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "pip install 'brainlm[hf]'" in err and len(err.strip().splitlines()) == 1
