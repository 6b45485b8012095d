"""Step time and peak memory of polytask's adapters against plain PEFT LoRA on the same backbone.

One step = forward of a mixed-task batch (each row under its own task: per-sample task ids),
a summed loss on the mean-pooled output (plus the routers' balancing loss), backward and an
AdamW step on the adapter parameters. Each method is compared with two PEFT LoRAs (peft 0.21):

- ``peft r``: PEFT LoRA of the same rank ``r`` (one task's LoRA): the baseline of the issue's
  target, mixtures at E=8 within 1.3x of a single LoRA's step time (column ``x lora r``);
- ``peft =params``: PEFT LoRA whose rank gives the same trainable-parameter count as the method
  (column ``x =params``; a fair comparison of capacity).

Peak memory: on CUDA the peak allocated bytes of the step; on CPU the bytes of the tensors
autograd saved for backward (a count, not a measurement of the allocator), both in MiB.
Times are medians over ``--repeats`` runs of ``--steps`` steps, after warm-up, methods interleaved.

Run: ``.venv/bin/python benchmarks/adapters.py [--size toy|small|base] [--device cuda] [--experts 8]``.
``toy`` only checks that the script works (seconds); the figures belong to ``small``/``base`` on a
quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from polytask import adapters

SIZES = {  # BERT-shaped backbones: hidden, layers, heads, intermediate, sequence length, batch
    "toy": dict(hidden=32, layers=2, heads=2, inter=64, seq=16, batch=8),
    "small": dict(hidden=256, layers=4, heads=4, inter=1024, seq=128, batch=16),
    "base": dict(hidden=768, layers=12, heads=12, inter=3072, seq=256, batch=16),
}
TARGETS = ["query", "value"]


def backbone(size: dict, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                                  num_attention_heads=size["heads"], intermediate_size=size["inter"],
                                  max_position_embeddings=max(512, size["seq"]), hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg)


def methods(rank: int, experts: int) -> list[tuple[str, str, dict]]:
    return [("lora (per task)", "lora", {}), ("mtlora", "mtlora", {}),
            (f"hydralora E={experts}", "hydralora", {"num_experts": experts}),
            (f"molora E={experts} k=2", "molora", {"num_experts": experts, "top_k": 2}),
            (f"loramoe E={experts}", "loramoe", {"num_experts": experts}),
            (f"smora R={rank} k=2", "smora", {"top_k": 2}),
            ("mhr 4 skills", "mhr", {"n_skills": 4, "n_splits": 2}),
            ("arrow k=2", "arrow", {"top_k": 2})]


def ours(base: nn.Module, method: str, rank: int, tasks: list[str], params: dict) -> nn.Module:
    model = adapters.apply(copy.deepcopy(base), method, tasks, TARGETS, rank=rank, alpha=2 * rank, **params)
    if method == "arrow":  # a library to route over: non-zero B factors (else every prototype is degenerate)
        with torch.no_grad():
            for layer in adapters.adapter_layers(model).values():
                layer.lora_B.normal_(0, 0.02)
                layer.refresh()
    return model


def peft_lora(base: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                          lora_dropout=0.0))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_rank(count: int, base: nn.Module) -> int:
    """The PEFT LoRA rank whose trainable-parameter count is closest to ``count``."""
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)
    return max(1, round(count / per_rank))


def make_step(model: nn.Module, batch: dict, task_ids: torch.Tensor | None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    wrapped = task_ids is not None

    def step() -> None:
        if wrapped:
            adapters.set_task(model, task_ids)
            adapters.set_token_mask(model, batch["attention_mask"])
        hidden = model(**batch).last_hidden_state
        loss = hidden.mean(1).square().mean()
        if wrapped:
            loss = loss + 0.01 * adapters.aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def saved_bytes(step) -> int:
    """Bytes of the tensors autograd saves for backward during one step (CPU memory count)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total[0]


def peak_mib(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return saved_bytes(step) / 2**20


def timed(step, device: torch.device, steps: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size, device = SIZES[args.size], torch.device(args.device)
    rank = min(args.rank, size["hidden"])
    base = backbone(size).to(device)
    tasks = [f"t{i}" for i in range(args.tasks)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (size["batch"], size["seq"]), generator=g)
    mask = torch.ones_like(ids)
    mask[: size["batch"] // 2, size["seq"] * 3 // 4:] = 0                      # some padding
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    task_ids = torch.randint(0, args.tasks, (size["batch"],), generator=g).to(device)

    baseline = peft_lora(base, rank).to(device)
    runs = {"peft lora r": make_step(baseline, batch, None)}
    info = {"peft lora r": (trainable(baseline), rank, None)}
    for label, method, params in methods(rank, args.experts):
        model = ours(base, method, rank, tasks, params).to(device)
        count = trainable(model)
        r_eq = matched_rank(count, base)
        matched = peft_lora(base, r_eq).to(device)
        runs[label] = make_step(model, batch, task_ids)
        runs[f"  peft r={r_eq}"] = make_step(matched, batch, None)
        info[label] = (count, rank, f"  peft r={r_eq}")
        info[f"  peft r={r_eq}"] = (trainable(matched), r_eq, None)
    memory = {k: peak_mib(step, device) for k, step in runs.items()}
    for step in runs.values():                                                  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):                                               # interleaved: load hits all alike
        for k, step in runs.items():
            times[k].append(timed(step, device, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    mem_name = "peak MiB" if device.type == "cuda" else "saved MiB"
    print(f"backbone: BERT-shaped {args.size} {size}, targets {TARGETS}, rank {rank}, {args.tasks} tasks, "
          f"device {device}, threads {torch.get_num_threads()}")
    print(f"| method | trainable | step ms | {mem_name} | x lora r | x =params |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in runs:
        count, _, matched = info[k]
        if k.startswith("  "):
            continue
        vs_r = med[k] / med["peft lora r"]
        vs_eq = f"{med[k] / med[matched]:.2f}" if matched else ""
        print(f"| {k} | {count} | {med[k]:.2f} | {memory[k]:.1f} | {vs_r:.2f} | {vs_eq} |")
        if matched:
            print(f"| {matched.strip()} (=params) | {info[matched][0]} | {med[matched]:.2f} | {memory[matched]:.1f} "
                  f"| {med[matched] / med['peft lora r']:.2f} | |")


if __name__ == "__main__":
    main()
