"""Speed of the edge-network convolution on QM9 batches: polytask's factorised
``EdgeNetworkConv`` (padded per-molecule layout, and unpadded size groups from a ``by_size``
batch) against ``torch_geometric.nn.NNConv`` (same parameters, same outputs), for one
convolution and for a whole MPNN training step.

    python benchmarks/qm9_mpnn_conv.py [--threads 1] [--repeats 5] [--batch 120]

Prints medians over ``--repeats`` batches of forward+backward wall and CPU time and the CPU-time
speed-up over NNConv. CPU time is reported because a shared machine's wall time depends on its
other users. Needs the ``qm9`` extra (qm9pack, rdkit, torch_geometric).

Measured 2026-11-23 on the 2-core CPU box (other jobs running), ``--threads 1 --repeats 3``
(~2174 atoms, ~38185 edges per batch of 120); wall / CPU seconds, CPU speed-up vs NNConv:

| | one convolution (fwd+bwd) | MPNN training step |
|---|---:|---:|
| NNConv (torch_geometric) | 2.420 / 2.404 (1.0x) | 7.673 / 7.183 (1.0x) |
| factorised, padded | 0.865 / 0.514 (4.7x) | 1.355 / 1.346 (5.3x) |
| factorised, size groups | 0.196 / 0.193 (12.4x) | 0.455 / 0.455 (15.8x) |

Whole epochs of ``polytask bench qm9 --balancer ls --train-size 20000`` (167 steps of 120 + the
10k validation molecules; the same box): before the size groups (padded path, evaluation in
batches of 250) one epoch took 337 s CPU with ``--threads 1`` (728 s wall on the loaded box);
after, the median epoch of a 30-epoch run took 99 s CPU / 103 s wall with ``--threads 1`` (whole
run 59:40 wall, 85 % of one core, Δm% +861.6, best epoch 29), and one epoch with ``--threads 2``
took 75 s wall (148 s CPU). With the box idle, 12 steps timed 251 ms each with 2 threads (441 ms
with 1) and the validation pass 5.8 s: ~48 s per epoch. With other jobs on the cores, 2 threads
are slower than 1 unless ``OMP_WAIT_POLICY=PASSIVE`` is set (1158 vs 605 ms per step, 628 ms
with PASSIVE). On an H100 (batch 120 on the device) a training step takes 16.5 ms with the padded
layout, 39.7 ms with size groups and 17.2 ms with NNConv, so ``bench qm9`` uses size groups on a
CPU only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=120)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from torch_geometric.nn import NNConv

    from polytask.data.qm9 import TARGETS, load_qm9
    from polytask.nn.mpnn import MPNN, EdgeNetworkConv
    from polytask.tasks import Task

    graphs = load_qm9()  # built and cached on first use
    perm = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(0))
    mols = [perm[i * args.batch:(i + 1) * args.batch] for i in range(args.repeats + 1)]
    padded = [graphs.batch(m) for m in mols]
    grouped = [graphs.batch(m, by_size=True) for m in mols]

    torch.manual_seed(0)
    ours = EdgeNetworkConv(64, 64, 5, 128)
    edge_net = torch.nn.Sequential(torch.nn.Linear(5, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64 * 64))
    ref = NNConv(64, 64, edge_net, aggr="mean")
    ref.load_state_dict(ours.state_dict())
    tasks = [Task(t, "regression") for t in TARGETS]
    mpnn_ours = MPNN(11, tasks)
    mpnn_ref = MPNN(11, tasks, conv="pyg")
    mpnn_ref.load_state_dict(mpnn_ours.state_dict())

    def conv_padded(b):
        x = torch.randn(b.x.shape[0], 64, requires_grad=True)
        ours(x, b.edge_index, b.edge_attr, b.batch, b.num_graphs, b.max_nodes).square().mean().backward()

    def conv_grouped(b):
        x = torch.randn(b.x.shape[0], 64, requires_grad=True)
        ours.propagate(x, ours.grouped_context(b.pair_attr, b.groups)).square().mean().backward()

    def conv_pyg(b):
        x = torch.randn(b.x.shape[0], 64, requires_grad=True)
        ref(x, b.edge_index, b.edge_attr).square().mean().backward()

    def step(model):
        def run(b):
            out = model(b)
            torch.stack([v.square().mean() for v in out.values()]).sum().backward()
        return run

    variants = {  # name: (one convolution, training step, batches)
        "NNConv (torch_geometric)": (conv_pyg, step(mpnn_ref), padded),
        "factorised, padded": (conv_padded, step(mpnn_ours), padded),
        "factorised, size groups": (conv_grouped, step(mpnn_ours), grouped),
    }
    rows = []
    for name, (conv, train, batches) in variants.items():
        times = []
        for fn in (conv, train):
            fn(batches[0])  # warm-up
            samples = [timed(lambda b=b: fn(b)) for b in batches[1:]]
            times.append((statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)))
        rows.append((name, times))

    mean_atoms = sum(b.x.shape[0] for b in padded) / len(padded)
    mean_edges = sum(b.edge_index.shape[1] for b in padded) / len(padded)
    print(f"QM9 batches of {args.batch} molecules (~{mean_atoms:.0f} atoms, ~{mean_edges:.0f} edges), "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}; wall / CPU seconds, CPU speed-up vs NNConv")
    print(f"{'':26} {'one convolution (fwd+bwd)':>36} {'MPNN training step (fwd+bwd)':>36}")
    base = rows[0][1]
    for name, t in rows:
        cells = [f"{w:8.3f} / {c:7.3f} {base[i][1] / c:7.1f}x" for i, (w, c) in enumerate(t)]
        print(f"{name:26} {cells[0]:>36} {cells[1]:>36}")


if __name__ == "__main__":
    main()
