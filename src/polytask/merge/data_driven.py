"""Merging methods that need the model and data: Fisher merging, RegMean, AdaMerging, WEMoE.

They work on ``nn.Module``s of one architecture (a shared base fine-tuned once per task) and
return a merged state dict. Data come as, per model/task, an iterable of batches; a batch is the
model's input or a tuple/list whose first element is the input (polytask's ``(inputs, targets,
mask)`` convention). ``output_fn(outputs, k)`` picks the logits of task ``k`` from the model's
output; by default a dict output is indexed by ``tasks[k]`` and any other output is used as is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from polytask.errors import ConfigError, DataError

__all__ = ["fisher_diagonal", "fisher_merge", "regmean_merge", "adamerging", "wemoe", "WeightEnsemblingMoE"]

OutputFn = Callable[[Any, int], Tensor]


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _default_output(tasks: Sequence[str] | None) -> OutputFn:
    def pick(outputs: Any, k: int) -> Tensor:
        if isinstance(outputs, Mapping):
            if tasks is None:
                raise ConfigError("the model returns a dict: pass tasks=[...] (one name per model) or output_fn")
            return outputs[tasks[k]]
        return outputs

    return pick


def _class_logits(logits: Tensor) -> Tensor:
    """Logits as ``(B, C)`` categorical logits; a single logit is a binary (Bernoulli) output."""
    if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
        z = logits.reshape(-1, 1)
        return torch.cat([torch.zeros_like(z), z], dim=1)
    if logits.dim() != 2:
        raise DataError(f"expected (batch, classes) logits, got shape {list(logits.shape)}")
    return logits


def _num_examples(x: Any) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, Tensor)]
    if not leaves:
        raise DataError("a batch holds no tensors")
    return leaves[0].shape[0]


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    k: int = 0,
    *,
    output_fn: OutputFn | None = None,
    tasks: Sequence[str] | None = None,
    max_examples: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``model``'s parameters for task ``k``.

    ``F = E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]`` (Matena & Raffel, "Merging Models with
    Fisher-Weighted Averaging", NeurIPS 2022), estimated with per-example gradients
    (``torch.func.vmap``) and one label sampled from the model's own prediction per example.
    Classification outputs only (``(B, C)`` logits or one binary logit).
    """
    pick = output_fn or _default_output(tasks)
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def log_prob(p: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (tree_map(lambda t: t.unsqueeze(0), x),))
        return torch.log_softmax(_class_logits(pick(out, k)), dim=-1)[0].gather(0, y.reshape(1)).squeeze(0)

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for batch in batches:
        x = _inputs(batch)
        with torch.no_grad():
            probs = torch.softmax(_class_logits(pick(model(x), k)), dim=-1)
        y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        try:
            for name, g in per_example(params, x, y).items():
                fisher[name] += g.pow(2).sum(dim=0)
        except RuntimeError as exc:
            if "vmap" not in str(exc):
                raise
            # a module without vmap support (e.g. a custom autograd.Function): one backward per row
            for i in range(y.shape[0]):
                xi = tree_map(lambda t: t[i], x)
                for name, g in grad(log_prob)(params, xi, y[i]).items():
                    fisher[name] += g.pow(2)
        seen += _num_examples(x)
        if max_examples is not None and seen >= max_examples:
            break
    if seen == 0:
        raise DataError(f"no batches to estimate the Fisher information of task {k}")
    return {n: f / seen for n, f in fisher.items()}


