"""ssd_scan in bf16 as the hosts run it, against the fp64 step-by-step recurrence: bench/results/scan_bf16_<device>.md.

Two bf16 modes: a bf16-cast model (bf16 inputs, no autocast) and bf16 autocast (bf16 inputs, as q/k/v arrive from
autocast linears, with autocast on around the scan). Decay regimes per SSM head: Mamba-2's init (log-decay per token
in [-1.6, -1e-3]), slow (-1e-4: the state sums ~10k tokens, the largest magnitudes), fast-forgetting ([-30, -5] per
token: decays down to e^-30), and Mamba init with a document start every ~500 tokens (-inf restarts). Inputs as
HybridHeads gives them: x = dt * v, B = k (unit rms per element), C = q / sqrt(head_dim), head_dim 64 = state 64.

Reported per row: the scan's error (max |y - ref| / max |ref|, and the same for the final state) and the floor,
the error of the exact output rounded once to bf16; a scan that rounds no worse than once is at the floor. The scan
keeps in fp32 what a bf16 rounding would spoil (log-decays, their segment sums and exps; the hand-over of states
between chunks, a recurrence over T/Q chunks); its matmuls and per-chunk intermediates run in the input's dtype.

    python3 bench/scan_bf16.py                       # T = 1,024 / 8,192 / 98,304 (the record's tokens per GPU)
    python3 bench/scan_bf16.py --lengths 1024 --out /tmp/x.md
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import benchkit  # noqa: F401  (import paths)
import torch

from hymba_layer import ssd_scan, ssd_scan_reference

REGIMES = {  # name -> log-decay per token, (T, H) -> tensor, and whether documents restart
    "mamba_init": lambda g, T, H: -torch.empty(T, H).uniform_(math.log(1e-3), math.log(1.6), generator=g).exp(),
    "slow": lambda g, T, H: torch.full((T, H), -1e-4),
    "fast_forgetting": lambda g, T, H: -torch.empty(T, H).uniform_(5, 30, generator=g),
    "mamba_init_restarts": lambda g, T, H: -torch.empty(T, H).uniform_(math.log(1e-3), math.log(1.6), generator=g).exp(),
}


def scan_inputs(regime: str, T: int, H: int = 2, d: int = 64, seed: int = 0):
    """fp64 inputs (batch 1, one KV group of H heads) in the HybridHeads scaling."""
    g = torch.Generator().manual_seed(seed)
    log_a = REGIMES[regime](g, T, H).double()
    if regime.endswith("restarts"):
        starts = torch.rand(T, generator=g) < 1 / 500
        log_a = log_a.masked_fill(starts[:, None], -math.inf)
    dt = torch.empty(T, H).uniform_(1e-3, 1e-1, generator=g).double()
    x = torch.randn(T, H, d, generator=g).double() * dt[..., None]
    B = torch.randn(T, 1, d, generator=g).double()
    C = torch.randn(T, H, d, generator=g).double() / math.sqrt(d)
    return x[None], log_a[None], B[None], C[None]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def row(regime: str, T: int, chunk: int) -> dict:
    x, log_a, B, C = scan_inputs(regime, T)
    t0 = time.perf_counter()
    y_ref, s_ref = ssd_scan_reference(x, log_a, B, C)
    out = dict(regime=regime, T=T, ref_s=time.perf_counter() - t0, floor=rel(y_ref.bfloat16(), y_ref),
               fp32=rel(ssd_scan(*(t.float() for t in (x, log_a, B, C)), chunk)[0], y_ref))
    bf = [t.bfloat16() if t is not log_a else t.float() for t in (x, log_a, B, C)]  # log-decays arrive fp32
    for mode, autocast in (("bf16_cast", False), ("bf16_autocast", True)):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y, s = ssd_scan(*bf, chunk)
        out[mode], out[mode + "_state"] = rel(y, y_ref), rel(s, s_ref)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,8192,98304", help="comma-separated T")
    p.add_argument("--chunk", type=int, default=64, help="the scan's chunk length Q")
    p.add_argument("--out", type=Path, default=benchkit.RESULTS / "scan_bf16_cpu.md")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    lines = ["# ssd_scan in bf16 against the fp64 recurrence", "",
             f"`python3 bench/scan_bf16.py --lengths {args.lengths} --chunk {args.chunk}`; torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}, CPU. Errors are max |y - ref| / max |ref| (y: output, "
             "state: final state); floor: the exact output rounded once to bf16.", "",
             "| regime | T | floor | fp32 | bf16 cast | bf16 cast state | bf16 autocast | bf16 autocast state |",
             "|---|---|---|---|---|---|---|---|"]
    for T in (int(t) for t in args.lengths.split(",")):
        for regime in REGIMES:
            r = row(regime, T, args.chunk)
            lines.append(f"| {regime} | {T:,} | {r['floor']:.1e} | {r['fp32']:.1e} | {r['bf16_cast']:.1e} | "
                         f"{r['bf16_cast_state']:.1e} | {r['bf16_autocast']:.1e} | {r['bf16_autocast_state']:.1e} |")
            print(lines[-1], f"(reference loop {r['ref_s']:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
