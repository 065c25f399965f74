"""Benchmark: vocabulary-factorised eq. 10 scoring vs the per-pair loop, at Flickr30K-1k and COCO-5k sizes.

    python bench/scoring.py                 # both sizes
    python bench/scoring.py --case flickr   # one size
    python bench/scoring.py --sweep         # also sweep the product block size (Flickr size)

Each size runs in a fresh subprocess so that its peak RSS is its own. Printed per size:
time of the full scorer (best / median of the repeats), the naive per-pair loop timed on a subset
and scaled to the full matrix, the speed-up, GFLOP/s of the region × vocabulary product alone and
of a plain large float32 matmul measured in the same process, the time the product would take at
that matmul rate ("bound") and full / bound, and the peak memory (RSS of the process, which holds
the inputs and the output too; and tracemalloc's peak of numpy allocations inside the scorer).
Because other processes may share the cores, the scorer and the matmul are also measured in CPU
seconds of this process; "full/bound (CPU)" compares the two on that footing, and "CPU s / threads"
is the wall time the scorer would take with its threads' cores to itself.
Inputs are synthetic (seeded): R regions of Z-d μ per image, captions of 1–12 words (mean ≈ 7)
drawn Zipf-like from a vocabulary subset of a 12,385-word prototype table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mask.scoring import score_matrix, score_matrix_naive  # noqa: E402

CASES = {
    # name: images, regions, latent, captions, caption vocabulary, knowledge rows
    "flickr": dict(n=1000, r=36, z=512, t=5000, vocab=3000, knowledge=12385),
    "coco": dict(n=5000, r=36, z=512, t=25000, vocab=6000, knowledge=12385),
}


def make_inputs(n, r, z, t, vocab, knowledge, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n, r, z), dtype=np.float32)  # (N, R, Z)
    mask = np.ones((n, r), bool)
    protos = rng.standard_normal((knowledge, z), dtype=np.float32)  # (V, Z)
    words = rng.choice(knowledge, vocab, replace=False)
    p = 1.0 / np.arange(1, vocab + 1) ** 0.8
    p /= p.sum()
    lengths = np.clip(rng.poisson(6.5, t), 1, 12)
    flat = words[rng.choice(vocab, lengths.sum(), p=p)]
    caps = np.split(flat, np.cumsum(lengths)[:-1])
    return mu, mask, [c.tolist() for c in caps], protos


def matmul_rate(size=4096, reps=3) -> tuple[float, float]:
    """A plain large square float32 matmul (torch): (GFLOP per wall second, GFLOP per CPU second)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b
    wall, cpu = zip(*(_timed(lambda: a @ b) for _ in range(reps)), strict=True)
    flops = 2 * size**3 / 1e9
    return flops / min(wall), flops / min(cpu)


