"""Parameter and FLOPs counts (torch-pruning's op counter) and measured CPU/GPU latency.

FLOPs are counted as torch-pruning 1.6's ``count_ops_and_params`` counts them: multiply-accumulates
of linear and convolution layers (plus their bias adds), one op per element of activations,
normalisations and pooling, per input row. polytask's :class:`~polytask.nn.layers.BatchedLinear` is
unknown to that counter; :func:`count` registers it as ``n`` linear maps (``n · in · out`` MACs and
``n · out`` bias adds per row). Products and sums written in the forward (the expert mixture) are
not counted, as the counter counts modules only. Attention: torch-pruning's count for
``nn.MultiheadAttention``, and the same formula with the inner width apart from ``d_model`` for
:class:`~polytask.nn.task_token.HeadAttention` (:func:`polytask.prune.heads.attention_flops`).
Sigmoid and GELU are not counted (the counter knows the ReLU family only).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from polytask.nn.layers import BatchedLinear


@dataclass(frozen=True)
class Cost:
    """FLOPs per input row and parameter count of a model."""

    flops: float
    params: int


def _batched_linear_hook(module: BatchedLinear, inputs, output) -> None:
    macs = output.numel() * module.in_features  # (n, B, out) outputs, each a dot product over `in`
    adds = output.numel() if module.bias is not None else 0
    module.__flops__ += int(macs + adds)


def count(model: nn.Module, example: tuple) -> Cost:
    """FLOPs of one row and parameters of ``model``; ``example``: a tuple of the forward's arguments,
    of which the first row is used (the counter adds a linear layer's bias once per call, not per
    row, so a one-row count is the per-row count)."""
    import torch_pruning as tp
    from torch_pruning.utils import op_counter

    example = tuple(first_row(x) for x in example)
    settle(model, example)
    from polytask.nn.task_token import HeadAttention
    from polytask.prune.heads import attention_flops

    # reset by the counter itself
    op_counter.CUSTOM_MODULES_MAPPING = {BatchedLinear: _batched_linear_hook, HeadAttention: attention_flops}
    flops, params = tp.utils.count_ops_and_params(model, example)
    # the counter divides by len() of the first argument, its batch size; for a dict of features
    # that is the number of features, not the one row passed
    if isinstance(example[0], dict):
        flops *= len(example[0])
    return Cost(float(flops), int(params))


def first_row(inputs):
    """Row 0 of a tensor (or of each tensor of a dict of inputs), keeping the batch dimension."""
    if isinstance(inputs, dict):
        return {k: v[:1] for k, v in inputs.items()}
    return inputs[:1]


@torch.no_grad()
def settle(model: nn.Module, example: tuple) -> None:
    """One forward without autograd, so that what the model keeps from its last forward
    (``shared_features``, gate weights) holds no graph: the model can then be deep-copied."""
    was_training = model.training
    model.eval()
    model(*example)
    model.train(was_training)


@torch.no_grad()
def latency_ms(model: nn.Module, example: tuple, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of one forward on ``example``, in milliseconds (CUDA synchronised)."""
    was_training = model.training
    model.eval()
    cuda = next(model.parameters()).is_cuda
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(*example)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    return statistics.median(times)
