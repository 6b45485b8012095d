"""QM9 as molecular graphs for the multi-task benchmark of Nash-MTL / FAMO.

Data: the 130,831 molecules of QM9 (Ramakrishnan, Dral, Rupp & von Lilienfeld, "Quantum chemistry
structures and properties of 134 kilo molecules", Scientific Data 2014) as shipped in CSV by the
``qm9pack`` package (SMILES, B3LYP coordinates and properties). No download is needed.

Graphs follow the conventions of the PyTorch Geometric ``QM9`` set (Fey & Lenssen, ICLR-W 2019)
that the multi-task papers use (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML
2022; Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023):

- 11 node features: one-hot type H/C/N/O/F, atomic number, aromatic, sp, sp2, sp3, number of
  bonded hydrogens (from RDKit on the molecule);
- fully connected edges (no self loops) with 5 features: one-hot bond type single / double /
  triple / aromatic (all zero for a non-bonded pair) and the interatomic distance in Ångström;
- 11 targets in the order of :data:`TARGETS` and the units of :data:`UNITS`: HOMO, LUMO, ZPVE
  and the four energies in meV, the four energies as atomization energies (total energy minus
  the per-atom reference energies of the QM9 ``atomref`` table).

Structures: the bonds come from the shipped SMILES (parsed by RDKit), the coordinates from the
shipped geometry. For ~99.8 % of the molecules the SMILES lists the heavy atoms in the order of
the geometry and each hydrogen is bonded to its nearest heavy atom; this is verified per molecule
(hydrogen counts, bond lengths) and the remaining molecules are mapped atom by atom by a
substructure match of the SMILES graph onto the geometry's distance graph (shortest bonds win).
A molecule for which neither works gets its bonds perceived from the geometry by RDKit
(``rdDetermineBonds``); :attr:`QM9Graphs.source` records which way each molecule went.

The processed set is built once (vectorised, with a progress bar) and cached as one file of flat
tensors under :func:`cache_dir`; later loads take seconds. Edges are built per batch from the flat
atom arrays (:meth:`QM9Graphs.batch`), so the fully connected edge set is never stored.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
import dataclasses
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from polytask.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: Targets in the order of the published tables (PyG indices 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11).
TARGETS: tuple[str, ...] = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")

#: Unit of each target as stored and reported.
UNITS: dict[str, str] = {
    "mu": "D",
    "alpha": "a0^3",
    "homo": "meV",
    "lumo": "meV",
    "r2": "a0^2",
    "zpve": "meV",
    "U0": "meV",
    "U": "meV",
    "H": "meV",
    "G": "meV",
    "cv": "cal/(mol K)",
}

#: qm9pack column of each target.
COLUMNS: dict[str, str] = {
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",  # (sic) the column's spelling in qm9pack
    "G": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}

#: CODATA 2014 Hartree energy in eV, the constant PyG's QM9 uses; times 1000 gives meV.
HARTREE_TO_EV: float = 27.211386246
HARTREE_TO_MEV: float = HARTREE_TO_EV * 1000.0

#: Hartree-valued targets converted to meV.
_HARTREE_TARGETS = ("homo", "lumo", "zpve", "U0", "U", "H", "G")

#: Atom types in one-hot order, with their atomic numbers.
ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBER: dict[str, int] = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}

#: Free-atom reference energies (Hartree) of U0, U, H, G at B3LYP/6-31G(2df,p): the ``atomref``
#: table of Ramakrishnan et al. (2014), figshare 10.6084/m9.figshare.1057643.
ATOMREF_HARTREE: dict[str, tuple[float, float, float, float]] = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063163, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}

#: Covalent radii (Å, Cordero et al., Dalton Trans. 2008) for the geometry's distance graph.
_COVALENT_RADIUS = np.array([0.31, 0.76, 0.71, 0.66, 0.57])
#: A pair is "at bonding distance" up to this factor times the sum of covalent radii.
_BOND_TOLERANCE = 1.3

#: How each molecule's bonds were obtained (QM9Graphs.source).
SOURCE_SMILES_ORDER, SOURCE_SMILES_MATCH, SOURCE_GEOMETRY = 0, 1, 2

NUM_NODE_FEATURES = 11
NUM_EDGE_FEATURES = 5
_CACHE_VERSION = 2
_CACHE_NAME = f"qm9_graphs_v{_CACHE_VERSION}.pt"
_DEPS = ("qm9pack", "rdkit", "torch_geometric")


# ----------------------------------------------------------------------------- dependencies, paths
def require_qm9_dependencies(names: Sequence[str] = _DEPS) -> None:
    """Raise ConfigError naming the missing optional packages of the QM9 benchmark."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ConfigError(
            f"qm9 needs the optional packages {', '.join(missing)}: pip install 'polytask[qm9]'"
        )


