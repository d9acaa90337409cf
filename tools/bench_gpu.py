"""The challenge's training step on one GPU, the baseline against one hybrid layer: bench/gpu/<device>.md.

Both GPTs as train_gpt.py trains them on CUDA, built by its build_model and build_optimizers (see
tools/speedkit.py): bf16 autocast, fp32 master weights, Muon + Adam, the model compiled with
torch.compile(dynamic=False, fullgraph=True) and inductor. The challenge's shape: 9 blocks x 512, vocab
1024, seq 1024, 524,288 tokens per step as 8 micro-batches of 64 x 1024 (the host's gradient
accumulation on one GPU), on random tokens (no dataset needed). Reported: each model's compile time,
median step time over interleaved steps, tokens per second and peak memory, the step-time ratio, and
ssd_scan's bf16 error on the GPU against the fp64 step-by-step reference. About 5 minutes, most of it
compiling. The hybrid layer is configured by the HYMBA_* env vars (HYMBA_LAYERS default 0). --seq T trains
at context T with the same tokens per step (524,288 / (8 T) rows per micro-batch); tools/bench_speed.py on
the GPU gives the one-layer table against context (plain, windowed, hybrid, windowed hybrid).

    python tools/bench_gpu.py                              # writes bench/gpu/<device name>.md
    HYMBA_LAYERS=4 python tools/bench_gpu.py --out bench/gpu/h100_layer4.md
    HYMBA_LAYERS=1,2,3,5,6,7 HYMBA_WINDOW=512 python tools/bench_gpu.py --seq 8192 --out bench/gpu/h100_T8192_w512.md
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedkit import (ROOT, STEP_SHAPES, at_seq, command_line, compile_label, compiled_once, describe_device, environment,  # noqa: E402
                      hymba_layer, interleaved_medians, scan_error, scan_inputs, step_models, timer, training_step)

NAIVE_BASELINE_MS = 43.54  # the challenge's naive baseline, 8xH100, 65,536 tokens per GPU per step (golf_conventions 7.1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10, help="timed steps per model, interleaved (median reported)")
    p.add_argument("--seq", type=int, help="TRAIN_SEQ_LEN, same tokens per step (default: the shape's, 1024)")
    p.add_argument("--out", type=Path, help="markdown file (default: bench/gpu/<device name>.md, or <device name>_T<seq>.md with --seq)")
    # for the CPU test of the whole measurement path: a tiny model, on CPU, with a backend that needs no compiler
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="inductor", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: error: CUDA is not available: this benchmark times the GPU step (tools/bench_speed.py times the CPU)",
              file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train_gpt.py's main
    shape = STEP_SHAPES["tiny" if args.tiny else "9x512"]
    if args.seq:
        shape = at_seq(shape, args.seq, shape.tokens, shape.micro_batches)
    models = step_models()
    baseline, hybrid = models

    # one model at a time, so each peak is its own; then the steps interleaved
    steps = {name: training_step(shape, settings, device, args.backend) for name, settings in models.items()}
    with compiled_once():
        ms = interleaved_medians({name: s.step for name, s in steps.items()}, args.samples, 1, timer(device))

    # the scan at the layer's SSM shape, bf16 as in training, eager and compiled
    s = shape.settings
    head_dim = s["MODEL_DIM"] // s["NUM_HEADS"]
    with environment({**s, **models[hybrid]}):
        cfg = hymba_layer.HymbaConfig.from_env(s["NUM_HEADS"], s["NUM_KV_HEADS"], s["NUM_LAYERS"])
    groups = cfg.ssm_heads // (s["NUM_HEADS"] // s["NUM_KV_HEADS"])
    inputs = scan_inputs(cfg.ssm_heads, groups, head_dim, 4, s["TRAIN_SEQ_LEN"], device, torch.bfloat16, seed=0)
    scans = {"eager": hymba_layer.ssd_scan,
             "compiled": torch.compile(hymba_layer.ssd_scan, dynamic=False, fullgraph=True, backend=args.backend)}
    scan_err = {}
    for mode, scan in scans.items():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            y, _ = scan(*inputs, cfg.scan_chunk)
        scan_err[mode] = scan_error(y, inputs)

    name = describe_device(device)
    peak = lambda step: f"{step.peak_mib:.0f}" if step.peak_mib is not None else "-"
    lines = [
        f"# Training step on {name}",
        "",
        f"command: `{command_line()}`",
        "",
        f"device: {name}; torch {torch.__version__}; {'bf16 autocast, TF32' if device.type == 'cuda' else 'fp32 (train_gpt.py autocasts on CUDA only)'}; "
        f"{compile_label(args.backend)}",
        f"shape: {shape} ({shape.about}); random tokens",
        f"hybrid config: {cfg}",
        "",
        "| model | params | compile s | median step ms | optimizer ms | tokens/s | peak MiB |",
        "|---|---|---|---|---|---|---|",
        *(f"| {n} | {step.params} | {step.compile_s:.1f} | {ms[n]:.1f} | {statistics.median(step.optimizer_ms):.1f} "
          f"| {shape.tokens / ms[n] * 1000:,.0f} | {peak(step)} |" for n, step in steps.items()),
        "",
        f"{hybrid} / baseline step time: **{ms[hybrid] / ms[baseline]:.3f}x** (median of {args.samples} interleaved steps). "
        "Peak: torch.cuda.max_memory_allocated during a step, less what was allocated before that model was built.",
        *(["", f"For scale: the challenge's naive baseline logs {NAIVE_BASELINE_MS} ms per step on 8xH100, each GPU taking one of the 8 "
               f"micro-batches; this single GPU takes all 8 ({8 * NAIVE_BASELINE_MS:.0f} ms at that per-GPU speed)."] if not args.tiny else []),
        "",
        f"## ssd_scan, bf16 autocast, against the fp64 reference (4 x {s['TRAIN_SEQ_LEN']} tokens, {cfg.ssm_heads} heads x P {head_dim} "
        f"x N {head_dim}, {groups} B groups, chunk {cfg.scan_chunk}, log a in [-1, 0])",
        "",
        "| scan | max abs err / max abs reference |",
        "|---|---|",
        *(f"| {mode} | {err:.1e} |" for mode, err in scan_err.items()),
        "",
        f"wall time of this benchmark: {time.perf_counter() - t_start:.0f} s",
    ]
    text = "\n".join(lines) + "\n"
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower() if device.type == "cuda" else "cpu").strip("-")
    out = args.out or ROOT / "bench" / "gpu" / (f"{slug}_T{args.seq}.md" if args.seq else f"{slug}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, end="")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
