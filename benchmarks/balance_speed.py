"""Speed of gradient balancing: one training step (forward + balanced backward), and aggregation alone.

Model: an MLP trunk (``--input`` -> ``--hidden`` x 2, ReLU) with T linear heads, batch ``--batch``.
For T in ``--tasks`` it prints the median step time (ms) of:

- ``ew``: the summed loss, one ``backward()`` (the floor);
- ``loop``: LibMTL's way -- ``T`` ``backward(retain_graph=True)`` calls collecting the shared
  gradients into a ``T x D`` matrix (mean-aggregated: the floor of any parameter-level method);
  ``loop:<m>``: the same loop followed by our aggregator ``<m>`` (isolates the engine's cost);
- ``tjd:<m>``: torchjd 0.18 (``mtl_backward`` + ``jac_to_grad`` with its aggregator);
- ``par:<m>`` / ``feat:<m>``: ours, parameter mode / feature mode (per-task Jacobian loop, the
  default); ``par-vmap`` / ``feat-vmap``: the same with one vectorised backward;
- ``famo``: FAMO (loss-based; backward only, its post-step pass excluded) if registered.

Then the aggregation alone at T=16 (given the ``T x D`` Jacobian): ours vs torchjd for CAGrad,
Nash-MTL and UPGrad (torchjd solves them with cvxpy / quadprog on the CPU).

Run: ``python benchmarks/balance_speed.py`` (a few minutes on CPU; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from polytask import balance
from polytask.balance import aggregators as agg
from polytask.nn import mlp
from polytask.tasks import Task

METHODS = ["mgda", "pcgrad", "cagrad", "nash_mtl", "upgrad"]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def torchjd_aggregator(name: str, n_tasks: int):
    import torchjd.aggregation as tja

    return {"mgda": lambda: tja.MGDA(), "pcgrad": lambda: tja.PCGrad(), "cagrad": lambda: tja.CAGrad(c=0.4),
            "nash_mtl": lambda: tja.NashMTL(n_tasks=n_tasks), "upgrad": lambda: tja.UPGrad()}[name]()


class TrunkHeads(nn.Module):
    """MLP trunk and T separate ``nn.Linear`` heads (torchjd's ``mtl_backward`` needs separate heads)."""

    def __init__(self, tasks: list[Task], input_dim: int, hidden: int) -> None:
        super().__init__()
        self.trunk = mlp(input_dim, (hidden, hidden))
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in tasks)
        self.names = [t.name for t in tasks]
        self.shared_features: torch.Tensor | None = None

    def shared_parameters(self):
        return self.trunk.parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        self.shared_features = z
        return {n: h(z) for n, h in zip(self.names, self.heads)}