def qm9pack_data_dir() -> Path:
    """Folder of the CSV files shipped by ``qm9pack``.

    Found without importing ``qm9pack`` itself, whose ``__init__`` needs ``pkg_resources`` (gone
    from recent setuptools); only its data files are used.
    """
    require_qm9_dependencies(("qm9pack",))
    spec = importlib.util.find_spec("qm9pack")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (folder / "qm9_part1.csv").is_file():
        raise DataError(f"qm9pack is installed but its data file {folder / 'qm9_part1.csv'} is missing")
    return folder


def cache_dir() -> Path:
    """Where processed data sets are cached.

    ``$POLYTASK_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/polytask``, else ``~/.cache/polytask``
    (``%LOCALAPPDATA%\\polytask`` on Windows).
    """
    if os.environ.get("POLYTASK_CACHE_DIR"):
        return Path(os.environ["POLYTASK_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "polytask"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "polytask"
    return Path.home() / ".cache" / "polytask"


def read_qm9pack(nrows: int | None = None) -> "pd.DataFrame":
    """The qm9pack CSV parts concatenated (130,831 rows), only the columns used here."""
    import pandas as pd

    folder = qm9pack_data_dir()
    cols = ["Index", "SMILES", "Elements", "XYZ_Ang", *COLUMNS.values()]
    frames = []
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        left = None if nrows is None else nrows - sum(len(f) for f in frames)
        if left is not None and left <= 0:
            break
        frames.append(pd.read_csv(folder / part, usecols=cols, nrows=left))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- the processed set
@dataclass
class QM9Graphs:
    """QM9 molecules as flat tensors (atoms of all molecules concatenated), one row per molecule.

    Attributes:
        x: ``(A, 11)`` node features (see module doc), float32.
        z: ``(A,)`` atomic numbers.
        pos: ``(A, 3)`` coordinates in Å, float32.
        atom_ptr: ``(N+1,)`` molecule ``i`` owns atoms ``atom_ptr[i]:atom_ptr[i+1]``.
        bonds: ``(Bd, 2)`` bonded atom pairs, indices local to their molecule, each bond once.
        bond_type: ``(Bd,)`` 0 single, 1 double, 2 triple, 3 aromatic (RDKit's aromaticity).
        bond_type_kekule: ``(Bd,)`` the same bonds in a Kekulé form (no aromatic type).
        bond_ptr: ``(N+1,)`` molecule ``i`` owns bonds ``bond_ptr[i]:bond_ptr[i+1]``.
        y: ``(N, 11)`` targets in :data:`TARGETS` order and :data:`UNITS`, float64.
        index: ``(N,)`` QM9 molecule number (1..133,885).
        source: ``(N,)`` how the bonds were obtained (``SOURCE_*``).
    """

    x: Tensor
    z: Tensor
    pos: Tensor
    atom_ptr: Tensor
    bonds: Tensor
    bond_type: Tensor
    bond_type_kekule: Tensor
    bond_ptr: Tensor
    y: Tensor
    index: Tensor
    source: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_atoms(self) -> Tensor:
        """``(N,)`` atoms per molecule."""
        return self.atom_ptr[1:] - self.atom_ptr[:-1]

    @cached_property
    def atom_kinds(self) -> tuple[Tensor, Tensor]:
        """``(kind, table)``: the distinct node feature rows ``table`` (30 in QM9) and the row
        ``kind`` of every atom, so that ``x == table[kind]``; computed once per set."""
        return _distinct_rows(self.x)

    def state(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str) -> QM9Graphs:
        """A copy with every tensor on ``device`` (so batches are built there, no host copies)."""
        return QM9Graphs(**{k: v.to(device) for k, v in self.state().items()})

    def subset(self, mols: Tensor) -> QM9Graphs:
        """The molecules ``mols`` (int tensor) as a new, contiguous set."""
        mols = torch.as_tensor(mols, dtype=torch.long, device=self.y.device)
        atoms, atom_ptr = _gather_ranges(self.atom_ptr, mols)
        bonds, bond_ptr = _gather_ranges(self.bond_ptr, mols)
        return QM9Graphs(
            x=self.x[atoms], z=self.z[atoms], pos=self.pos[atoms], atom_ptr=atom_ptr,
            bonds=self.bonds[bonds], bond_type=self.bond_type[bonds],
            bond_type_kekule=self.bond_type_kekule[bonds], bond_ptr=bond_ptr,
            y=self.y[mols], index=self.index[mols], source=self.source[mols],
        )

    def pyg_compatible(self) -> QM9Graphs:
        """The features of PyTorch Geometric's ``QM9`` set as the published numbers used them.

        PyG reads the SDF without sanitising, so its aromatic and sp/sp2/sp3 node features are
        all zero and its bonds are in Kekulé form (pyg-team/pytorch_geometric issues #2163,
        #8370). This copy zeroes node columns 6-9 and uses the Kekulé bond types.
        """
        x = self.x.clone()
        x[:, 6:10] = 0
        return dataclasses.replace(self, x=x, bond_type=self.bond_type_kekule)

    def batch(self, mols: Tensor, y: Tensor | None = None, by_size: bool = False) -> GraphBatch:
        """The molecules ``mols`` as one fully connected graph batch (PyG layout).

        ``y`` replaces the targets (e.g. z-scored ones, indexed like the whole set).
        ``by_size`` orders the molecules by atom count (stable; targets follow) and adds the
        dense layout of :class:`GraphBatch` (``groups``, ``pair_attr``) that
        :class:`polytask.nn.mpnn.EdgeNetworkConv` uses without padding; the batch holds the same
        molecules. Vectorised: no Python loop over molecules.
        """
        mols = torch.as_tensor(mols, dtype=torch.long, device=self.y.device)
        if by_size:
            mols = mols[torch.sort(self.atom_ptr[mols + 1] - self.atom_ptr[mols], stable=True).indices]
        atoms, atom_ptr = _gather_ranges(self.atom_ptr, mols)
        bonds, _ = _gather_ranges(self.bond_ptr, mols)
        n = atom_ptr[1:] - atom_ptr[:-1]
        pair_mol, pair_i, pair_j, pair_ptr = _all_pairs(n)
        # bond type of every ordered pair via its position in the per-molecule n x n block
        bond_mol = torch.repeat_interleave(
            torch.arange(len(mols), device=n.device), self.bond_ptr[mols + 1] - self.bond_ptr[mols]
        )
        a, b = self.bonds[bonds, 0], self.bonds[bonds, 1]
        kind = torch.zeros(pair_mol.shape[0], dtype=torch.long, device=n.device)
        base, width = pair_ptr[bond_mol], n[bond_mol]
        kind[base + a * width + b] = self.bond_type[bonds] + 1
        kind[base + b * width + a] = self.bond_type[bonds] + 1
        pos = self.pos[atoms]
        src, dst = atom_ptr[pair_mol] + pair_i, atom_ptr[pair_mol] + pair_j
        dist = (pos[src] - pos[dst]).norm(dim=1, keepdim=True)
        pair_attr = torch.cat([torch.nn.functional.one_hot(kind, 5)[:, 1:].to(self.x.dtype), dist], dim=1)
        edge = torch.nonzero(pair_i != pair_j).squeeze(1)  # no self loops
        groups = atom_kind = kinds = None
        if by_size:
            sizes, counts = torch.unique_consecutive(n, return_counts=True)
            groups = tuple(zip(counts.tolist(), sizes.tolist()))
            kind, kinds = self.atom_kinds
            atom_kind = kind[atoms]
        targets = self.y[mols] if y is None else y[mols]
        return GraphBatch(
            x=self.x[atoms],
            pos=pos,
            edge_index=torch.stack([src[edge], dst[edge]]),
            edge_attr=pair_attr[edge],
            batch=torch.repeat_interleave(torch.arange(len(mols), device=n.device), n),
            ptr=atom_ptr,
            y=targets,
            max_nodes=int(n.max()) if len(n) else 0,
            groups=groups,
            pair_attr=pair_attr if by_size else None,
            atom_kind=atom_kind,
            kinds=kinds,
        )

    def batches(
        self,
        mols: Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        y: Tensor | None = None,
        by_size: bool = False,
    ) -> Iterator[GraphBatch]:
        """Batches over the molecules ``mols`` (shuffled with ``generator`` when asked); ``by_size``
        as in :meth:`batch` (each batch is still the next ``batch_size`` molecules)."""
        mols = torch.as_tensor(mols, dtype=torch.long)
        if shuffle:
            mols = mols[torch.randperm(len(mols), generator=generator)]
        mols = mols.to(self.y.device)
        for start in range(0, len(mols), batch_size):
            yield self.batch(mols[start : start + batch_size], y=y, by_size=by_size)


@dataclass
class GraphBatch:
    """A batch of molecules as one graph: the layout of ``torch_geometric.data.Batch``.

    ``edge_index[0]`` is the source, ``edge_index[1]`` the target of each directed edge;
    ``batch`` maps each atom to its molecule, ``ptr`` gives each molecule's first atom;
    ``max_nodes`` (the largest molecule) is known on the host, so models need no sync for it.

    A batch built ``by_size`` (:meth:`QM9Graphs.batch`) also has the dense layout of its complete
    graphs: its molecules are ordered by atom count, ``groups`` lists ``(molecules, atoms per
    molecule)`` of each run of equal size, in order, and ``pair_attr`` holds the 5 edge features of
    every ordered atom pair ``(i, j)`` of each molecule, row-major per molecule, the diagonal
    included (bond one-hot all zero, distance 0; a convolution must skip it). The edge features are
    symmetric, so row ``(i, j)`` is also the edge ``j -> i``. ``kinds`` lists the distinct node
    feature rows of the whole set and ``atom_kind`` the row of each atom (``x == kinds[atom_kind]``).
    """

    x: Tensor
    pos: Tensor
    edge_index: Tensor
    edge_attr: Tensor
    batch: Tensor
    ptr: Tensor
    y: Tensor
    max_nodes: int
    groups: tuple[tuple[int, int], ...] | None = None
    pair_attr: Tensor | None = None
    atom_kind: Tensor | None = None
    kinds: Tensor | None = None

    @property
    def num_graphs(self) -> int:
        return int(self.ptr.shape[0] - 1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GraphBatch:
        """A copy on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, Tensor):
                moved[key] = value.to(device, non_blocking=non_blocking)
        return GraphBatch(**moved)


def _gather_ranges(ptr: Tensor, mols: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the concatenated ranges ``ptr[m]:ptr[m+1]`` for ``m`` in ``mols``, and their ptr."""
    starts, counts = ptr[mols], ptr[mols + 1] - ptr[mols]
    new_ptr = torch.zeros(len(mols) + 1, dtype=torch.long, device=ptr.device)
    new_ptr[1:] = counts.cumsum(0)
    offset = torch.repeat_interleave(starts - new_ptr[:-1], counts)
    return torch.arange(int(new_ptr[-1]), device=ptr.device) + offset, new_ptr


def _distinct_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(index, table)`` with ``table`` the distinct rows of ``x`` (sorted) and ``x == table[index]``.

    Rows of small non-negative integers (the QM9 node features) are packed into one int64 key per
    row, which is much faster than ``torch.unique(dim=0)``; other rows take ``torch.unique``.
    """
    if x.numel() and bool((x == x.round()).all()) and bool((x >= 0).all()):
        bits = [int(v).bit_length() for v in x.amax(0).tolist()]
        if sum(bits) <= 62:
            shifts = torch.tensor([sum(bits[i + 1:]) for i in range(len(bits))], device=x.device)
            key = (x.long() << shifts).sum(1)
            _, index = torch.unique(key, return_inverse=True)
            num = int(index.max()) + 1
            first = torch.full((num,), x.shape[0], dtype=torch.long, device=x.device)
            first.scatter_reduce_(0, index, torch.arange(x.shape[0], device=x.device), "amin")
            return index, x[first]
    table, index = torch.unique(x, dim=0, return_inverse=True)
    return index, table


def _all_pairs(n: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every ordered pair ``(i, j)`` (``i == j`` included) inside each molecule of sizes ``n``,
    row-major per molecule: each pair's molecule, local ``i`` and ``j``, and the blocks' ptr."""
    sq = n * n
    pair_ptr = torch.zeros(len(n) + 1, dtype=torch.long, device=n.device)
    pair_ptr[1:] = sq.cumsum(0)
    mol = torch.repeat_interleave(torch.arange(len(n), device=n.device), sq)
    local = torch.arange(int(pair_ptr[-1]), device=n.device) - pair_ptr[mol]
    width = n[mol]
    return mol, local // width, local % width, pair_ptr


# ----------------------------------------------------------------------------- building
def _parse_number_lists(column: Sequence[str]) -> np.ndarray:
    """All numbers of a column of bracketed lists (``"[[1.,2.],[3.,4.]]"``), concatenated."""
    text = ",".join(column).replace("[", "").replace("]", "")
    return np.array(text.split(","), dtype=np.float64)


def _parse_elements(column: Sequence[str]) -> np.ndarray:
    """Type index (0 H .. 4 F) of every atom of a column of ``"['C','H',...]"`` lists."""
    text = ",".join(column).replace("[", "").replace("]", "").replace("'", "").replace(" ", "")
    symbols = np.array(text.split(","))
    lookup = {s: i for i, s in enumerate(ELEMENTS)}
    try:
        return np.array([lookup[s] for s in symbols], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"qm9: unknown element {exc.args[0]!r} in column Elements") from exc


def _rdkit_heavy_atoms(smiles: str) -> tuple[list[int], list[int], list[int], list[int], list[tuple[int, int, int, int]]]:
    """From a SMILES: per heavy atom (type, aromatic, hybridisation 0 none/1 sp/2 sp2/3 sp3,
    attached H count) and the heavy-heavy bonds ``(i, j, type, Kekulé type)``."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise DataError(f"qm9: RDKit cannot parse SMILES {smiles!r}")
    hyb = {Chem.HybridizationType.SP: 1, Chem.HybridizationType.SP2: 2, Chem.HybridizationType.SP3: 3}
    btype = {Chem.BondType.SINGLE: 0, Chem.BondType.DOUBLE: 1, Chem.BondType.TRIPLE: 2, Chem.BondType.AROMATIC: 3}
    types = [ELEMENTS.index(a.GetSymbol()) for a in mol.GetAtoms()]
    arom = [int(a.GetIsAromatic()) for a in mol.GetAtoms()]
    hybs = [hyb.get(a.GetHybridization(), 0) for a in mol.GetAtoms()]
    hs = [a.GetTotalNumHs() for a in mol.GetAtoms()]
    kinds = [btype[b.GetBondType()] for b in mol.GetBonds()]
    Chem.Kekulize(mol, clearAromaticFlags=True)  # bond indices are kept
    bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx(), k, btype[b.GetBondType()])
             for b, k in zip(mol.GetBonds(), kinds)]
    return types, arom, hybs, hs, bonds


def _process_chunk(smiles: Sequence[str]) -> list[tuple]:
    """RDKit part of the build for a chunk of molecules (runs in a worker process)."""
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    return [_rdkit_heavy_atoms(s) for s in smiles]


def _distance_graph(types: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Boolean ``(n, n)`` adjacency of pairs within bonding distance (no self pairs)."""
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    r = _COVALENT_RADIUS[types]
    adj = d <= _BOND_TOLERANCE * (r[:, None] + r[None])
    np.fill_diagonal(adj, False)
    return adj


def _match_molecule(smiles: str, types: np.ndarray, pos: np.ndarray) -> tuple[int, dict[str, np.ndarray]]:
    """Atom-by-atom features of one molecule whose SMILES order does not follow the geometry.

    First a substructure match of the SMILES graph (with hydrogens, bond orders ignored) onto the
    geometry's distance graph, choosing among matches the one with the shortest bonds; failing
    that, bonds perceived from the geometry by RDKit (neutral molecule).
    """
    from rdkit import Chem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    adj = _distance_graph(types, pos)
    target = _skeleton([ELEMENTS[t] for t in types], np.argwhere(np.triu(adj)))
    query = _skeleton([a.GetSymbol() for a in mol.GetAtoms()],
                      np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]))
    matches = target.GetSubstructMatches(query, uniquify=False, maxMatches=256) if len(types) == mol.GetNumAtoms() else ()
    if matches:
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        qb = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()])
        best = min(matches, key=lambda m: d[np.asarray(m)[qb[:, 0]], np.asarray(m)[qb[:, 1]]].sum())
        return SOURCE_SMILES_MATCH, _features_from_mol(mol, np.asarray(best), len(types))
    mol = _geometry_mol(types, pos)
    return SOURCE_GEOMETRY, _features_from_mol(mol, np.arange(len(types)), len(types))


