"""Muon's orthogonalization on this CPU: torch.optim.Muon's bf16 Newton-Schulz against train_gpt.py's fp32 one
(newton_schulz_fp32, what train_gpt uses on a CPU), side by side in one run, per matrix shape, median of repeats.

    python3 bench/ns_dtype.py                  # writes bench/results/ns_dtype_cpu.md

Whether the CPU has bf16 matmul units (avx512_bf16 / amx_bf16 in /proc/cpuinfo) decides the ratio: without them a
bf16 matmul is emulated and costs many times the fp32 one."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchkit import RESULTS  # first: it sets the import paths

import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import train_gpt

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SHAPES = [(128, 128), (256, 128), (128, 256), (256, 256), (512, 256), (256, 512), (256, 1024)]


def median_ms(fn, g: torch.Tensor, repeats: int = 7) -> float:
    fn(g, COEFFICIENTS, 5, 1e-7)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(g, COEFFICIENTS, 5, 1e-7)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags) or "unknown"


def main() -> None:
    lines = ["## Muon's Newton-Schulz (5 steps) on this CPU: bf16 (torch) against fp32 (train_gpt on a CPU)", "",
             "Command: `python3 bench/ns_dtype.py`. Median of 7 after one warm-up, per call. "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {cpu_flags()}.", "",
             "| shape | bf16 ms | fp32 ms | bf16 / fp32 |", "|---|---|---|---|"]
    for shape in SHAPES:
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        bf16, fp32 = median_ms(_zeropower_via_newtonschulz, g), median_ms(train_gpt.newton_schulz_fp32, g)
        lines.append(f"| {shape[0]} x {shape[1]} | {bf16:.2f} | {fp32:.2f} | {bf16 / fp32:.2f}x |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "ns_dtype_cpu.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
