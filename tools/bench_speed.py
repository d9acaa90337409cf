"""Speed of the hybrid, side by side in one run, as a markdown table: a HymbaLayer against the host's
CausalSelfAttention (forward + backward), a whole training step of the GPT with and without a hybrid
layer (train_gpt.py's model and Muon + Adam), each eager and compiled with inductor, where the hybrid
layer's time goes (torch.profiler), and ssd_scan against the step-by-step reference and by chunk size.

On CUDA it runs as the host trains (bf16 autocast, fp32 master weights); on CPU in fp32. Compiled means
torch.compile(dynamic=False, fullgraph=True) with inductor, each contender compiled once (its first call
is the compile time; a recompile while timing is an error). The hybrid layer is configured by the
HYMBA_* env vars, as in training; the whole step's hybrid has HYMBA_LAYERS (default 0). Timings are
medians of interleaved samples (A, B, A, B, ...). For the challenge's step on a GPU: tools/bench_gpu.py.

The whole step on a CPU is 9 blocks x 128 by default: torch.optim.Muon orthogonalizes in bf16, which a
CPU without bf16 instructions emulates (here a 512x512 Muon update takes 2.2 s, a 128x128 one 28 ms),
so a 512-wide step would take minutes. Even so the optimizer is a large share of a CPU-sized step,
which is why the table gives it apart. On a shared CPU, quiet the machine or set OMP_NUM_THREADS=1:
an OpenMP thread that loses its core stalls the others at every barrier (a depthwise conv backward
measured 10 ms alone took up to 9 s beside other processes).

    python tools/bench_speed.py --out bench/speed_cpu.md   # layer: 4 x 1024 tokens, width 512, 8 heads / 4 KV;
                                                           # step: 9x128; about 10 minutes on 2 cores, mostly compiling
    python tools/bench_speed.py --step-shape 9x64          # the whole step at bench_quality.py's l9 preset
    python tools/bench_speed.py --no-compile               # eager only (no inductor compiles: a few minutes)
    python tools/bench_speed.py --quick                    # small shapes, eager only: a smoke run in seconds
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedkit import (STEP_SHAPES, command_line, compile_label, compiled_once, describe_device, first_call_s,  # noqa: E402
                      hymba_layer, interleaved_medians, scan_error, scan_inputs, step_models, sync, timer, train_gpt, training_step)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--step-shape", default="9x128", choices=sorted(STEP_SHAPES),
                   help="the whole training step's model and batch (default 9x128): "
                   + "; ".join(f"{k}: {v} ({v.about})" for k, v in STEP_SHAPES.items()))
    p.add_argument("--samples", type=int, default=15, help="timed samples per layer contender (median reported); a third as many whole steps")
    p.add_argument("--reps", type=int, default=5, help="layer fwd+bwd calls per sample")
    p.add_argument("--scan-lengths", default="256,1024,4096", help="T values for the scan comparison")
    p.add_argument("--chunks", default="16,32,64,128,256", help="chunk sizes Q for the scan fwd+bwd comparison at T=--seq")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the layers and the step compiled with inductor (default: on, off with --quick)")
    p.add_argument("--quick", action="store_true", help="small shapes and few samples, eager only (smoke test)")
    p.add_argument("--out", help="also write the tables to this markdown file")
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.dim, args.heads, args.kv_heads, args.step_shape = 2, 128, 64, 4, 2, "tiny"
        args.samples, args.reps, args.scan_lengths, args.chunks = 3, 1, "64,256", "16,64"
    if args.compile is None:
        args.compile = not args.quick
    return args


def memory_mib(fn, device: torch.device) -> str:
    """CUDA: peak memory allocated by one call above what was there before. CPU (no allocator
    statistics): the bytes of the tensors autograd saves for backward - the activation memory, which
    is what grows with batch x tokens - counted once per storage."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}"
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return f"{sum(storages.values()) / 2**20:.1f}"