def _skeleton(symbols: Sequence[str], pairs: np.ndarray):
    """An RDKit graph of bare atoms and single bonds (for matching connectivity only)."""
    from rdkit import Chem

    rw = Chem.RWMol()
    for s in symbols:
        atom = Chem.Atom(s)
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    for i, j in pairs:
        rw.AddBond(int(i), int(j), Chem.BondType.SINGLE)
    return rw.GetMol()


def _geometry_mol(types: np.ndarray, pos: np.ndarray):
    """RDKit molecule with bonds perceived from coordinates (orders if possible, else single)."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    block = f"{len(types)}\n\n" + "\n".join(
        f"{ELEMENTS[t]} {x:.10f} {y:.10f} {z:.10f}" for t, (x, y, z) in zip(types, pos)
    )
    mol = Chem.MolFromXYZBlock(block)
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=0)
    except Exception:  # noqa: BLE001  (RDKit raises plain errors; fall back to connectivity)
        mol = Chem.MolFromXYZBlock(block)
        rdDetermineBonds.DetermineConnectivity(mol)
        mol.UpdatePropertyCache(strict=False)
        Chem.SanitizeMol(mol, Chem.SanitizeFlags.SANITIZE_ALL ^ Chem.SanitizeFlags.SANITIZE_PROPERTIES,
                         catchErrors=True)
    return mol


def _features_from_mol(mol, mapping: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Node features and bonds of an RDKit molecule with explicit H, in geometry order.

    ``mapping[k]`` is the geometry index of the molecule's atom ``k``.
    """
    from rdkit import Chem

    hyb = {Chem.HybridizationType.SP: 1, Chem.HybridizationType.SP2: 2, Chem.HybridizationType.SP3: 3}
    btype = {Chem.BondType.SINGLE: 0, Chem.BondType.DOUBLE: 1, Chem.BondType.TRIPLE: 2, Chem.BondType.AROMATIC: 3}
    arom, hybs = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for a in mol.GetAtoms():
        arom[mapping[a.GetIdx()]] = int(a.GetIsAromatic())
        hybs[mapping[a.GetIdx()]] = hyb.get(a.GetHybridization(), 0)
    kinds = [btype.get(b.GetBondType(), 0) for b in mol.GetBonds()]
    try:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    except Exception:  # noqa: BLE001  (a geometry-perceived molecule may not kekulize; keep types)
        pass
    bonds = np.array(
        [(mapping[b.GetBeginAtomIdx()], mapping[b.GetEndAtomIdx()], k, btype.get(b.GetBondType(), 0))
         for b, k in zip(mol.GetBonds(), kinds)], dtype=np.int64,
    ).reshape(-1, 4)
    return {"aromatic": arom, "hyb": hybs, "bonds": bonds}


