"""Training throughput of polytask's MMoE and PLE against torch-rechub's MMOE and PLE.

Same sizes on both sides: 8 experts (PLE: 3 tasks x 2 specific + 2 shared per level, 2 levels),
3 binary tasks, batch 2048, the same dense input (one pre-embedded vector per row, passed to
torch-rechub as a single ``DenseFeature`` so its per-feature embedding loop costs nothing).
One step = forward + loss + backward (no optimizer step). Throughput is samples/s, the median
over repeats of a few steps each, after warm-up.

torch-rechub's MLPs put a BatchNorm after every linear layer (gates included), which polytask's
experts do not have, so it is measured twice: as shipped, and with every BatchNorm replaced by an
identity (the like-for-like architecture). Ratios are ours / theirs.

Run: ``.venv/bin/python benchmarks/arch_speed.py [--threads 2] [--repeats 7]``. On a shared CPU the
wall-clock numbers move with the load from other processes (the models are measured interleaved
so that load hits all alike, but a loaded 2-core machine still makes them noisy);
``--threads 1 --clock cpu`` counts this process's CPU time instead, which other processes barely
affect.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from polytask.nn import MMoE, PLE
from polytask.tasks import Task

TASKS = [Task(f"t{i}", "binary") for i in range(3)]


def _rechub(kind: str, input_dim: int, expert: list[int], tower: list[int], batchnorm: bool) -> nn.Module:
    from torch_rechub.basic.features import DenseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.models.multi_task import PLE as RPLE

    feats = [DenseFeature("x", embed_dim=input_dim)]
    types = ["classification"] * 3
    if kind == "mmoe":
        model = MMOE(feats, types, 8, {"dims": expert}, [{"dims": tower}] * 3)
    else:
        model = RPLE(feats, types, 2, 2, 2, {"dims": expert}, [{"dims": tower}] * 3)
    if not batchnorm:
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.BatchNorm1d):
                    setattr(module, child_name, nn.Identity())
    return model


def _ours(kind: str, input_dim: int, expert: list[int], tower: list[int]) -> nn.Module:
    if kind == "mmoe":
        return MMoE(input_dim, TASKS, num_experts=8, expert=expert, tower=tower)
    return PLE(input_dim, TASKS, num_levels=2, specific_experts=2, shared_experts=2, expert=expert, tower=tower)


def _step_ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    out = model(x)
    loss = sum(F.binary_cross_entropy_with_logits(out[t.name][:, 0], y[:, i]) for i, t in enumerate(TASKS))
    model.zero_grad(set_to_none=True)
    loss.backward()


def _step_rechub(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    p = model({"x": x})  # (B, 3) probabilities
    loss = F.binary_cross_entropy(p, y)
    model.zero_grad(set_to_none=True)
    loss.backward()


CLOCK = time.perf_counter
SYNC = lambda: None  # noqa: E731  (torch.cuda.synchronize on CUDA: time finished work, not launches)


def throughput(step, model, x, y, steps: int, repeats: int) -> list[float]:
    """samples per second of ``CLOCK`` for each repeat (``steps`` training steps each), after 3
    warm-up steps."""
    for _ in range(3):
        step(model, x, y)
    rates = []
    for _ in range(repeats):
        SYNC()
        start = CLOCK()
        for _ in range(steps):
            step(model, x, y)
        SYNC()
        rates.append(steps * x.shape[0] / (CLOCK() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--archs", nargs="+", default=["mmoe", "ple"], choices=["mmoe", "ple"])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: samples per CPU-second of this process (use with --threads 1 on a "
                             "shared machine: other processes' load then barely moves the figure)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on CUDA timings are wall-clock "
                        "with a synchronize around each repeat")
    args = parser.parse_args()
    global CLOCK, SYNC
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    if device.type == "cuda":
        if args.clock == "cpu":
            parser.error("--clock cpu measures host CPU time; use --clock wall with --device cuda")
        SYNC = torch.cuda.synchronize
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    configs = [  # (input width, expert widths, tower widths)
        (256, [128, 64], [32]),
        (128, [16], [8]),  # torch-rechub's census example sizes for experts/towers
    ]
    rows = []
    for kind in args.archs:
        for d, expert, tower in configs:
            x = torch.randn(args.batch, d, device=device)
            y = torch.randint(0, 2, (args.batch, 3), device=device).float()
            models = {
                "polytask": (_ours(kind, d, expert, tower).to(device), _step_ours),
                "rechub": (_rechub(kind, d, expert, tower, batchnorm=True).to(device), _step_rechub),
                "rechub-noBN": (_rechub(kind, d, expert, tower, batchnorm=False).to(device), _step_rechub),
            }
            rates: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(args.repeats):  # interleave so that load changes hit every model alike
                for name, (model, step) in models.items():
                    rates[name] += throughput(step, model, x, y, args.steps, 1)
            med = {k: statistics.median(v) for k, v in rates.items()}
            rows.append((kind, f"d={d} expert={expert} tower={tower}", med))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"\nbatch {args.batch}, 3 tasks, 8 experts, {where}, torch {torch.__version__}; "
          f"median samples per {args.clock}-second over {args.repeats} repeats of {args.steps} steps (forward+backward)")
    header = f"{'model':5} | {'sizes':34} | {'polytask':>10} | {'rechub':>10} | {'rechub-noBN':>11} | {'x rechub':>8} | {'x noBN':>6}"
    print(header)
    print("-" * len(header))
    for kind, sizes, med in rows:
        print(f"{kind:5} | {sizes:34} | {med['polytask']:10.0f} | {med['rechub']:10.0f} | {med['rechub-noBN']:11.0f} | "
              f"{med['polytask'] / med['rechub']:8.2f} | {med['polytask'] / med['rechub-noBN']:6.2f}")


if __name__ == "__main__":
    main()
