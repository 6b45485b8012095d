"""Fast paths of the merge engine against the reference operations they replace.

``argsort_head_mask`` replays torch's CPU sort (libstdc++ introsort) to pick the first ``k``
entries of ``torch.argsort`` without sorting; it must pick exactly those entries, ties included
(mergekit's TIES trim keeps ``torch.argsort(|tau|, descending=True)[:k]``).
"""

from __future__ import annotations

import pytest
import torch

from polytask.merge import kernels, sortselect
from polytask.merge.methods import topk_mask
from polytask.merge.sortselect import argsort_head_mask


@pytest.fixture
def torch_path(monkeypatch):
    """The torch operations, as without numba (the fused kernels have their own tests)."""
    monkeypatch.setattr(kernels, "can_trim", lambda x: False)
    monkeypatch.setattr(kernels, "available", lambda *tensors: False)


def _reference(values: torch.Tensor, k: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.argsort(values.float(), descending=descending)[:k]] = True  # mergekit sorts float32
    return mask


def _cases():
    g = torch.Generator().manual_seed(0)
    yield "bf16 magnitudes", (torch.randn(50_000, generator=g) * 1e-2).to(torch.bfloat16).abs().float()
    yield "fp16 magnitudes", (torch.randn(30_001, generator=g) * 1e-3).to(torch.float16).abs().float()
    yield "float32, few ties", torch.randn(20_000, generator=g).abs()
    yield "all equal", torch.full((40_000,), 0.5)
    third_zero = (torch.randn(60_000, generator=g) * 1e-2).to(torch.bfloat16).abs().float()
    third_zero[::3] = 0
    yield "a third zeros", third_zero
    yield "two values", (torch.rand(25_000, generator=g) < 0.3).float()
    yield "badly scaled", (torch.randn(30_000, generator=g) * torch.logspace(-10, 10, 30_000)).to(
        torch.bfloat16).abs().float()
    yield "signed values", (torch.randn(20_000, generator=g)).to(torch.bfloat16).float()
    yield "bf16 kept in bf16", (torch.randn(45_000, generator=g) * 1e-2).to(torch.bfloat16).abs()
    yield "tiny", torch.tensor([0.5, 0.5, 0.25, 0.5, 0.0, 0.5, 0.25])
    yield "leaf size", (torch.randn(17, generator=g)).to(torch.bfloat16).abs().float()


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("name, values", list(_cases()), ids=[c[0] for c in _cases()])
def test_argsort_head_mask_equals_torch_argsort(name, values, descending):
    n = values.numel()
    for k in sorted({0, 1, n // 7, n // 3, n // 2, n - 1, n}):
        got = argsort_head_mask(values, k, descending=descending)
        assert got is not None, (name, k)
        assert torch.equal(got, _reference(values, k, descending)), (name, k)


def test_ties_at_the_threshold_follow_the_sort_not_the_index_order():
    # 40 000 equal magnitudes, keep 10 000: the lowest indices would be 0..9999; torch's
    # unstable sort keeps another set, and the replay must keep that one
    values = torch.full((40_000,), 0.5)
    got = argsort_head_mask(values, 10_000, descending=True)
    lowest = torch.zeros(40_000, dtype=torch.bool)
    lowest[:10_000] = True
    assert int(got.sum()) == 10_000
    assert not torch.equal(got, lowest)
    assert torch.equal(got, _reference(values, 10_000, True))


def test_large_bf16_row_several_steps():
    # large enough for many partition levels and several count blocks
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(600_000, generator=g) * 1e-2).to(torch.bfloat16).abs().float()
    for k in (1, 123_457, 300_000, 599_999):
        assert torch.equal(argsort_head_mask(values, k, descending=True), _reference(values, k, True))


def test_nan_is_left_to_the_sort():
    values = torch.tensor([0.5, float("nan"), 0.25] * 10)
    assert argsort_head_mask(values, 5, descending=True) is None


def test_topk_mask_uses_the_replay_and_matches_argsort(monkeypatch, torch_path):
    calls = []
    real = sortselect.argsort_head_mask

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    import polytask.merge.methods as methods

    monkeypatch.setattr(methods, "argsort_head_mask", spy)
    g = torch.Generator().manual_seed(5)
    deltas = (torch.randn(3, 300, 200, generator=g) * 1e-2).to(torch.bfloat16)
    density = torch.tensor([0.3, 0.5, 1.0], dtype=torch.float64)
    mask = topk_mask(deltas, density)
    assert len(calls) == 2  # rows 0 and 1 (ties straddle the cut); density 1 keeps all
    for i, d in enumerate(density.tolist()):
        k = max(1, int(d * 60_000))
        ref = _reference(deltas[i].reshape(-1).abs().float(), k, True).reshape(300, 200)
        assert torch.equal(mask[i], ref)


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_sign_mask_equals_the_select_form(consensus):
    from polytask.merge.methods import _sign_mask

    g = torch.Generator().manual_seed(7)
    deltas = torch.randn(3, 4000, generator=g).to(torch.bfloat16)
    deltas[:, :500] = 0  # zeros agree with neither sign
    deltas[0, 500:700] = float("nan")
    deltas[1, 700:900] = -deltas[0, 700:900]  # exactly opposite: sum 0 elects +
    positive, negative = deltas > 0, deltas < 0
    if consensus == "sum":
        elected = deltas.sum(0) >= 0
    else:
        elected = positive.sum(0) >= negative.sum(0)
    assert torch.equal(_sign_mask(deltas, consensus), torch.where(elected, positive, negative))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_agreeing_weight_sum_equals_mergekits_product_sum(dtype):
    from polytask.merge.methods import _agreeing_weight_sum

    g = torch.Generator().manual_seed(8)
    agree = torch.rand(3, 5000, generator=g) < 0.5
    agree[:, :100] = False  # no model agrees: the divisor is 1
    w = torch.tensor([1.0, 0.6, 0.8], dtype=torch.float64).to(dtype).reshape(3, 1)
    reference = (w * agree.to(dtype)).sum(dim=0)  # mergekit: (weights * mask).sum(dim=0), divisor[== 0] = 1
    reference[reference == 0] = 1
    got = _agreeing_weight_sum(agree, w)
    assert got.dtype == dtype
    assert torch.equal(got, reference)


def _save_models(tmp_path, dtype=torch.bfloat16):
    from polytask.merge.io import save_state_dict

    g = torch.Generator().manual_seed(11)
    base = {"embed.weight": torch.randn(37, 24, generator=g).to(dtype), "norm.weight": torch.ones(24, dtype=dtype),
            "step": torch.tensor([3], dtype=torch.int64)}
    models = []
    for i in range(3):
        m = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v
             for k, v in base.items()}
        models.append(m)
        save_state_dict(m, tmp_path / f"m{i}")
    save_state_dict(base, tmp_path / "base")
    return base, models