def step_benchmarks(n_tasks: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    tasks = [Task(f"t{i}", "regression") for i in range(n_tasks)]
    model = TrunkHeads(tasks, args.input, args.hidden)
    x = torch.randn(args.batch, args.input)
    y = torch.randn(n_tasks, args.batch, 1)
    shared = list(model.shared_parameters())

    def losses() -> dict[str, torch.Tensor]:
        out = model(x)
        return {t.name: t.loss(out[t.name], y[i]) for i, t in enumerate(tasks)}

    def ew() -> None:
        model.zero_grad(set_to_none=True)
        sum(losses().values()).backward()

    def loop(aggregator: agg.Aggregator | None = None) -> None:
        model.zero_grad(set_to_none=True)
        ls = list(losses().values())
        rows = []
        for i, loss in enumerate(ls):
            loss.backward(retain_graph=i < len(ls) - 1)
            rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
            for p in shared:
                p.grad = None
        jac = torch.stack(rows)
        update = jac.mean(0) if aggregator is None else aggregator(jac)
        offset = 0
        for p in shared:
            p.grad = update[offset: offset + p.numel()].view_as(p)
            offset += p.numel()

    results = {"ew": median_ms(ew, args.repeats), "loop": median_ms(loop, args.repeats)}
    if "famo" in balance.names():
        famo = balance.get("famo")

        def famo_step() -> None:
            model.zero_grad(set_to_none=True)
            famo.backward(losses(), shared=model.shared_parameters(), features=model.shared_features)

        results["famo"] = median_ms(famo_step, args.repeats)
    for name in METHODS:
        method = balance.get(name).aggregator
        results[f"loop:{name}"] = median_ms(lambda: loop(method), args.repeats)
        for mode, tag in (("parameters", "par"), ("features", "feat")):
            b = balance.get(name, mode=mode)

            def ours(b=b) -> None:
                model.zero_grad(set_to_none=True)
                b.backward(losses(), shared=model.shared_parameters(), features=model.shared_features)

            results[f"{tag}:{name}"] = median_ms(ours, args.repeats)
            if name == "upgrad":  # the vectorised (is_grads_batched) Jacobian instead of the per-task loop
                bv = balance.get(name, mode=mode)
                bv.batched = True

                def ours_vmap(b=bv) -> None:
                    model.zero_grad(set_to_none=True)
                    b.backward(losses(), shared=model.shared_parameters(), features=model.shared_features)

                results[f"{tag}-vmap:{name}"] = median_ms(ours_vmap, args.repeats)
        if not args.no_torchjd:
            from torchjd.autojac import jac_to_grad, mtl_backward

            a = torchjd_aggregator(name, n_tasks)

            def tjd(a=a) -> None:
                model.zero_grad(set_to_none=True)
                ls = list(losses().values())
                mtl_backward(ls, features=model.shared_features)
                jac_to_grad(shared, a)

            slow = name in ("nash_mtl", "cagrad") and n_tasks >= 16
            results[f"tjd:{name}"] = median_ms(tjd, max(3, args.repeats // 3) if slow else args.repeats, warmup=1)
    return results


def aggregation_benchmarks(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    import torchjd.aggregation as tja

    n = 16
    torch.manual_seed(0)
    jac = torch.randn(n, args.agg_dim)
    rows = []
    pairs = [("cagrad", agg.CAGrad(c=0.4), tja.CAGrad(c=0.4)), ("nash_mtl", agg.NashMTL(), tja.NashMTL(n_tasks=n)),
             ("upgrad", agg.UPGrad(), tja.UPGrad())]
    for name, ours, theirs in pairs:
        t_ours = median_ms(lambda: ours(jac), args.repeats * 2)
        t_theirs = median_ms(lambda: theirs(jac), max(5, args.repeats), warmup=1)
        rows.append((name, t_ours, t_theirs))
    # The solver alone, given the Gramian (both sides otherwise spend most time forming J J^T).
    gram = jac @ jac.T
    for name, ours, theirs in [("cagrad (G given)", agg.CAGrad(c=0.4), tja.CAGradWeighting(c=0.4)),
                               ("upgrad (G given)", agg.UPGrad(), tja.UPGradWeighting())]:
        gram64 = gram.double()
        t_ours = median_ms(lambda: ours.weights(gram64), args.repeats * 2)
        t_theirs = median_ms(lambda: theirs(gram), max(5, args.repeats), warmup=1)
        rows.append((name, t_ours, t_theirs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--agg-dim", type=int, default=100_000, help="D of the Jacobian for the aggregation-only table")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable timings on a shared box)")
    parser.add_argument("--no-torchjd", action="store_true")
    parser.add_argument("--quick", action="store_true", help="T in {2, 16}, 3 repeats")
    parser.add_argument("--agg-only", action="store_true", help="only the aggregation-alone table")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.repeats = [2, 16], 3
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # cvxpy's DPP notices in torchjd's Nash-MTL

    if not args.agg_only:
        print(f"# step time, median ms (MLP {args.input}-{args.hidden}-{args.hidden}, T linear heads, batch {args.batch}, "
              f"{torch.get_num_threads()} thread(s), device cpu)")
    table = {} if args.agg_only else {t: step_benchmarks(t, args) for t in args.tasks}
    if table:
        cols = list(next(iter(table.values())))
        print("| T | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for t, row in table.items():
            print(f"| {t} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")

        print("\n# ratios: feat/EW (target <= 1.5 at T=16), par/loop:<m> (same aggregator, LibMTL loop; target <= 1),"
              " par/loop (mean-only loop), torchjd/par")
        print("| T | method | feat/EW | par/loop:m | par/loop | tjd/par |")
        print("|---|---|---|---|---|---|")
        for t, row in table.items():
            for m in METHODS:
                tjd = row.get(f"tjd:{m}")
                tjd_ratio = f"{tjd / row[f'par:{m}']:.2f}" if tjd is not None else "-"
                print(f"| {t} | {m} | {row[f'feat:{m}'] / row['ew']:.2f} | {row[f'par:{m}'] / row[f'loop:{m}']:.2f} | "
                      f"{row[f'par:{m}'] / row['loop']:.2f} | {tjd_ratio} |")

    if not args.no_torchjd:
        print(f"\n# aggregation alone, T=16, D={args.agg_dim}, median ms")
        print("| method | ours | torchjd | speed-up |")
        print("|---|---|---|---|")
        for name, ours, theirs in aggregation_benchmarks(args):
            print(f"| {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x |")


if __name__ == "__main__":
    main()