def fisher_merge(
    models: Sequence[nn.Module],
    fishers: Sequence[Mapping[str, Tensor]],
    *,
    weights: Sequence[float] | None = None,
    eps: float = 1e-8,
) -> dict[str, Tensor]:
    """Fisher-weighted average (Matena & Raffel, NeurIPS 2022):
    ``theta = sum_i w_i F_i theta_i / sum_i w_i F_i`` per entry, with ``F_i + eps`` so that
    entries no model is sensitive to fall back to the (weighted) average. Buffers and parameters
    without a Fisher estimate are averaged with the weights.
    """
    if len(models) != len(fishers) or not models:
        raise ConfigError("fisher_merge needs one Fisher estimate per model")
    w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float32)
    states = [m.state_dict() for m in models]
    merged: dict[str, Tensor] = {}
    for name, ref in states[0].items():
        stacked = torch.stack([s[name].float() for s in states])
        shape = (-1,) + (1,) * ref.dim()
        if not ref.is_floating_point():
            merged[name] = ref.clone()
            continue
        if all(name in f for f in fishers):
            f = torch.stack([fi[name].float() for fi in fishers]) + eps
            coef = w.reshape(shape) * f
        else:
            coef = w.reshape(shape).expand_as(stacked)
        merged[name] = ((coef * stacked).sum(0) / coef.sum(0)).to(ref.dtype)
    return merged


