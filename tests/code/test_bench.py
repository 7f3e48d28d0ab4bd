"""The bench scripts run on the CPU and print their figures (behaviour only: no speed is asserted)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
# Small windows keep each run to seconds: 16 parcels instead of 424, batch 2, one thread (steady on busy CIs).
TINY = ["--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--parcels", "16", "--threads", "1"]


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a GPU box
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "train.json"
    out = run("pretrain_throughput.py", *TINY, "--mask", "0.75", "0.2", "--json", str(path))
    return out, path


def test_pretrain_throughput_prints_a_row_per_preset_and_mask(train_json):
    out, path = train_json
    assert "preset  mask device batch" in out and "MFU%" in out
    rows = [r for r in map(str.split, out.splitlines()) if r[:1] == ["tiny"] and len(r) == 10]  # table rows
    assert [r[1] for r in rows] == ["0.75", "0.20"]
    assert all(r[2] == "cpu" and r[3] == "2" for r in rows)
    assert "CPU figures" in out and "CPU-hours" in out  # says the MFU is a CPU figure; prints the arithmetic
    results = json.loads(path.read_text())["results"]
    for r in results:
        assert r["windows_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["windows_per_s"] * 16 * 10)
        assert 0 < r["mfu"] and r["tflop_per_window"] > 0
        assert 0 < r["attention_flop_share"] < 1  # the CPU attention kernel is counted, not left at zero
    # less masking = more visible tokens through the encoder = more work per window
    assert results[1]["tflop_per_window"] > results[0]["tflop_per_window"]


def test_loader_throughput_times_each_worker_count_against_the_training_rate(train_json, tmp_path):
    _, path = train_json
    out = run("loader_throughput.py", "--recordings", "6", "--parcels", "16", "--timepoints", "240",
              "--batch", "4", "--workers", "0", "1", "--batches", "2", "--warmup", "1", "--train-json", str(path),
              "--json", str(tmp_path / "loader.json"))
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [r[0] for r in rows] == ["0", "1"] and all(float(r[1]) > 0 for r in rows)
    assert "training needs" in out and "target 5x" in out
    saved = json.loads((tmp_path / "loader.json").read_text())
    assert [r["workers"] for r in saved["results"]] == [0, 1] and saved["train_rate"] > 0


@pytest.mark.slow
def test_ingest_footprint_prints_time_memory_and_bytes_per_place(tmp_path):
    out = run("ingest_footprint.py", "--recordings", "3", "6", "--parcels", "16", "--timepoints", "220",
              "--workers", "1", "--dir", str(tmp_path), "--json", str(tmp_path / "footprint.json"))
    assert "store disk" in out and "cache disk" in out and "remote disk" in out
    rows = json.loads((tmp_path / "footprint.json").read_text())
    assert [r["recordings"] for r in rows] == [3, 6]
    for r in rows:
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0 and r["store_bytes"] > 0
        assert r["cache_disk"] < r["store_disk"]  # hard links: the cache adds little beyond the store
        assert r["remote_bytes"] >= r["store_bytes"]  # the default local remote is a copy
    assert not any(tmp_path.glob("brainlm-ingest-footprint-*")), "inputs and homes are removed afterwards"


def test_profile_step_prints_the_top_ops_table():
    out = run("profile_step.py", "--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch", "2",
              "--parcels", "16", "--threads", "1", "--rows", "5")
    assert "Self CPU time total" in out and "aten::" in out


def test_gpu_peak_table_matches_specific_names_first_and_refuses_unknown_gpus():
    bench = load_bench("pretrain_throughput")
    assert bench.gpu_peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.4
    assert bench.gpu_peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert bench.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert bench.gpu_peak_tflops("NVIDIA L40S", None)[0] == 362.0
    assert bench.gpu_peak_tflops("Mystery GPU", 100.0) == (100.0, "--peak-tflops")
    with pytest.raises(SystemExit, match="--peak-tflops"):
        bench.gpu_peak_tflops("Mystery GPU", None)


def test_model_overrides_are_typed_and_guarded():
    bench = load_bench("pretrain_throughput")
    assert bench.parse_overrides(["decoder_heads=8", "mlp_ratio=2"]) == {"decoder_heads": 8, "mlp_ratio": 2.0}
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        bench.parse_overrides(["mask_ratio=0.5"])


def test_the_engine_and_the_step_benches_import_with_torch_alone():
    """A GPU machine without Ray, MLflow, Prefect or pandas runs bench/ and the engine: nothing else loads."""
    refuse = ("ray", "mlflow", "prefect", "great_expectations", "dvc", "pandas", "nilearn")
    code = (
        "import importlib.abc, sys\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        f"    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {refuse!r}:\n"
        "            raise ImportError(f'{name} imported')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import brainlm.engine, brainlm.checkpoint\n"
        "for script in ('pretrain_throughput', 'profile_step'):\n"
        "    import importlib.util\n"
        f"    spec = importlib.util.spec_from_file_location(script, {str(BENCH)!r} + f'/{{script}}.py')\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


@pytest.mark.slow
def test_pretrain_quality_prints_the_curve_beside_the_references_and_the_final_ratios(tmp_path):
    out = run("pretrain_quality.py", "--seconds", "1", "--steps", "40", "--warmup", "5", "--eval-every", "10", "--batch", "4",
              "--subjects", "5", "--parcels", "18", "--set", "window=100", "--json", str(tmp_path / "q.json"))
    assert "references (masked MSE): zero" in out and "spatial" in out and "temporal" in out
    assert "model/zero" in out and "model/spatial" in out and "the spatial reference" in out
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["cohort"]["parcels"] == 18 and saved["cohort"]["participants"] == 5
    curve = saved["curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] >= 1 and all(r["model"] > 0 for r in curve)
    refs = saved["references"]
    assert refs["spatial"] < refs["zero"]  # other parcels at the same timepoints predict the synthetic signal
    last = curve[-1]
    assert saved["final"]["model/spatial"] == pytest.approx(last["model"] / refs["spatial"])
    run("pretrain_quality.py", "--plot-from", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
