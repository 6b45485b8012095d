"""Scale-out: training throughput at 1 and 2 (or more) processes, and what the balancers exchange.

For each world size in ``--world`` (processes started by torchrun's elastic launcher on this
machine, gloo on CPU, nccl with ``--device cuda``: one GPU per rank if there are enough, else the
ranks share GPU 0), each architecture in ``--archs`` (shared-bottom, MMoE) and each method, it
times ``--steps`` training steps after ``--warmup`` on a global batch of ``--batch`` rows split
across the ranks, exactly as ``polytask train --nproc N`` runs them (DDP wrapper, forward and
balanced backward under ``no_sync``, ``balancer.backward(..., process_group=, counts=)``):

- ``ddp-ew``: plain DDP with EW -- one ``backward()`` of the summed loss, DDP's own bucketed
  all-reduce (no balancer): the reference of the ``vs ddp-ew`` column;
- ``ew``, ``famo`` (loss-based; FAMO with its post-step pass), ``mgda`` and ``nash_mtl`` at
  feature level (``:feat``) and parameter level (``:par``), through polytask's balancers, which
  reduce the gradients themselves (forward and backward under DDP's ``no_sync``);
- ``...@ddp``: the same balancer, but DDP's own bucketed all-reduce reduces the gradients (outside
  ``no_sync``, ``reduce_gradients=False``; only balancers with ``supports_external_reduction``, and
  feature level only on models without task gates below the features).

Columns: samples/s (global rows per second), step time (ms, median over steps of the slowest
rank, median over interleaved rounds), communication volume per step (bytes through ``torch.distributed`` collectives, counted on
one extra untimed step by wrapping ``all_reduce`` / ``all_gather`` / ``broadcast``; DDP's reducer
runs in C++ and is shown as the parameter bytes it all-reduces), and the step time relative to
``ddp-ew`` at the same world size and architecture (the overhead of the balancer's collectives
and solver). Timings on a loaded machine mean little: run it on a quiet one.

Run: ``python benchmarks/scale.py`` (defaults: world 1,2; a few minutes on CPU);
``--quick`` for a smoke run (tiny model, few steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

METHODS = {
    "ddp-ew": None,
    "ew": ("ew", {}),
    "famo": ("famo", {}),
    "mgda:feat": ("mgda", {"mode": "features"}),
    "mgda:par": ("mgda", {"mode": "parameters"}),
    "nash_mtl:feat": ("nash_mtl", {"mode": "features"}),
    "nash_mtl:par": ("nash_mtl", {"mode": "parameters"}),
    # "@ddp": DDP's own bucketed all-reduce does the gradient reduction (forward and backward outside
    # no_sync, ``reduce_gradients=False``), for the balancers with ``supports_external_reduction``
    "ew@ddp": ("ew", {}),
    "famo@ddp": ("famo", {}),
    "mgda:feat@ddp": ("mgda", {"mode": "features"}),
    "nash_mtl:feat@ddp": ("nash_mtl", {"mode": "features"}),
}
ARCHS = {
    "shared_bottom": {"bottom": [256, 128], "tower": [64]},
    "mmoe": {"num_experts": 4, "expert": [128], "tower": [64]},
}
ROUTED = {"mmoe"}  # task gates below the shared features
QUICK_ARCHS = {"shared_bottom": {"bottom": [16], "tower": [8]}, "mmoe": {"num_experts": 2, "expert": [16], "tower": [8]}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="1,2", help="comma list of world sizes")
    p.add_argument("--archs", default="shared_bottom,mmoe")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--input", type=int, default=128, help="input width")
    p.add_argument("--batch", type=int, default=512, help="global batch (rows over all ranks)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per method in each round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each method times --steps per round)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps: checks that it runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON file: set by the launcher
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup, args.batch, args.input = 2, 2, 1, 32, 8
    return args


# ---------------------------------------------------------------------------- one rank
class _Counter:
    """Bytes through torch.distributed collectives while active (wraps the module functions that
    polytask's balancers and train/dist.py call by attribute)."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self) -> None:
        self.bytes = 0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> _Counter:
        import torch
        import torch.distributed as dist

        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def wrapped(*a, _fn=fn, **k):
                t = a[1] if _fn.__name__ == "all_gather" else a[0]  # all_gather(list_out, tensor)
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
                return _fn(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def run_rank(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import torch
    import torch.distributed as dist

    from polytask.train import dist as dist_lib

    device = torch.device(args.device)
    ctx, device = dist_lib.setup(device)
    setups = {f"{arch}|{method}": _setup(args, ctx, device, arch, method)
              for arch in args.archs.split(",") for method in args.methods.split(",")
              if not (arch in ROUTED and ":feat@ddp" in method)}  # refused: gates below the features
    comm: dict[str, float] = {}
    for key, (step, balancer, params) in setups.items():
        for i in range(args.warmup):
            step(i)
        with _Counter() as counter:
            step(args.warmup)
        comm[key] = counter.bytes
        if balancer is None and ctx.world_size > 1:
            comm[key] = sum(p.numel() * p.element_size() for p in params)  # DDP's reducer (C++, not hooked)
    # Interleaved rounds: every method times a block of steps in each round, so a slow spell of the
    # machine hits all of them alike; ratios to ddp-ew are paired per round, then the median taken.
    blocks: dict[str, list[float]] = {key: [] for key in setups}
    for r in range(args.rounds):
        for key, (step, _, _) in setups.items():
            times = []
            for i in range(args.steps):
                if ctx.world_size > 1:
                    dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                step(args.warmup + 1 + r * args.steps + i)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            t = torch.tensor(times, dtype=torch.float64)
            if ctx.world_size > 1:  # the step takes as long as its slowest rank
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            blocks[key].append(statistics.median(t.tolist()))
    results: dict[str, dict[str, float]] = {}
    for key, meds in blocks.items():
        arch = key.split("|")[0]
        med = statistics.median(meds)

        def paired(ref: str) -> float:
            base = blocks.get(f"{arch}|{ref}")
            return statistics.median(m / b for m, b in zip(meds, base)) if base else float("nan")

        results[key] = {"step_ms": med * 1e3, "samples_s": args.batch / med, "comm_bytes": comm[key],
                        "vs_ddp_ew": paired("ddp-ew"), "vs_ew": paired("ew")}
    ctx.close()
    return results


def _setup(args: argparse.Namespace, ctx, device, arch: str, method: str):
    """``(step(i), balancer, params)`` for one architecture and method, as ``polytask train --nproc`` runs it."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from polytask import balance, nn as nn_lib
    from polytask.balance import GradientBalancer
    from polytask.tasks import Task
    from polytask.train import dist as dist_lib

    world, rank = ctx.world_size, ctx.rank
    tasks = [Task(f"t{i}", "binary") for i in range(args.tasks)]
    g = torch.Generator().manual_seed(0)
    pool = 8  # batches of data, reused cyclically
    x = torch.randn(args.batch * pool, args.input, generator=g)
    y = {t.name: (torch.rand(args.batch * pool, generator=g) < 0.3).float() for t in tasks}
    lo, hi = dist_lib.shard_bounds(args.batch, rank, world)
    archs = QUICK_ARCHS if args.quick else ARCHS
    torch.manual_seed(0)
    model = nn_lib.build_model(arch, args.input, tasks, **archs[arch]).to(device)
    spec = METHODS[method]
    balancer = None if spec is None else balance.get(spec[0], **spec[1]).to(device)
    ddp_reduces = method.endswith("@ddp") and world > 1
    task_features = isinstance(balancer, GradientBalancer) and hasattr(model, "expose_task_features")
    if task_features:
        model.expose_task_features()
    step_model = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(list(model.parameters()) + ([] if balancer is None else
                                                       [p for p in balancer.parameters() if p.requires_grad]))
    params = [p for p in model.parameters() if p.requires_grad]
    shared = list(model.shared_parameters())

    def step(i: int) -> None:
        start = (i % pool) * args.batch
        xb = x[start + lo:start + hi].to(device)
        yb = {k: v[start + lo:start + hi].to(device) for k, v in y.items()}
        opt.zero_grad(set_to_none=True)
        if balancer is None:  # plain DDP: its reducer all-reduces during backward
            out = step_model(xb)
            sum(t.loss(out[t.name], yb[t.name]) for t in tasks).backward()
            opt.step()
            return
        sync = step_model.no_sync() if world > 1 and not ddp_reduces else nullcontext()
        with sync:
            out = step_model(xb)
            losses = {t.name: t.loss(out[t.name], yb[t.name]) for t in tasks}
            extra = {"task_features": model.task_features} if task_features else {}
            kw = {"process_group": ctx.group, "counts": [float(hi - lo)] * len(tasks),
                  "parameters": params} if world > 1 else {}
            if ddp_reduces:
                kw["reduce_gradients"] = False
            balancer.backward(losses, shared=shared, features=getattr(model, "shared_features", None),
                              **extra, **kw)
        opt.step()
        if balancer.needs_post_step_losses:
            with torch.no_grad():
                out = model(xb)
                after = {t.name: t.loss(out[t.name], yb[t.name]) for t in tasks}
            balancer.post_step(after, **({"process_group": ctx.group, "counts": kw["counts"]}
                                         if world > 1 else {}))

    return step, balancer, params


# ---------------------------------------------------------------------------- launcher and table
def launch(world: int, argv: list[str], out: Path) -> dict[str, dict[str, float]]:
    """Run this script's worker in ``world`` processes (torchrun's elastic launcher)."""
    if world == 1:
        return run_rank(parse_args(argv))
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=f"scale-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, local_addr="127.0.0.1")
    elastic_launch(config, sys.executable)(str(Path(__file__).resolve()), *argv, "--worker", str(out))
    return json.loads(out.read_text())


def table(results: dict[int, dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [f"global batch {args.batch}, {args.tasks} tasks, input {args.input}, {args.rounds} interleaved rounds x "
             f"{args.steps} timed steps (median of round medians; vs ddp-ew, vs ew: medians of per-round paired ratios), "
             f"device {args.device}, 1 thread per process, load average at the end {load}",
             "| arch | method | world | samples/s | step ms | comm bytes/step | vs ddp-ew | vs ew |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in next(iter(results.values())):
        arch, method = key.split("|")
        for world, res in results.items():
            if key not in res:
                continue
            r = res[key]
            ratio = f"{r['vs_ddp_ew']:.2f}x" if r["vs_ddp_ew"] == r["vs_ddp_ew"] else "-"
            ratio_ew = f"{r['vs_ew']:.2f}x" if r["vs_ew"] == r["vs_ew"] else "-"
            lines.append(f"| {arch} | {method} | {world} | {r['samples_s']:.0f} | {r['step_ms']:.2f} | "
                         f"{int(r['comm_bytes'])} | {ratio} | {ratio_ew} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.worker:  # one rank of a launch: rank 0 writes the results
        res = run_rank(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.worker).write_text(json.dumps(res))
        # leave before the interpreter's teardown, which gloo's threads can abort (as polytask.cli.main does)
        sys.stdout.flush()
        os._exit(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in args.world.split(",")):
            results[world] = launch(world, argv, Path(tmp) / f"world{world}.json")
    print(table(results, args))


if __name__ == "__main__":
    main()
