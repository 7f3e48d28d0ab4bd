"""Pretraining throughput: windows/s, tokens/s, step time, peak memory and model FLOP utilisation (MFU).

Times exactly `brainlm.engine.train_step` (the step the trainer runs: bf16 autocast on CUDA, fused AdamW, grad
clipping, no host sync) on synthetic batches that already sit on the device; the loader is measured on its
own by bench/loader_throughput.py. FLOPs per window are counted once with `torch.utils.flop_counter` on a
forward + backward of one window (model FLOPs: activation-checkpointing recompute is not counted), so MFU is

    MFU = FLOPs/window × batch / step time / peak

with the GPU's dense bf16 tensor-core peak from the table below (or `--peak-tflops`). On the CPU both the step
and a fp32 `torch.mm` are measured in process CPU time, so MFU there is FLOPs per CPU-second against the
matmul's FLOPs per CPU-second: a CPU figure, not comparable with GPU MFU, that other jobs on the cores do not
skew (wall-clock step time and windows/s are printed as measured).

    PYTHONPATH=. python bench/pretrain_throughput.py                          # CPU: tiny
    PYTHONPATH=. python bench/pretrain_throughput.py --batch auto --compile --json out.json   # GPU: 111M, 650M

Needs torch (and numpy through brainlm) only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from brainlm.config import ModelConfig, TrainConfig, preset
from brainlm.engine import build_optimizer, build_scheduler, train_step
from brainlm.model import BrainLM

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets. Matched in order as
# substrings of torch.cuda.get_device_name(), so the more specific names come first.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),  # also GH200
    ("H800", 989.4),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)

# Kernels `--sdpa-backend` can pin. Not MATH: it is no training choice, and torch counts its backward as 4
# matmuls, not flash's 5, so the FLOP check below would (rightly) refuse it.
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}

# The reference run: 77k recordings × 100 epochs (one window per recording per epoch) in 12 GPU-hours.
RUN_RECORDINGS, RUN_EPOCHS, RUN_BUDGET_GPU_HOURS = 77_000, 100, 12.0

# FlopCounterMode knows the CUDA SDPA kernels (flash, memory-efficient, cuDNN) but not the CPU flash kernel,
# which it would count as 0 FLOPs. Count it with torch's own SDPA formulas, so CPU and GPU agree.
_aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


EXTRA_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


# ------------------------------------------------------------------------------------------- device


def autocast(device: torch.device):
    """The precision train_step uses: bf16 autocast on CUDA, plain fp32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_peak_tflops(name: str, override: float | None) -> tuple[float, str]:
    if override is not None:
        return override, "--peak-tflops"
    for key, tflops in GPU_PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"dense bf16 datasheet peak of {key}"
    known = ", ".join(k for k, _ in GPU_PEAK_BF16_TFLOPS)
    raise SystemExit(f"no dense bf16 peak known for GPU {name!r} (known: {known}); pass --peak-tflops N "
                     f"with its dense (non-sparse) bf16 tensor-core peak in TFLOP/s")