@pytest.mark.parametrize("method, params, chunked", [
    ("task_arithmetic", {"lambda_": 0.7}, True),
    ("ties", {}, False),  # the trim ranks the whole tensor: never split
])
def test_large_tensors_of_elementwise_methods_go_in_row_chunks(tmp_path, monkeypatch, method, params, chunked):
    from polytask.merge.engine import merge_checkpoints, merge_state_dicts
    from polytask.merge.io import CheckpointWriter, load_state_dict

    base, models = _save_models(tmp_path)
    weights = (1.0, 0.6, 0.3) if method == "ties" else (1.0, 0.6, -0.3)
    per_model = [{"weight": w, **({"density": 0.4} if method == "ties" else {})} for w in weights]
    expected = merge_state_dicts(method, models, base, model_params=per_model, compute_dtype=None, **params)
    chunks = []
    real = CheckpointWriter.write_rows

    def spy(self, name, start, tensor):
        chunks.append((name, start, tensor.shape[0]))
        return real(self, name, start, tensor)

    monkeypatch.setattr(CheckpointWriter, "write_rows", spy)
    # a 600-byte budget: the (37, 24) embedding of 4 models (7 KB) goes in chunks of 1 row
    out = merge_checkpoints(method, [tmp_path / f"m{i}" for i in range(3)], tmp_path / "base", tmp_path / "out",
                            model_params=per_model, method_params=params, compute_dtype=None, prefetch_bytes=600)
    got = load_state_dict(out)
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    if chunked:
        embed_rows = sorted((s, n) for name, s, n in chunks if name == "embed.weight")
        assert sum(n for _, n in embed_rows) == 37 and len(embed_rows) > 1
        assert [s for s, _ in embed_rows] == sorted({s for s, _ in embed_rows})  # each row once
    else:
        assert chunks == []


