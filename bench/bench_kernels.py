"""Kernel benchmarks, side by side in one run.

  python bench/bench_kernels.py [--quick] [--device cpu|cuda] [--threads N]
                                [--parts linear ce lora decode bandwidth] [--out bench/results/kernels_cpu.json]

(a) linear JSD (beta 0.5) over the lm_head, fwd+bwd: the lean chunked path vs the naive
    full-logits path vs Liger's LigerFusedLinearJSDLoss (and, on CUDA, our Triton chunk math
    and Liger's Triton LigerFusedLinearJSD). Peak memory and median time.
(b) gathered LoRA, 16 adapters x 32 rows, d=576, r=16: vectorised ("torch", and "triton" on
    CUDA) vs the Python loop over adapters, forward and fwd+bwd, with equality checks; rows in
    random adapter order (worst case) and grouped by adapter (the SGMV layout).
(d) gathered-LoRA decode overhead: one new token for each of 32 requests, each with its own
    adapter (rank 16), through one projection; time of base matmul + gathered LoRA over the
    base matmul alone (issue target on an H200: <= 15 % overhead). d = 4096 bf16 on CUDA,
    d = 576 fp32 on CPU.
(e) cross-entropy over the lm_head with the lm_head frozen (the LoRA case), fwd+bwd: the lean
    chunked path (which makes d loss / d hidden in forward) vs full logits + F.cross_entropy vs
    Liger's LigerFusedLinearCrossEntropyLoss (Triton: CUDA only). Peak memory and median time.
(c) CUDA only: RMSNorm / SwiGLU (reference, triton, liger) and our loss-chunk kernel, as
    achieved GB/s against a measured device-to-device copy peak.

Peak memory: each linear-loss variant runs in a fresh subprocess. On CPU the peak is the
resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs right before the measured
step) minus the resident set just before it: it sees every byte torch allocates, which
tracemalloc does not. Where clear_refs cannot be written, ru_maxrss is used (the fresh
process's inputs are built first, so the delta is still the step's). On CUDA:
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the allocation before.
Time: the median of --repeats fwd+bwd steps after the measured one.
(b) and (d) on CPU call the implementations in turns and report the median of the per-round
ratios, so a shared machine's noise slows both sides alike; glibc's malloc thresholds are raised
first (keep_large_buffers: otherwise multi-MiB temporaries page-fault in on every call in some
processes; --default-malloc keeps glibc's behaviour).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # (a): tokens N, student/teacher hidden H, vocab V, chunk
    "cpu": dict(N=4096, H=576, V=49152, chunk=1024, dtype="float32"),
    "cpu_quick": dict(N=512, H=64, V=4096, chunk=128, dtype="float32"),
    "cuda": dict(N=4096, H=2048, V=128256, chunk=1024, dtype="bfloat16"),
    "cuda_quick": dict(N=1024, H=576, V=32768, chunk=512, dtype="bfloat16"),
}
PARTS = ("linear", "ce", "lora", "decode", "bandwidth")
LORA = dict(n_adapters=16, rows_per_adapter=32, d=576, r=16)
DECODE = {"cpu": dict(requests=32, n_adapters=32, d=576, r=16, dtype="float32"),
          "cuda": dict(requests=32, n_adapters=32, d=4096, r=16, dtype="bfloat16")}
TARGETS = {"lean_memory_vs_naive": 0.25, "lean_time_vs_naive": 1.3, "lora_speedup_vs_loop": 4.0,
           "lora_decode_overhead_gpu": 0.15}


# ---------------------------------------------------------------- measuring


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak extra memory of a block, in MiB (see the module docstring for the method)."""

    def __init__(self, device: str):
        self.device = device
        self.method = None
        self.mib = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _rss_kb("VmRSS")
            self.method = "VmHWM after clear_refs, minus VmRSS before (fresh process)"
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss delta (fresh process)"
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.method.startswith("VmHWM"):
            self.mib = (_rss_kb("VmHWM") - self.base) / 1024
        else:
            self.mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device: str) -> tuple[float, list[float]]:
    times = _interleaved_times({"fn": fn}, repeats, device)["fn"]
    return statistics.median(times), times