def regmean_merge(
    models: Sequence[nn.Module],
    batches: Sequence[Iterable[Any]],
    *,
    alpha: float = 0.9,
    max_batches: int | None = None,
) -> dict[str, Tensor]:
    """RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
    ICLR 2023).

    For every ``nn.Linear`` (``y = x W^T``) the merged weight minimises
    ``sum_i ||X_i W^T - X_i W_i^T||^2`` over the layer inputs ``X_i`` of model ``i`` on its own
    data: ``W^T = (sum_i G_i)^-1 sum_i G_i W_i^T`` with Gram matrices ``G_i = X_i^T X_i / n_i``
    (per example, so tasks count equally). As in the paper, the off-diagonal entries of each
    ``G_i`` are scaled by ``alpha`` (``alpha = 1``: exact least squares). Other parameters and
    biases are averaged.
    """
    if len(models) != len(batches) or not models:
        raise ConfigError("regmean_merge needs one data iterable per model")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"regmean alpha must be in [0, 1], got {alpha}")
    grams = [_linear_grams(m, b, max_batches) for m, b in zip(models, batches)]
    states = [m.state_dict() for m in models]
    merged = {
        n: (torch.stack([s[n].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone())
        for n, v in states[0].items()
    }
    for layer in grams[0]:
        g = torch.stack([gi[layer] for gi in grams])  # (N, in, in)
        diag = torch.diag_embed(g.diagonal(dim1=1, dim2=2))
        g = alpha * g + (1 - alpha) * diag
        key = f"{layer}.weight" if layer else "weight"
        w = torch.stack([s[key].float() for s in states])  # (N, out, in)
        solved = _psd_solve(g.sum(0), (g @ w.transpose(1, 2)).sum(0), w.mean(0).T)
        merged[key] = solved.T.to(states[0][key].dtype)
    return merged


def _psd_solve(gram: Tensor, rhs: Tensor, prior: Tensor, rtol: float = 1e-7) -> Tensor:
    """Solve ``gram X = rhs`` for a symmetric PSD ``gram`` in float64 by eigendecomposition.

    Directions of (numerically) zero variance - inputs that are always zero on the data, or
    linear combinations that never vary - are left undetermined by the least-squares problem;
    there ``X`` keeps ``prior`` (the plain average) instead of a noisy or zero value.
    """
    g, b, x0 = gram.double(), rhs.double(), prior.double()
    evals, evecs = torch.linalg.eigh(g)
    keep = evals > evals.max().clamp_min(0) * rtol
    inv = torch.where(keep, 1 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    x = x0 + evecs @ (inv[:, None] * (evecs.T @ (b - g @ x0)))
    return x.to(rhs.dtype)


def _linear_grams(model: nn.Module, batches: Iterable[Any], max_batches: int | None) -> dict[str, Tensor]:
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(hook_for(name)))
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                model(_inputs(batch))
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise DataError("RegMean saw no data (or the model has no nn.Linear layers)")
    return {n: s / counts[n] for n, s in sums.items()}


def adamerging(
    base: nn.Module,
    models: Sequence[nn.Module],
    unlabeled: Sequence[Iterable[Any]],
    *,
    granularity: str = "layer",
    steps: int = 100,
    lr: float = 1e-3,
    init: float = 0.3,
    tasks: Sequence[str] | None = None,
    output_fn: OutputFn | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
    ICLR 2024).

    ``theta = theta_0 + sum_k lambda_k tau_k`` with one coefficient per task
    (``granularity="task"``) or per task and parameter tensor (``"layer"``), learned by Adam to
    minimise the summed Shannon entropy of each task's predictions on its unlabeled (test) batches;
    coefficients are clipped to [0, 1] after each step and start at ``init``. Returns the merged
    state dict and the coefficients (``(K,)`` or ``(K, n_params)``).
    """
    if granularity not in ("task", "layer"):
        raise ConfigError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    if len(models) != len(unlabeled) or not models:
        raise ConfigError("adamerging needs one unlabeled data iterable per model")
    pick = output_fn or _default_output(tasks)
    names = [n for n, _ in base.named_parameters()]
    theta0 = {n: p.detach() for n, p in base.named_parameters()}
    buffers = {n: b.detach() for n, b in base.named_buffers()}
    taus = []
    for m in models:
        params = dict(m.named_parameters())
        taus.append({n: params[n].detach() - theta0[n] for n in names})
    stacked = {n: torch.stack([t[n] for t in taus]) for n in names}  # (K, *shape)
    k_models = len(models)
    shape = (k_models,) if granularity == "task" else (k_models, len(names))
    lambdas = torch.full(shape, float(init), requires_grad=True)
    opt = torch.optim.Adam([lambdas], lr=lr)
    streams = [itertools.cycle(list(u)) for u in unlabeled]

    def merged_params(lam: Tensor) -> dict[str, Tensor]:
        out = {}
        for j, n in enumerate(names):
            coef = lam if lam.dim() == 1 else lam[:, j]
            out[n] = theta0[n] + torch.tensordot(coef, stacked[n], dims=1)
        return out

    base.eval()
    for _ in range(steps):
        params = merged_params(lambdas)
        loss = torch.zeros(())
        for k, stream in enumerate(streams):
            logits = _class_logits(pick(functional_call(base, (params, buffers), (_inputs(next(stream)),)), k))
            p = torch.softmax(logits, dim=-1)
            loss = loss + -(p * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lambdas.clamp_(0, 1)
    with torch.no_grad():
        final = merged_params(lambdas)
    state = {n: v.detach().clone() for n, v in base.state_dict().items()}
    state.update({n: v.detach() for n, v in final.items()})
    return state, lambdas.detach()


class WeightEnsemblingMoE(nn.Module):
    """A module whose weights are mixed per input from task vectors (Tang et al., "Merging
    Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024).

    ``theta(x) = theta_0 + sum_k r_k(x) tau_k`` where the router ``r`` is a two-layer MLP of the
    module's input (averaged over tokens when the input is ``(B, L, d)``), initialised so that
    every ``r_k`` starts at ``init_lambda`` (task arithmetic). Each sample runs the module with its
    own mixed weights (``torch.func.vmap`` over ``functional_call``).
    """

    def __init__(self, base: nn.Module, experts: Sequence[nn.Module], in_features: int,
                 hidden: int = 16, init_lambda: float = 0.3) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.names = [n for n, _ in base.named_parameters()]
        theta0 = dict(base.named_parameters())
        taus = []
        for expert in experts:
            params = dict(expert.named_parameters())
            taus.append(torch.cat([(params[n] - theta0[n]).detach().reshape(-1) for n in self.names]))
        self.register_buffer("task_vectors", torch.stack(taus))  # (K, P)
        self.shapes = [theta0[n].shape for n in self.names]
        self.router = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, len(experts)))
        nn.init.zeros_(self.router[2].weight)
        nn.init.constant_(self.router[2].bias, float(init_lambda))

    def routing(self, x: Tensor) -> Tensor:
        """Routing weights ``(B, K)`` of a batch."""
        h = x.mean(dim=1) if x.dim() == 3 else x
        return self.router(h)

    def forward(self, x: Tensor) -> Tensor:
        r = self.routing(x)  # (B, K)
        theta0 = torch.cat([p.detach().reshape(-1) for p in self.base.parameters()])
        flat = theta0 + r @ self.task_vectors  # (B, P)
        buffers = dict(self.base.named_buffers())

        def one(params_flat: Tensor, xi: Tensor) -> Tensor:
            params, start = {}, 0
            for name, shape in zip(self.names, self.shapes):
                n = shape.numel()
                params[name] = params_flat[start:start + n].reshape(shape)
                start += n
            return functional_call(self.base, (params, buffers), (xi.unsqueeze(0),)).squeeze(0)

        return vmap(one)(flat, x)


def wemoe(
    base: nn.Module,
    models: Sequence[nn.Module],
    unlabeled: Sequence[Iterable[Any]],
    modules: Sequence[str],
    *,
    in_features: Mapping[str, int] | None = None,
    init_lambda: float = 0.3,
    router_hidden: int = 16,
    steps: int = 100,
    lr: float = 1e-3,
    tasks: Sequence[str] | None = None,
    output_fn: OutputFn | None = None,
) -> nn.Module:
    """Upcycle ``base`` into a WEMoE model (Tang et al., ICML 2024) and train its routers.

    Parameters outside ``modules`` are merged by task arithmetic,
    ``theta_0 + init_lambda * sum_k tau_k``; each submodule named in ``modules`` (the MLPs of a
    Transformer in the paper) becomes a :class:`WeightEnsemblingMoE` over the task vectors of
    its parameters. The routers are trained by Adam to minimise the summed entropy of each task's
    predictions on its unlabeled (test) batches, as in the paper (test-time adaptation). Returns
    the new model; ``base`` and ``models`` are not modified. ``in_features[name]`` gives a
    module's input width when it has no leading ``nn.Linear`` to read it from.
    """
    import copy

    if len(models) != len(unlabeled) or not models:
        raise ConfigError("wemoe needs one unlabeled data iterable per model")
    pick = output_fn or _default_output(tasks)
    merged = copy.deepcopy(base)
    theta0 = base.state_dict()
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        new_state = {
            k: (v + init_lambda * sum(s[k] - v for s in states)) if v.is_floating_point() else v
            for k, v in theta0.items()
        }
    merged.load_state_dict(new_state)
    for name in modules:
        try:
            original = base.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"wemoe: model has no submodule {name!r}") from None
        width = (in_features or {}).get(name)
        if width is None:
            first = next((m for m in original.modules() if isinstance(m, nn.Linear)), None)
            if first is None:
                raise ConfigError(f"wemoe: cannot tell the input width of {name!r}; pass in_features")
            width = first.in_features
        moe = WeightEnsemblingMoE(copy.deepcopy(original), [m.get_submodule(name) for m in models], width,
                                  router_hidden, init_lambda)
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, moe)
    for p in merged.parameters():
        p.requires_grad_(False)
    routers = [p for m in merged.modules() if isinstance(m, WeightEnsemblingMoE) for p in m.router.parameters()]
    for p in routers:
        p.requires_grad_(True)
    opt = torch.optim.Adam(routers, lr=lr)
    streams = [itertools.cycle(list(u)) for u in unlabeled]
    merged.eval()
    for _ in range(steps):
        loss = torch.zeros(())
        for k, stream in enumerate(streams):
            logits = _class_logits(pick(merged(_inputs(next(stream))), k))
            loss = loss + -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged
