"""Speed of a HymbaLayer against the host's CausalSelfAttention, and of ssd_scan against the step-by-step
reference, as a markdown table.

On CUDA it runs as the host trains (bf16 autocast, fp32 master weights, torch.compile fullgraph); on CPU in
fp32 eager (--compile to use inductor there). The hybrid layer is configured by the HYMBA_* env vars, as in
training (HYMBA_LAYERS is not needed). Timings are medians of interleaved samples (A, B, A, B, ...).

    python tools/bench_speed.py                      # default shape: 4 x 1024 tokens, width 512, 8 heads, 4 KV heads
    python tools/bench_speed.py --quick              # a small smoke run
    python tools/bench_speed.py --out bench/speed_cpu.md
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hymba_layer  # noqa: E402
import train_gpt  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--samples", type=int, default=15, help="timed samples per contender (median reported)")
    p.add_argument("--reps", type=int, default=5, help="fwd+bwd calls per sample")
    p.add_argument("--scan-lengths", default="256,1024,4096", help="T values for the scan comparison")
    p.add_argument("--chunks", default="16,32,64,128,256", help="chunk sizes Q for the scan fwd+bwd comparison at T=--seq")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile(fullgraph=True) the layers and the scan (default: on for CUDA, off for CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes and few samples (smoke test)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.dim, args.heads, args.kv_heads = 2, 128, 64, 4, 2
        args.samples, args.reps, args.scan_lengths, args.chunks = 3, 1, "64,256", "16,64"
    return args


def timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def measure(fn, reps: int) -> float:
        """ms per call of fn, over reps calls."""
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return 1000 * (time.perf_counter() - t0) / reps

    return measure


def interleaved_medians(fns: dict, samples: int, reps: int, measure) -> dict[str, float]:
    for fn in fns.values():  # warm-up (and compilation)
        fn(), fn()
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            times[name].append(measure(fn, reps))
    return {name: statistics.median(ts) for name, ts in times.items()}


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


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    use_compile = cuda if args.compile is None else args.compile
    compile_ = (lambda f: torch.compile(f, fullgraph=True)) if use_compile else (lambda f: f)
    measure = timer(device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=cuda)
    # on a shared CPU other processes skew timings: the load average says how much
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})"

    hymba_layer.register_host_classes(train_gpt.CastedLinear, train_gpt.Rotary, train_gpt.apply_rotary_emb)
    os.environ.setdefault("HYMBA_LAYERS", "0")
    shape = types.SimpleNamespace(num_layers=1, model_dim=args.dim, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                  rope_base=10000.0, qk_gain_init=1.5)
    cfg = hymba_layer.HymbaConfig.from_env(shape)
    torch.manual_seed(0)
    layers = {
        "attention": train_gpt.CausalSelfAttention(args.dim, args.heads, args.kv_heads, 10000.0, 1.5),
        "hybrid": hymba_layer.HymbaLayer(args.dim, args.heads, args.kv_heads, 10000.0, 1.5, cfg),
    }
    x = torch.randn(args.batch, args.seq, args.dim, device=device, dtype=dtype, requires_grad=True)
    steps = {}
    for name, layer in layers.items():
        layer.to(device)
        torch.nn.init.normal_(layer.proj.weight, std=0.02)  # not zero, so the backward pass does real work
        run = compile_(layer)

        def step(run=run, layer=layer):
            with autocast():
                y = run(x)
            y.float().square().mean().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None

        steps[name] = step
    layer_ms = interleaved_medians(steps, args.samples, args.reps, measure)
    layer_mem = {name: memory_mib(fn, device) for name, fn in steps.items()}
    params = {name: sum(p.numel() for p in layer.parameters()) for name, layer in layers.items()}

    # the scan alone, forward, at the default layer's SSM shape (fewer batch rows at the longest T)
    heads, head_dim = cfg.ssm_heads, args.dim // args.heads
    scan = compile_(hymba_layer.ssd_scan)

    def scan_inputs(b: int, T: int, seed: int) -> list[torch.Tensor]:
        """x, log_a (in [-1, 0]), B, C for ssd_scan at the layer's SSM shape."""
        g = torch.Generator(device=device).manual_seed(seed)
        return [torch.randn(b, T, heads, head_dim, device=device, generator=g).to(dtype), -torch.rand(b, T, heads, device=device, generator=g),
                *(torch.randn(b, T, cfg.groups, cfg.ssm_state, device=device, generator=g).to(dtype) for _ in range(2))]

    scan_rows = []
    for T in (int(t) for t in args.scan_lengths.split(",")):
        b = args.batch if T <= 1024 else 1
        xs, log_a, B, C = scan_inputs(b, T, seed=T)
        with torch.no_grad():
            fns = {"ssd_scan": lambda: scan(xs, log_a, B, C, cfg.scan_chunk), "reference": lambda: hymba_layer.ssd_scan_reference(xs, log_a, B, C)}
            ms = interleaved_medians(fns, max(3, args.samples // 5), 1, measure)
            y, _ = fns["ssd_scan"]()
            y_ref, _ = hymba_layer.ssd_scan_reference(xs.double(), log_a.double(), B.double(), C.double())
        err = ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item()
        scan_rows.append(f"| {T} | {b} x {heads} x {head_dim} x {cfg.ssm_state} | {ms['ssd_scan']:.2f} | {ms['reference']:.2f} "
                         f"| {ms['reference'] / ms['ssd_scan']:.1f}x | {err:.1e} |")

    # chunk size Q: the scan is exact for any Q, so Q is a speed choice (fwd+bwd, as in training)
    T, b = args.seq, args.batch
    leaves = [t.requires_grad_() for t in scan_inputs(b, T, seed=1)]

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

    hymba_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("HYMBA_") and k != "HYMBA_LAYERS")
    command = " ".join(filter(None, [hymba_env, "python", *map(shlex.quote, sys.argv)]))
    lines = [
        "# HymbaLayer speed",
        "",
        f"command: `{command}`",
        "",
        f"device: {device_name}; torch {torch.__version__}; {'bf16 autocast' if cuda else 'fp32'}; torch.compile: {'on' if use_compile else 'off'}",
        f"hybrid config: {cfg}",
        "",
        f"## One layer, forward + backward ({args.batch} x {args.seq} tokens, width {args.dim}, {args.heads} heads, {args.kv_heads} KV heads)",
        "",
        f"| layer | params | median ms | {'peak MiB' if cuda else 'saved for backward, MiB'} |",
        "|---|---|---|---|",
        *(f"| {name} | {params[name]} | {layer_ms[name]:.2f} | {layer_mem[name]} |" for name in layers),
        "",
        f"hybrid / attention time: **{layer_ms['hybrid'] / layer_ms['attention']:.2f}x** "
        f"(median of {args.samples} interleaved samples, {args.reps} calls each)",
        "",
        "## Scan, forward (batch x heads x P x N; error: max |y - y_ref| / max |y_ref|, the reference in fp64)",
        "",
        "| T | shape | ssd_scan ms | reference ms | speedup | max rel err |",
        "|---|---|---|---|---|---|",
        *scan_rows,
        "",
        f"## Scan chunk size Q, forward + backward ({b} x {T} tokens, {heads} heads x P {head_dim} x N {cfg.ssm_state})",
        "",
        f"| Q | median ms | vs fastest | {'peak MiB' if cuda else 'saved for backward, MiB'} |",
        "|---|---|---|---|",
        *chunk_rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