def _interleaved_times(fns: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Per-call times of several functions, called in turns (each round runs every one once,
    starting with a different one each round): a noisy shared machine then slows all of them
    alike, so the ratios of a round's times carry over even when absolute times do not."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _paired_speedup(base: list[float], other: list[float]) -> float:
    """Median over rounds of base/other (both timed in the same rounds): how many times faster
    ``other`` is; ``_paired_speedup(slow, fast) - 1`` reads as an overhead."""
    return statistics.median(b / o for b, o in zip(base, other))


# ---------------------------------------------------------------- (a) linear JSD, one variant per process


def _linear_step(variant: str, shape: dict, device: str):
    from cogcore.kernels import (
        TeacherDense,
        distill_loss_from_logits,
        linear_cross_entropy,
        linear_distill_loss,
    )

    dtype = getattr(torch, shape["dtype"])
    N, H, V, chunk = shape["N"], shape["H"], shape["V"], shape["chunk"]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=g) * H**-0.5).to(dtype).requires_grad_()
    t_hidden = torch.randn(N, H, device=device, generator=g).to(dtype)
    t_weight = (torch.randn(V, H, device=device, generator=g) * H**-0.5).to(dtype)
    weights = torch.ones(N, device=device)
    labels = torch.randint(0, V, (N,), device=device, generator=g)

    if variant == "naive":

        def loss_fn():
            logits = hidden @ weight.T  # (N, V) and every intermediate of the loss kept for backward
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.T
            return (distill_loss_from_logits(logits, t_logits, loss="jsd", beta=0.5) * weights).sum() / N
    elif variant in ("chunked", "triton"):

        def loss_fn():
            return (
                linear_distill_loss(
                    hidden,
                    weight,
                    TeacherDense(t_hidden, t_weight),
                    weights,
                    loss="jsd",
                    beta=0.5,
                    chunk_size=chunk,
                    impl=variant,
                )
                / N
            )
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # compiled=False: torch.compile of its chunk step needs an inductor build (C++ on CPU),
        # which takes longer than the whole GPU check may run; this is Liger's eager chunked path
        module = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False, chunk_size=chunk
        )

        def loss_fn():
            return module(hidden, weight, t_hidden, t_weight, labels)
    elif variant == "liger_fused":
        from liger_kernel.transformers import LigerFusedLinearJSD

        module = LigerFusedLinearJSD(jsd_beta=0.5)

        def loss_fn():
            return module(hidden, weight, t_hidden, t_weight)
    elif variant.startswith("ce_"):  # (e) cross-entropy, the lm_head frozen (LoRA training)
        weight.requires_grad_(False)
        ce = {"ce_naive": lambda: (torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum") / N),
              "ce_chunked": lambda: linear_cross_entropy(hidden, weight, labels, weights, chunk_size=chunk,
                                                         impl="chunked") / N}
        if variant == "ce_liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            module = LigerFusedLinearCrossEntropyLoss(reduction="mean")
            ce["ce_liger"] = lambda: module(weight, hidden, labels)
        loss_fn = ce[variant]
    else:
        raise ValueError(variant)

    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    return step, (hidden, weight)


def run_linear_variant(variant: str, shape: dict, device: str, repeats: int) -> dict:
    """Runs in its own process: the first step is measured for memory, the next for time."""
    torch.manual_seed(0)
    step, (hidden, weight) = _linear_step(variant, shape, device)
    with PeakMemory(device) as peak:
        loss = step()
    first = {
        "loss_per_token": float(loss.detach()),
        "grad_hidden_norm": float(hidden.grad.float().norm()),
        "grad_weight_norm": float(weight.grad.float().norm()) if weight.grad is not None else None,
    }
    median, times = _median_time(step, repeats, device)
    return {
        "peak_mib": round(peak.mib, 1),
        "memory_method": peak.method,
        "time_s": round(median, 4),
        "times_s": [round(t, 4) for t in times],
        **first,
    }


def _run_variants(variants: list[str], title: str, device: str, quick: bool, repeats: int, progress) -> dict:
    shape = SHAPES[f"{device}_quick" if quick else device]
    results = {}
    for variant in variants:
        progress(f"{title} {variant} N={shape['N']} H={shape['H']} V={shape['V']} {shape['dtype']}")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_linear-variant",
            variant,
            "--device",
            device,
            "--repeats",
            str(repeats),
            "--threads",
            str(torch.get_num_threads()),
        ] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[variant] = {"error": (proc.stderr or proc.stdout)[-1500:]}
            continue
        results[variant] = json.loads(lines[-1])
    return results


