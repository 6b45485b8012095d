"""Merge speed, peak memory and output agreement: polytask vs mergekit on Llama-shaped checkpoints.

Generates a random Llama-shaped HF checkpoint with transformers (``LlamaConfig`` +
``from_config``, bf16, no download) and three "fine-tuned" variants (base + small seeded noise,
rounded to bf16), saved as HF-style shards with an index (cached in the work directory). Then
merges them with mergekit's CLI (``mergekit-yaml``) and polytask's CLI (``polytask merge``) - task
arithmetic, TIES, DARE-TIES - each run in a fresh process, and compares the outputs tensor by
tensor: exact equality for the deterministic methods, kept-entry fraction and L1 mass for DARE's
random masks.

The configs are the plain ones a user writes: no ``dtype:``, so both tools compute in the
inputs' bfloat16 and write bfloat16. The only difference: polytask's DARE-TIES config says
``rescale: l1`` (mergekit's ``rescale: true`` is L1-norm matching; polytask's ``true`` is the
paper's ``1/density``), so that both draw from the same distribution.

Method: for each method, ``--repeats`` rounds, each running mergekit then polytask (the order
alternates from round to round), so slow drifts of the machine hit both. Reported: the median
wall time of each tool, the median of the per-round ratios polytask / mergekit, and the peak
memory of each process tree, split into anonymous (``RssAnon``: what the merge allocates) and
file-backed (``RssFile``: page-cache pages of memory-mapped inputs, which the kernel can drop),
sampled from ``/proc/PID/status`` of the process and all its descendants every
``--sample-ms`` (``VmHWM`` alone does not split them). Take figures on a quiet machine only
(no other jobs: check the load average), with the inputs already in the page cache (the first
round of each tool warms it; ``--warmup`` adds an untimed round).

Figures, 2026-12-05 09:00-09:13 UTC, nothing else running (load average 1.0 before; the tools'
own processes brought it to 1.1-1.7), 2 CPU cores, 1.10 B TinyLlama shape, bf16, plain configs,
``--repeats 2`` (medians of 2 interleaved rounds; speed-up = median of the per-round ratios),
polytask with numba installed (``polytask[fast]``: the fused bfloat16 kernels, inputs read as
views of the mapped shards, hence the file-backed column):

| method | mergekit wall (s) | polytask wall (s) | speed-up | mergekit peak anon / file (GiB) | polytask peak anon / file (GiB) | agreement |
|---|---:|---:|---:|---:|---:|---|
| task_arithmetic | 11.0 | 4.7 | 2.34x | 2.68 / 1.70 | 0.27 / 8.39 | bit-identical |
| ties | 235.0 | 24.2 | 9.66x | 3.20 / 1.76 | 0.97 / 8.39 | bit-identical |
| dare_ties | 82.4 | 11.1 | 7.43x | 2.67 / 1.76 | 0.34 / 8.39 | random masks: changed 78.19 % vs 78.23 %, L1 ratio 1.0001 |

After this table, TIES' trim was changed to make each task vector on the fly from the mapped
inputs (never held with the selection's scratch). Rerun, ``--methods ties --repeats 1``, 09:47-09:52
UTC, nothing else running: mergekit 259.1 s / polytask 24.3 s = 10.66x; peak anonymous memory
mergekit 3.03 GiB, polytask 0.77 GiB (file-backed 1.75 / 8.35 GiB); bit-identical.

Usage::

    python benchmarks/merge_speed.py --size 1b --repeats 3 --workdir /tmp/merge_bench
    python benchmarks/merge_speed.py --size tiny --repeats 1     # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
    cfg = {"merge_method": method, "base_model": str(base), "models": entries}
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


@dataclass
class Run:
    wall: float
    anon_gib: float  # peak summed RssAnon of the process tree
    file_gib: float  # peak summed RssFile of the process tree
    total_gib: float  # peak summed RssAnon + RssFile (+ RssShmem) of the process tree


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/PID/task/TID/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def _rss_kib(pid: int) -> tuple[int, int, int]:
    """(RssAnon, RssFile, RssShmem) of one process in KiB (zeros if it is gone)."""
    vals = {"RssAnon:": 0, "RssFile:": 0, "RssShmem:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(maxsplit=1)[0]
                if key in vals:
                    vals[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return vals["RssAnon:"], vals["RssFile:"], vals["RssShmem:"]


def timed(cmd: list[str], sample_s: float) -> Run:
    """Run ``cmd``; wall time and the peak anonymous / file-backed RSS of its process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = [0, 0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            anon = file = shm = 0
            for p in _tree(proc.pid):
                a, f, s = _rss_kib(p)
                anon, file, shm = anon + a, file + f, shm + s
            peaks[0], peaks[1] = max(peaks[0], anon), max(peaks[1], file)
            peaks[2] = max(peaks[2], anon + file + shm)
            stop.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.stderr.write(out[-3000:] + err[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return Run(wall, peaks[0] / 2**20, peaks[1] / 2**20, peaks[2] / 2**20)


def run_tool(tool: str, config: Path, out: Path, sample_s: float) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    if tool == "mergekit":
        cmd = [str(VENV_BIN / "mergekit-yaml"), str(config), str(out), "--quiet", "--no-write-model-card",
               "--random-seed", "0"]
    else:
        cmd = [str(VENV_BIN / "polytask"), "merge", str(config), str(out)]
    return timed(cmd, sample_s)


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
    text = f"equal {100 * equal / total:.4f}% of {total / 1e6:.1f}M, max|diff| {max_diff:.3g}"
    if method.startswith("dare"):
        text += (f"; changed entries {100 * kept_a / total:.2f}% vs {100 * kept_b / total:.2f}%, "
                 f"L1(out-base) ratio {l1_a / l1_b:.4f}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", action="store_true", help="one untimed round per method first")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/polytask_merge_bench"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sample-ms", type=float, default=50.0, help="RSS sampling period")
    parser.add_argument("--clean", action="store_true", help="remove the generated checkpoints at the end")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, models, n_params = generate(args.workdir, args.size)
    print(f"checkpoints: {n_params / 1e9:.3f}B params, bf16, base + 3 variants in {args.workdir} "
          f"(ready after {time.perf_counter() - t0:.0f}s); {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}", flush=True)
    sample_s = args.sample_ms / 1000
    rows = []
    for method in args.methods.split(","):
        mk_cfg, pt_cfg = write_configs(args.workdir, base, models, method)
        tools = {"mergekit": mk_cfg, "polytask": pt_cfg}
        if args.warmup:
            for tool, cfg in tools.items():
                run_tool(tool, cfg, args.workdir / f"out_{tool}", sample_s)
        runs: dict[str, list[Run]] = {"mergekit": [], "polytask": []}
        for r in range(args.repeats):
            order = list(tools) if r % 2 == 0 else list(tools)[::-1]  # interleaved, alternating
            for tool in order:
                run = run_tool(tool, tools[tool], args.workdir / f"out_{tool}", sample_s)
                runs[tool].append(run)
                print(f"  {method:16s} {tool:9s} round {r + 1}: {run.wall:7.1f} s  anon {run.anon_gib:5.2f} GiB  "
                      f"file {run.file_gib:5.2f} GiB  (load {os.getloadavg()[0]:.1f})", flush=True)
        agreement = compare(method, base, args.workdir / "out_polytask", args.workdir / "out_mergekit")
        print(f"  {method:16s} agreement: {agreement}", flush=True)
        med = {tool: Run(*(statistics.median(getattr(x, f) for x in rs) for f in ("wall", "anon_gib", "file_gib",
                                                                                  "total_gib")))
               for tool, rs in runs.items()}
        ratios = [p.wall / m.wall for m, p in zip(runs["mergekit"], runs["polytask"])]
        rows.append((method, med["mergekit"], med["polytask"], statistics.median(ratios), min(ratios),
                     max(ratios), agreement))
    for tool in ("mergekit", "polytask"):
        shutil.rmtree(args.workdir / f"out_{tool}", ignore_errors=True)
    if args.clean:
        shutil.rmtree(args.workdir / f"ckpt-{args.size}", ignore_errors=True)

    print()
    print("| method | mergekit wall (s) | polytask wall (s) | speed-up (median of paired) | "
          "mergekit peak anon / file (GiB) | polytask peak anon / file (GiB) | output agreement |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for method, mk, pt, ratio, lo, hi, agreement in rows:
        print(f"| {method} | {mk.wall:.1f} | {pt.wall:.1f} | {1 / ratio:.2f}x ({1 / hi:.2f}-{1 / lo:.2f}) | "
              f"{mk.anon_gib:.2f} / {mk.file_gib:.2f} | {pt.anon_gib:.2f} / {pt.file_gib:.2f} | {agreement} |")
    print(f"\nmedians of {args.repeats} interleaved rounds; speed-up = mergekit wall / polytask wall per round "
          f"(range over rounds in brackets); targets: TIES and DARE-TIES >= 5x, task arithmetic >= 2x, "
          f"polytask peak anon < 1 GiB. Load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
