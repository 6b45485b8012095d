"""Speed of the edge-network convolution on QM9 batches: polytask's factorised
``EdgeNetworkConv`` against ``torch_geometric.nn.NNConv`` (same parameters, same outputs), and of
a whole MPNN training step with each.

    python benchmarks/qm9_mpnn_conv.py [--threads 1] [--repeats 5] [--batch 120]

Prints medians over ``--repeats`` batches of forward+backward wall and CPU time and the ratio.
CPU time is reported because a shared machine's wall time depends on its other users.
Needs the ``qm9`` extra (qm9pack, rdkit, torch_geometric).
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
    batches = [graphs.batch(perm[i * args.batch:(i + 1) * args.batch]) for i in range(args.repeats + 1)]

    torch.manual_seed(0)
    ours = EdgeNetworkConv(64, 64, 5, 128)
    edge_net = torch.nn.Sequential(torch.nn.Linear(5, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64 * 64))
    ref = NNConv(64, 64, edge_net, aggr="mean")
    ref.load_state_dict(ours.state_dict())
    tasks = [Task(t, "regression") for t in TARGETS]
    mpnn_ours = MPNN(11, tasks)
    mpnn_ref = MPNN(11, tasks, conv="pyg")
    mpnn_ref.load_state_dict(mpnn_ours.state_dict())

    def conv_step(conv, b, x):
        if isinstance(conv, EdgeNetworkConv):
            out = conv(x, b.edge_index, b.edge_attr, b.batch, b.num_graphs, b.max_nodes)
        else:
            out = conv(x, b.edge_index, b.edge_attr)
        out.square().mean().backward()

    def model_step(model, b):
        out = model(b)
        torch.stack([v.square().mean() for v in out.values()]).sum().backward()

    rows = []
    for label, make in [
        ("one convolution (fwd+bwd)", lambda m, b: conv_step(m, b, torch.randn(b.x.shape[0], 64, requires_grad=True))),
        ("MPNN training step (fwd+bwd)", model_step),
    ]:
        pair = (ours, ref) if label.startswith("one") else (mpnn_ours, mpnn_ref)
        times = {}
        for name, module in zip(("polytask", "torch_geometric"), pair):
            make(module, batches[0])  # warm-up
            samples = [timed(lambda b=b: make(module, b)) for b in batches[1:]]
            times[name] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))
        rows.append((label, times))

    mean_atoms = sum(b.x.shape[0] for b in batches) / len(batches)
    mean_edges = sum(b.edge_index.shape[1] for b in batches) / len(batches)
    print(f"QM9 batches of {args.batch} molecules (~{mean_atoms:.0f} atoms, ~{mean_edges:.0f} edges), "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'':32} {'polytask wall/CPU s':>22} {'NNConv wall/CPU s':>22} {'speed-up (CPU)':>15}")
    for label, t in rows:
        (ow, oc), (rw, rc) = t["polytask"], t["torch_geometric"]
        print(f"{label:32} {ow:10.3f} / {oc:8.3f} {rw:10.3f} / {rc:8.3f} {rc / oc:14.1f}x")


if __name__ == "__main__":
    main()
