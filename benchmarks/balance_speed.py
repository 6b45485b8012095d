"""Speed of gradient balancing: one training step (forward + balanced backward), and aggregation alone.

Model: an MLP trunk (``--input`` -> ``--hidden`` x 2, ReLU) with T linear heads (one
:class:`~polytask.nn.base.TaskHeads`: the heads run as one wide GEMM), batch ``--batch``. For T in
``--tasks`` it prints the median step time (ms) of:

- ``ew``: the summed loss, one ``backward()`` (the floor); ``ew-copies``: the same with the heads
  reading per-task copies of the features (``expose_task_features()``, which the ``par`` and
  ``feat`` columns use) -- what exposing ``task_features`` costs a plain step;
- ``loop``: LibMTL's way -- ``T`` ``backward(retain_graph=True)`` calls collecting the shared
  gradients into a ``T x D`` matrix (mean-aggregated: the floor of any parameter-level method);
  ``loop:<m>``: the same loop followed by our aggregator ``<m>`` (isolates the engine's cost);
- ``tjd:<m>``: torchjd 0.18 (``mtl_backward`` + ``jac_to_grad`` with its aggregator), on the same
  trunk with T separate ``nn.Linear`` heads (it cannot take one stacked head weight); ``ew-sep``
  is EW on that model;
- ours, given ``task_features`` (one backward through the heads for all tasks):
  ``par:<m>`` parameter mode (``T`` passes of the feature-gradient rows through the trunk, the
  default), ``par-vb:<m>`` (the rows in one vectorised trunk backward), ``feat:<m>`` feature mode
  (with these linear heads: the Gramian-only source, ``U^T U * W W^T``, no ``T x (B d)`` Jacobian);
- ours without ``task_features`` (one pass per task, the fallback): ``par-old:<m>``, ``feat-old:<m>``;
- ``famo``: FAMO (loss-based; backward only, its post-step pass excluded) if registered;
- ``feat-floor``: feature mode through the Gramian path with mean weights (FairGrad at ``alpha = 0``,
  no solve): the engine's own cost, the floor of every ``feat:<m>`` of a Gramian method.

Every variant of one T is timed round-robin (one step of each per round, ``--repeats`` rounds),
so that load changes on a shared machine hit all of them alike; the median per variant is shown,
and ``feat/EW paired``, ``par/loop:m paired``, ``par-old/loop:m paired``: the median over rounds of
the ratio within one round.

The methods: MGDA, PCGrad, CAGrad, Nash-MTL, UPGrad and torchjd 0.18's later ones (``RECENT``:
SDMGrad, MoDo, CR-MOGM over MGDA, PCD, Krum, TrimmedMean; Krum and TrimmedMean from T = 3).

Then the aggregation alone at T=16 (given the ``T x D`` Jacobian): ours vs torchjd for CAGrad,
Nash-MTL and UPGrad (torchjd solves them with cvxpy / quadprog on the CPU).

``--solvers``: only the weights given the ``T x T`` Gramian, every T of ``--solver-tasks``, with the
solvers' CUDA graphs off and on (``polytask.balance.solvers.CUDA_GRAPHS``; on the CPU both are eager).

Run: ``python benchmarks/balance_speed.py`` (several minutes on CPU; ``--quick`` for a smoke run);
``--device cuda`` runs everything (ours and torchjd) on the GPU, each timed region closed by
``torch.cuda.synchronize()``.
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
from polytask.nn.base import TaskHeads
from polytask.tasks import Task

# torchjd 0.18's later methods (issue 16): SDMGrad, MoDo, CR-MOGM (over MGDA), PCD, Krum, TrimmedMean
RECENT = ["sdmgrad", "modo", "cr_mogm", "pcd", "krum", "trimmed_mean", "ntkmtl"]  # ntkmtl: no torchjd column
METHODS = ["mgda", "pcgrad", "cagrad", "nash_mtl", "upgrad"] + RECENT
MIN_TASKS = {"krum": 3, "trimmed_mean": 3}  # Krum needs T >= n_byzantine + 3, the trimmed mean T >= 2 trim + 1


def runs_at(name: str, n_tasks: int) -> bool:
    return n_tasks >= MIN_TASKS.get(name, 1)


def gramian_methods(n_tasks: int) -> list[str]:
    """The methods of METHODS that have ``weights(G)`` (the trimmed mean works per coordinate) and run at T."""
    return [m for m in METHODS if runs_at(m, n_tasks) and isinstance(balance.get(m).aggregator, agg.GramianWeighting)]
SLOW_TJD = ("nash_mtl", "cagrad")  # torchjd's cvxpy-based solvers: fewer rounds at large T


DEVICE = torch.device("cpu")  # set from --device in main()


def sync() -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes, its device work included."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats)) * 1e3


def round_robin_ms(fns: dict[str, Callable[[], object]], repeats: int, sparse: dict[str, int] | None = None,
                   paired_with: str | None = None, pairs: list[tuple[str, str]] = ()) -> dict[str, float]:
    """Median ms of each function, timed one call of each per round (``sparse[k]``: only that many rounds).

    With ``paired_with=ref`` also ``"k|ref"``: the median over rounds of ``time_k / time_ref`` within
    the same round -- a ratio that a load change on a shared machine between rounds does not bias.
    """
    sparse = sparse or {}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            if r >= sparse.get(k, repeats):
                continue
            times[k].append(timed(fn))
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    if paired_with is not None:
        ref = times[paired_with]
        out.update({f"{k}|{paired_with}": statistics.median(a / b for a, b in zip(v, ref)) for k, v in times.items()})
    for k, ref in pairs:  # further paired ratios (``pairs``: (k, ref)), e.g. parameter mode against the loop
        out[f"{k}|{ref}"] = statistics.median(a / b for a, b in zip(times[k], times[ref]))
    return out


def torchjd_aggregator(name: str, n_tasks: int):
    import torchjd.aggregation as tja

    return {"mgda": lambda: tja.MGDA(), "pcgrad": lambda: tja.PCGrad(), "cagrad": lambda: tja.CAGrad(c=0.4),
            "nash_mtl": lambda: tja.NashMTL(n_tasks=n_tasks), "upgrad": lambda: tja.UPGrad(),
            "sdmgrad": lambda: tja.GramianWeightedAggregator(tja.SDMGradWeighting()),
            "modo": lambda: tja.GramianWeightedAggregator(tja.MoDoWeighting()),
            "cr_mogm": lambda: tja.GramianWeightedAggregator(tja.CRMOGMWeighting(tja.MGDAWeighting())),
            "pcd": lambda: tja.PCD(), "krum": lambda: tja.Krum(n_byzantine=0),
            "trimmed_mean": lambda: tja.TrimmedMean(trim_number=1)}.get(name, lambda: None)()


class SeparateHeads(nn.Module):
    """The same trunk with T separate ``nn.Linear`` heads (torchjd's ``mtl_backward`` needs heads that
    share no parameter, which one stacked TaskHeads weight is not)."""

    def __init__(self, trunk: nn.Module, names: list[str], hidden: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in names)
        self.names = names
        self.shared_features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        self.shared_features = z
        return {n: h(z) for n, h in zip(self.names, self.heads)}


class TrunkHeads(nn.Module):
    """MLP trunk and T linear heads run as one :class:`TaskHeads` (``heads.copies``: per-task copies of z)."""

    def __init__(self, tasks: list[Task], input_dim: int, hidden: int) -> None:
        super().__init__()
        self.trunk = mlp(input_dim, (hidden, hidden))
        self.heads = TaskHeads(tasks, hidden)
        self.names = [t.name for t in tasks]
        self.shared_features: torch.Tensor | None = None
        self.task_features: torch.Tensor | None = None

    def shared_parameters(self):
        return self.trunk.parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        self.shared_features = z
        out = self.heads(z)
        self.task_features = self.heads.task_features
        return out


def step_benchmarks(n_tasks: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    tasks = [Task(f"t{i}", "regression") for i in range(n_tasks)]
    model = TrunkHeads(tasks, args.input, args.hidden).to(DEVICE)
    x = torch.randn(args.batch, args.input).to(DEVICE)
    y = torch.randn(n_tasks, args.batch, 1).to(DEVICE)
    shared = list(model.shared_parameters())

    def losses() -> dict[str, torch.Tensor]:
        out = model(x)
        return {t.name: t.loss(out[t.name], y[i]) for i, t in enumerate(tasks)}

    def ew() -> None:
        model.zero_grad(set_to_none=True)
        sum(losses().values()).backward()

    def ew_copies() -> None:
        model.heads.copies = True
        model.zero_grad(set_to_none=True)
        sum(losses().values()).backward()
        model.heads.copies = False

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

    separate = SeparateHeads(model.trunk, model.names, args.hidden).to(DEVICE)

    def separate_losses() -> list[torch.Tensor]:
        out = separate(x)
        return [t.loss(out[t.name], y[i]) for i, t in enumerate(tasks)]

    def ew_separate() -> None:
        separate.zero_grad(set_to_none=True)
        sum(separate_losses()).backward()

    fns: dict[str, Callable[[], object]] = {"ew": ew, "ew-copies": ew_copies, "ew-sep": ew_separate, "loop": loop}
    sparse: dict[str, int] = {}
    if "famo" in balance.names():
        famo = balance.get("famo").to(DEVICE)

        def famo_step() -> None:
            model.zero_grad(set_to_none=True)
            famo.backward(losses(), shared=model.shared_parameters(), features=model.shared_features)

        fns["famo"] = famo_step

    def ours(b, one_pass: bool) -> Callable[[], None]:
        def step() -> None:
            model.heads.copies = one_pass
            model.zero_grad(set_to_none=True)
            ls = losses()
            extra = {"task_features": model.task_features} if one_pass else {}
            b.backward(ls, shared=model.shared_parameters(), features=model.shared_features, **extra)
            model.heads.copies = False
        return step

    # The floor of every Gramian method at feature level: the same engine path with mean weights (FairGrad at
    # alpha = 0 returns 1/T without a solve), so feat:<m> minus feat-floor is what <m>'s own weights cost.
    fns["feat-floor"] = ours(balance.get("fairgrad", mode="features", alpha=0.0).to(DEVICE), True)
    methods = [m for m in METHODS if runs_at(m, n_tasks)]
    for name in methods:
        method = balance.get(name).aggregator
        fns[f"loop:{name}"] = lambda method=method: loop(method)
        fns[f"par:{name}"] = ours(balance.get(name, mode="parameters").to(DEVICE), True)
        vb = balance.get(name, mode="parameters").to(DEVICE)
        vb.trunk_batched = True
        fns[f"par-vb:{name}"] = ours(vb, True)
        fns[f"feat:{name}"] = ours(balance.get(name, mode="features").to(DEVICE), True)
        fns[f"par-old:{name}"] = ours(balance.get(name, mode="parameters").to(DEVICE), False)
        fns[f"feat-old:{name}"] = ours(balance.get(name, mode="features").to(DEVICE), False)
        if not args.no_torchjd and torchjd_aggregator(name, n_tasks) is not None:
            from torchjd.autojac import jac_to_grad, mtl_backward

            def tjd(a=torchjd_aggregator(name, n_tasks)) -> None:
                separate.zero_grad(set_to_none=True)
                ls = separate_losses()
                mtl_backward(ls, features=separate.shared_features)
                jac_to_grad(shared, a)

            fns[f"tjd:{name}"] = tjd
            if name in SLOW_TJD and n_tasks >= 16:
                sparse[f"tjd:{name}"] = max(3, args.repeats // 3)
    pairs = [(f"{v}:{m}", f"loop:{m}") for m in methods for v in ("par", "par-old")]
    return round_robin_ms(fns, args.repeats, sparse, paired_with="ew", pairs=pairs)


def aggregation_benchmarks(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    import torchjd.aggregation as tja

    n = 16
    torch.manual_seed(0)
    jac = torch.randn(n, args.agg_dim).to(DEVICE)
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


def breakdown_benchmarks(args: argparse.Namespace) -> list[tuple[str, float, float, float, float]]:
    """Feature-mode aggregation at T=16 split in parts: ``(method, G = J J^T, weights(G), w @ J, aggregate(J))``.

    ``J`` is the feature Jacobian of the step benchmark (``16 x batch*hidden``): the Gramian and
    the combination are the floor every Gramian-based method pays on top of the backward passes.
    """
    n = 16
    torch.manual_seed(0)
    jac = torch.randn(n, args.batch * args.hidden).to(DEVICE)
    t_gram = median_ms(lambda: jac @ jac.T, args.repeats * 4)
    gram64 = (jac @ jac.T).double()
    rows = []
    for name in gramian_methods(n):
        method = balance.get(name).aggregator
        w = method.weights(gram64).float()
        rows.append((name, t_gram, median_ms(lambda: method.weights(gram64), args.repeats * 4),
                     median_ms(lambda: w @ jac, args.repeats * 4), median_ms(lambda: method.aggregate(jac), args.repeats * 4)))
    return rows


def solver_benchmarks(args: argparse.Namespace) -> list[tuple[str, int, float, float, str]]:
    """The weights alone, given a float64 ``T x T`` Gramian: ``(method, T, graphs off ms, graphs on ms, graphs)``.

    "on" replays the solvers' CUDA graphs (``polytask.balance.solvers.CUDA_GRAPHS``; the capture
    happens in the warm-up calls); "off" runs the same kernels one launch at a time. ``graphs``:
    how many graphs the method's calls captured, and how many captures failed (run eagerly).
    """
    from polytask.balance import solvers

    rows = []
    for n in args.solver_tasks:
        torch.manual_seed(0)
        jac = torch.randn(n, 4096, dtype=torch.float64).to(DEVICE)
        gram = jac @ jac.T
        for name in gramian_methods(n) + ["dualproj", "fairgrad"]:
            times = {}
            for graphs in (False, True):
                solvers.CUDA_GRAPHS = graphs
                solvers._GRAPHS.clear()
                torch.manual_seed(0)
                method = balance.get(name).aggregator.to(DEVICE)
                times[graphs] = median_ms(lambda: method.weights(gram), args.repeats * 4, warmup=3)
            failed = sum(v is None for v in solvers._GRAPHS.values())
            rows.append((name, n, times[False], times[True], f"{len(solvers._GRAPHS) - failed} ok, {failed} failed"))
    solvers.CUDA_GRAPHS = True
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--agg-dim", type=int, default=100_000, help="D of the Jacobian for the aggregation-only table")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the models, data and Jacobians live (cuda: timings synchronise the device)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable timings on a shared box)")
    parser.add_argument("--no-torchjd", action="store_true")
    parser.add_argument("--quick", action="store_true", help="T in {2, 16}, 3 repeats")
    parser.add_argument("--agg-only", action="store_true", help="only the aggregation-alone table")
    parser.add_argument("--solvers", action="store_true",
                        help="only the solver table: weights(G) with CUDA graphs off and on (T from --solver-tasks)")
    parser.add_argument("--solver-tasks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.repeats = [2, 16], 3
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # cvxpy's DPP notices in torchjd's Nash-MTL
    if args.solvers:
        warnings.filterwarnings("default", message="polytask: CUDA graph capture")  # show a capture that failed
        print(f"# weights(G) alone, float64 Gramian, device {DEVICE}, median ms "
              f"(graphs: polytask.balance.solvers.CUDA_GRAPHS; only on CUDA)")
        print("| method | T | graphs off | graphs on | speed-up | graphs captured |")
        print("|---|---|---|---|---|---|")
        for name, n, off, on, captured in solver_benchmarks(args):
            print(f"| {name} | {n} | {off:.3f} | {on:.3f} | {off / on:.1f}x | {captured} |")
        return

    if not args.agg_only:
        print(f"# step time, median ms (MLP {args.input}-{args.hidden}-{args.hidden}, T linear heads, batch {args.batch}, "
              f"{torch.get_num_threads()} CPU thread(s), device {DEVICE})")
    table = {} if args.agg_only else {t: step_benchmarks(t, args) for t in args.tasks}
    for t, row in table.items():
        base = "".join(f", {k} {row[k]:.2f}" for k in ("ew-copies", "ew-sep", "loop", "famo", "feat-floor") if k in row)
        base += f" (feat-floor/EW paired {row['feat-floor|ew']:.2f})"
        print(f"\n## T={t}: ew {row['ew']:.2f} ms{base}")
        cols = ["loop:m", "tjd", "par", "par-vb", "par-old", "feat", "feat-old"]
        print("| method | " + " | ".join(cols) + " | feat/EW | feat/EW paired | feat/EW-copies | feat-old/EW | par/loop:m "
              "| par/loop:m paired | par-old/loop:m | par-old/loop:m paired | tjd/par |")
        print("|---|" + "---|" * (len(cols) + 9))
        for m in (m for m in METHODS if runs_at(m, t)):
            vals = [row.get(f"loop:{m}"), row.get(f"tjd:{m}"), row[f"par:{m}"], row[f"par-vb:{m}"], row[f"par-old:{m}"],
                    row[f"feat:{m}"], row[f"feat-old:{m}"]]
            tjd = row.get(f"tjd:{m}")
            ratios = [row[f"feat:{m}"] / row["ew"], row[f"feat:{m}|ew"], row[f"feat:{m}"] / row["ew-copies"], row[f"feat-old:{m}"] / row["ew"], row[f"par:{m}"] / row[f"loop:{m}"],
                      row[f"par:{m}|loop:{m}"], row[f"par-old:{m}"] / row[f"loop:{m}"], row[f"par-old:{m}|loop:{m}"]]
            cells = ["-" if v is None else f"{v:.2f}" for v in vals] + [f"{r:.2f}" for r in ratios]
            cells.append("-" if tjd is None else f"{tjd / row[f'par:{m}']:.2f}")
            print(f"| {m} | " + " | ".join(cells) + " |")
    if table:
        print("\n# targets: feat/EW <= 1.5 at T=16; par/loop:m <= 1 (parameter mode no slower than the per-task loop)."
              "\n# feat/EW paired: median over rounds of feat/EW timed in the same round (robust to load drifts)"
              "\n# EW: the default model (no copies); EW-copies: the same model with expose_task_features()")

    if table:
        print(f"\n# feature-mode aggregation in parts, T=16, J 16x{args.batch * args.hidden}, device {DEVICE}, median ms")
        print("| method | G = J J^T | weights(G) | w @ J | aggregate(J) |")
        print("|---|---|---|---|---|")
        for name, *parts in breakdown_benchmarks(args):
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in parts) + " |")

    if not args.no_torchjd:
        print(f"\n# aggregation alone, T=16, D={args.agg_dim}, device {DEVICE}, median ms")
        print("| method | ours | torchjd | speed-up |")
        print("|---|---|---|---|")
        for name, ours, theirs in aggregation_benchmarks(args):
            print(f"| {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x |")


if __name__ == "__main__":
    main()
