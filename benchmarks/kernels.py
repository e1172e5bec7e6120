"""Kernel microbenchmarks: Kimad's native ops against baselines measured in the same run.

    python benchmarks/kernels.py [--quick] [--device cpu|cuda] [--json PATH]

Baselines per row: "floor" is ``torch.add(a, b, out=c)`` on the same d (a memory-bound pass
that reads 2d and writes d floats), "torch" is the plain torch composition of the same op.
Every figure is the median of ``--repeats`` timed runs after one warm-up (at d = 100M: a third as
many, at least 3; the slow torch compositions at d >= 25M: a third of those, at least 1, and one
run without warm-up for the sort-based error profile). The full run (d = 1M, 25M, 100M;
densities 0.1%, 1%, 10%) holds about 5 GB and takes several minutes; ``--quick`` is d = 25M at
1%. The table says the machine it ran on; ``--json`` writes the rows (op, d, density,
median_ms, x_floor, x_torch).

Ops covered so far:
  decode8   decode-and-accumulate of 8 ranks' sparse messages (density each) into a dense d:
            one ``sparse_sum`` call that overwrites a preallocated ``out`` with the averaged sum
            (zeroing included in the time; bounds checks included). Indices are ascending, as
            ``topk_encode`` emits them, and overlap across ranks. vs torch: ``out.zero_()`` and
            ``out.index_add_(0, idx, values)`` per rank (duplicates add up in both).
  ef_topk   fused EF21 exact top-k encode (k = density * d) vs torch: ``v = g - h;
            torch.topk(v.abs(), k); v.gather; h[idx] += vals``.
  profile16 error profile for 16 densities geometric from 1e-4 to 1 (one histogram pass) vs
            torch: ``v = g - h``, one sort of ``v**2`` and a cumulative sum read at the 16 ks.
  prof+topk the plugin's per-tensor pair at the density: ``topk_profile`` at 16 densities (incl. this
            one) then ``topk_encode`` reusing the profile's histogram (one pass over v fewer). Its
            "x torch" column is against the same two ops unfused (the encode builds its own
            histogram), not torch; what profiling adds on top of the encode is this row's time
            minus ef_topk's, in floors.
  bitmap    (CPU, densities above about 1/16, where a top-k message sends a bitmap instead of 16-bit block
            offsets) the decode of one message's bitmap to its k int32 positions (``decode_topk``'s native scan,
            bounds and count checks included) vs torch: unpack the bits (shift and mask) and ``nonzero``.
  qsgd4_ef  fused EF QSGD encode, 4 bits, buckets of 512 (payload + state update) vs torch:
            ``v = g + e``, bucket norms, ``floor(|v| / N * 7 + rand)``, ``e = v - Q(v)``, nibble packing.
  sign_ef   fused EF scaled-sign encode, buckets of 512, vs torch: ``v = g + e``, bucket mean |v|,
            ``e = v - Q(v)``, sign bits packed 8 per byte.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from kimad.bench.machine import cpu_model
from kimad.compressors.topk import decode_topk, encode_topk
from kimad.compressors.wire import HEADER_BYTES, TOPK_VALUE_BYTES, IndexKind, topk_index_kind
from kimad.ops import error_profile, qsgd_encode, sign_encode, sparse_sum, topk_encode, topk_profile


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` runs (after one warm-up unless told not to)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if warmup:
        fn()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, torch {torch.__version__}"


def slow_repeats(d: int, repeats: int) -> int:
    """Timed runs of the slow torch compositions (top-k, sort) at size d."""
    return repeats if d < 25_000_000 else max(1, repeats // 3)


def bench_decode(d: int, density: float, ranks: int, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    k = max(1, int(d * density))
    msgs = []
    for _ in range(ranks):
        # About k distinct ascending indices (unique() sorts), drawn in O(k) rather than a randperm of d.
        idx = torch.randint(0, d, (k,), generator=g).unique().to(torch.int32)
        msgs.append((torch.randn(idx.numel(), generator=g).to(device), idx.to(device)))
    msgs64 = [(v, i.long()) for v, i in msgs]
    out = torch.zeros(d, device=device)
    a, b, c = torch.randn(d, device=device), torch.randn(d, device=device), torch.empty(d, device=device)

    def kimad_decode():
        sparse_sum(out, msgs, scale=1.0 / ranks)

    def torch_decode():
        out.zero_()
        for v, i in msgs64:
            out.index_add_(0, i, v, alpha=1.0 / ranks)

    floor = median_ms(lambda: torch.add(a, b, out=c), repeats, device)
    ours = median_ms(kimad_decode, repeats, device)
    ref = median_ms(torch_decode, repeats, device)
    return {"op": f"decode{ranks}", "d": d, "density": density, "median_ms": round(ours, 3),
            "x_floor": round(ours / floor, 2), "x_torch": round(ref / ours, 2), "floor_ms": round(floor, 3),
            "torch_ms": round(ref, 3)}


def bench_bitmap(d: int, density: float, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(4)
    k = max(1, int(d * density))
    idx = torch.randint(0, d, (k,), generator=g).unique().to(torch.int32)
    message = encode_topk(torch.randn(idx.numel(), generator=g), idx, d)
    bitmap = message[HEADER_BYTES + TOPK_VALUE_BYTES * idx.numel():]
    a, b, c = torch.randn(d), torch.randn(d), torch.empty(d)
    shifts = torch.arange(8, dtype=torch.uint8)

    def torch_bitmap():
        ((bitmap.unsqueeze(1) >> shifts) & 1).view(-1).view(torch.bool)[:d].nonzero().view(-1).to(torch.int32)

    floor = median_ms(lambda: torch.add(a, b, out=c), repeats, device)
    ours = median_ms(lambda: decode_topk(message, d), repeats, device)
    return _row("bitmap", d, density, ours, floor, median_ms(torch_bitmap, repeats, device))


def _row(op: str, d: int, density: float, ours: float, floor: float, ref: float) -> dict:
    return {"op": op, "d": d, "density": density, "median_ms": round(ours, 3),
            "x_floor": round(ours / floor, 2), "x_torch": round(ref / ours, 2), "floor_ms": round(floor, 3),
            "torch_ms": round(ref, 3)}


def bench_ef_topk(d: int, density: float, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    k = max(1, int(d * density))
    grad = torch.randn(d, generator=g).to(device)
    h = (0.1 * torch.randn(d, generator=g)).to(device)
    h_torch = h.clone()
    a, b, c = torch.randn(d, device=device), torch.randn(d, device=device), torch.empty(d, device=device)

    def torch_ef_topk():
        v = grad - h_torch
        idx = torch.topk(v.abs(), k, sorted=False).indices
        vals = v.gather(0, idx)
        h_torch[idx] += vals
        return vals, idx

    floor = median_ms(lambda: torch.add(a, b, out=c), repeats, device)
    ours = median_ms(lambda: topk_encode(grad, h, k, mode="ef21"), repeats, device)
    ref = median_ms(torch_ef_topk, slow_repeats(d, repeats), device)
    return _row("ef_topk", d, density, ours, floor, ref)


def bench_profile16(d: int, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(d, generator=g).to(device)
    h = (0.1 * torch.randn(d, generator=g)).to(device)
    ks = profile_ks(d)
    a, b, c = torch.randn(d, device=device), torch.randn(d, device=device), torch.empty(d, device=device)

    def torch_profile():
        sq = (grad - h).double().pow(2)
        desc = torch.sort(sq, descending=True).values
        kept = torch.cumsum(desc, 0)
        total = kept[-1]
        return [float(total - kept[k - 1]) for k in ks]

    floor = median_ms(lambda: torch.add(a, b, out=c), repeats, device)
    ours = median_ms(lambda: error_profile(grad, h, ks, mode="ef21"), repeats, device)
    ref = median_ms(torch_profile, max(1, repeats // 3), device) if d < 25_000_000 else \
        median_ms(torch_profile, 1, device, warmup=False)
    return _row("profile16", d, 1.0, ours, floor, ref)


def profile_ks(d: int, k: int | None = None) -> list[int]:
    """16 candidate ks at densities geometric from 1e-4 to 1 (plus k when given), ascending."""
    return sorted({min(d, max(1, round(d * 10 ** (-4 + 4 * i / 15)))) for i in range(16)} | ({k} if k else set()))


def bench_profile_encode(d: int, density: float, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(5)
    k = max(1, int(d * density))
    grad = torch.randn(d, generator=g).to(device)
    h = (0.1 * torch.randn(d, generator=g)).to(device)
    ks = profile_ks(d, k)
    a, b, c = torch.randn(d, device=device), torch.randn(d, device=device), torch.empty(d, device=device)
    buffer = None

    def fused():
        nonlocal buffer
        profile = topk_profile(grad, h, ks, mode="ef21", buffer=buffer)
        buffer = profile.buffer  # refilled next time, as kimad.feedback does per tensor
        return topk_encode(grad, h, k, mode="ef21", profile=profile)

    def unfused():
        error_profile(grad, h, ks, mode="ef21")
        return topk_encode(grad, h, k, mode="ef21")

    floor = median_ms(lambda: torch.add(a, b, out=c), repeats, device)
    ours = median_ms(fused, repeats, device)
    ref = median_ms(unfused, repeats, device)
    return _row("prof+topk", d, density, ours, floor, ref)


def _buckets(v: torch.Tensor, bucket: int) -> torch.Tensor:
    """v zero-padded to whole buckets, as a (buckets, bucket) view."""
    return torch.nn.functional.pad(v, (0, -v.numel() % bucket)).view(-1, bucket)


def bench_qsgd4_ef(d: int, repeats: int, device: torch.device, bucket: int = 512) -> dict:
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(d, generator=g).to(device)
    e = (0.1 * torch.randn(d, generator=g)).to(device)
    e_torch = e.clone()
    a, b, c = torch.randn(d, device=device), torch.randn(d, device=device), torch.empty(d, device=device)
    bit_weights = torch.tensor([1, 16], dtype=torch.uint8, device=device)

    def torch_qsgd4():
        v = grad + e_torch
        vb = _buckets(v, bucket)
        norms = vb.norm(dim=1, keepdim=True)
        x = vb.abs() * (7.0 / norms.clamp_min(1e-30))
        level = (x + torch.rand_like(x)).floor_().clamp_(max=7.0)
        q = torch.where(vb < 0, -level, level) * (norms / 7.0)
        e_torch.copy_(v - q.view(-1)[:d])
        codes = (level.to(torch.uint8) | ((vb < 0).to(torch.uint8) << 3)).view(-1)[:d]
        codes = torch.nn.functional.pad(codes, (0, d % 2)).view(-1, 2)
        return norms, (codes * bit_weights).sum(1, dtype=torch.uint8)

    floor = median_ms(lambda: torch.add(a, b, out=c), repeats, device)
    seeds = iter(range(10**9))
    ours = median_ms(lambda: qsgd_encode(grad, e, bits=4, bucket=bucket, seed=next(seeds), mode="ef"), repeats, device)
    ref = median_ms(torch_qsgd4, repeats, device)
    return _row("qsgd4_ef", d, 1.0, ours, floor, ref)


def bench_sign_ef(d: int, repeats: int, device: torch.device, bucket: int = 512) -> dict:
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(d, generator=g).to(device)
    e = (0.1 * torch.randn(d, generator=g)).to(device)
    e_torch = e.clone()
    a, b, c = torch.randn(d, device=device), torch.randn(d, device=device), torch.empty(d, device=device)
    bit_weights = (2 ** torch.arange(8, device=device)).to(torch.uint8)

    def torch_sign():
        v = grad + e_torch
        vb = _buckets(v, bucket)
        scale = vb.abs().mean(dim=1, keepdim=True)
        negative = vb < 0
        e_torch.copy_(v - torch.where(negative, -scale, scale).view(-1)[:d])
        bits = torch.nn.functional.pad(negative.view(-1)[:d], (0, -d % 8)).view(-1, 8).to(torch.uint8)
        return scale, (bits * bit_weights).sum(1, dtype=torch.uint8)

    floor = median_ms(lambda: torch.add(a, b, out=c), repeats, device)
    ours = median_ms(lambda: sign_encode(grad, e, bucket=bucket, mode="ef"), repeats, device)
    ref = median_ms(torch_sign, repeats, device)
    return _row("sign_ef", d, 1.0, ours, floor, ref)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only d = 25M at density 1%% (about a minute)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the tensors live (default: cpu)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per figure (default: 7)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible to torch")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    sizes = [25_000_000] if args.quick else [1_000_000, 25_000_000, 100_000_000]
    densities = [0.01] if args.quick else [0.001, 0.01, 0.1]
    print(f"machine: {machine(device)}")
    print("x_floor = median / median of torch.add(a, b, out=c) on the same d;"
          " x_torch = torch composition's median / ours (higher is better)")
    header = f"{'op':<10}{'d':>13}{'density':>9}{'median ms':>11}{'x floor':>9}{'x torch':>9}"
    print(header)
    print("-" * len(header))
    rows = []

    def print_row(row: dict) -> None:
        print(f"{row['op']:<10}{row['d']:>13,}{row['density']:>9.3%}{row['median_ms']:>11.2f}{row['x_floor']:>9.2f}"
              f"{row['x_torch']:>9.2f}", flush=True)

    started = time.perf_counter()
    for d in sizes:
        reps = args.repeats if d <= 25_000_000 else max(3, args.repeats // 3)
        for density in densities:
            bitmap = device.type == "cpu" and topk_index_kind(d, max(1, int(d * density))) is IndexKind.BITMAP
            for row in (bench_decode(d, density, 8, reps, device),
                        bench_ef_topk(d, density, reps, device),
                        bench_profile_encode(d, density, reps, device),
                        *([bench_bitmap(d, density, reps, device)] if bitmap else [])):
                rows.append(row)
                print_row(row)
        for row in (bench_profile16(d, reps, device), bench_qsgd4_ef(d, reps, device),
                    bench_sign_ef(d, reps, device)):
            rows.append(row)
            print_row(row)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(device), "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
