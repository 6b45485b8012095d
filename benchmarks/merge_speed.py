"""Merge speed, peak memory and output agreement: polytask vs mergekit on Llama-shaped checkpoints.

Generates a random Llama-shaped HF checkpoint with transformers (``LlamaConfig`` +
``from_config``, bf16, no download) and three "fine-tuned" variants (base + small seeded noise,
rounded to bf16), saved as HF-style shards with an index. Then merges them with mergekit's CLI
(``mergekit-yaml``) and polytask's CLI (``polytask merge``) - task arithmetic, TIES, DARE-TIES -
each run in a fresh process under ``/usr/bin/time -v`` (wall time, peak RSS of the process tree
leader), and compares the outputs tensor by tensor: exact equality for the deterministic methods,
kept-entry density and L1 mass for DARE's random masks.

Both tools compute in float32 and write bf16 (mergekit: ``dtype: float32``, ``out_dtype:
bfloat16``), so deterministic outputs can be compared bit for bit. For DARE-TIES polytask uses
``rescale: l1`` (mergekit's rescaling) so that the two draw from the same distribution.

Measured 2026-11-23 on the 2-core / 24 GB development box, 1.10 B parameters (TinyLlama shape),
while other jobs kept the load average at 10-17 (so absolute times are inflated; runs of the two
tools were interleaved). Task arithmetic: median of 2 runs; TIES and DARE-TIES: 1 run each.

| method | mergekit wall (s) | polytask wall (s) | wall ratio | mergekit peak RSS (GiB) | polytask peak RSS (GiB) | RSS ratio | output agreement |
|---|---:|---:|---:|---:|---:|---:|---|
| task_arithmetic | 203.0 | 64.6 | 0.32 | 4.24 | 3.26 | 0.77 | bit-identical (100 % of 1.10 B) |
| ties | 1332.8 | 282.7 | 0.21 | 4.62 | 4.38 | 0.95 | 98.21 % identical; the rest are magnitude ties at the trim threshold |
| dare_ties | 560.3 | 245.3 | 0.44 | 4.62 | 4.29 | 0.93 | random masks: changed entries 78.19 % vs 78.19 %, L1(out - base) ratio 1.0001 |

Usage::

    python benchmarks/merge_speed.py --size 1b --repeats 3 --workdir /tmp/merge_bench
    python benchmarks/merge_speed.py --size tiny --repeats 1     # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VENV_BIN = Path(sys.executable).parent

SIZES = {
    # TinyLlama-1.1B shape: 1.10 B parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # ~0.5 B parameters
    "500m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=24,
                 num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4000),
}

METHODS = {
    "task_arithmetic": ({"weight": [1.0, 0.6, 0.8]}, {"lambda": 0.9}),
    "ties": ({"weight": [1.0, 0.6, 0.8], "density": [0.3, 0.5, 0.4]}, {}),
    "dare_ties": ({"weight": [1.0, 0.6, 0.8], "density": [0.3, 0.5, 0.4]}, {}),
}


def generate(workdir: Path, size: str) -> tuple[Path, list[Path], int]:
    """Base + 3 variants as bf16 HF shards; cached in ``workdir/ckpt-SIZE``."""
    root = workdir / f"ckpt-{size}"
    names = ["base", "ft0", "ft1", "ft2"]
    marker = root / "done.json"
    if marker.is_file():
        n_params = json.loads(marker.read_text())["params"]
        return root / "base", [root / n for n in names[1:]], n_params
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shard = "500MB" if size != "tiny" else "2MB"
    model.save_pretrained(root / "base", max_shard_size=shard, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in names[1:]:
            for key, p in model.state_dict().items():
                # a "fine-tune": relative noise of about 10 % of the weights' scale
                noise = torch.randn(p.shape, generator=g) * (0.1 * base[key].float().std().clamp_min(1e-3))
                p.copy_((base[key].float() + noise).to(torch.bfloat16))
            model.save_pretrained(root / name, max_shard_size=shard, safe_serialization=True)
    marker.write_text(json.dumps({"params": n_params}))
    return root / "base", [root / n for n in names[1:]], n_params


def write_configs(workdir: Path, base: Path, models: list[Path], method: str) -> tuple[Path, Path]:
    per_model, shared = METHODS[method]
    entries = [
        {"model": str(m), "parameters": {k: v[i] for k, v in per_model.items()}} for i, m in enumerate(models)
    ]
    cfg = {"merge_method": method, "base_model": str(base), "models": entries,
           "dtype": "float32", "out_dtype": "bfloat16"}
    if shared:
        cfg["parameters"] = dict(shared)
    import yaml

    mk = workdir / f"mergekit_{method}.yaml"
    mk.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ours = dict(cfg)
    if method.startswith("dare"):
        ours["parameters"] = {**cfg.get("parameters", {}), "rescale": "l1"}
    pt = workdir / f"polytask_{method}.yaml"
    pt.write_text(yaml.safe_dump(ours, sort_keys=False))
    return mk, pt


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time -v; return (wall seconds, peak RSS in GiB)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss_kb / 2**20


def run_tool(tool: str, config: Path, out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    if tool == "mergekit":
        cmd = [str(VENV_BIN / "mergekit-yaml"), str(config), str(out), "--quiet", "--no-write-model-card",
               "--random-seed", "0"]
    else:
        cmd = [str(VENV_BIN / "polytask"), "merge", str(config), str(out)]
    return timed(cmd)


def compare(method: str, base: Path, ours: Path, theirs: Path) -> str:
    """Agreement of two merged checkpoints, tensor by tensor (streamed)."""
    from polytask.merge import Checkpoint

    a, b, c = Checkpoint(ours), Checkpoint(theirs), Checkpoint(base)
    if set(a.names()) != set(b.names()):
        return f"different tensor sets ({len(a.names())} vs {len(b.names())})"
    total = equal = 0
    max_diff = 0.0
    kept_a = kept_b = 0
    l1_a = l1_b = 0.0
    for name in a.names():
        x, y = a.load(name), b.load(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        total += x.numel()
        equal += int((x == y).sum())
        max_diff = max(max_diff, float((x.float() - y.float()).abs().max()))
        if method.startswith("dare"):
            z = c.load(name).float()
            kept_a += int((x.float() != z).sum())
            kept_b += int((y.float() != z).sum())
            l1_a += float((x.float() - z).abs().sum())
            l1_b += float((y.float() - z).abs().sum())
    for ck in (a, b, c):
        ck.close()
    text = f"equal {100 * equal / total:.4f}% of {total / 1e9:.2f}B, max|diff| {max_diff:.3g}"
    if method.startswith("dare"):
        text += (f"; changed entries {100 * kept_a / total:.2f}% vs {100 * kept_b / total:.2f}%, "
                 f"L1(out-base) ratio {l1_a / l1_b:.4f}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/polytask_merge_bench"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, models, n_params = generate(args.workdir, args.size)
    print(f"checkpoints: {n_params / 1e9:.3f}B params, bf16, base + 3 variants in {args.workdir} "
          f"(ready after {time.perf_counter() - t0:.0f}s); {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for method in args.methods.split(","):
        mk_cfg, pt_cfg = write_configs(args.workdir, base, models, method)
        results: dict[str, list[tuple[float, float]]] = {"mergekit": [], "polytask": []}
        for r in range(args.repeats):
            for tool, cfg in (("mergekit", mk_cfg), ("polytask", pt_cfg)):  # interleaved runs
                wall, rss = run_tool(tool, cfg, args.workdir / f"out_{tool}")
                results[tool].append((wall, rss))
                print(f"  {method:16s} {tool:9s} run {r + 1}: {wall:7.1f} s  {rss:6.2f} GiB", flush=True)
        agreement = compare(method, base, args.workdir / "out_polytask", args.workdir / "out_mergekit")
        print(f"  {method:16s} agreement: {agreement}", flush=True)
        mk_wall = statistics.median(w for w, _ in results["mergekit"])
        pt_wall = statistics.median(w for w, _ in results["polytask"])
        mk_rss = statistics.median(m for _, m in results["mergekit"])
        pt_rss = statistics.median(m for _, m in results["polytask"])
        rows.append((method, mk_wall, pt_wall, mk_rss, pt_rss, agreement))
    for tool in ("mergekit", "polytask"):
        shutil.rmtree(args.workdir / f"out_{tool}", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.workdir / f"ckpt-{args.size}", ignore_errors=True)

    print()
    print(f"| method | mergekit wall (s) | polytask wall (s) | wall ratio | mergekit peak RSS (GiB) | "
          f"polytask peak RSS (GiB) | RSS ratio | output agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for method, mk_wall, pt_wall, mk_rss, pt_rss, agreement in rows:
        print(f"| {method} | {mk_wall:.1f} | {pt_wall:.1f} | {pt_wall / mk_wall:.2f} | {mk_rss:.2f} | "
              f"{pt_rss:.2f} | {pt_rss / mk_rss:.2f} | {agreement} |")
    print(f"\nmedians of {args.repeats} runs each; ratio = polytask / mergekit (targets: wall <= 0.5, RSS <= 1.0)")


if __name__ == "__main__":
    main()