def _vs_naive(results: dict, naive_name: str, grad_hidden: bool = False) -> dict:
    """Each variant's peak memory and time over the naive path's, and how far its loss (and, with
    ``grad_hidden``, its d loss / d hidden norm) is from the naive one."""
    naive, ratios = results.get(naive_name, {}), {}
    for name, r in results.items():
        if name != naive_name and "peak_mib" in r and "peak_mib" in naive:
            ratios[f"{name}_vs_naive"] = {
                "memory": round(r["peak_mib"] / naive["peak_mib"], 3),
                "time": round(r["time_s"] / naive["time_s"], 3),
                "loss_rel_diff": abs(r["loss_per_token"] / naive["loss_per_token"] - 1),
            }
            if grad_hidden:
                ratios[f"{name}_vs_naive"]["grad_hidden_norm_rel_diff"] = abs(
                    r["grad_hidden_norm"] / naive["grad_hidden_norm"] - 1)
    return ratios


def bench_ce_frozen(device: str, quick: bool, repeats: int, progress) -> dict:
    """(e) mean cross-entropy over the lm_head with the lm_head frozen (every LoRA run): the lean
    chunked path (d loss / d hidden made in forward) vs full logits + F.cross_entropy vs Liger's
    LigerFusedLinearCrossEntropyLoss (CUDA). Peak memory, median fwd+bwd time, loss and grad agreement."""
    shape = SHAPES[f"{device}_quick" if quick else device]
    # Liger's fused linear CE is a Triton kernel: CUDA only (on CPU the peer is the full-logits path
    # that transformers' models and TRL run)
    variants = ["ce_naive", "ce_chunked"] + (["ce_liger"] if device == "cuda" else [])
    results = _run_variants(variants, "(e) linear CE, frozen lm_head", device, quick, repeats, progress)
    out = {"shape": shape, "loss": "mean cross-entropy, lm_head frozen (grad to hidden only)", "variants": results,
           "ratios": {}}
    out["ratios"] = _vs_naive(results, "ce_naive", grad_hidden=True)
    ours, liger = results.get("ce_chunked", {}), results.get("ce_liger", {})
    if "time_s" in ours and "time_s" in liger:
        out["ratios"]["ce_chunked_vs_liger"] = {"memory": round(ours["peak_mib"] / liger["peak_mib"], 3),
                                                "time": round(ours["time_s"] / liger["time_s"], 3)}
    return out


def bench_linear(device: str, quick: bool, repeats: int, progress) -> dict:
    shape = SHAPES[f"{device}_quick" if quick else device]
    variants = ["naive", "chunked", "liger"] + (["triton", "liger_fused"] if device == "cuda" else [])
    results = _run_variants(variants, "(a) linear JSD", device, quick, repeats, progress)
    out = {"shape": shape, "loss": "generalized JSD, beta=0.5, T=1", "variants": results, "ratios": {}}
    out["ratios"] = _vs_naive(results, "naive")
    lean = out["ratios"].get("chunked_vs_naive")
    if lean:
        out["targets"] = {
            f"memory <= {TARGETS['lean_memory_vs_naive']} x naive": lean["memory"]
            <= TARGETS["lean_memory_vs_naive"],
            f"time <= {TARGETS['lean_time_vs_naive']} x naive": lean["time"] <= TARGETS["lean_time_vs_naive"],
        }
    return out


# ---------------------------------------------------------------- (b) gathered LoRA


