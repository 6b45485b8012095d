"""The fused bfloat16 merge kernels (numba) against the torch operations they replace.

The torch path is itself checked bit for bit against mergekit (test_merge_mergekit_configs.py,
test_merge_methods.py); here every kernel must give the torch path's bits: the trim's selection
against ``torch.argsort`` itself, the combination against ``methods._combine``, whole merges
against the same merges with the kernels switched off.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("numba")

from polytask.merge import kernels  # noqa: E402
from polytask.merge import methods  # noqa: E402
from polytask.merge.engine import merge_state_dicts  # noqa: E402


def _argsort_head(values: torch.Tensor, k: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.argsort(values.abs().float(), descending=descending)[:k]] = True  # as mergekit
    return mask


def _trim_cases():
    g = torch.Generator().manual_seed(0)
    yield "bf16", (torch.randn(50_000, generator=g) * 1e-2).to(torch.bfloat16)
    yield "fp16", (torch.randn(30_001, generator=g) * 1e-3).to(torch.float16)
    yield "all equal", torch.full((40_000,), 0.5, dtype=torch.bfloat16)
    third_zero = (torch.randn(60_000, generator=g) * 1e-2).to(torch.bfloat16)
    third_zero[::3] = 0
    third_zero[1::7] = -0.0
    yield "a third zeros", third_zero
    yield "two values", ((torch.rand(25_000, generator=g) < 0.3).float() - 0.5).to(torch.bfloat16)
    yield "badly scaled", (torch.randn(30_000, generator=g) * torch.logspace(-30, 30, 30_000)).to(torch.bfloat16)
    yield "with inf", torch.tensor([1.0, float("inf"), -float("inf"), 0.5] * 50, dtype=torch.bfloat16)
    for n in (17, 18, 128, 129, 130, 257):  # around the leaf and the partition's block sizes
        yield f"n={n}", (torch.randn(n, generator=g) * 1e-2).to(torch.bfloat16)


@pytest.mark.parametrize("name,values", list(_trim_cases()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("descending", [True, False])
def test_trim_masks_pick_what_torch_argsort_picks(name, values, descending):
    n = values.numel()
    for k in sorted({1, 2, n // 7, n // 3, n // 2, n - 2, n - 1}):
        if not 0 < k < n:
            continue
        masks = kernels.trim_masks(values.reshape(1, -1), [k], largest=descending)
        assert masks is not None
        assert torch.equal(masks[0], _argsort_head(values, k, descending)), (name, k)


def test_trim_masks_rows_in_parallel_and_whole_rows():
    g = torch.Generator().manual_seed(1)
    deltas = (torch.randn(4, 20_000, generator=g) * 1e-2).to(torch.bfloat16)
    counts = [6000, 20_000, 1, 19_999]  # a row kept whole, extremes
    masks = kernels.trim_masks(deltas, counts, largest=True)
    for i, k in enumerate(counts):
        expected = torch.ones(20_000, dtype=torch.bool) if k >= 20_000 else _argsort_head(deltas[i], k, True)
        assert torch.equal(masks[i], expected)


def test_trim_masks_refuse_nan_rows():
    values = torch.randn(2, 1000).to(torch.bfloat16)
    values[1, 17] = float("nan")
    assert kernels.trim_masks(values, [300, 300], largest=True) is None
    # the method then sorts: the same entries as torch.argsort (NaN first, as torch orders it)
    mask = methods.topk_mask(values, torch.tensor([0.3, 0.3], dtype=torch.float64))
    assert torch.equal(mask[0], _argsort_head(values[0], 300, True))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "_CHUNK", 1000)  # several chunks on two threads


def _task_vectors(seed: int, n: int, m: int):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(m, generator=g) * 0.02).to(torch.bfloat16)
    base[::7] = 0.0
    base[1::11] = -0.0
    scales = 10 ** torch.randn(n, 1, generator=g)
    x = (base.float() + torch.randn(n, m, generator=g) * 0.002 * scales).to(torch.bfloat16)
    x[:, ::13] = base[::13]  # zero task vectors
    return x, base


@pytest.mark.parametrize("weights", [[1.0, 0.6, 0.8], [1e-3, 5e3, -2.0], [0.7, -0.3, 0.25, 1.5, 2.0]])
def test_combine_gives_the_torch_bits(weights, small_chunks):
    w = torch.tensor(weights, dtype=torch.float64)
    x, base = _task_vectors(3, len(weights), 4567)
    mixed_signs = bool((w > 0).any()) and bool((w < 0).any())
    for consensus, normalize, scale in itertools.product([None, "sum", "count"], [False, True], [1.0, 0.7, -1.3]):
        if normalize and consensus is not None and mixed_signs:
            continue  # refused by the methods (a divisor that can vanish)
        expected = methods._combine(x.clone().sub_(base), w, base, consensus=consensus, normalize=normalize,
                                    scale=scale)
        got = kernels.combine(x.clone(), base, w, subtract=True, consensus=consensus, normalize=normalize,
                              scale=scale)
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), (consensus, normalize, scale)


def test_combine_of_trimmed_task_vectors_gives_the_torch_bits(small_chunks):
    x, base = _task_vectors(4, 3, 5000)
    w = torch.tensor([1.0, 0.6, 0.8])
    deltas = x.clone().sub_(base)
    keep = torch.rand(3, 5000, generator=torch.Generator().manual_seed(2)) < 0.4
    expected = methods._combine(deltas * keep, w, base, consensus="sum", normalize=True, scale=1.0)
    got = kernels.combine(deltas * keep, base, w, subtract=False, consensus="sum", normalize=True, scale=1.0)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def _merge(method, models, base, per_model, **kwargs):
    return merge_state_dicts(method, models, base, model_params=per_model, compute_dtype=None, **kwargs)["w"]


@pytest.mark.parametrize("method,kwargs", [
    ("task_arithmetic", {}), ("task_arithmetic", {"normalize": True, "lambda_": 0.5}),
    ("ties", {}), ("ties", {"consensus": "count", "lambda_": 1.2}), ("ties", {"normalize": False}),
    ("ties", {"rescale": "l2"}),
    ("dare_ties", {}), ("dare_ties", {"rescale": False, "normalize": True}), ("dare_linear", {}),
    ("dare_linear", {"rescale": "l1"}), ("dare_ties", {"rescale": "l1"}), ("dare_ties", {"rescale": "l2"}),
    ("dare_linear", {"rescale": "linf", "lambda_": 0.8}), ("breadcrumbs_ties", {}),
])
def test_merges_give_the_same_bits_with_and_without_the_kernels(monkeypatch, small_chunks, method, kwargs):
    x, base_w = _task_vectors(5, 3, 60 * 70)
    base = {"w": base_w.reshape(60, 70)}
    models = [{"w": x[i].reshape(60, 70)} for i in range(3)]
    per_model = [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (0.6, 0.5), (0.8, 1.0))]
    if method == "task_arithmetic":
        per_model = [{"weight": p["weight"]} for p in per_model]
    if method == "breadcrumbs_ties":
        per_model = [{**p, "gamma": 0.01} for p in per_model]
    fused = _merge(method, models, base, per_model, **kwargs)
    monkeypatch.setattr(kernels, "can_trim", lambda x: False)
    monkeypatch.setattr(kernels, "available", lambda *tensors: False)
    plain = _merge(method, models, base, per_model, **kwargs)
    assert torch.equal(fused.view(torch.int16), plain.view(torch.int16))
    assert not torch.equal(fused, base["w"])


def test_uniform24_compiled_equals_the_torch_fallback(monkeypatch):
    seed = kernels.stream_seed(123456789, 2)
    compiled = kernels.uniform24(seed, 1000, 50_000)
    monkeypatch.setattr(kernels, "_compiled", lambda: None)
    fallback = kernels.uniform24(seed, 1000, 50_000)
    assert torch.equal(compiled, fallback)
    assert torch.equal(fallback[:10], kernels.uniform24(seed, 1000, 10))  # counter-based: chunks agree
    assert not torch.equal(fallback, kernels.uniform24(kernels.stream_seed(123456789, 3), 1000, 50_000))


def test_dare_keeps_the_density_fraction_and_the_mass():
    g = torch.Generator().manual_seed(6)
    m = 400_000
    base = {"w": torch.zeros(m, dtype=torch.bfloat16)}
    models = [{"w": torch.full((m,), 0.5, dtype=torch.bfloat16) * torch.randn(m, generator=g).sign().to(torch.bfloat16)}]
    for density in (0.1, 0.3, 0.5, 0.9):
        out = _merge("dare_linear", models, base, [{"weight": 1.0, "density": density}])
        kept = float((out != 0).float().mean())
        sigma = (density * (1 - density) / m) ** 0.5
        assert abs(kept - density) < 5 * sigma
        # 1/density rescale: kept entries are 0.5/density (rounded to bfloat16)
        expected = torch.tensor(0.5 / torch.tensor(density).to(torch.bfloat16).item()).to(torch.bfloat16)
        assert torch.equal(out[out > 0].unique(), expected.reshape(1))


def test_trim_in_place_zeroes_what_the_mask_drops():
    g = torch.Generator().manual_seed(7)
    deltas = (torch.randn(5, 30_000, generator=g) * 1e-2).to(torch.bfloat16)
    deltas[1, ::3] = 0.0
    deltas[1, 1::3] = -0.0  # zeros of both signs tied at the cut
    deltas[2, 5] = float("inf")  # left to the masked path
    deltas[3, 9] = float("nan")
    counts = [9000, 25_000, 300, 300, 0]
    expected = deltas.clone()
    for i, k in enumerate(counts):
        keep = _argsort_head(deltas[i], k, True) if k else torch.zeros(30_000, dtype=torch.bool)
        expected[i] = deltas[i] * keep
    trimmed = deltas.clone()
    left = kernels.trim_in_place(trimmed, counts)
    assert left == [4, 2, 3]
    for i in (0, 1):
        assert torch.equal(trimmed[i].view(torch.int16), expected[i].view(torch.int16))
    for i in left:  # untouched
        assert torch.equal(trimmed[i].view(torch.int16), deltas[i].view(torch.int16))


def test_ties_with_infinite_and_nan_rows_matches_the_torch_path(monkeypatch):
    x, base_w = _task_vectors(8, 3, 4000)
    x[1, 10] = float("inf")
    base = {"w": base_w}
    models = [{"w": x[i]} for i in range(3)]
    per_model = [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (0.6, 0.5), (0.8, 0.4))]
    fused = _merge("ties", models, base, per_model, allow_nonfinite=True)
    monkeypatch.setattr(kernels, "can_trim", lambda x: False)
    monkeypatch.setattr(kernels, "available", lambda *tensors: False)
    plain = _merge("ties", models, base, per_model, allow_nonfinite=True)
    same = fused.view(torch.int16) == plain.view(torch.int16)
    assert bool(same.all()) or bool((fused[~same].isnan() & plain[~same].isnan()).all())


def test_combine_tells_all_finite_whether_its_output_is_finite():
    x, base = _task_vectors(9, 3, 3000)
    w = torch.tensor([1.0, 0.6, 0.8])
    out = kernels.combine(x, base, w, subtract=True, consensus=None, normalize=False, scale=1.0)
    assert kernels.all_finite(out)
    x[1, 17] = float("inf")
    out = kernels.combine(x, base, w, subtract=True, consensus=None, normalize=False, scale=1.0)
    assert out.__dict__.get("_polytask_finite") is False
    assert not kernels.all_finite(out)
    assert not kernels.all_finite(out)  # read once; then from the bits: still not finite
    x[1, 17] = float("nan")
    out = kernels.combine(x, base, w, subtract=True, consensus="sum", normalize=True, scale=1.0)
    assert not kernels.all_finite(out) and bool(out.isnan().any())


@pytest.mark.parametrize("method,kwargs", [("task_arithmetic", {}), ("ties", {}), ("dare_ties", {"rescale": "l1"})])
def test_checkpoints_read_as_mapped_views_give_the_same_bits_as_read_buffers(tmp_path, monkeypatch, method, kwargs):
    from polytask.merge import engine
    from polytask.merge.io import load_state_dict, save_state_dict

    g = torch.Generator().manual_seed(10)
    shapes = {"embed": (300, 64), "layer.w": (64, 48), "layer.b": (48,), "norm": (64,)}
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    models = [{k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
              for _ in range(3)]
    base_dir = save_state_dict(base, tmp_path / "base", max_shard_bytes=20_000)
    paths = [save_state_dict(m, tmp_path / f"m{i}", max_shard_bytes=20_000) for i, m in enumerate(models)]
    params = [{"weight": w} if method == "task_arithmetic" else {"weight": w, "density": d}
              for w, d in ((1.0, 0.3), (0.6, 0.5), (0.8, 0.4))]
    viewed = []
    real_view = engine._CheckpointSource.view

    def spy(self, name, rows=None):
        v = real_view(self, name, rows)
        viewed.append(v is not None)
        return v

    monkeypatch.setattr(engine._CheckpointSource, "view", spy)
    mapped = merge_checkpoints_bf16(method, paths, base_dir, tmp_path / "mapped", params, kwargs)
    assert viewed and all(viewed)  # the fused methods read every input as a view
    monkeypatch.setattr(engine._CheckpointSource, "view", lambda self, name, rows=None: None)
    read = merge_checkpoints_bf16(method, paths, base_dir, tmp_path / "read", params, kwargs)
    a, b = load_state_dict(mapped), load_state_dict(read)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    for i, p in enumerate(paths):  # the inputs are untouched (the mapping is private and never written)
        for k, v in load_state_dict(p).items():
            assert torch.equal(v, models[i][k])


def merge_checkpoints_bf16(method, paths, base_dir, out, params, kwargs):
    from polytask.merge.engine import merge_checkpoints

    return merge_checkpoints(method, paths, base_dir, out, model_params=params, method_params=kwargs,
                             compute_dtype=None, prefetch_bytes=30_000, seed=3)


def test_trim_differences_equal_the_trim_of_stored_differences():
    x, base = _task_vectors(11, 4, 20_000)
    x[2, 5] = float("inf")  # left: its row holds the plain difference
    counts = [6000, 20_000, 300, 0]
    stored = x.clone().sub_(base)
    expected = stored.clone()
    kernels.trim_in_place(expected, counts)
    out = torch.empty_like(x)
    left = kernels.trim_differences(list(x), base, counts, out)
    assert left == [3, 2]
    for i in (0, 1):
        assert torch.equal(out[i].view(torch.int16), expected[i].view(torch.int16))
    for i in left:
        assert torch.equal(out[i].view(torch.int16), stored[i].view(torch.int16))
