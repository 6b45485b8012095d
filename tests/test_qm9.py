"""QM9 benchmark: graph features against hand-derived values, the MPNN against PyG's NNConv,
a tiny end-to-end run and the bad inputs."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from polytask.errors import ConfigError

SAMPLE = Path(__file__).parent / "data" / "qm9" / "sample.csv"
HARTREE_MEV = 27.211386246 * 1000  # CODATA 2014, as PyG


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP spin-waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def frame():
    pd = pytest.importorskip("pandas")
    return pd.read_csv(SAMPLE)


@pytest.fixture(scope="module")
def graphs(frame):
    pytest.importorskip("rdkit")
    from polytask.data.qm9 import build_graphs

    return build_graphs(frame, progress=False)


def _mol(graphs, frame, smiles):
    """(row, atoms slice, local bonds {(i, j): type}, kekule types) of the molecule ``smiles``."""
    row = int(frame.index[frame.SMILES == smiles][0])
    a0, a1 = int(graphs.atom_ptr[row]), int(graphs.atom_ptr[row + 1])
    b0, b1 = int(graphs.bond_ptr[row]), int(graphs.bond_ptr[row + 1])
    bonds = {tuple(sorted(map(int, graphs.bonds[k]))): int(graphs.bond_type[k]) for k in range(b0, b1)}
    kek = {tuple(sorted(map(int, graphs.bonds[k]))): int(graphs.bond_type_kekule[k]) for k in range(b0, b1)}
    return row, slice(a0, a1), bonds, kek


def _coords(frame, row):
    return [list(map(float, p)) for p in ast.literal_eval(frame.XYZ_Ang[row])]


# x columns: H C N O F | Z | aromatic | sp sp2 sp3 | num_hs
H_ROW = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]


# ----------------------------------------------------------------------------- features
def test_methane_atoms_bonds_and_distances(graphs, frame):
    row, atoms, bonds, _ = _mol(graphs, frame, "C")
    x = graphs.x[atoms]
    assert x.shape == (5, 11)
    assert x[0].tolist() == [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4]  # sp3 carbon with 4 H
    assert all(r == H_ROW for r in x[1:].tolist())
    assert bonds == {(0, 1): 0, (0, 2): 0, (0, 3): 0, (0, 4): 0}  # four single C-H
    batch = graphs.batch(torch.tensor([row]))
    assert batch.edge_index.shape == (2, 20)  # 5 * 4 ordered pairs, no self loops
    xyz = _coords(frame, row)
    for (s, d), attr in zip(batch.edge_index.t().tolist(), batch.edge_attr.tolist()):
        assert attr[4] == pytest.approx(math.dist(xyz[s], xyz[d]), abs=1e-5)
        assert attr[:4] == ([1, 0, 0, 0] if 0 in (s, d) else [0, 0, 0, 0])  # H-H pairs: no bond


def test_bond_orders_hybridisation_and_h_counts(graphs, frame):
    _, atoms, bonds, _ = _mol(graphs, frame, "C#C")
    x = graphs.x[atoms]
    assert bonds[(0, 1)] == 2  # triple
    assert x[0].tolist() == [0, 1, 0, 0, 0, 6, 0, 1, 0, 0, 1] == x[1].tolist()  # sp, one H each
    _, atoms, bonds, _ = _mol(graphs, frame, "C=O")
    x = graphs.x[atoms]
    assert bonds[(0, 1)] == 1  # double
    assert x[0].tolist() == [0, 1, 0, 0, 0, 6, 0, 0, 1, 0, 2]  # sp2 carbon, two H
    assert x[1].tolist() == [0, 0, 0, 1, 0, 8, 0, 0, 1, 0, 0]  # sp2 oxygen
    _, atoms, bonds, _ = _mol(graphs, frame, "O")
    assert graphs.x[atoms][0].tolist() == [0, 0, 0, 1, 0, 8, 0, 0, 0, 1, 2]
    _, atoms, bonds, _ = _mol(graphs, frame, "FC(F)(F)F")
    x = graphs.x[atoms]
    assert x[:, 4].sum() == 4 and (x[x[:, 4] == 1][:, 5] == 9).all()
    assert sorted(bonds.values()) == [0, 0, 0, 0]


def test_aromatic_ring_and_kekule_form(graphs, frame):
    _, atoms, bonds, kek = _mol(graphs, frame, "N1C=CC=C1")  # pyrrole
    x = graphs.x[atoms]
    ring = [i for i, r in enumerate(x.tolist()) if r[0] == 0]
    assert len(ring) == 5 and all(x[i, 6] == 1 and x[i, 8] == 1 for i in ring)  # aromatic, sp2
    n = [i for i in ring if x[i, 2] == 1][0]
    assert x[n, 10] == 1  # N-H
    ring_bonds = [b for b in bonds if b[0] in ring and b[1] in ring]
    assert len(ring_bonds) == 5 and all(bonds[b] == 3 for b in ring_bonds)
    assert sorted(kek[b] for b in ring_bonds) == [0, 0, 0, 1, 1]  # Kekulé: 3 single, 2 double
    pyg = graphs.pyg_compatible()
    assert pyg.x[:, 6:10].abs().sum() == 0 and not (pyg.bond_type == 3).any()


def test_reordered_and_strained_molecules_get_correct_bonds(graphs, frame):
    from polytask.data.qm9 import SOURCE_SMILES_MATCH

    # butadiyne's atoms are listed in another order than its SMILES: matched atom by atom
    row, atoms, bonds, _ = _mol(graphs, frame, "C#CC#C")
    assert int(graphs.source[row]) == SOURCE_SMILES_MATCH
    xyz = _coords(frame, row)
    cc = {b: t for b, t in bonds.items() if graphs.x[atoms][b[0], 1] == 1 and graphs.x[atoms][b[1], 1] == 1}
    assert sorted(cc.values()) == [0, 2, 2]
    for (i, j), t in cc.items():  # triple bonds are the short ones (1.21 Å vs 1.37 Å)
        assert (math.dist(xyz[i], xyz[j]) < 1.25) == (t == 2)
    # bicyclo[1.1.1]pentane: the short transannular C...C distance is not a bond
    _, atoms, bonds, _ = _mol(graphs, frame, "C1C2CC1C2")
    x = graphs.x[atoms]
    assert x.shape[0] == 13 and len(bonds) == 6 + 8
    assert (x[x[:, 1] == 1][:, 9] == 1).all()  # every carbon sp3


def test_fast_path_agrees_with_atom_by_atom_matching(graphs, frame):
    """The vectorised path (SMILES order + nearest heavy atom for H) gives the same bonds and
    features as mapping each molecule by substructure matching."""
    import numpy as np

    from polytask.data.qm9 import SOURCE_SMILES_ORDER, _match_molecule

    checked = 0
    for row in range(len(frame)):
        if int(graphs.source[row]) != SOURCE_SMILES_ORDER:
            continue
        a0, a1 = int(graphs.atom_ptr[row]), int(graphs.atom_ptr[row + 1])
        types = graphs.x[a0:a1, :5].argmax(1).numpy()
        source, feats = _match_molecule(frame.SMILES[row], types, graphs.pos[a0:a1].double().numpy())
        assert source != 2, frame.SMILES[row]
        np.testing.assert_array_equal(feats["aromatic"], graphs.x[a0:a1, 6].numpy())
        np.testing.assert_array_equal(np.eye(4)[feats["hyb"]][:, 1:], graphs.x[a0:a1, 7:10].numpy())
        b0, b1 = int(graphs.bond_ptr[row]), int(graphs.bond_ptr[row + 1])
        ours = {tuple(sorted(map(int, graphs.bonds[k]))): int(graphs.bond_type[k]) for k in range(b0, b1)}
        theirs = {tuple(sorted((int(i), int(j)))): int(t) for i, j, t, _ in feats["bonds"]}
        assert ours == theirs, frame.SMILES[row]
        checked += 1
    assert checked >= 18


def test_targets_in_published_units(graphs, frame):
    from polytask.data.qm9 import TARGETS

    row = int(frame.index[frame.SMILES == "C"][0])
    y = dict(zip(TARGETS, graphs.y[row].tolist()))
    # free-atom energies of H and C (Ramakrishnan et al. 2014, atomref table), Hartree
    ref = {"U0": (-0.500273, -37.846772), "U": (-0.498857, -37.845355),
           "H": (-0.497912, -37.844411), "G": (-0.510927, -37.861317)}
    total = {"U0": -40.47893, "U": -40.476062, "H": -40.475117, "G": -40.498597}
    for k in ref:
        assert y[k] == pytest.approx((total[k] - 4 * ref[k][0] - ref[k][1]) * HARTREE_MEV, abs=1e-6)
    assert y["U0"] == pytest.approx(-17172.2, abs=0.5)  # methane atomization energy, -17.17 eV
    assert y["homo"] == pytest.approx(-0.3877 * HARTREE_MEV)
    assert y["lumo"] == pytest.approx(0.1171 * HARTREE_MEV)
    assert y["zpve"] == pytest.approx(0.044749 * HARTREE_MEV)
    assert (y["mu"], y["alpha"], y["r2"], y["cv"]) == pytest.approx((0.0, 13.21, 35.3641, 6.469))


def test_batch_layout_and_subset(graphs, frame):
    rows = [int(frame.index[frame.SMILES == s][0]) for s in ("C", "O")]
    batch = graphs.batch(torch.tensor(rows))
    assert batch.x.shape[0] == 8 and batch.edge_index.shape[1] == 20 + 6
    assert batch.batch.tolist() == [0] * 5 + [1] * 3 and batch.ptr.tolist() == [0, 5, 8]
    assert batch.max_nodes == 5
    water = batch.edge_attr[20:]
    assert water[:, :4].sum() == 4  # 2 O-H bonds, both directions; the H...H pair has none
    sub = graphs.subset(torch.tensor(rows[::-1]))
    assert torch.equal(sub.batch(torch.tensor([1, 0])).edge_attr, batch.edge_attr)


def test_split_is_seeded_disjoint_and_sized():
    from polytask.data.qm9 import split_indices

    a, b = split_indices(100, 3, test=10, val=20, train=30), split_indices(100, 3, test=10, val=20, train=30)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("test", "val", "train")] == [10, 20, 30]
    assert len(torch.cat(list(a.values())).unique()) == 60
    assert not torch.equal(split_indices(100, 4, 10, 20)["test"], a["test"])
    with pytest.raises(ConfigError, match="no training molecule"):
        split_indices(30, 0, test=10, val=20)


def test_cache_is_written_once_and_reloaded(frame, tmp_path, monkeypatch):
    pytest.importorskip("rdkit")
    from polytask.data import qm9

    monkeypatch.setattr(qm9, "read_qm9pack", lambda nrows=None: frame)
    first = qm9.load_qm9(tmp_path, progress=False, workers=1)
    assert (tmp_path / qm9._CACHE_NAME).is_file()

    def fail(nrows=None):
        raise AssertionError("rebuilt instead of loading the cache")

    monkeypatch.setattr(qm9, "read_qm9pack", fail)
    again = qm9.load_qm9(tmp_path, progress=False)
    assert all(torch.equal(v, again.state()[k]) for k, v in first.state().items())
    # a cached set loads where the packages that build it (qm9pack, RDKit) are not installed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("qm9pack", "rdkit") else real(name, *a))
    again = qm9.load_qm9(tmp_path, progress=False)
    assert all(torch.equal(v, again.state()[k]) for k, v in first.state().items())


# ----------------------------------------------------------------------------- model
def test_edge_network_conv_equals_pyg_nnconv():
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import NNConv

    from polytask.nn.mpnn import EdgeNetworkConv

    gen = torch.Generator().manual_seed(0)
    sizes = [3, 5, 2]
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    # a sparse, irregular edge set with one duplicated edge and an isolated node (graph 2, node 1)
    edges = [(0, 1), (1, 0), (2, 0), (3, 4), (4, 5), (5, 6), (7, 3), (6, 4), (4, 3), (8, 8), (3, 4)]
    edge_index = torch.tensor(edges).t()
    edge_attr = torch.randn(len(edges), 5, generator=gen)
    conv = EdgeNetworkConv(6, 4, edge_dim=5, hidden=7)
    ref = NNConv(6, 4, torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 24)), aggr="mean")
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(10, 6, generator=gen, requires_grad=True)
    ours = conv(x, edge_index, edge_attr, batch, num_graphs=3, max_nodes=5)
    theirs = ref(x, edge_index, edge_attr)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(ours.square().sum(), [x, *conv.parameters()])
    g2 = torch.autograd.grad(theirs.square().sum(), [x, *ref.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _complete_graphs(sizes, gen):
    """Complete graphs of ``sizes`` (sorted) with random symmetric edge features: the edge list
    (PyG layout), the pair layout of a ``by_size`` batch and its groups."""
    feats, src, dst, start = [], [], [], 0
    for n in sizes:
        block = torch.randn(n, n, 5, generator=gen)
        block = block + block.transpose(0, 1)
        feats.append(block.reshape(n * n, 5))
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = (i != j).reshape(-1)
        src.append(start + i.reshape(-1)[keep])
        dst.append(start + j.reshape(-1)[keep])
        start += n
    pair_attr = torch.cat(feats)
    off_diagonal = torch.cat([(torch.arange(n * n) % (n + 1)) != 0 for n in sizes])
    edge_index = torch.stack([torch.cat(src), torch.cat(dst)])
    groups = tuple((sizes.count(n), n) for n in sorted(set(sizes)))
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return edge_index, pair_attr[off_diagonal], pair_attr, groups, batch


@pytest.mark.parametrize("chunk_atoms", [5, 192])
def test_grouped_conv_equals_padded_conv_and_pyg_nnconv(chunk_atoms):
    """The unpadded size-group path (self pairs masked, blocks of at most ``chunk_atoms`` rows)
    computes NNConv's mean-aggregated messages, with a 1-atom graph that has no neighbour."""
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import NNConv

    from polytask.nn.mpnn import EdgeNetworkConv

    gen = torch.Generator().manual_seed(1)
    sizes = [1, 1, 3, 4, 4, 4]
    edge_index, edge_attr, pair_attr, groups, batch = _complete_graphs(sizes, gen)
    conv = EdgeNetworkConv(6, 4, edge_dim=5, hidden=7, chunk_atoms=chunk_atoms)
    ref = NNConv(6, 4, torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 24)), aggr="mean")
    ref.load_state_dict(conv.state_dict())
    torch.nn.init.normal_(conv.bias)  # a non-zero bias must reach every node, isolated ones too
    ref.bias.data.copy_(conv.bias.data)
    x = torch.randn(sum(sizes), 6, generator=gen, requires_grad=True)
    ctx = conv.grouped_context(pair_attr, groups)
    if chunk_atoms == 5:
        assert ctx.groups == [(2, 1), (1, 3), (1, 4), (1, 4), (1, 4)]  # blocks of <= 5 atoms
    grouped = conv.propagate(x, ctx)
    padded = conv(x, edge_index, edge_attr, batch, num_graphs=len(sizes), max_nodes=4)
    theirs = ref(x, edge_index, edge_attr)
    torch.testing.assert_close(grouped, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[:2], conv.lin(x[:2]) + conv.bias)  # no neighbour: root + bias
    g1 = torch.autograd.grad(grouped.square().sum(), [x, *conv.parameters()])
    g2 = torch.autograd.grad(theirs.square().sum(), [x, *ref.parameters()])
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_conv_with_few_distinct_inputs_equals_the_plain_sum():
    """``kinds=(table, kind)`` (x == table[kind], fewer rows than channels) applies W2 to the
    table's rows: same output and gradients as the plain grouped path on x."""
    from polytask.nn.mpnn import EdgeNetworkConv

    gen = torch.Generator().manual_seed(2)
    sizes = [2, 3, 3, 5]
    _, _, pair_attr, groups, _ = _complete_graphs(sizes, gen)
    conv = EdgeNetworkConv(6, 4, edge_dim=5, hidden=7)
    table = torch.randn(3, 6, generator=gen, requires_grad=True)
    kind = torch.randint(0, 3, (sum(sizes),), generator=gen)
    ctx = conv.grouped_context(pair_attr, groups)
    plain = conv.propagate(table[kind], ctx)
    by_kind = conv.propagate(table[kind], ctx, kinds=(table, kind))
    torch.testing.assert_close(by_kind, plain, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(plain.square().sum(), [table, *conv.parameters()], retain_graph=True)
    g2 = torch.autograd.grad(by_kind.square().sum(), [table, *conv.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_context_rejects_groups_that_do_not_cover_the_pairs():
    from polytask.errors import DataError
    from polytask.nn.mpnn import EdgeNetworkConv

    conv = EdgeNetworkConv(6, 4, edge_dim=5, hidden=7)
    with pytest.raises(DataError, match="groups cover 9 atom pairs but pair_attr has 13 rows"):
        conv.grouped_context(torch.zeros(13, 5), ((1, 3),))


def test_by_size_batch_layout(graphs):
    mols = torch.arange(len(graphs)).flip(0)
    plain, grouped = graphs.batch(mols), graphs.batch(mols, by_size=True)
    sizes = (grouped.ptr[1:] - grouped.ptr[:-1]).tolist()
    assert sizes == sorted((plain.ptr[1:] - plain.ptr[:-1]).tolist())
    assert [n for count, n in grouped.groups for _ in range(count)] == sizes
    # the same molecules and targets, reordered by size (stable)
    order = torch.sort(graphs.num_atoms[mols], stable=True).indices
    assert torch.equal(grouped.y, graphs.y[mols[order]])
    assert grouped.pair_attr.shape[0] == sum(n * n for n in sizes)
    # the edge list is the pair layout without its diagonal, in the same order
    first = torch.cat([torch.tensor([0]), torch.tensor([n * n for n in sizes]).cumsum(0)[:-1]])
    diagonal = torch.cat([f + torch.arange(n) * (n + 1) for f, n in zip(first.tolist(), sizes)])
    keep = torch.ones(grouped.pair_attr.shape[0], dtype=torch.bool)
    keep[diagonal] = False
    assert torch.equal(grouped.pair_attr[keep], grouped.edge_attr)
    assert grouped.pair_attr[diagonal].abs().sum() == 0
    assert plain.groups is None and plain.pair_attr is None
    assert torch.equal(grouped.kinds[grouped.atom_kind], grouped.x)
    assert len(grouped.kinds) == len(torch.unique(graphs.x, dim=0))


def test_mpnn_shape_parameters_and_pyg_path(graphs):
    pytest.importorskip("torch_geometric")
    from polytask.data.qm9 import TARGETS
    from polytask.nn.mpnn import MPNN
    from polytask.tasks import Task

    tasks = [Task(t, "regression") for t in TARGETS]
    torch.manual_seed(0)
    model = MPNN(11, tasks)
    # hand count: lin0 11*64+64; edge net 5*128+128 + 128*4096+4096; root 64*64; bias 64;
    # GRU 3*(2*64*64 + 2*64); Set2Set LSTM(128->64) 4*64*(128+64) + 2*4*64; lin1 128*64+64
    shared = 768 + (768 + 528384 + 4096 + 64) + 24960 + (49152 + 512) + 8256
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    assert sum(p.numel() for p in model.task_specific_parameters()) == 11 * 65
    batch = graphs.batch(torch.arange(6))
    out = model(batch)
    assert list(out) == list(TARGETS) and out["mu"].shape == (6, 1)
    assert model.shared_features.shape == (6, 64)
    reference = MPNN(11, tasks, conv="pyg")
    reference.load_state_dict(model.state_dict())
    theirs = reference(batch)
    for t in TARGETS:
        torch.testing.assert_close(out[t], theirs[t], rtol=1e-5, atol=1e-5)
    # the unpadded size-group path: same predictions, molecule by molecule, and same gradients
    mols = torch.arange(len(graphs))
    plain, grouped = graphs.batch(mols), graphs.batch(mols, by_size=True)
    order = torch.sort(graphs.num_atoms, stable=True).indices
    preds = []
    for net, data in ((model, grouped), (reference, plain)):
        net.zero_grad()
        out = net(data)
        preds.append(torch.cat([out[t] for t in TARGETS], dim=1))
        (preds[-1] * torch.linspace(-1, 1, 11)).sum().backward()
    torch.testing.assert_close(preds[0], preds[1][order], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- end to end
def test_tiny_run_end_to_end_is_reproducible(graphs):
    pytest.importorskip("torch_geometric")
    from polytask.bench import qm9 as bench

    kwargs = dict(graphs=graphs, epochs=1, val_size=4, test_size=4, batch_size=8, progress=False,
                  device="cpu", seeds=(0,))
    a = bench.run("ew", **kwargs)
    b = bench.run("ew", **kwargs)
    assert a.runs[0].test_mae == b.runs[0].test_mae  # same seed, same numbers
    mae = a.test_mae()
    assert set(mae) == set(a.targets) and all(math.isfinite(m) and m > 0 for m, _ in mae.values())
    assert a.runs[0].best_epoch == 0 and math.isfinite(a.delta_m()[0])
    text = bench.format_result(a)
    assert "LS: +177.6" in text and "Δm%" in text


def test_post_step_and_end_epoch_hooks_are_called(graphs):
    pytest.importorskip("torch_geometric")
    from polytask.balance.loss_weighting import EqualWeighting
    from polytask.balance.registry import BALANCERS
    from polytask.bench import qm9 as bench

    calls = {"post": [], "epochs": 0}

    class Spy(EqualWeighting):
        needs_post_step_losses = True

        def post_step(self, losses):
            calls["post"].append(sorted(losses))

        def end_epoch(self):
            calls["epochs"] += 1

    BALANCERS.register("test_qm9_spy")(Spy)
    try:
        bench.run("test_qm9_spy", graphs=graphs, epochs=2, val_size=4, test_size=4, batch_size=8,
                  progress=False, device="cpu", targets=["mu", "U0"])
    finally:
        del BALANCERS._entries["test_qm9_spy"]
    train = len(graphs) - 8
    assert len(calls["post"]) == 2 * math.ceil(train / 8) and calls["post"][0] == ["U0", "mu"]
    assert calls["epochs"] == 2


@pytest.mark.parametrize("balancer", ["famo", "random"])
def test_interrupted_run_resumes_to_the_same_result(graphs, tmp_path, monkeypatch, balancer):
    pytest.importorskip("torch_geometric")
    from polytask.bench import qm9 as bench

    kwargs = dict(balancer=balancer, epochs=3, train_size=16, val_size=4, test_size=4, batch_size=8,
                  device="cpu", progress=False, targets=["mu", "homo", "U0"])
    whole = bench.train_once(graphs, checkpoint=tmp_path / "whole.ckpt", **kwargs)

    real, calls = bench.evaluate_mae, []

    def killed_in_second_epoch(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # validation of epoch 1: the checkpoint holds epoch 0
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(bench, "evaluate_mae", killed_in_second_epoch)
    ckpt = tmp_path / "cut.ckpt"
    with pytest.raises(KeyboardInterrupt):
        bench.train_once(graphs, checkpoint=ckpt, **kwargs)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    monkeypatch.setattr(bench, "evaluate_mae", real)
    resumed = bench.train_once(graphs, checkpoint=ckpt, **kwargs)
    assert resumed.test_mae == whole.test_mae and resumed.best_epoch == whole.best_epoch
    assert len(resumed.epoch_seconds) == 3 and resumed.val_criterion == whole.val_criterion
    # the last epoch's weights, Adam and balancer states (in the final checkpoints) are the same too
    a, b = torch.load(tmp_path / "whole.ckpt", weights_only=True), torch.load(ckpt, weights_only=True)
    for part in ("model", "balancer"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part] if torch.is_tensor(a[part][k])), part
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in zip(a["optimizer"]["state"].values(),
                                                                      b["optimizer"]["state"].values()))

    # a finished checkpoint returns its result without training; other settings are refused
    monkeypatch.setattr(bench, "evaluate_mae", lambda *a, **k: pytest.fail("trained again"))
    assert bench.train_once(graphs, checkpoint=ckpt, **kwargs).test_mae == whole.test_mae
    with pytest.raises(ConfigError, match=r"checkpoint .*cut.ckpt is from other settings \(epochs 3 vs 4\)"):
        bench.train_once(graphs, checkpoint=ckpt, **{**kwargs, "epochs": 4})
    assert not list(tmp_path.glob("*.tmp"))


def test_single_task_baselines_and_comparison(graphs, tmp_path):
    pytest.importorskip("torch_geometric")
    pytest.importorskip("matplotlib")
    from polytask.bench import qm9 as bench

    kwargs = dict(graphs=graphs, epochs=1, val_size=4, test_size=4, batch_size=8, progress=False,
                  device="cpu", targets=["mu", "homo"])
    stl = bench.run_stl(**kwargs)
    ref = bench.stl_reference(stl)
    assert set(ref) == {"mu", "homo"}
    results, md, png = bench.run_all(tmp_path, ["ew", "uw"], reference=ref, reference_name="ours", **kwargs)
    assert md.is_file() and png.is_file() and png.stat().st_size > 1000
    text = md.read_text()
    assert "| ew |" in text and "| uw |" in text and "177.6" in text and "108.0" in text


def test_run_all_skips_only_methods_done_with_the_same_budget_and_parameters(monkeypatch, tmp_path):
    pytest.importorskip("torch_geometric")
    import functools

    from polytask.bench import qm9 as bench

    budget = dict(epochs=2, train_size=20, val_size=4, test_size=4, batch_size=8, lr=1e-3)
    for method in ("ew", "mgda"):
        bench.save_result(bench.QM9Result(method, ("mu",), [bench.SeedResult(0, 0, 0.0, {"mu": 1.0})], {"mu": 1.0},
                                          "unit", settings={**budget, "seeds": [0], "balancer_params": {}}),
                          tmp_path / f"qm9_{method}.json")
    trained = []

    @functools.wraps(bench.run)  # keeps run's signature: its defaults fill in what a call leaves out
    def fake_run(name, **kwargs):
        trained.append(name)
        return bench.QM9Result(name, ("mu",), [bench.SeedResult(0, 0, 0.0, {"mu": 2.0})], {"mu": 1.0}, "unit")

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "write_report", lambda out, results: (None, None))
    monkeypatch.setattr(bench, "save_result", lambda result, path: path)

    def rerun(**changes):
        trained.clear()
        bench.run_all(tmp_path, ["ew", "mgda"], graphs=object(), progress=False, **{**budget, **changes})
        return sorted(trained)

    assert rerun() == []
    assert rerun(seeds=(0,)) == []
    assert rerun(batch_size=16) == ["ew", "mgda"]
    assert rerun(val_size=10_000) == ["ew", "mgda"]
    without_test_size = {k: v for k, v in budget.items() if k != "test_size"}
    trained.clear()
    bench.run_all(tmp_path, ["ew"], graphs=object(), progress=False, **without_test_size)  # default 10,000 != 4
    assert trained == ["ew"]
    # mode=features goes to MGDA only (EW takes no such parameter), so only MGDA's saved run is stale
    assert rerun(balancer_params={"mode": "features"}) == ["mgda"]


def test_mean_ranks_hand_example():
    from polytask.bench.qm9 import QM9Result, SeedResult, mean_ranks

    def res(name, a, b):
        return QM9Result(name, ("mu", "alpha"), [SeedResult(0, 0, 0.0, {"mu": a, "alpha": b})], {}, "x")

    # mu: A best, B and C tied (2.5 each); alpha: C best, A second, B third
    ranks = mean_ranks([res("A", 1.0, 2.0), res("B", 2.0, 3.0), res("C", 2.0, 1.0)])
    assert ranks == pytest.approx([(1 + 2) / 2, (2.5 + 3) / 2, (2.5 + 1) / 2])


def _published_like(delta_m: dict[str, float], **settings):
    """Results whose Δm% against a unit reference is ``delta_m[method]`` (one target, mu)."""
    from polytask.bench.qm9 import QM9Result, SeedResult

    return [QM9Result(m, ("mu",), [SeedResult(0, 0, 0.0, {"mu": 1.0 + d / 100})], {"mu": 1.0}, "unit",
                      settings={"epochs": 5, "train_size": 20, **settings}) for m, d in delta_m.items()]


def test_ordering_against_published_hand_example():
    from polytask.bench.qm9 import ordering_against_published

    # published: FAMO 58.5 < Nash-MTL 62.0 < IMTL-G 77.2 < LS 177.6; ours swaps FAMO/Nash-MTL and puts LS first
    text = ordering_against_published(_published_like({"famo": 30, "nash_mtl": 20, "imtl_g": 40, "ls": 10, "dwa": 0}))
    assert "published FAMO < Nash-MTL < IMTL-G < LS; ours LS < Nash-MTL < FAMO < IMTL-G" in text
    # ranks ours (FAMO 3, Nash 2, IMTL-G 4, LS 1) vs published (1, 2, 3, 4): sum d^2 = 4+0+1+9 = 14
    rho = 1 - 6 * 14 / (4 * 15)
    # swapped pairs: (FAMO, Nash), (FAMO, LS), (Nash, LS), (IMTL-G, LS): tau = (6 - 2*4) / 6
    assert f"Spearman ρ = {rho:+.2f}, Kendall τ = {(6 - 8) / 6:+.2f}; 4 of 6 pairs" in text
    assert "Nash-MTL ahead of FAMO" in text and "LS ahead of IMTL-G" in text and "DWA" not in text
    same = ordering_against_published(_published_like({"famo": 1, "nash_mtl": 2, "ls": 3}))
    assert "Spearman ρ = +1.00, Kendall τ = +1.00; 0 of 3 pairs ordered the other way." in same
    assert ordering_against_published(_published_like({"famo": 1, "dwa": 2})) == ""


def test_report_combines_result_files_and_rejects_mixed_budgets(monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from polytask.bench import qm9 as bench

    for r in _published_like({"famo": 30, "nash_mtl": 20}):
        (tmp_path / f"qm9_{r.method}.json").write_text(json.dumps(r.to_json()))
    code, err = _cli(monkeypatch, capsys, "--report", "--out", str(tmp_path))
    assert code is None or code == 0, err
    text = (tmp_path / "qm9_comparison.md").read_text()
    assert "| nash_mtl |" in text and "| famo |" in text and "1 of 1 pairs ordered the other way" in text
    assert "| +30.0 ± 0.0 | 58.5 |" in text  # famo: MAE 1.3 against the unit reference
    # our single-task runs with the same budget (qm9_stl.json) become the reference: famo 1.3 vs 1.5
    [stl] = _published_like({"stl": 50})
    (tmp_path / "qm9_stl.json").write_text(json.dumps(stl.to_json()))
    [famo, nash] = bench.load_results(tmp_path)
    assert famo.reference == {"mu": 1.5} and famo.delta_m()[0] == pytest.approx((1.3 - 1.5) / 1.5 * 100)
    assert "our single-task runs" in bench.comparison_markdown([famo, nash])
    assert (tmp_path / "qm9_comparison.png").stat().st_size > 1000 and not list(tmp_path.glob("*.tmp*"))
    [odd_stl] = _published_like({"stl": 5}, epochs=30)
    (tmp_path / "qm9_stl.json").write_text(json.dumps(odd_stl.to_json()))
    with pytest.raises(ConfigError, match="qm9_stl.json and qm9_famo.json were run with different budgets"):
        bench.load_results(tmp_path)
    (tmp_path / "qm9_stl.json").unlink()
    [odd] = _published_like({"ls": 5}, epochs=30)
    (tmp_path / "qm9_ls.json").write_text(json.dumps(odd.to_json()))
    with pytest.raises(ConfigError, match="qm9_ls.json and qm9_famo.json were run with different budgets "
                                          r"\(epochs 5 vs 30\)"):
        bench.load_results(tmp_path)
    code, err = _cli(monkeypatch, capsys, "--report", "--out", str(tmp_path / "empty"))
    assert code == 2 and err.count("\n") == 0 and "no result files" in err


def _child_budget(graphs, tmp_path) -> list[str]:
    """CLI flags for a tiny budget whose child processes load ``graphs`` from a cache in ``tmp_path``."""
    from polytask.data import qm9

    torch.save(graphs.state(), tmp_path / qm9._CACHE_NAME)
    return ["--epochs", "1", "--train-size", "8", "--val-size", "4", "--test-size", "4", "--batch-size", "8",
            "--targets", "mu,homo", "--threads", "1", "--device", "cpu", "--cache-dir", str(tmp_path)]


def test_workers_run_each_method_in_its_own_process(graphs, monkeypatch, capsys, tmp_path):
    pytest.importorskip("torch_geometric")
    pytest.importorskip("matplotlib")
    from polytask.bench import qm9 as bench
    budget = _child_budget(graphs, tmp_path)
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, "--all", "--balancers", "ew,uw", "--workers", "2", "--out", str(out), *budget)
    assert code in (None, 0), err
    for name in ("ew", "uw"):
        done = bench.QM9Result.from_json(json.loads((out / f"qm9_{name}.json").read_text()))
        assert done.method == name and done.settings["train_size"] == 8 and done.targets == ("mu", "homo")
        assert (out / f"log_{name}.txt").is_file()
    # the same as a run in this process (same seed, same budget)
    here = bench.run("uw", graphs=graphs, epochs=1, train_size=8, val_size=4, test_size=4, batch_size=8,
                     targets=["mu", "homo"], device="cpu", progress=False)
    there = bench.QM9Result.from_json(json.loads((out / "qm9_uw.json").read_text()))
    assert there.runs[0].test_mae == pytest.approx(here.runs[0].test_mae, rel=1e-5)
    table = (out / "qm9_comparison.md").read_text()
    assert "| ew |" in table and "| uw |" in table
    # a child that fails is reported, and does not stop the others
    failed = bench.run_in_processes(out / "bad", ["ew"], 1, ["--epochs=0", f"--cache-dir={tmp_path}"])
    assert failed == ["ew"] and "epochs must be at least 1" in (out / "bad" / "log_ew.txt").read_text()
    code, err = _cli(monkeypatch, capsys, "--balancer", "ew", "--workers", "2", "--out", str(out))
    assert code == 2 and "--workers needs --all" in err
    assert "stl_" not in " ".join(p.name for p in out.iterdir())  # no single-task jobs without --stl


def test_stl_targets_run_as_worker_jobs_and_a_saved_stl_is_reused(graphs, monkeypatch, capsys, tmp_path):
    pytest.importorskip("torch_geometric")
    pytest.importorskip("matplotlib")
    from polytask.bench import qm9 as bench
    budget = _child_budget(graphs, tmp_path)
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, "--all", "--balancers", "ew", "--stl", "--workers", "2", "--out", str(out),
                     *budget)
    assert code in (None, 0), err
    assert (out / "log_stl_mu.txt").is_file() and (out / "log_stl_homo.txt").is_file()
    assert not list(out.glob("*.ckpt"))  # collected into qm9_stl.json, then removed
    there = bench.QM9Result.from_json(json.loads((out / "qm9_stl.json").read_text()))
    kwargs = dict(epochs=1, train_size=8, val_size=4, test_size=4, batch_size=8, device="cpu", progress=False)
    here = bench.run_stl(graphs=graphs, targets=["mu", "homo"], **kwargs)  # one process, one target after the other
    assert there.runs[0].test_mae == pytest.approx(here.runs[0].test_mae, rel=1e-5)
    ew = bench.QM9Result.from_json(json.loads((out / "qm9_ew.json").read_text()))
    ew_vs_stl = sum((ew.runs[0].test_mae[t] - here.runs[0].test_mae[t]) / here.runs[0].test_mae[t]
                    for t in ("mu", "homo")) / 2 * 100
    table = (out / "qm9_comparison.md").read_text()
    assert "our single-task runs (--stl)" in table and f"{ew_vs_stl:+.1f}" in table

    # a second --stl with the same budget reuses qm9_stl.json; another budget trains again
    def trained_again(**kw):
        raise RuntimeError("single-task runs trained again")

    monkeypatch.setattr(bench, "run_stl", trained_again)
    code, err = _cli(monkeypatch, capsys, "--balancer", "ew", "--stl", "--out", str(out), *budget)
    assert code in (None, 0), err
    with pytest.raises(RuntimeError, match="single-task runs trained again"):
        _cli(monkeypatch, capsys, "--balancer", "ew", "--stl", "--out", str(out), *budget, "--batch-size", "4")
    assert bench.saved_stl(out, targets=["mu"], seeds=[0], **kwargs) is not None
    assert bench.saved_stl(out, targets=["mu", "lumo"], seeds=[0], **kwargs) is None  # a target it lacks
    assert bench.saved_stl(out, targets=["mu"], seeds=[0, 1], **kwargs) is None


# ----------------------------------------------------------------------------- bad inputs
def test_unknown_target_and_balancer_are_clear_errors(graphs):
    from polytask.bench import qm9 as bench

    with pytest.raises(ConfigError, match="unknown target 'gap'"):
        bench.run("ew", graphs=graphs, targets=["mu", "gap"], epochs=1)
    with pytest.raises(ConfigError, match="unknown balancer 'nash_mlt'"):
        bench.run("nash_mlt", graphs=graphs, epochs=1)


def test_missing_qm9pack_is_a_clear_error(monkeypatch, tmp_path):
    from polytask.data import qm9

    monkeypatch.setenv("POLYTASK_CACHE_DIR", str(tmp_path))  # no cached set: it must be built

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else real(name, *a))
    with pytest.raises(ConfigError, match=r"qm9 needs the optional packages qm9pack: pip install 'polytask\[qm9\]'"):
        qm9.load_qm9()
    from polytask.bench import qm9 as bench

    with pytest.raises(ConfigError, match="qm9pack"):
        bench.run("ew", epochs=1)