def bench_lora(device: str, quick: bool, progress) -> dict:
    """Two row layouts: ``shuffled`` (adapters in random order: both gathers, the worst case;
    reported as ``impls``) and ``grouped`` (rows already in adapter segments, as a server or a
    multi-user trainer lays out its batch: no gather)."""
    from cogcore.kernels import gathered_lora

    n, rows, d, r = LORA["n_adapters"], LORA["rows_per_adapter"], LORA["d"], LORA["r"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n * rows, d, device=device, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(n, d, r, device=device, generator=g) * d**-0.5).to(dtype).requires_grad_()
    B = torch.randn(n, r, d, device=device, generator=g).to(dtype).requires_grad_()
    grouped = torch.arange(n, device=device).repeat_interleave(rows)
    layouts = {"shuffled": grouped[torch.randperm(n * rows, device=device, generator=g)], "grouped": grouped}
    scale = torch.full((n,), 2.0, device=device)
    dy = torch.randn(n * rows, d, device=device, generator=g).to(dtype)
    impls = ["loop", "torch"] + (["triton"] if device == "cuda" else [])
    repeats = 20 if quick else 200
    per_layout = {}
    for layout, idx in layouts.items():
        progress(f"(b) gathered LoRA {', '.join(impls)}, {layout} rows: {n} adapters x {rows} rows, d={d}, r={r}")
        fwd, fwd_bwd, outputs = {}, {}, {}
        for impl in impls:

            def forward(impl=impl, idx=idx):
                with torch.no_grad():
                    return gathered_lora(x, A, B, idx, scale, impl=impl)

            def forward_backward(impl=impl, idx=idx):
                x.grad = A.grad = B.grad = None
                y = gathered_lora(x, A, B, idx, scale, impl=impl)
                y.backward(dy)
                return y

            for _ in range(3):
                forward_backward()  # warm-up
            y = forward_backward()
            outputs[impl] = [t.detach().float() for t in (y, x.grad, A.grad, B.grad)]
            fwd[impl], fwd_bwd[impl] = forward, forward_backward
        t_fwd = _interleaved_times(fwd, repeats, device)
        t_fb = _interleaved_times(fwd_bwd, repeats, device)
        results = {impl: {"forward_ms": round(statistics.median(t_fwd[impl]) * 1e3, 4),
                          "fwd_bwd_ms": round(statistics.median(t_fb[impl]) * 1e3, 4)} for impl in impls}
        ref = outputs["loop"]
        for impl in impls[1:]:
            # paired: the median of per-round ratios (the implementations ran in turns)
            results[impl]["speedup_vs_loop"] = {
                "forward": round(_paired_speedup(t_fwd["loop"], t_fwd[impl]), 2),
                "fwd_bwd": round(_paired_speedup(t_fb["loop"], t_fb[impl]), 2),
            }
            results[impl]["max_rel_diff_vs_loop"] = {
                name: float((a - b).abs().max() / b.abs().max())
                for name, a, b in zip(("y", "dx", "dA", "dB"), outputs[impl], ref)
            }
        per_layout[layout] = results
    targets = {}
    for layout, results in per_layout.items():
        for part in ("forward", "fwd_bwd"):
            speedup = results["torch"]["speedup_vs_loop"][part]
            targets[f"torch >= {TARGETS['lora_speedup_vs_loop']} x loop ({part}, {layout} rows)"] = (
                speedup >= TARGETS["lora_speedup_vs_loop"])
    return {
        "shape": {**LORA, "rows": n * rows, "dtype": str(dtype).removeprefix("torch.")},
        "repeats": repeats,
        "impls": per_layout["shuffled"],
        "grouped": per_layout["grouped"],
        "targets": targets,
    }


# ---------------------------------------------------------------- (d) LoRA decode overhead