def test_write_rows_refuses_rows_outside_the_tensor(tmp_path):
    from polytask.errors import MergeError
    from polytask.merge.io import CheckpointWriter, TensorSpec

    with CheckpointWriter(tmp_path / "o", {"w": TensorSpec((4, 2), torch.float32)}) as writer:
        with pytest.raises(MergeError, match="rows 3:5"):
            writer.write_rows("w", 3, torch.zeros(2, 2))
        writer.write_rows("w", 2, torch.ones(2, 2))
        with pytest.raises(MergeError, match="never written"):
            writer.commit()  # rows 0:2 missing


def test_dare_keeps_an_entry_iff_its_draw_is_below_the_threshold(torch_path):
    from polytask.merge.methods import _dare_streams, dare_drop

    density = torch.tensor([0.3, 1 / 3, 0.1 + 1e-9, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    deltas = torch.randn(4, 300, 70, generator=g).to(torch.bfloat16)
    got = dare_drop(deltas.clone(), density, False, torch.Generator().manual_seed(4))
    seeds = _dare_streams(torch.Generator().manual_seed(4), 4)
    for i, p in enumerate(density.tolist()):
        draws = kernels.uniform24(seeds[i], 0, 21_000).reshape(300, 70)
        threshold = -(-int(p * 2**24 * 2**30) // 2**30)  # ceil(p 2^24), p*2^24 exact in float64
        assert torch.equal(got[i], deltas[i] * (draws < threshold))
    # a draw exactly at the threshold is dropped: keep probability ceil(p 2^24) / 2^24
    assert kernels.dare_threshold(0.5) == 2**23 and kernels.dare_threshold(1 / 3) == 5592406
    assert kernels.dare_threshold(0.0) == 0 and kernels.dare_threshold(1.0) == 2**24


def test_replay_is_checked_against_this_torch_and_steps_aside(monkeypatch, torch_path):
    assert sortselect.replay_matches_torch()  # torch's CPU sort is the replayed introsort
    values = torch.full((1000,), 0.5)
    monkeypatch.setattr(sortselect, "replay_matches_torch", lambda: False)  # as if torch's sort changed
    assert argsort_head_mask(values, 10, descending=True) is None
    mask = topk_mask(values.reshape(1, -1).to(torch.bfloat16), torch.tensor([0.01], dtype=torch.float64))
    assert torch.equal(mask[0], _reference(values, 10, True))  # the argsort fallback


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sign_election_in_blocks_gives_the_same_bits(monkeypatch, method, torch_path):
    import polytask.merge.methods as methods
    from polytask.merge.engine import merge_state_dicts

    g = torch.Generator().manual_seed(12)
    base = {"w": torch.randn(50, 37, generator=g).to(torch.bfloat16)}
    models = [{"w": (base["w"].float() + 0.05 * torch.randn(50, 37, generator=g)).to(torch.bfloat16)} for _ in range(3)]
    models[1]["w"][:5] = base["w"][:5]  # zero task vectors
    per_model = [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (0.6, 0.5), (0.8, 0.4))]
    whole = merge_state_dicts(method, models, base, model_params=per_model, compute_dtype=None, normalize=True)
    monkeypatch.setattr(methods, "_COMBINE_BLOCK", 64)  # 29 blocks of 64 entries (the last shorter)
    blocks = merge_state_dicts(method, models, base, model_params=per_model, compute_dtype=None, normalize=True)
    assert torch.equal(whole["w"], blocks["w"])
    assert not torch.equal(whole["w"], base["w"])