def build_graphs(frame: "pd.DataFrame", progress: bool = True, workers: int = 1) -> QM9Graphs:
    """Process qm9pack rows (columns ``SMILES``, ``Elements``, ``XYZ_Ang``, ``Index`` and the
    target columns of :data:`COLUMNS`) into :class:`QM9Graphs`.

    The per-molecule RDKit step (SMILES parsing) runs in ``workers`` processes with a progress
    bar; everything else is vectorised over the whole set.
    """
    from tqdm.auto import tqdm

    missing = [c for c in ("SMILES", "Elements", "XYZ_Ang", "Index", *COLUMNS.values()) if c not in frame]
    if missing:
        raise DataError(f"qm9: the table lacks column(s) {', '.join(missing)}")
    smiles = frame["SMILES"].tolist()
    num = len(smiles)
    types = _parse_elements(frame["Elements"].tolist())
    pos = _parse_number_lists(frame["XYZ_Ang"].tolist())
    counts = np.array([s.count(",") + 1 for s in frame["Elements"]], dtype=np.int64)
    if pos.size != 3 * types.size or counts.sum() != types.size:
        raise DataError("qm9: column XYZ_Ang does not give 3 coordinates per atom of column Elements")
    pos = pos.reshape(-1, 3)
    atom_ptr = np.zeros(num + 1, np.int64)
    atom_ptr[1:] = np.cumsum(counts)

    # per-molecule RDKit step, in chunks so that the progress bar moves
    chunk = 2000
    pieces = [smiles[s : s + chunk] for s in range(0, num, chunk)]
    bar = tqdm(total=num, desc="QM9 graphs", unit="mol", disable=not progress or None)
    results: list[tuple] = []
    if workers > 1 and len(pieces) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for part in pool.imap(_process_chunk, pieces):
                results.extend(part)
                bar.update(len(part))
    else:
        for piece in pieces:
            results.extend(_process_chunk(piece))
            bar.update(len(piece))
    bar.close()

    heavy_types = [r[0] for r in results]
    n_heavy = np.array([len(t) for t in heavy_types], np.int64)
    h_types = np.concatenate([np.asarray(t, np.int64) for t in heavy_types])
    h_arom = np.concatenate([np.asarray(r[1], np.int64) for r in results])
    h_hyb = np.concatenate([np.asarray(r[2], np.int64) for r in results])
    h_nhs = np.concatenate([np.asarray(r[3], np.int64) for r in results])
    heavy_ptr = np.zeros(num + 1, np.int64)
    heavy_ptr[1:] = np.cumsum(n_heavy)

    mol_of_atom = np.repeat(np.arange(num), counts)
    is_heavy = types != 0
    geo_heavy_count = np.bincount(mol_of_atom[is_heavy], minlength=num)
    ok = geo_heavy_count == n_heavy
    # geometry index of each SMILES heavy atom, assuming the same order (checked below)
    geo_heavy_idx = np.flatnonzero(is_heavy)
    geo_heavy_ptr = np.zeros(num + 1, np.int64)
    geo_heavy_ptr[1:] = np.cumsum(geo_heavy_count)
    ok_atoms = np.repeat(ok, n_heavy)
    # compare element sequences molecule by molecule where the counts agree
    mol_of_heavy = np.repeat(np.arange(num), n_heavy)
    k_in_mol = np.arange(len(h_types)) - heavy_ptr[mol_of_heavy]
    pick = np.where(ok_atoms, geo_heavy_ptr[mol_of_heavy] + k_in_mol, 0)
    geo_of_heavy = geo_heavy_idx[np.minimum(pick, len(geo_heavy_idx) - 1)]
    same = ok_atoms & (types[geo_of_heavy] == h_types)
    ok &= np.bincount(mol_of_heavy, weights=~same, minlength=num) == 0

    # hydrogens: each bonded to its nearest heavy atom of the same molecule
    h_atoms = np.flatnonzero(~is_heavy)
    h_mol = mol_of_atom[h_atoms]
    max_heavy = int(n_heavy.max(initial=1))
    slot = np.arange(max_heavy)
    valid = slot[None] < np.minimum(n_heavy, geo_heavy_count)[h_mol, None]
    cand = geo_heavy_idx[np.minimum(geo_heavy_ptr[h_mol, None] + slot[None], len(geo_heavy_idx) - 1)]
    d = np.linalg.norm(pos[cand] - pos[h_atoms, None], axis=-1)
    d[~valid] = np.inf
    nearest_slot = d.argmin(axis=1)
    h_parent = cand[np.arange(len(h_atoms)), nearest_slot]  # geometry index of the parent atom
    h_dist = d[np.arange(len(h_atoms)), nearest_slot]
    ok &= np.bincount(h_mol, weights=h_dist > 1.3, minlength=num) == 0
    # the parents' H counts must be the SMILES' H counts
    geo_nhs = np.bincount(h_parent, minlength=len(types))
    ok &= np.bincount(mol_of_heavy, weights=(geo_nhs[geo_of_heavy] != h_nhs) & ok_atoms, minlength=num) == 0

    # heavy-heavy bonds from the SMILES, mapped to geometry indices and checked against distance
    hb = [np.asarray(r[4], np.int64).reshape(-1, 4) for r in results]
    n_hb = np.array([len(b) for b in hb], np.int64)
    hb = np.concatenate(hb) if hb else np.zeros((0, 4), np.int64)
    hb_mol = np.repeat(np.arange(num), n_hb)
    gi = geo_of_heavy[heavy_ptr[hb_mol] + hb[:, 0]]
    gj = geo_of_heavy[heavy_ptr[hb_mol] + hb[:, 1]]
    r = _COVALENT_RADIUS[types]
    too_long = np.linalg.norm(pos[gi] - pos[gj], axis=1) > _BOND_TOLERANCE * (r[gi] + r[gj])
    ok &= np.bincount(hb_mol, weights=too_long, minlength=num) == 0

    # assemble features in geometry order (fast path), then patch the other molecules
    aromatic = np.zeros(len(types), np.int64)
    hyb = np.zeros(len(types), np.int64)
    fast = ok[mol_of_heavy]  # molecules that failed a check are filled atom by atom below
    aromatic[geo_of_heavy[fast]] = h_arom[fast]
    hyb[geo_of_heavy[fast]] = h_hyb[fast]
    keep_hb = ok[hb_mol]
    keep_h = ok[h_mol]
    single = np.zeros(keep_h.sum(), np.int64)
    bond_rows = [
        np.stack([hb_mol[keep_hb], gi[keep_hb], gj[keep_hb], hb[keep_hb, 2], hb[keep_hb, 3]], 1),
        np.stack([h_mol[keep_h], h_parent[keep_h], h_atoms[keep_h], single, single], 1),
    ]
    source = np.full(num, SOURCE_SMILES_ORDER, np.int64)
    for m in np.flatnonzero(~ok):
        a0, a1 = atom_ptr[m], atom_ptr[m + 1]
        source[m], feats = _match_molecule(smiles[m], types[a0:a1], pos[a0:a1])
        aromatic[a0:a1], hyb[a0:a1] = feats["aromatic"], feats["hyb"]
        b = feats["bonds"]
        bond_rows.append(np.stack([np.full(len(b), m), b[:, 0] + a0, b[:, 1] + a0, b[:, 2], b[:, 3]], 1))

    bonds = np.concatenate(bond_rows)
    bonds = bonds[np.lexsort((bonds[:, 2], bonds[:, 1], bonds[:, 0]))]
    bond_mol, bi, bj, bt, bk = bonds.T
    # hydrogens bonded to each atom, counted on the final bond list (as PyG counts them)
    num_hs = np.bincount(bi[types[bj] == 0], minlength=len(types)) + np.bincount(
        bj[types[bi] == 0], minlength=len(types)
    )
    bond_ptr = np.zeros(num + 1, np.int64)
    bond_ptr[1:] = np.cumsum(np.bincount(bond_mol, minlength=num))
    x = np.concatenate(
        [
            np.eye(5)[types],
            np.array([ATOMIC_NUMBER[e] for e in ELEMENTS])[types][:, None],
            aromatic[:, None],
            np.eye(4)[hyb][:, 1:],
            num_hs[:, None],
        ],
        axis=1,
    )
    return QM9Graphs(
        x=torch.tensor(x, dtype=torch.float32),
        z=torch.tensor(np.array([ATOMIC_NUMBER[e] for e in ELEMENTS])[types]),
        pos=torch.tensor(pos, dtype=torch.float32),
        atom_ptr=torch.tensor(atom_ptr),
        bonds=torch.tensor(np.stack([bi - atom_ptr[bond_mol], bj - atom_ptr[bond_mol]], 1)),
        bond_type=torch.tensor(bt),
        bond_type_kekule=torch.tensor(bk),
        bond_ptr=torch.tensor(bond_ptr),
        y=torch.tensor(_targets(frame, types, mol_of_atom, num)),
        index=torch.tensor(frame["Index"].to_numpy(np.int64)),
        source=torch.tensor(source),
    )