def _decode_time(fn, repeats: int, device: str) -> tuple[float, str]:
    """Seconds per call of a tiny decode-step op, and how it was measured.

    CUDA (the CPU path times the steps in turns instead): a single call is mostly launch
    latency, which a serving engine hides with CUDA graphs; so the op is captured in a graph and
    the graph is replayed ``repeats`` times between two syncs (falls back to back-to-back calls
    when the op cannot be captured)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, method = graph.replay, "CUDA graph replays"
    except Exception as exc:  # capture failed: time the launches too
        torch.cuda.synchronize()
        run, method = fn, f"back-to-back calls (graph capture failed: {type(exc).__name__})"
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, method


def bench_lora_decode(device: str, quick: bool, progress) -> dict:
    """Base projection vs base + gathered LoRA for one decode step of 32 requests / 32 adapters."""
    from cogcore.kernels import gathered_lora

    shape = DECODE[device]
    n, d, r, rows = shape["n_adapters"], shape["d"], shape["r"], shape["requests"]
    dtype = getattr(torch, shape["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, d, device=device, generator=g).to(dtype)
    W = (torch.randn(d, d, device=device, generator=g) * d**-0.5).to(dtype)
    A = (torch.randn(n, d, r, device=device, generator=g) * d**-0.5).to(dtype)
    B = (torch.randn(n, r, d, device=device, generator=g) * 0.1).to(dtype)
    idx = torch.randperm(n, device=device, generator=g)[:rows]  # every request its own adapter
    scale = torch.full((n,), 2.0, device=device)
    repeats = 50 if quick else 500
    impls = ["loop", "torch"] + (["triton"] if device == "cuda" else [])
    steps = {"base": lambda: torch.nn.functional.linear(x, W)}
    for impl in impls:
        steps[impl] = lambda impl=impl: torch.nn.functional.linear(x, W) + gathered_lora(x, A, B, idx, scale, impl=impl)
    results = {}
    with torch.no_grad():
        outputs = {impl: steps[impl]().float() for impl in impls}
        if device == "cuda":
            seconds = {}
            for name, step in steps.items():
                progress(f"(d) LoRA decode {name}: {rows} requests x {n} adapters, d={d}, r={r}")
                seconds[name], method = _decode_time(step, repeats, device)
                results[name] = {"ms": round(seconds[name] * 1e3, 4), "timing": method}
            for impl in impls:
                results[impl]["overhead_vs_base"] = round(seconds[impl] / seconds["base"] - 1, 3)
        else:  # in turns, so that a noisy machine slows the base and the LoRA steps alike
            progress(f"(d) LoRA decode base, {', '.join(impls)}: {rows} requests x {n} adapters, d={d}, r={r}")
            times = _interleaved_times(steps, repeats, device)
            for name, t in times.items():
                results[name] = {"ms": round(statistics.median(t) * 1e3, 4), "timing": "median of single calls in turns"}
            for impl in impls:
                results[impl]["overhead_vs_base"] = round(_paired_speedup(times[impl], times["base"]) - 1, 3)
    ref = outputs["loop"]
    for impl in impls:
        results[impl]["max_rel_diff_vs_loop"] = float((outputs[impl] - ref).abs().max() / ref.abs().max())
    best = min((v["overhead_vs_base"] for k, v in results.items() if k not in ("base", "loop")))
    out = {"shape": shape, "repeats": repeats, "impls": results}
    if device == "cuda":
        out["targets"] = {f"overhead <= {TARGETS['lora_decode_overhead_gpu']:.0%} over the base matmul":
                          best <= TARGETS["lora_decode_overhead_gpu"]}
    return out


# ---------------------------------------------------------------- (c) CUDA bandwidth


def _copy_peak_gbps(n_floats: int, repeats: int) -> float:
    src = torch.empty(n_floats, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    seconds, _ = _median_time(lambda: dst.copy_(src), repeats, "cuda")
    return 2 * n_floats * 4 / seconds / 1e9  # read + write


def _norm_timings(impl: str, rows: int, hidden: int, repeats: int) -> dict[str, tuple[float, int]]:
    """name -> (seconds, bytes the op must move at least), bf16 RMSNorm and SwiGLU."""
    from cogcore.kernels import rms_norm, swiglu

    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    gate = torch.randn(rows, 2 * hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    dz = torch.randn_like(gate)
    out = {
        "rms_norm_fwd": (
            _median_time(lambda: rms_norm(x, w, 1e-6, impl=impl), repeats, "cuda")[0],
            2 * x.numel() * 2,
        ),
        # fwd reads x, writes y; bwd reads x, dy and writes dx (dw is negligible)
        "rms_norm_fwd_bwd": (
            _median_time(
                lambda: torch.autograd.grad(rms_norm(x, w, 1e-6, impl=impl), (x, w), dy), repeats, "cuda"
            )[0],
            5 * x.numel() * 2,
        ),
        "swiglu_fwd": (
            _median_time(lambda: swiglu(gate, up, impl=impl), repeats, "cuda")[0],
            3 * gate.numel() * 2,
        ),
    }
    if impl != "liger":  # liger's backward writes into its inputs; timing it would need fresh copies
        out["swiglu_fwd_bwd"] = (
            _median_time(
                lambda: torch.autograd.grad(swiglu(gate, up, impl=impl), (gate, up), dz), repeats, "cuda"
            )[0],
            8 * gate.numel() * 2,
        )
    return out


def _chunk_kernel_timings(vocab: int, repeats: int) -> dict[str, tuple[float, int]]:
    from cogcore.kernels.linear_loss import _LossSpec
    from cogcore.kernels.triton_linear_loss import launch_chunk_kernel

    c = 1024
    s = torch.randn(c, vocab, device="cuda")
    t = torch.randn(c, vocab, device="cuda")
    work = s.clone()
    spec = _LossSpec("jsd", beta=0.5)
    loss_only, _ = _median_time(
        lambda: launch_chunk_kernel(spec, s, t, None, want_grad=False), repeats, "cuda"
    )
    with_grad, _ = _median_time(
        lambda: launch_chunk_kernel(spec, work.copy_(s), t, None, want_grad=True), repeats, "cuda"
    )
    refill, _ = _median_time(lambda: work.copy_(s), repeats, "cuda")
    return {
        "jsd_chunk_loss_only": (loss_only, 2 * c * vocab * 4),  # read s, t
        "jsd_chunk_loss_and_grad": (max(with_grad - refill, 1e-9), 3 * c * vocab * 4),  # read s, t; write ds
    }


def bench_bandwidth(quick: bool, progress) -> dict:
    """Achieved GB/s = bytes the op must move at least / time, vs a measured copy peak."""
    import importlib.util

    repeats = 10 if quick else 50
    progress("(c) device copy peak")
    peak = _copy_peak_gbps(2**28 if quick else 2**29, repeats)  # 1 / 2 GiB each way
    out = {"copy_peak_GBps": round(peak, 1), "ops": {}}
    timings = {}
    rows, hidden = (2048, 2048) if quick else (8192, 4096)
    for impl in ["reference", "triton"] + (["liger"] if importlib.util.find_spec("liger_kernel") else []):
        progress(f"(c) rms_norm / swiglu {impl}")
        timings.update(
            {f"{name}/{impl}": v for name, v in _norm_timings(impl, rows, hidden, repeats).items()}
        )
    progress("(c) loss chunk kernel")
    timings.update(_chunk_kernel_timings(SHAPES["cuda_quick" if quick else "cuda"]["V"], repeats))
    for name, (seconds, nbytes) in timings.items():
        gbps = nbytes / seconds / 1e9
        out["ops"][name] = {
            "time_ms": round(seconds * 1e3, 4),
            "GBps": round(gbps, 1),
            "fraction_of_copy_peak": round(gbps / peak, 3),
        }
    return out


# ---------------------------------------------------------------- driver


def keep_large_buffers() -> str:
    """Stop glibc from handing multi-MiB buffers back to the OS after every call.

    By default glibc serves large allocations with fresh mmaps or trims the heap top when they
    are freed, so an op whose temporaries are a few MiB (the gathered LoRA's gathered rows and
    outputs at 512 x 576) page-faults all of them in again on every call: measured here, 1.4 ms
    of a 0.25 ms op in some processes and not in others. The Python loop's per-adapter pieces
    are small and never hit it. Raising the two thresholds (what a jemalloc/tcmalloc build or
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ give a production job) removes the artefact
    for every implementation alike. Returns what was done, for the results file."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return "unchanged (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from malloc.h
    ok = libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 << 20) == 1
    return "glibc mmap threshold 64 MiB, trim threshold 128 MiB" if ok else "unchanged (mallopt failed)"


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    from importlib.metadata import PackageNotFoundError, version

    for name in ("triton", "liger-kernel", "transformers"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    return info


def _print_summary(result: dict) -> None:
    lin = result.get("linear_jsd")
    if lin:
        _print_linear(lin)
    lora = result.get("gathered_lora")
    if lora:
        _print_lora(lora)
    dec = result.get("lora_decode")
    if dec:
        sh = dec["shape"]
        print(f"(d) LoRA decode  {sh['requests']} requests x {sh['n_adapters']} adapters, d={sh['d']}, r={sh['r']}: "
              f"base {dec['impls']['base']['ms']:.4f} ms")
        for name, r in dec["impls"].items():
            if name != "base":
                print(f"    {name:<8} {r['ms']:8.4f} ms  overhead {r['overhead_vs_base']:+.1%}")
    if "bandwidth" in result:
        bw = result["bandwidth"]
        print(f"(c) bandwidth  copy peak {bw['copy_peak_GBps']} GB/s")
        for name, r in bw["ops"].items():
            print(f"    {name:<28} {r['GBps']:>8.1f} GB/s  ({r['fraction_of_copy_peak']:.2f} of peak)")
    for part in ("linear_jsd", "gathered_lora", "lora_decode"):
        for target, ok in result.get(part, {}).get("targets", {}).items():
            print(f"    target {target}: {'met' if ok else 'NOT met'}")


def _print_linear(lin: dict) -> None:
    print(
        f"\n(a) linear JSD  N={lin['shape']['N']} H={lin['shape']['H']} V={lin['shape']['V']} {lin['shape']['dtype']}"
    )
    print(f"    {'variant':<12} {'peak MiB':>10} {'time s':>9} {'mem x':>7} {'time x':>7}")
    for name, r in lin["variants"].items():
        if "error" in r:
            print(f"    {name:<12} error: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            continue
        ratio = lin["ratios"].get(f"{name}_vs_naive", {"memory": 1.0, "time": 1.0})
        print(
            f"    {name:<12} {r['peak_mib']:>10.1f} {r['time_s']:>9.3f} {ratio['memory']:>7.3f} {ratio['time']:>7.3f}"
        )


def _print_lora(lora: dict) -> None:
    print(
        f"(b) gathered LoRA  {lora['shape']['n_adapters']} adapters x {lora['shape']['rows_per_adapter']} rows"
    )
    for layout, impls in (("shuffled", lora["impls"]), ("grouped", lora.get("grouped", {}))):
        for name, r in impls.items():
            sp = r.get("speedup_vs_loop", {})
            print(
                f"    {layout:<9} {name:<8} fwd {r['forward_ms']:8.3f} ms  fwd+bwd {r['fwd_bwd_ms']:8.3f} ms"
                + (f"  speedup {sp['forward']:.2f}x / {sp['fwd_bwd']:.2f}x" if sp else "")
            )


def _save_png(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = []  # (title, labels, values, colour)
    if "linear_jsd" in result:
        lin = {k: v for k, v in result["linear_jsd"]["variants"].items() if "peak_mib" in v}
        panels.append(("(a) linear JSD: peak memory (MiB)", list(lin), [v["peak_mib"] for v in lin.values()],
                       "tab:blue"))
        panels.append(("(a) linear JSD: fwd+bwd time (s)", list(lin), [v["time_s"] for v in lin.values()],
                       "tab:orange"))
    if "gathered_lora" in result:
        lora = result["gathered_lora"]["impls"]
        panels.append(("(b) gathered LoRA (ms)", [f"{k}\nfwd" for k in lora] + [f"{k}\nfwd+bwd" for k in lora],
                       [v["forward_ms"] for v in lora.values()] + [v["fwd_bwd_ms"] for v in lora.values()],
                       "tab:green"))
    if "lora_decode" in result:
        dec = result["lora_decode"]["impls"]
        panels.append(("(d) LoRA decode step (ms)", list(dec), [v["ms"] for v in dec.values()], "tab:purple"))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    axes = axes[0]
    for ax, (title, labels, values, colour) in zip(axes, panels):
        ax.bar(labels, values, color=colour)
        ax.set_title(title)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cogcore bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: finishes in seconds")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed fwd+bwd steps per linear variant")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (CPU; default: torch's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/kernels_<device>.json)"
    )
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS),
        help="which benchmarks to run (default: all; bandwidth runs on CUDA only)",
    )
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="leave glibc's malloc thresholds alone (default: raise them, see keep_large_buffers)",
    )
    parser.add_argument("--_linear-variant", dest="linear_variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick or args.device == "cpu" else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "unchanged (--default-malloc)" if args.default_malloc else keep_large_buffers()

    if args.linear_variant:  # child process: one variant, one JSON line
        shape = SHAPES[f"{args.device}_quick" if args.quick else args.device]
        print(json.dumps(run_linear_variant(args.linear_variant, shape, args.device, repeats)))
        return 0

    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    result = {
        "machine": machine_info(args.device),
        "quick": args.quick,
        "repeats": repeats,
        "targets": TARGETS,
    }
    result["threads"] = torch.get_num_threads()
    result["malloc"] = malloc
    if "linear" in args.parts:
        result["linear_jsd"] = bench_linear(args.device, args.quick, repeats, progress)
    if "ce" in args.parts:
        result["linear_ce_frozen_head"] = bench_ce_frozen(args.device, args.quick, repeats, progress)
    if "lora" in args.parts:
        result["gathered_lora"] = bench_lora(args.device, args.quick, progress)
    if "decode" in args.parts:
        result["lora_decode"] = bench_lora_decode(args.device, args.quick, progress)
    if "bandwidth" in args.parts and args.device == "cuda":
        result["bandwidth"] = bench_bandwidth(args.quick, progress)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)

    out = (
        args.out
        or Path(__file__).resolve().parent
        / "results"
        / f"kernels_{args.device}{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _save_png(result, out.with_suffix(".png"))
    _print_summary(result)
    print(f"\nwrote {out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