def _cli(monkeypatch, capsys, *args):
    from polytask.cli import main

    monkeypatch.setattr("sys.argv", ["polytask", "bench", "qm9", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err.strip()


def test_cli_bad_inputs_exit_2_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("POLYTASK_CACHE_DIR", str(tmp_path))  # no cached set: qm9pack is needed to build it
    pytest.importorskip("rdkit")
    pytest.importorskip("torch_geometric")
    code, err = _cli(monkeypatch, capsys, "--balancer", "nash_mlt", "--epochs", "1")
    assert code == 2 and err.count("\n") == 0 and "unknown balancer 'nash_mlt'" in err
    code, err = _cli(monkeypatch, capsys, "--balancer", "ew", "--targets", "mu,gap")
    assert code == 2 and err.count("\n") == 0 and "unknown target 'gap'" in err
    code, err = _cli(monkeypatch, capsys, "--balancer", "ew", "--seeds", "0", "x")
    assert code == 2 and "unexpected argument 'x'" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else real(name, *a))
    code, err = _cli(monkeypatch, capsys, "--balancer", "ew")
    assert code == 2 and err == "error: qm9 needs the optional packages qm9pack: pip install 'polytask[qm9]'"


def test_shared_parameters_reach_only_methods_that_name_them():
    from polytask import balance
    from polytask.bench.qm9 import params_accepted_by

    assert params_accepted_by("ew", {"mode": "features"}) == {}  # **kwargs pass-through does not count
    assert params_accepted_by("famo", {"mode": "features", "gamma": 0.1}) == {"gamma": 0.1}
    if "nash_mtl" in balance.BALANCERS:
        assert params_accepted_by("nash_mtl", {"mode": "features", "gamma": 0.1}) == {"mode": "features"}


def test_bench_checkpoint_full_disk_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    """The per-epoch QM9 checkpoint goes through the one atomic writer: on a full disk the previous
    checkpoint stays byte for byte, the error names the file, and no temporary file is left."""
    import errno

    from polytask.bench import qm9 as bench_qm9
    from polytask.errors import CheckpointError

    path = tmp_path / "qm9_ls_seed0.ckpt"
    bench_qm9._save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bench_qm9.torch, "save", full)
    with pytest.raises(CheckpointError, match="qm9_ls_seed0.ckpt.*No space left.*previous epoch's checkpoint is kept"):
        bench_qm9._save_checkpoint(path, {"epoch": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qm9_ls_seed0.ckpt"]
