"""Overhead of the diagnostics monitors on a training step.

Times a plain multi-task training step (forward, equal-weight backward, Adam step; the Trainer's
step) with and without the gradient-conflict monitor and the affinity monitor attached, sampling
every N = 1, 10, 50 steps. Prints median ms/step over several repeats, wall-clock and process CPU
time (on a shared, loaded CPU machine the CPU time is the stable one), and the overhead against
the plain step. No peer library ships these monitors, so the comparison is against training
without them.

    .venv/bin/python benchmarks/analyze_overhead.py [--device cuda] [--steps 200] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from polytask import balance
from polytask.analyze import AffinityMonitor, GradientConflictMonitor
from polytask.data import load
from polytask.nn import build_model


def make(device: str, tasks: int, rows: int, width: int):
    splits = load("synthetic", num_tasks=tasks, clusters=2, correlation=0.9, num_rows=rows, input_dim=100)
    data = splits.train.to(device)
    torch.manual_seed(0)
    model = build_model("shared_bottom", 100, splits.tasks, bottom=[width, width // 2], tower=[32]).to(device)
    return splits.tasks, data, model


def run(device: str, tasks, data, model, monitor, steps: int, batch_size: int) -> tuple[float, float]:
    """(wall, process CPU) ms per training step over ``steps`` steps (after a warm-up)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ew = balance.get("ew")
    gen = torch.Generator().manual_seed(0)
    trainer = SimpleNamespace(model=model, tasks=tasks, last_batch=None, optimizer=opt)
    batches = []
    while len(batches) < steps + 10:
        batches += list(data.batches(batch_size, shuffle=True, generator=gen, drop_last=True))
    def step(i, batch):
        opt.zero_grad(set_to_none=True)
        out = model(batch.inputs)
        losses = {t.name: t.loss(out[t.name], batch.targets[t.name]) for t in tasks}
        ew.backward(losses, shared=model.shared_parameters(), features=model.shared_features)
        opt.step()
        trainer.last_batch = batch
        if monitor is not None:
            monitor.on_step(trainer, i)
    for i, b in enumerate(batches[:10]):  # warm-up
        step(i + 1, b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for i, b in enumerate(batches[10:10 + steps]):
        step(i + 1, b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps, 1000 * (time.process_time() - cpu) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks, data, model = make(args.device, args.tasks, 20000, args.width)
    variants = [("none", None, None)]
    for n in (1, 10, 50):
        variants.append(("conflict", n, lambda n=n: GradientConflictMonitor(every=n, groups="layer", write=False)))
        variants.append(("affinity", n, lambda n=n: AffinityMonitor(every=n, lr=1e-3, write=False)))
    times: dict[tuple[str, int | None], list[tuple[float, float]]] = {(v[0], v[1]): [] for v in variants}
    for _ in range(args.repeats):  # interleave variants so drift in machine load hits them alike
        for name, n, factory in variants:
            monitor = factory() if factory else None
            times[(name, n)].append(run(args.device, tasks, data, model, monitor, args.steps, args.batch_size))
            if monitor is not None:
                monitor.result()  # the one host sync, outside the timed loop
    def med(key, k):
        return statistics.median(t[k] for t in times[key])
    base_wall, base_cpu = med(("none", None), 0), med(("none", None), 1)
    params = sum(p.numel() for p in model.shared_parameters())
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.tasks} tasks, shared-bottom "
          f"{args.width}-{args.width // 2} ({params} shared parameters), batch {args.batch_size}, "
          f"{args.steps} steps × {args.repeats} repeats (median)\n")
    print("| monitor | every N steps | wall ms / step | overhead (wall) | CPU ms / step | overhead (CPU) |")
    print("|---|---|---|---|---|---|")
    for name, n, _ in variants:
        w, c = med((name, n), 0), med((name, n), 1)
        print(f"| {name} | {n if n else '-'} | {w:.2f} | {100 * (w / base_wall - 1):+.1f}% | {c:.2f} | "
              f"{100 * (c / base_cpu - 1):+.1f}% |")


if __name__ == "__main__":
    main()
