"""A cost model (arithmetic, not a measurement) of one hybrid layer on an H100 inside the record stack.

For each step of ssd_scan and HybridHeads it counts the FLOPs and the bytes a compiled (inductor) graph moves through
HBM, assuming each listed intermediate is written once and read once (what inductor does at best when it cannot fuse
across a matmul or a scan), forward and backward (backward taken as 2x the forward's FLOPs and bytes, as for
matmul-bound layers). The attention heads the SSM heads replace are costed as FA3 (FLOPs of causal attention inside
segments of the record's 2,048-token rows, bytes of q/k/v/o only: FA3 keeps its tiles on chip). Time per part is
max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth). Inputs are flags; defaults are the record's shape
(98,304 tokens per GPU per step, 8 heads of 64 / 4 KV heads, 11 blocks, 121.7 ms per step) and H100 SXM figures
derated to what kernels of these shapes reach (bf16 dense 400 TFLOP/s for FA3, 150 for the scan's 64-wide batched
matmuls, 2.5 TB/s of the 3.35 TB/s HBM3 peak).

    python3 bench/cost_model.py                      # one hybrid layer, 4 of its 8 heads SSM heads
    python3 bench/cost_model.py --ssm-heads 2 --hybrid-layers 11
"""
from __future__ import annotations

import argparse


def scan_parts(T: int, Q: int, P: int, N: int, act: int) -> list[tuple[str, float, float]]:
    """(part, forward FLOPs, forward bytes) per SSM head over T tokens; act = bytes per activation (2: bf16)."""
    c = T // Q
    f32 = 4
    tq = T * Q  # the (tokens x Q) intermediates of steps 1-2
    return [
        ("dt, log-decay (fp32)", 4 * T * P, T * P * act + 2 * T * f32),
        ("segsum: expand, masked cumsum, mask (fp32)", 2 * tq, 3 * tq * f32),
        ("1. CB = C B^T per chunk", 2 * tq * N, 2 * T * N * act + tq * act),
        ("1. L = exp(segsum) * CB", 2 * tq, tq * f32 + 2 * tq * act),
        ("1. Y_diag = (CB * L) X", 2 * tq * P, tq * act + 2 * T * P * act),
        ("2. chunk states B^T (decay * X)", 2 * T * N * P, 2 * T * P * act + T * N * act + c * P * N * act),
        ("3. hand-over between chunks (fp32 recursion)", 2 * c * Q * P * N, 3 * c * P * N * f32),
        ("4. Y_off = decay * C S_start", 2 * T * N * P, T * N * act + c * P * N * act + 2 * T * P * act),
        ("D skip, rms norm, concat", 6 * T * P, 4 * T * P * act),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=98_304, help="tokens per GPU per step")
    p.add_argument("--seq", type=int, default=2048, help="longest attention segment (the record's row length)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ssm-heads", type=int, default=4, help="SSM heads per hybrid layer (of 8)")
    p.add_argument("--hybrid-layers", type=int, default=1)
    p.add_argument("--step-ms", type=float, default=121.7, help="the record's step time, 8xH100")
    p.add_argument("--scan-tflops", type=float, default=150.0)
    p.add_argument("--fa3-tflops", type=float, default=400.0)
    p.add_argument("--hbm-tbps", type=float, default=2.5)
    a = p.parse_args(argv)
    T, Q, d = a.tokens, a.chunk, a.head_dim
    ms = lambda flops, nbytes, tflops: max(flops / (tflops * 1e12), nbytes / (a.hbm_tbps * 1e12)) * 1e3
    print(f"# One hybrid layer on an H100: {T:,} tokens, chunk {Q}, head dim = state {d}, {a.ssm_heads} SSM heads\n")
    print("| part (per SSM head, forward) | GFLOP | MB moved | ms at the assumed rates |\n|---|---|---|---|")
    total_f = total_b = total_ms = 0.0
    for name, f, b in scan_parts(T, Q, d, d, 2):
        t = ms(f, b, a.scan_tflops)
        total_f, total_b, total_ms = total_f + f, total_b + b, total_ms + t
        print(f"| {name} | {f / 1e9:.2f} | {b / 1e6:.1f} | {t:.3f} |")
    print(f"| **per head, forward** | {total_f / 1e9:.2f} | {total_b / 1e6:.0f} | {total_ms:.3f} |")
    scan_ms = 3 * total_ms * a.ssm_heads  # forward + backward (2x)
    # FA3 for the same heads: causal attention inside segments of up to `seq` tokens (all full: the upper bound)
    attn_f = 4 * T * (a.seq / 2) * d * 3.5  # QK^T and PV, causal half, fwd + bwd ~ 3.5x fwd
    attn_b = 4 * T * d * 2 * 3  # q, k, v, o in bf16, fwd + bwd
    attn_ms = ms(attn_f, attn_b, a.fa3_tflops) * a.ssm_heads
    kernel_b = (4 * T * d * 2 + 2 * (T // Q) * d * d * 4) * 3  # a fused kernel: x, B, C, y and the chunk states only
    kernel_ms = ms(3 * total_f, kernel_b, a.scan_tflops) * a.ssm_heads
    added = (scan_ms - attn_ms) * a.hybrid_layers
    print(f"\nforward + backward, {a.ssm_heads} SSM heads: compiled PyTorch scan {scan_ms:.2f} ms "
          f"({3 * total_b * a.ssm_heads / 1e9:.2f} GB moved); FA3 on the same heads, every segment {a.seq} tokens "
          f"(upper bound): {attn_ms:.2f} ms; a fused scan kernel (tiles on chip): {kernel_ms:.2f} ms.")
    print(f"{a.hybrid_layers} hybrid layer(s): {added:+.2f} ms per step, a step ratio of "
          f"{(a.step_ms + added) / a.step_ms:.3f}x against {a.step_ms} ms; with a fused kernel "
          f"{(a.step_ms + (kernel_ms - attn_ms) * a.hybrid_layers) / a.step_ms:.3f}x.")
    print(f"A dedicated kernel pays when its saving, {(scan_ms - kernel_ms) * a.hybrid_layers:.2f} ms per step here "
          f"({100 * (scan_ms - kernel_ms) * a.hybrid_layers / a.step_ms:.1f}% of the steps in the 600 s budget), is worth "
          "more than its cost in compile (a custom op, so fullgraph holds) and maintenance: past ~1% of the step.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
