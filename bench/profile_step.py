"""Profile one training step (`brainlm.engine.train_step`) with torch.profiler and print the top ops.

Default: the tiny preset on the CPU, which is where waste shows without a GPU: host-side copies, float64,
rebuilt tables, syncs. On CUDA the table is sorted by device time instead.

    PYTHONPATH=. python bench/profile_step.py                       # tiny, CPU, 424 parcels
    PYTHONPATH=. python bench/profile_step.py --trace step.json     # plus a Chrome trace (chrome://tracing)
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from brainlm.config import TrainConfig, preset
from brainlm.engine import build_optimizer, build_scheduler, train_step
from brainlm.model import BrainLM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--mask", type=float, default=0.75)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--parcels", type=int, default=424)
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--rows", type=int, default=25, help="rows of the ops table")
    p.add_argument("--group-by-shape", action="store_true", help="one row per (op, input shapes)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a shared, busy CPU")
    p.add_argument("--trace", default=None, help="also export a Chrome trace here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    cfg = preset(args.preset, mask_ratio=args.mask)
    tcfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, compile=args.compile, use_gpu=cuda)
    model = BrainLM(cfg).to(device)
    optimizer = build_optimizer(model, tcfg, device)
    scheduler = build_scheduler(optimizer, tcfg)
    stepped = torch.compile(model) if args.compile else model
    signals = torch.randn(args.batch, args.parcels, cfg.window, device=device)
    coords = torch.randn(args.parcels, 3, device=device) * 50

    def step() -> torch.Tensor:
        return train_step(stepped, signals, coords, optimizer, scheduler, tcfg, device)

    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=args.group_by_shape) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=args.group_by_shape).table(sort_by=sort, row_limit=args.rows)
    print(f"{args.preset} mask {args.mask} batch {args.batch} parcels {args.parcels} on {device}, "
          f"{args.steps} profiled step(s), compile={args.compile}")
    print(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote {args.trace}")
    return table


if __name__ == "__main__":
    main()