def top_ops(fn, device: torch.device, calls: int = 3, top: int = 8) -> list[tuple[str, float, float]]:
    """The ops with the most self time over `calls` calls of fn: (name, ms per call, share of all self time)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    label = lambda name: re.sub(r"^## Call CompiledFxGraph (\w{6})\w*.*", r"inductor's fused kernels, graph \1", name)
    return [(label(e.key), getattr(e, key) / 1000 / calls, getattr(e, key) / total) for e in events[:top]]


def ratios(ms: dict, a: str, b: str) -> str:
    """a's time over b's, eager and (when measured) compiled."""
    return ", ".join(f"**{ms[a, mode] / ms[b, mode]:.2f}x** {mode}" for mode in ("eager", "compiled") if (a, mode) in ms)


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    measure = timer(device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=cuda)
    device_name = describe_device(device)  # on a shared CPU other processes skew timings: this says how much
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    backend = lambda mode: "inductor" if mode == "compiled" else None
    dash = lambda d, k, fmt: format(d[k], fmt) if k in d else "-"

    # one layer, eager and compiled: each compiled contender's first call is its compile
    hymba_layer.register_host_classes(train_gpt.CastedLinear, train_gpt.Rotary, train_gpt.apply_rotary_emb)
    head_dim = args.dim // args.heads
    cfg = hymba_layer.HymbaConfig.from_env(args.heads, args.kv_heads, head_dim)
    torch.manual_seed(0)
    layers = {
        "attention": train_gpt.CausalSelfAttention(args.dim, args.heads, args.kv_heads, 10000.0, 1.5),
        "hybrid": hymba_layer.HymbaLayer(args.dim, args.heads, args.kv_heads, 10000.0, 1.5, cfg=cfg),
    }
    x = torch.randn(args.batch, args.seq, args.dim, device=device, dtype=dtype, requires_grad=True)
    steps = {}
    for name, layer in layers.items():
        layer.to(device)
        torch.nn.init.normal_(layer.proj.weight, std=0.02)  # not zero, so the backward pass does real work
        for mode in modes:
            run = torch.compile(layer, dynamic=False, fullgraph=True, backend=backend(mode)) if backend(mode) else layer

            def step(run=run, layer=layer):
                with autocast():
                    y = run(x)
                y.float().square().mean().backward()
                layer.zero_grad(set_to_none=True)
                x.grad = None

            steps[name, mode] = step
    for name in layers:
        steps[name, "eager"]()  # fills the Rotary caches (first_call_s)
    layer_compile_s = {name: first_call_s(steps[name, "compiled"], device) for name in layers if args.compile}
    with compiled_once():
        layer_ms = interleaved_medians(steps, args.samples, args.reps, measure)
        profiles = {mode: top_ops(steps["hybrid", mode], device) for mode in modes}
    layer_mem = {name: memory_mib(steps[name, "eager"], device) for name in layers}
    params = {name: sum(p.numel() for p in layer.parameters()) for name, layer in layers.items()}

    # whole training steps: baseline and hybrid GPT, eager and compiled
    shape = STEP_SHAPES[args.step_shape]
    models = step_models()
    train_steps = {(name, mode): training_step(shape, settings, device, backend(mode)) for name, settings in models.items() for mode in modes}
    step_samples = max(3, args.samples // 3)
    with compiled_once():
        step_ms = interleaved_medians({k: s.step for k, s in train_steps.items()}, step_samples, 1, measure)
    step_compile_s = {name: train_steps[name, "compiled"].compile_s for name in models if args.compile}
    optimizer_ms = {k: statistics.median(s.optimizer_ms) for k, s in train_steps.items()}
    baseline, hybrid = models
    # the challenge's 524,288-token step makes the optimizer a small share; a CPU-sized step does not
    fwd_bwd = ", ".join(f"{(step_ms[hybrid, m] - optimizer_ms[hybrid, m]) / (step_ms[baseline, m] - optimizer_ms[baseline, m]):.2f}x {m}"
                        for m in modes)

    # the scan alone, forward, at the default layer's SSM shape (fewer batch rows at the longest T);
    # compiled on CUDA (as it trains), eager on CPU (a compile per length and chunk size is minutes there)
    scan = torch.compile(hymba_layer.ssd_scan, fullgraph=True) if cuda else hymba_layer.ssd_scan
    scan_mode = "compiled" if cuda else "eager"
    scan_rows = []
    with torch._dynamo.config.patch(recompile_limit=64):
        for T in (int(t) for t in args.scan_lengths.split(",")):
            b = args.batch if T <= 1024 else 1
            xs, log_a, B, C = inputs = scan_inputs(cfg, head_dim, b, T, device, dtype, seed=T)
            with torch.no_grad():
                fns = {"ssd_scan": lambda: scan(xs, log_a, B, C, cfg.scan_chunk), "reference": lambda: hymba_layer.ssd_scan_reference(xs, log_a, B, C)}
                ms = interleaved_medians(fns, max(3, args.samples // 5), 1, measure)
                err = scan_error(fns["ssd_scan"]()[0], inputs)
            scan_rows.append(f"| {T} | {b} x {cfg.ssm_heads} x {head_dim} x {cfg.ssm_state} | {ms['ssd_scan']:.2f} | {ms['reference']:.2f} "
                             f"| {ms['reference'] / ms['ssd_scan']:.1f}x | {err:.1e} |")

        # chunk size Q: the scan is exact for any Q, so Q is a speed choice (fwd+bwd, as in training)
        T, b = args.seq, args.batch
        leaves = [t.requires_grad_() for t in scan_inputs(cfg, head_dim, b, T, device, dtype, seed=1)]

        def scan_step(q):
            y, _ = scan(*leaves, q)
            y.float().square().mean().backward()
            for t in leaves:
                t.grad = None

        chunks = [int(q) for q in args.chunks.split(",")]
        chunk_ms = interleaved_medians({q: (lambda q=q: scan_step(q)) for q in chunks}, max(3, args.samples // 3), args.reps, measure)
    chunk_mem = {q: memory_mib(lambda q=q: scan_step(q), device) for q in chunks}
    best = min(chunk_ms.values())
    chunk_rows = [f"| {q} | {chunk_ms[q]:.2f} | {chunk_ms[q] / best:.2f}x | {chunk_mem[q]} |" for q in chunks]

    mem_label = "peak MiB" if cuda else "saved for backward, MiB"
    lines = [
        "# HymbaLayer speed",
        "",
        f"command: `{command_line()}`",
        "",
        f"device: {device_name}; torch {torch.__version__}; {'bf16 autocast' if cuda else 'fp32'}; "
        f"compiled: {compile_label('inductor') if args.compile else 'not measured (--no-compile)'}",
        f"hybrid config: {cfg}",
        "",
        f"## One layer, forward + backward ({args.batch} x {args.seq} tokens, width {args.dim}, {args.heads} heads, {args.kv_heads} KV heads)",
        "",
        f"| layer | params | eager ms | {mem_label} | compiled ms | compile s |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {params[name]} | {layer_ms[name, 'eager']:.2f} | {layer_mem[name]} | {dash(layer_ms, (name, 'compiled'), '.2f')} "
          f"| {dash(layer_compile_s, name, '.1f')} |" for name in layers),
        "",
        f"hybrid / attention time: {ratios(layer_ms, 'hybrid', 'attention')} (median of {args.samples} interleaved samples, {args.reps} calls each)",
        "",
        f"## Whole training step, forward + backward + Muon/Adam step ({shape}: {shape.about})",
        "",
        "| model | params | eager ms | eager optimizer ms | compiled ms | compiled optimizer ms | compile s |",
        "|---|---|---|---|---|---|---|",
        *(f"| {name} | {train_steps[name, 'eager'].params} | {step_ms[name, 'eager']:.1f} | {optimizer_ms[name, 'eager']:.1f} "
          f"| {dash(step_ms, (name, 'compiled'), '.1f')} | {dash(optimizer_ms, (name, 'compiled'), '.1f')} | {dash(step_compile_s, name, '.1f')} |"
          for name in models),
        "",
        f"{hybrid} / baseline step time: {ratios(step_ms, hybrid, baseline)} (median of {step_samples} interleaved steps); "
        f"forward + backward alone (step less optimizer): {fwd_bwd}",
        "",
        f"## Where the hybrid layer's time goes: top ops by self {'GPU' if cuda else 'CPU'} time (torch.profiler, 3 fwd+bwd calls, shape above)",
        "",
        "| mode | op | ms per call | share |",
        "|---|---|---|---|",
        *(f"| {mode} | `{op[:70]}` | {ms:.2f} | {share:.0%} |" for mode in modes for op, ms, share in profiles[mode]),
        "",
        f"## Scan, forward, {scan_mode} (batch x heads x P x N; error: max |y - y_ref| / max |y_ref|, the reference in fp64)",
        "",
        "| T | shape | ssd_scan ms | reference ms | speedup | max rel err |",
        "|---|---|---|---|---|---|",
        *scan_rows,
        "",
        f"## Scan chunk size Q, forward + backward, {scan_mode} ({b} x {T} tokens, {cfg.ssm_heads} heads x P {head_dim} x N {cfg.ssm_state})",
        "",
        f"| Q | median ms | vs fastest | {mem_label} |",
        "|---|---|---|---|",
        *chunk_rows,
        "",
        f"load average at the end: {os.getloadavg()[0]:.1f}" if not cuda else "",
    ]
    text = "\n".join(lines).rstrip() + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