def _targets(frame: "pd.DataFrame", types: np.ndarray, mol_of_atom: np.ndarray, num: int) -> np.ndarray:
    """``(N, 11)`` targets in TARGETS order, converted to UNITS (float64)."""
    y = np.stack([frame[COLUMNS[t]].to_numpy(np.float64) for t in TARGETS], axis=1)
    ref = np.array([ATOMREF_HARTREE[e] for e in ELEMENTS])  # (5 types, 4 energies)
    per_mol = np.zeros((num, 4))
    np.add.at(per_mol, mol_of_atom, ref[types])
    energies = [TARGETS.index(t) for t in ("U0", "U", "H", "G")]
    y[:, energies] -= per_mol
    hartree = [TARGETS.index(t) for t in _HARTREE_TARGETS]
    y[:, hartree] *= HARTREE_TO_MEV
    return y


# ----------------------------------------------------------------------------- loading
def load_qm9(
    cache: Path | str | None = None,
    rebuild: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> QM9Graphs:
    """The processed QM9 set, built from qm9pack on first use and cached.

    Args:
        cache: cache folder (default :func:`cache_dir`).
        rebuild: rebuild even if a cached file exists.
        progress: show a progress bar while building.
        workers: processes for the RDKit step (default: the CPU count, at most 8).
    """
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / _CACHE_NAME
    if path.is_file() and not rebuild:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return QM9Graphs(**state)
        except Exception as exc:  # noqa: BLE001  (any unreadable cache: say which file)
            raise DataError(f"qm9: cached file {path} is unreadable ({exc}); rerun with rebuild") from exc
    require_qm9_dependencies(("qm9pack", "rdkit"))  # only building needs them: a cached set loads without
    frame = read_qm9pack()
    graphs = build_graphs(frame, progress=progress, workers=workers or min(8, os.cpu_count() or 1))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(graphs.state(), tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written cache
    return graphs


def split_indices(num: int, seed: int, test: int = 10_000, val: int = 10_000,
                  train: int | None = None) -> dict[str, Tensor]:
    """Shuffle ``num`` molecules with ``seed``; the first ``test`` are test, the next ``val``
    validation, the rest (or the first ``train`` of the rest) train (the published protocol)."""
    if test + val >= num:
        raise ConfigError(f"qm9 split: test ({test}) + val ({val}) leave no training molecule of {num}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num, generator=gen)
    rest = perm[test + val :]
    if train is not None:
        if train < 1:
            raise ConfigError(f"qm9 split: train size must be positive, got {train}")
        rest = rest[:train]
    return {"test": perm[:test], "val": perm[test : test + val], "train": rest}


def describe_sources(graphs: QM9Graphs) -> dict[str, int]:
    """How many molecules took each way to their bonds."""
    counts = torch.bincount(graphs.source, minlength=3).tolist()
    return {"smiles_order": counts[0], "smiles_match": counts[1], "geometry": counts[2]}