def measured_matmul_tflops(device: torch.device, size: int, repeats: int = 5) -> float:
    """Best-of-`repeats` rate of one square `torch.mm` (bf16 on CUDA, fp32 on the CPU): a practical ceiling.

    On the CPU the rate is per second of process CPU time, not wall time, so that jobs sharing the cores
    do not lower it (the CPU MFU divides by the step's CPU time as well).
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up: thread pool / cuBLAS handle
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = clock()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, clock() - t0)
    return 2 * size**3 / best / 1e12


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the whole process's peak so far, never reset.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


# -------------------------------------------------------------------------------------------- FLOPs


def check_sdpa_is_counted(device: torch.device) -> None:
    """FlopCounterMode must see the attention kernel training really runs (flash on CUDA): one SDPA, by hand.

    Forward = 2 matmuls (QKᵀ, PV) = 4·B·H·L²·d; backward as torch counts flash = 5 matmuls (the scores are
    recomputed) = 10·B·H·L²·d.
    """
    B, H, L, d = 2, 4, 256, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(B, H, L, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    expected = 14 * B * H * L * L * d
    if counter.get_total_flops() != expected:
        ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        raise RuntimeError(f"FlopCounterMode counted {counter.get_total_flops()} FLOPs for one SDPA forward + "
                           f"backward on {device} (expected {expected}; by op: {ops}): the attention kernel "
                           f"is not counted correctly, so MFU would be wrong")


def count_flops_per_window(cfg: ModelConfig, parcels: int, device: torch.device) -> dict[str, float]:
    """Model FLOPs of one training window (forward + backward), counted on a separate one-window model.

    FLOPs are linear in the batch, so one window is enough and keeps this cheap next to the timed model.
    Activation checkpointing is off here: MFU counts the model's FLOPs, not the recompute.
    """
    with torch.device(device):  # initialised in place: a 650M model built on the CPU first takes seconds
        model = BrainLM(dataclasses.replace(cfg, activation_checkpointing=False)).train()
    signals = torch.randn(1, parcels, cfg.window, device=device)
    coords = torch.randn(parcels, 3, device=device) * 50
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        with autocast(device):
            loss = model(signals, coords).loss
        loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in by_op.items() if "attention" in op)
    total = counter.get_total_flops()
    del model, signals, coords, loss
    return {"total": float(total), "attention": float(attention), "by_op": by_op}


# ------------------------------------------------------------------------------------------ stepping


class Trainer:
    """One model + optimizer + scheduler + synthetic device batch, stepped through brainlm.engine.train_step."""

    def __init__(self, cfg: ModelConfig, tcfg: TrainConfig, batch: int, parcels: int, total_steps: int,
                 device: torch.device, compile_model: bool):
        self.device, self.tcfg = device, tcfg
        with torch.device(device):
            model = BrainLM(cfg)
        self.optimizer = build_optimizer(model, tcfg, device)  # on the plain module: parameter names unchanged
        self.scheduler = build_scheduler(self.optimizer, dataclasses.replace(tcfg, steps=total_steps))
        self.model = torch.compile(model) if compile_model else model
        self.signals = torch.randn(batch, parcels, cfg.window, device=device)
        self.coords = torch.randn(parcels, 3, device=device) * 50  # MNI-like mm

    def step(self) -> torch.Tensor:
        return train_step(self.model, self.signals, self.coords, self.optimizer, self.scheduler, self.tcfg,
                          self.device)


def batch_fits(cfg: ModelConfig, tcfg: TrainConfig, batch: int, parcels: int, device: torch.device) -> bool:
    """Two eager steps (the second holds the optimizer state as well as activations and gradients)."""
    try:
        trainer = Trainer(cfg, tcfg, batch, parcels, 2, device, compile_model=False)
        trainer.step()
        trainer.step()
        synchronize(device)  # an OOM raised asynchronously surfaces here
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def find_batch(cfg: ModelConfig, tcfg: TrainConfig, parcels: int, device: torch.device, limit: int) -> int:
    """Largest power-of-two-ish batch (8, 16, …, or 1.5× between two of them) that trains without OOM.

    Searched in eager mode, which is quicker to try than recompiling per size; torch.compile fuses
    element-wise ops and usually needs less memory than eager, so the batch found fits compiled as well.
    """
    def fits(b: int) -> bool:
        ok = batch_fits(cfg, tcfg, b, parcels, device)
        gc.collect()  # drop the failed attempt's tensors before the next try
        torch.cuda.empty_cache()
        print(f"    batch {b:5d}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    good, bad = 0, None
    b = 8
    while b <= limit:
        if not fits(b):
            bad = b
            break
        good, b = b, b * 2
    if good == 0:  # 8 did not fit: go down
        b = 4
        while b >= 1 and not fits(b):
            b //= 2
        if b < 1:
            raise SystemExit(f"{cfg}: not even batch 1 fits on {device}; try --activation-checkpointing")
        return b
    if bad is not None and good >= 2 and fits(good * 3 // 2):
        good = good * 3 // 2
    return good


def time_steps(trainer: Trainer, steps: int, warmup: int) -> dict[str, float]:
    """Step times in ms. The device is synchronised only before and after the timed region.

    On the CPU also the process's CPU time per step (`cpu`): unlike wall time it does not grow when other
    jobs share the cores, so with --threads 1 it is the steadier figure on a busy machine.
    """
    for _ in range(warmup):  # compilation, cuBLAS/cuDNN autotuning, allocator growth, optimizer state
        trainer.step()
    device = trainer.device
    losses = []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        synchronize(device)
        events[0].record()
        for i in range(steps):
            losses.append(trainer.step())
            events[i + 1].record()
        synchronize(device)
        times = [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]
        cpu = None
    else:
        times, cpu_times = [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(trainer.step())
            times.append((time.perf_counter() - t0) * 1e3)
            cpu_times.append((time.process_time() - c0) * 1e3)
        cpu = sum(cpu_times) / len(cpu_times)
    if not torch.stack(losses).isfinite().all():  # after timing: a host sync here costs nothing
        raise RuntimeError("non-finite loss during the timed steps")
    return {"mean": sum(times) / len(times), "median": statistics.median(times), "min": min(times),
            "max": max(times), "cpu": cpu}


def count_host_syncs(trainer: Trainer) -> int | None:
    """Synchronising CUDA calls in one (warm) step, via torch's sync debug mode; None on the CPU.

    Python-side calls only: a sync inside the C++ autograd engine's backward thread would not show here.
    """
    if trainer.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# -------------------------------------------------------------------------------------------- report


def gpu_hours(windows_per_s: float) -> float:
    return RUN_RECORDINGS * RUN_EPOCHS / windows_per_s / 3600


def measure(name: str, mask: float, args: argparse.Namespace, device: torch.device,
            peak_tflops: float) -> dict:
    cfg = preset(name, mask_ratio=mask, activation_checkpointing=args.activation_checkpointing, **args.set)
    tcfg = TrainConfig(compile=args.compile, use_gpu=device.type == "cuda")
    flops = count_flops_per_window(cfg, args.parcels, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.batch_from:
        batch = batch_from_json(args.batch_from, name, mask)
    elif args.batch == "auto":
        print(f"  {name} mask {mask}: searching the largest batch", flush=True)
        batch = find_batch(cfg, tcfg, args.parcels, device, args.max_batch)
    else:
        batch = int(args.batch)
    if args.compile:
        torch.compiler.reset()  # a fresh compile per configuration, no recompiles across presets
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, dataclasses.replace(tcfg, batch_size=batch), batch, args.parcels,
                      args.warmup + args.steps + 1, device, args.compile)
    times = time_steps(trainer, args.steps, args.warmup)
    syncs = count_host_syncs(trainer)
    step_s = times["mean"] / 1e3
    tokens_per_window = args.parcels * cfg.patches_per_parcel
    result = {
        "preset": name, "mask": mask, "device": device_name(device), "batch": batch,
        "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
        "overrides": args.set, "sdpa_backend": args.sdpa_backend, "parcels": args.parcels,
        "tokens_per_window": tokens_per_window,
        "step_ms": times["mean"], "step_ms_median": times["median"], "step_ms_min": times["min"],
        "step_ms_max": times["max"], "step_cpu_ms": times["cpu"], "windows_per_s": batch / step_s,
        "tokens_per_s": batch * tokens_per_window / step_s, "peak_mem_GB": peak_memory_gb(device),
        "peak_reserved_GB": torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None,
        "tflop_per_window": flops["total"] / 1e12, "tflop_per_step": flops["total"] * batch / 1e12,
        "attention_flop_share": flops["attention"] / flops["total"], "flops_by_op": flops["by_op"],
        # CPU: FLOPs per CPU-second of the step against FLOPs per CPU-second of the matmul (see above)
        "mfu": flops["total"] * batch / (times["cpu"] / 1e3 if times["cpu"] else step_s) / (peak_tflops * 1e12),
        "gpu_hours_77k_x100": gpu_hours(batch / step_s), "host_syncs_per_step": syncs,
        "steps": args.steps, "warmup": args.warmup,
    }
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def batch_from_json(path: str, name: str, mask: float) -> int:
    """The batch an earlier run of this script used for (preset, mask): compare compile/eager like for like."""
    rows = json.loads(open(path).read())["results"]
    found = [r["batch"] for r in rows if r["preset"] == name and r["mask"] == mask]
    if not found:
        raise SystemExit(f"--batch-from {path}: no row for preset {name} mask {mask}")
    return found[0]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def attention_kernels(by_op: dict[str, int]) -> str:
    names = [op.removeprefix("aten._scaled_dot_product_").removesuffix("_backward") for op in by_op
             if "attention" in op]
    return "/".join(sorted(set(names))) or "none counted"


HEADER = (f"{'preset':>6} {'mask':>5} {'device':>6} {'batch':>5} {'step_ms':>9} {'windows/s':>10} "
          f"{'tokens/s':>10} {'peak_mem_GB':>11} {'TFLOP/step':>10} {'MFU%':>6}")


def row(r: dict, device: torch.device) -> str:
    return (f"{r['preset']:>6} {r['mask']:>5.2f} {device.type:>6} {r['batch']:>5d} {r['step_ms']:>9.1f} "
            f"{r['windows_per_s']:>10.4g} {r['tokens_per_s']:>10.4g} {r['peak_mem_GB']:>11.2f} "
            f"{r['tflop_per_step']:>10.4g} {100 * r['mfu']:>6.1f}")


def parse_overrides(items: list[str]) -> dict:
    """`--set decoder_heads=8 mlp_ratio=4.0` → ModelConfig field overrides, typed by the field's default."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key in ("mask_ratio", "activation_checkpointing"):
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{sorted(set(fields) - {'mask_ratio', 'activation_checkpointing'})} "
                             f"(use --mask / --activation-checkpointing for those)")
        kind = type(fields[key].default)
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", help="model presets (default: tiny on CPU, 111M 650M on CUDA)")
    p.add_argument("--mask", nargs="+", type=float, default=[0.75, 0.2], help="mask ratios")
    p.add_argument("--batch", default=None,
                   help="windows per step, or 'auto' (CUDA: largest that fits); default auto on CUDA, 4 on CPU")
    p.add_argument("--max-batch", type=int, default=1024, help="upper bound for --batch auto")
    p.add_argument("--batch-from", default=None, metavar="JSON",
                   help="take each (preset, mask)'s batch from an earlier --json output (overrides --batch)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--parcels", type=int, default=424, help="parcels per window (A424: 424)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override ModelConfig fields of every preset, e.g. decoder_heads=8 (what-if runs)")
    p.add_argument("--sdpa-backend", choices=["default", *SDPA_BACKENDS], default="default",
                   help="restrict scaled_dot_product_attention to one kernel (default: torch chooses)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak in TFLOP/s (needed for GPUs not in the table)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a shared, busy CPU")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.batch not in (None, "auto") and not (args.batch.isdigit() and int(args.batch) > 0):
        p.error(f"--batch must be a positive integer or 'auto', got {args.batch!r}")
    args.set = parse_overrides(args.set)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device("cuda" if cuda else "cpu")
    args.preset = args.preset or (["111M", "650M"] if cuda else ["tiny"])
    args.batch = args.batch or ("auto" if cuda else "4")
    if args.batch == "auto" and not cuda:
        raise SystemExit("--batch auto needs CUDA (it catches torch.cuda.OutOfMemoryError); give a number")
    if cuda:
        peak, peak_source = gpu_peak_tflops(torch.cuda.get_device_name(device), args.peak_tflops)
        matmul = measured_matmul_tflops(device, 8192)
    else:
        matmul = measured_matmul_tflops(device, 1024, repeats=20)  # best of many: steadier on a busy CPU
        peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else (matmul, "measured")
    backend = (contextlib.nullcontext() if args.sdpa_backend == "default"
               else sdpa_kernel([SDPA_BACKENDS[args.sdpa_backend]]))
    print(f"torch {torch.__version__} on {device_name(device)}; precision "
          f"{'bf16 autocast' if cuda else 'fp32'}; compile={args.compile} "
          f"activation_checkpointing={args.activation_checkpointing} sdpa={args.sdpa_backend}"
          + (f" overrides={args.set}" if args.set else ""))
    print(f"peak {peak:.3g} TFLOP/s ({peak_source}); measured {'bf16' if cuda else 'fp32'} torch.mm "
          f"{matmul:.3g} TFLOP/s" + ("" if cuda else " per CPU-second"))
    if not cuda:
        load = os.getloadavg()[0]
        print(f"CPU figures: MFU = FLOPs per CPU-second of the step / FLOPs per CPU-second of a fp32 torch.mm "
              f"on this CPU (process CPU time, which other jobs do not inflate), not comparable with GPU MFU; "
              f"step_ms and windows/s are wall time: 1-min load average {load:.1f} on {os.cpu_count()} cores")
    print(HEADER, flush=True)
    results = []
    with backend:
        check_sdpa_is_counted(device)
        for name in args.preset:
            for mask in args.mask:
                r = measure(name, mask, args, device, peak)
                r["peak_tflops"], r["peak_source"], r["measured_matmul_tflops"] = peak, peak_source, matmul
                results.append(r)
                print(row(r, device), flush=True)
                if args.json:  # after every row: a run stopped by a time limit keeps what it measured
                    write_json(args.json, results)
    unit = "GPU" if cuda else "CPU"
    print(f"\n{RUN_RECORDINGS:,} recordings x {RUN_EPOCHS} epochs x 1 window = {RUN_RECORDINGS * RUN_EPOCHS:,} "
          f"windows; {RUN_BUDGET_GPU_HOURS:g} {unit}-hours need "
          f"{RUN_RECORDINGS * RUN_EPOCHS / RUN_BUDGET_GPU_HOURS / 3600:.0f} windows/s")
    for r in results:
        hours = r["gpu_hours_77k_x100"]
        syncs = "" if r["host_syncs_per_step"] is None else f"; host syncs in a step: {r['host_syncs_per_step']}"
        if r["step_cpu_ms"] is not None:
            syncs += f"; process CPU time {r['step_cpu_ms']:.0f} ms/step (wall {r['step_ms']:.0f})"
        print(f"  {r['preset']} mask {r['mask']:.2f}: {RUN_RECORDINGS * RUN_EPOCHS:,} / "
              f"{r['windows_per_s']:.4g} windows/s / 3600 = {hours:,.1f} {unit}-hours "
              f"({'within' if hours <= RUN_BUDGET_GPU_HOURS else 'over'} {RUN_BUDGET_GPU_HOURS:g}); "
              f"{r['tflop_per_window']:.4g} TFLOP/window, attention {100 * r['attention_flop_share']:.0f} % "
              f"({attention_kernels(r['flops_by_op'])}){syncs}")
    if args.json:
        print(f"wrote {args.json}")
    return results


def write_json(path: str, results: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "argv": sys.argv[1:], "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