def product_rates(x: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """GFLOP/s (wall) of regions × vocabulary as one matmul: (torch, numpy)."""
    flops = 2.0 * x.shape[0] * x.shape[1] * p.shape[0]
    xt, pt = torch.from_numpy(x), torch.from_numpy(p)
    t_torch = min(_timed(lambda: xt @ pt.T)[0] for _ in range(2))
    t_numpy = min(_timed(lambda: x @ p.T)[0] for _ in range(2))
    return flops / t_torch / 1e9, flops / t_numpy / 1e9


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - w0, _cpu() - c0


def run_case(name: str, reps: int, sweep: bool) -> dict:
    c = CASES[name]
    mu, mask, caps, protos = make_inputs(**c)
    used = np.unique(np.concatenate([np.asarray(x) for x in caps]))
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: dict = {"case": name, **c, "used_vocab": int(used.size),
                 "mean_words": float(np.mean([len(x) for x in caps])), "threads": torch.get_num_threads()}

    # full scorer
    score_matrix(mu[:8], mask[:8], caps, protos)  # warm-up
    wall, cpu = zip(*(_timed(lambda: score_matrix(mu, mask, caps, protos)) for _ in range(reps)), strict=True)
    out["full_best_s"] = min(wall)
    out["full_median_s"] = statistics.median(wall)
    out["full_cpu_s"] = min(cpu)
    tracemalloc.start()
    s = score_matrix(mu, mask, caps, protos)
    out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    out["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_inputs_mb"] = rss_inputs
    out["output_mb"] = s.nbytes / 2**20

    # plain matmul rate, and the product alone as one matmul on ≤ 1000 images (the full COCO product
    # would need 4 GB), with torch (what the scorer uses) and with numpy's BLAS for comparison
    out["matmul_gflops"], out["matmul_gflop_per_cpu_s"] = matmul_rate()
    out["product_gflops"], out["product_numpy_gflops"] = product_rates(mu[:1000].reshape(-1, c["z"]), protos[used])
    flops = 2.0 * c["n"] * c["r"] * c["z"] * used.size
    out["bound_s"] = flops / (out["matmul_gflops"] * 1e9)
    out["full_over_bound"] = out["full_best_s"] / out["bound_s"]
    # the same ratio in CPU seconds: robust when other processes share the cores
    out["bound_cpu_s"] = flops / (out["matmul_gflop_per_cpu_s"] * 1e9)
    out["full_over_bound_cpu"] = out["full_cpu_s"] / out["bound_cpu_s"]

    # naive per-pair loop on a subset, checked against the factorised values and scaled
    ni, nt = 10, 300
    naive_t = _timed(lambda: score_matrix_naive(mu[:ni], mask[:ni], caps[:nt], protos))[0]
    ref = score_matrix_naive(mu[:ni], mask[:ni], caps[:nt], protos)
    out["max_abs_diff_vs_naive"] = float(np.abs(ref - s[:ni, :nt]).max())
    out["naive_scaled_s"] = naive_t * (c["n"] * c["t"]) / (ni * nt)
    out["speedup"] = out["naive_scaled_s"] / out["full_best_s"]

    if sweep:
        out["sweep"] = {}
        for mbe in (1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26):
            ts = [_timed(lambda mbe=mbe: score_matrix(mu, mask, caps, protos, max_block_elements=mbe))
                  for _ in range(reps)]
            out["sweep"][mbe] = (min(t[0] for t in ts), min(t[1] for t in ts))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = args.case or ["flickr", "coco"]
    if args.child:
        print(json.dumps(run_case(cases[0], args.reps, args.sweep)))
        return
    print(f"load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}")
    rows = []
    for name in cases:
        cmd = [sys.executable, __file__, "--child", "--case", name, "--reps", str(args.reps)]
        if args.sweep and name == "flickr":
            cmd.append("--sweep")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"load average at end: {os.getloadavg()}")
    hdr = ("case", "N×T", "Vu", "full best s", "median s", "naive (scaled) s", "speed-up", "product GF/s (torch/np)",
           "matmul GF/s", "bound s", "full/bound", "full CPU s", "full/bound (CPU)", "RSS peak MB", "inputs MB", "out MB", "tracemalloc MB", "max|Δ|")
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join([
            r["case"], f"{r['n']}×{r['t']}", str(r["used_vocab"]), f"{r['full_best_s']:.2f}",
            f"{r['full_median_s']:.2f}", f"{r['naive_scaled_s']:.0f}", f"{r['speedup']:.0f}×",
            f"{r['product_gflops']:.0f}/{r['product_numpy_gflops']:.0f}", f"{r['matmul_gflops']:.0f}", f"{r['bound_s']:.2f}",
            f"{r['full_over_bound']:.2f}", f"{r['full_cpu_s']:.2f}", f"{r['full_over_bound_cpu']:.2f}", f"{r['rss_peak_mb']:.0f}", f"{r['rss_inputs_mb']:.0f}",
            f"{r['output_mb']:.0f}", f"{r['tracemalloc_peak_mb']:.0f}", f"{r['max_abs_diff_vs_naive']:.1e}"]))
        if "sweep" in r:
            print("  block sweep (max_block_elements → best wall s / CPU s): "
                  + ", ".join(f"{int(k)}: {v[0]:.2f}/{v[1]:.2f}" for k, v in r["sweep"].items()))
    targets = {"flickr": (3.0, 2.0), "coco": (60.0, None)}
    for r in rows:
        limit, ratio = targets[r["case"]]
        ok = r["full_best_s"] <= limit and (ratio is None or r["full_over_bound"] <= ratio)
        ok_cpu = r["full_cpu_s"] / r["threads"] <= limit and (ratio is None or r["full_over_bound_cpu"] <= ratio)
        mem = "" if r["case"] != "coco" else f", RSS {r['rss_peak_mb'] / 1024:.2f} GB (target ≤ 4 GB)"
        print(f"{r['case']}: target ≤ {limit:.0f} s" + (f" and ≤ {ratio:.0f}× bound" if ratio else "")
              + f" → wall: {'met' if ok else 'NOT met'}; CPU s / threads: {'met' if ok_cpu else 'NOT met'}{mem}")


if __name__ == "__main__":
    main()
