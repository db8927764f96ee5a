"""The SSD scan, the Mamba2 mixer and the compressor, each beside its reference, in one run.

    python bench/bench_ssd.py                                  # CPU defaults, about 2-3 minutes
    python bench/bench_ssd.py --lengths 1024,4096 --frames 64,128,256    # quicker
    python bench/bench_ssd.py --device cuda                    # GPU: fused kernels where installed
    python bench/bench_ssd.py --device cuda --skip mixer,compressor --lengths 4096,16384,65536

Sections (all float32, batch 1):
  ssd         model.ssd.chunk_scan vs the sequential recurrence of tests/test_ssd.py (one time step
              per iteration), forward, at each --lengths; the naive scan beyond --naive-max-len is
              extrapolated linearly from the longest measured length (its cost per step is fixed)
              and marked so. Our forward+backward is reported too. On CPU also the GEMM floor: the
              matrix products every chunked SSD must do, timed alone (the machine's ceiling). On
              CUDA also mamba_ssm's kernel called directly (MAMBAMIA_KERNELS=fused) and our PyTorch
              path (reference), forward and forward+backward: "ours" is the default dispatch, which
              should cost what the kernel costs.
  mixer       our causal Mamba2Mixer vs transformers' Mamba2Mixer on its torch path, same weights,
              forward and forward+backward; our bidirectional mixer's forward+backward beside them.
  compressor  model.compressor.VideoCompressor, kind "mambamia" vs the "transformer" ablation, time
              of a forward pass as the video grows over --frames, with growth ratios.

Time: the best of --repeats runs after one warm-up (slow runs are timed once, without warm-up);
on CPU with --threads 1 (the default) the calling thread's CPU seconds, which other processes on a
shared machine do not inflate, else wall seconds.
Peak memory: on CUDA, torch.cuda.max_memory_allocated above the allocation before the call; on CPU,
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its resident
set before the call, with glibc told to map blocks of 128 KiB and more separately and return them
on free, so the figure follows live memory (torch's or not) rather than the allocator's cache.
While timing, glibc keeps blocks up to 32 MiB and freed heap for reuse (for both sides alike).
The last line of output is one JSON object with every figure and ratio.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import kernels, ssd  # noqa: E402
from model.compressor import VideoCompressor  # noqa: E402
from model.config import CompressorConfig  # noqa: E402
from model.mixer import Mamba2Mixer  # noqa: E402
from tests.test_ssd import naive_scan  # noqa: E402

SLOW_S = 2.0  # a run longer than this is timed once
_LIBC = ctypes.CDLL("libc.so.6")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# While timing, blocks up to 32 MiB (glibc's ceiling) are recycled inside the heap and freed heap is
# kept (as a caching allocator would), rather than mapped and page-faulted afresh on every call:
# on these VMs a first touch costs ~2.5 ns per float, more than the arithmetic of a streaming op.
# Setting the mmap threshold freezes glibc's trim threshold at 128 KiB, hence the explicit trim one.
# Applies to both sides of a comparison.
_TIMING_MMAP_THRESHOLD = 32 * 2**20
_TIMING_TRIM_THRESHOLD = 2**30


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Memory the call needed above what was already held, in MiB (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # Blocks of 128 KiB and more get their own mappings, unmapped on free, so the resident set
    # follows live memory instead of glibc's cached heap; freed heap goes back to the OS first.
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    _LIBC.malloc_trim(0)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    fn()
    peak = (_rss_kib("VmHWM") - before) / 1024
    _timing_malloc()
    return peak


def _timing_malloc() -> None:
    _LIBC.mallopt(_M_MMAP_THRESHOLD, _TIMING_MMAP_THRESHOLD)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, _TIMING_TRIM_THRESHOLD)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    # On CPU with one intra-op thread all the work runs on this thread, and its CPU time is what
    # the call costs whatever else shares the machine; wall time on a loaded host is mostly waiting.
    clock = time.perf_counter if device.type == "cuda" or torch.get_num_threads() > 1 else time.thread_time

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    first = once()  # doubles as the warm-up
    if first > SLOW_S:
        return first
    return min(once() for _ in range(repeats))


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    seconds = best_time(fn, device, repeats)
    return {"s": round(seconds, 4), "peak_mib": round(peak_mib(fn, device), 1)}


def scan_inputs(length: int, args, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(length)
    h, p, n = args.heads, args.headdim, args.d_state

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    return {"x": rnd(1, length, h, p), "dt": rnd(1, length, h, scale=0.5),
            "A": -(torch.rand(h, generator=gen) + 0.1).to(device),
            "B": rnd(1, length, 1, n), "C": rnd(1, length, 1, n), "D": torch.ones(h, device=device),
            "dt_bias": rnd(h, scale=0.3)}


def bench_ssd(args, device: torch.device) -> list[dict]:
    rows = []
    naive_per_step = None
    for length in args.lengths:
        inputs = scan_inputs(length, args, device)

        def ours():
            with torch.no_grad():
                return ssd.chunk_scan(**inputs, chunk_size=args.chunk_size, dt_softplus=True)

        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

        def ours_train():
            ssd.chunk_scan(**leaves, chunk_size=args.chunk_size, dt_softplus=True).sum().backward()

        def naive():
            with torch.no_grad():
                return naive_scan(**inputs, dt_softplus=True)

        row = {"L": length, "ours_fwd": measure(ours, device, args.repeats),
               "ours_fwd_bwd": measure(ours_train, device, args.repeats)}
        if device.type == "cpu":
            row["gemm_floor_fwd_s"] = round(best_time(gemm_floor(length, args), device, args.repeats), 4)
        else:
            row.update(fused_and_reference(ours, ours_train, device, args.repeats))
        if length <= args.naive_max_len:
            row["naive_fwd"] = measure(naive, device, 1)
            row["naive_extrapolated"] = False
            naive_per_step = row["naive_fwd"]["s"] / length
        else:
            row["naive_fwd"] = {"s": round(naive_per_step * length, 4), "peak_mib": None}
            row["naive_extrapolated"] = True
        row["speedup_vs_naive"] = round(row["naive_fwd"]["s"] / row["ours_fwd"]["s"], 2)
        if "gemm_floor_fwd_s" in row:
            row["naive_over_gemm_floor"] = round(row["naive_fwd"]["s"] / row["gemm_floor_fwd_s"], 2)
        rows.append(row)
        print(f"ssd L={length:6d}  ours fwd {row['ours_fwd']['s']:.4f}s {row['ours_fwd']['peak_mib']:8.1f}MiB"
              f"  fwd+bwd {row['ours_fwd_bwd']['s']:.4f}s {row['ours_fwd_bwd']['peak_mib']:8.1f}MiB"
              f"  naive fwd {row['naive_fwd']['s']:.4f}s{' (extrapolated)' if row['naive_extrapolated'] else ''}"
              f"  speed-up x{row['speedup_vs_naive']}"
              + (f"  | GEMM floor {row['gemm_floor_fwd_s']:.4f}s: naive/floor x{row['naive_over_gemm_floor']}"
                 if "gemm_floor_fwd_s" in row else "")
              + (f"  | fused fwd {row['fused_fwd']['s']:.4f}s, fwd+bwd {row['fused_fwd_bwd']['s']:.4f}s;"
                 f" reference fwd {row['reference_fwd']['s']:.4f}s, fwd+bwd {row['reference_fwd_bwd']['s']:.4f}s"
                 if "fused_speedup_vs_reference_fwd" in row else ""), flush=True)
    return rows


def fused_and_reference(fwd: Callable[[], object], fwd_bwd: Callable[[], object], device: torch.device,
                        repeats: int) -> dict:
    """The same calls with the kernel forced (fused) and with the PyTorch path (reference); the
    dispatch's cost relative to the kernel, and the kernel's speed-up over the reference."""
    row: dict = {}
    for impl in ("fused", "reference"):
        try:
            with kernels.use(impl):
                row[f"{impl}_fwd"], row[f"{impl}_fwd_bwd"] = (measure(fwd, device, repeats),
                                                              measure(fwd_bwd, device, repeats))
        except RuntimeError as err:  # the kernel cannot run here: say why, keep the other figures
            row[f"{impl}_error"] = str(err)
    if "fused_fwd" in row and "reference_fwd" in row:
        row["fused_speedup_vs_reference_fwd"] = round(row["reference_fwd"]["s"] / row["fused_fwd"]["s"], 2)
        row["fused_speedup_vs_reference_fwd_bwd"] = round(row["reference_fwd_bwd"]["s"] / row["fused_fwd_bwd"]["s"], 2)
    return row


def gemm_floor(length: int, args) -> Callable[[], object]:
    """The matrix products no chunked SSD can avoid, alone: per chunk of cs tokens (the CPU tile),
    the incoming state read out ([cs, n] x [n, h*p]), the chunk's state contribution ([n, cs] x
    [cs, h*p]) and the within-chunk mixing ([cs, cs] x [cs, h*p], the per-head products' FLOPs as
    one), on contiguous operands with nothing else. naive / this time is the largest speed-up any
    implementation with these FLOPs can show on the machine; the rest of ours is the decay
    exponentials, masks and per-op dispatch of eager PyTorch."""
    cs = ssd.reference_tile(args.chunk_size, torch.device("cpu"))
    hp, n = args.heads * args.headdim, args.d_state
    chunks = math.ceil(length / cs)
    gen = torch.Generator().manual_seed(1)
    C, Bt, scores = (torch.randn(chunks, *shape, generator=gen) for shape in ((cs, n), (n, cs), (cs, cs)))
    w, state = torch.randn(chunks, cs, hp, generator=gen), torch.randn(n, hp, generator=gen)

    def run():
        with torch.no_grad():
            for k in range(chunks):
                torch.mm(C[k], state)
                torch.mm(scores[k], w[k])
                torch.mm(Bt[k], w[k])
    return run


def bench_mixer(args, device: torch.device) -> list[dict]:
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    d_model = args.heads * args.headdim // 2
    sizes = dict(d_state=args.d_state, headdim=args.headdim, expand=2, ngroups=1, chunk_size=args.chunk_size)
    torch.manual_seed(0)
    ours = Mamba2Mixer(d_model, **sizes).to(device)
    bidir = Mamba2Mixer(d_model, **sizes, bidirectional=True).to(device)
    hf_config = Mamba2Config(hidden_size=d_model, num_heads=args.heads, head_dim=args.headdim, expand=2,
                             state_size=args.d_state, n_groups=1, chunk_size=args.chunk_size,
                             num_hidden_layers=1, layer_norm_epsilon=1e-5)
    theirs = HFMamba2Mixer(hf_config, layer_idx=0).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)

    rows = []
    for length in args.lengths:
        h = torch.randn(1, length, d_model, generator=torch.Generator().manual_seed(length)).to(device)
        h_leaf = h.clone().requires_grad_()
        row = {"L": length}
        with torch.no_grad():
            diff = (ours(h) - theirs(h)).abs().max().item()
        for name, module in (("ours", ours), ("transformers", theirs), ("ours_bidirectional", bidir)):
            def fwd(module=module):
                with torch.no_grad():
                    return module(h)

            def fwd_bwd(module=module):
                module(h_leaf).sum().backward()

            if name != "ours_bidirectional":
                row[f"{name}_fwd"] = measure(fwd, device, args.repeats)
            row[f"{name}_fwd_bwd"] = measure(fwd_bwd, device, args.repeats)
        row["fwd_speedup_vs_transformers"] = round(row["transformers_fwd"]["s"] / row["ours_fwd"]["s"], 2)
        row["fwd_bwd_speedup_vs_transformers"] = round(
            row["transformers_fwd_bwd"]["s"] / row["ours_fwd_bwd"]["s"], 2)
        row["max_abs_diff"] = diff
        rows.append(row)
        print(f"mixer L={length:6d}  ours fwd {row['ours_fwd']['s']:.4f}s {row['ours_fwd']['peak_mib']:7.1f}MiB"
              f" | transformers fwd {row['transformers_fwd']['s']:.4f}s {row['transformers_fwd']['peak_mib']:7.1f}MiB"
              f" | fwd+bwd ours {row['ours_fwd_bwd']['s']:.4f}s {row['ours_fwd_bwd']['peak_mib']:7.1f}MiB"
              f" transformers {row['transformers_fwd_bwd']['s']:.4f}s {row['transformers_fwd_bwd']['peak_mib']:7.1f}MiB"
              f" bidirectional {row['ours_bidirectional_fwd_bwd']['s']:.4f}s"
              f" | x{row['fwd_speedup_vs_transformers']} / x{row['fwd_bwd_speedup_vs_transformers']}"
              f" | max diff {diff:.1e}", flush=True)
    return rows


def bench_compressor(args, device: torch.device) -> dict:
    results = {}
    for kind in ("mambamia", "transformer"):
        config = CompressorConfig(kind=kind, input_dim=args.feature_dim, patches_per_frame=args.patches,
                                  hidden_size=args.compressor_hidden, num_layers=2, k=args.k,
                                  taa_layers=1, keyframes=args.keyframes, d_state=args.d_state,
                                  headdim=args.headdim, ssd_chunk_size=args.chunk_size,
                                  transformer_heads=max(1, args.compressor_hidden // 64))
        torch.manual_seed(0)
        compressor = VideoCompressor(config).to(device).eval()
        rows = []
        for frames in args.frames:
            features = torch.randn(1, frames, args.patches, args.feature_dim,
                                   generator=torch.Generator().manual_seed(frames)).to(device)

            def fwd():
                with torch.no_grad():
                    return compressor(features)

            row = {"frames": frames, "tokens_in": frames * args.patches, **measure(fwd, device, args.repeats)}
            rows.append(row)
            print(f"compressor {kind:12s} frames={frames:5d}  {row['s']:.4f}s {row['peak_mib']:8.1f}MiB", flush=True)
        base = rows[0]
        for row in rows:
            row["time_growth"] = round(row["s"] / base["s"], 2)
            row["frames_growth"] = row["frames"] / base["frames"]
        # Per doubling of the frames: ~2 for linear cost, ~4 for quadratic.
        doublings = math.log2(rows[-1]["frames"] / base["frames"])
        results[kind] = {"rows": rows,
                         "growth_per_doubling": round((rows[-1]["s"] / base["s"]) ** (1 / doublings), 2)
                         if doublings > 0 else None}
    return results


def _allow_triton_only_mamba_ssm() -> None:
    """A mamba-ssm built without CUDA (the GPU check's wheel) lacks the extension its package
    __init__ imports; its Triton modules import fine on their own (tests/support/triton_cpu.py)."""
    import importlib.util

    if importlib.util.find_spec("mamba_ssm") and not importlib.util.find_spec("selective_scan_cuda"):
        from tests.support.triton_cpu import register_bare_mamba_ssm

        register_bare_mamba_ssm()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v]

    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on CPU; with 1, times are this thread's CPU seconds")
    parser.add_argument("--lengths", type=ints, default=[1024, 4096, 16384])
    parser.add_argument("--naive-max-len", type=int, default=16384,
                        help="longest length the naive scan is run at; longer ones are extrapolated")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--frames", type=ints, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--patches", type=int, default=16, help="patch tokens per frame")
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--compressor-hidden", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--keyframes", type=int, default=32)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: ssd,mixer,compressor")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        _allow_triton_only_mamba_ssm()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        _timing_malloc()
    skip = set(args.skip.split(",")) - {""}

    print(f"device {device}, torch threads {torch.get_num_threads()}, heads {args.heads} x headdim "
          f"{args.headdim}, d_state {args.d_state}, chunk_size {args.chunk_size} (PyTorch path tiles at "
          f"{ssd.reference_tile(args.chunk_size, device)})", flush=True)
    clock = "wall" if device.type == "cuda" or torch.get_num_threads() > 1 else "thread CPU time"
    report: dict = {"device": str(device), "threads": torch.get_num_threads(), "clock": clock, "heads": args.heads,
                    "headdim": args.headdim, "d_state": args.d_state, "chunk_size": args.chunk_size,
                    "memory": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) above RSS"}
    if "ssd" not in skip:
        report["ssd"] = bench_ssd(args, device)
    if "mixer" not in skip:
        report["mixer"] = bench_mixer(args, device)
    if "compressor" not in skip:
        report["compressor"] = bench_compressor(args, device)

    targets = {}
    if "ssd" in report:
        last = report["ssd"][-1]
        targets["ssd_speedup_vs_naive_at_max_L"] = last["speedup_vs_naive"]
        targets["ssd_naive_extrapolated"] = last["naive_extrapolated"]
        targets["ssd_meets_20x"] = last["speedup_vs_naive"] >= 20
        if "fused_fwd" in last:
            targets["ssd_dispatch_over_fused_fwd_at_max_L"] = round(last["ours_fwd"]["s"] / last["fused_fwd"]["s"], 3)
        if "naive_over_gemm_floor" in last:
            targets["ssd_naive_over_gemm_floor_at_max_L"] = last["naive_over_gemm_floor"]
    if "mixer" in report:
        last = report["mixer"][-1]
        targets["mixer_fwd_speedup_vs_transformers_at_max_L"] = last["fwd_speedup_vs_transformers"]
        targets["mixer_at_least_as_fast"] = all(r["fwd_speedup_vs_transformers"] >= 1 and
                                                r["fwd_bwd_speedup_vs_transformers"] >= 1
                                                for r in report["mixer"])
    if "compressor" in report:
        targets["compressor_growth_per_doubling"] = {
            kind: r["growth_per_doubling"] for kind, r in report["compressor"].items()}
    report["targets"] = targets
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
