"""What one QM9 training step's balanced backward costs, per balancer, against LS.

The model and batch of ``polytask bench qm9`` (Gilmer et al. 2017 MPNN, 11 targets, the first
``--batch`` training molecules of seed 0's split); for each balancer in ``--balancers`` a forward
pass, then ``balancer.backward(...)`` timed in CPU seconds of this process (``time.process_time``:
the machine may be shared, CPU time is ours). Every balancer is timed round-robin (one step of each
per round, ``--repeats`` rounds), and the table gives the median per balancer and the median over
rounds of its ratio to LS in the same round.

Parameter-level methods need one backward per task through the trunk (11 here), so about 11x LS
is their floor; ``--param mode=features`` puts the gradient methods on the 64-wide shared
features instead.

Needs ``polytask[qm9]`` and the processed set in the cache (``polytask bench qm9`` builds it).

    python benchmarks/qm9_step_cost.py --balancers ls,db_mtl,moco,excess_mtl,nash_mtl --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)
import yaml  # noqa: E402

from polytask.bench import qm9 as bench  # noqa: E402
from polytask.data.qm9 import load_qm9  # noqa: E402
from polytask.nn.mpnn import MPNN  # noqa: E402
from polytask.tasks import Task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--balancers", default="ls,db_mtl,moco,excess_mtl,nash_mtl,mgda,famo")
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE to every balancer that takes it")
    parser.add_argument("--batch", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = {k: yaml.safe_load(v) for k, _, v in (p.partition("=") for p in args.param)}
    names = ["ls", *[n for n in args.balancers.split(",") if n != "ls"]]

    graphs = load_qm9(None, progress=False)
    split = bench.split_indices(len(graphs), 0, test=10_000, val=10_000, train=20_000)
    y = graphs.y.float()
    y = (y - y[split["train"]].mean(0)) / y[split["train"]].std(0)
    tasks = [Task(t, "regression") for t in bench.TARGETS]
    torch.manual_seed(0)
    model = MPNN(graphs.x.shape[1], tasks)
    batch = next(iter(graphs.batches(split["train"][: args.batch], args.batch, shuffle=False, y=y,
                                     by_size=model.conv_kind == "factorised")))
    shared = list(model.shared_parameters())
    balancers = {n: bench.make_balancer(n, bench.params_accepted_by(n, params), seed=0) for n in names}

    def step(bal) -> float:
        out = model(batch)
        losses = {t.name: t.loss(out[t.name], batch.y[:, i]) for i, t in enumerate(tasks)}
        model.zero_grad(set_to_none=True)
        start = time.process_time()
        bal.backward(losses, shared=shared, features=model.shared_features)
        return time.process_time() - start

    for bal in balancers.values():  # warm-up: first-step state, graph walks
        step(bal)
    rounds = [{n: step(b) for n, b in balancers.items()} for _ in range(args.repeats)]
    print(f"QM9 MPNN, 11 targets, batch {args.batch}, {args.threads} thread(s), {args.repeats} rounds"
          f"{', ' + ', '.join(args.param) if args.param else ''}")
    print(f"{'balancer':16} {'backward CPU s':>15} {'/ LS (paired)':>14}")
    for n in names:
        median = statistics.median(r[n] for r in rounds)
        ratio = statistics.median(r[n] / r["ls"] for r in rounds)
        print(f"{n:16} {median:15.3f} {ratio:14.2f}")


if __name__ == "__main__":
    main()
