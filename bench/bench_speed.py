"""What the hybrid layer costs against context, side by side in one run, as markdown: one attention layer
(train_gpt.py's CausalSelfAttention) plain, windowed, with hybrid heads and with windowed hybrid heads,
forward + backward at equal tokens for each T, eager and compiled with inductor; a whole training step of
train_gpt.py's GPT (Muon + Adam) plain against models whose swapped layers are windowed hybrids, by T; where
the windowed hybrid layer's time goes (torch.profiler); ssd_scan against the step-by-step reference and by
chunk size.

Equal tokens: every T runs --tokens tokens as tokens / T rows, so a row's time is what a training step of
that many tokens pays for this layer at that context; the ratios are the hybrid's time over the plain
layer's at the same T. The hybrid layer is CausalSelfAttention with `.hymba = HybridHeads(...)` attached, as
build_and_swap_hymba_layers attaches it: the last --ssm-heads heads (whole KV groups) are SSM heads, the
others attention; with --window W its attention heads see the last W tokens (hymba_layer.local_attention:
blocks of W queries against their own and the previous block's keys, so they cost about 2W keys per query
where full causal attention costs about T/2; W=512 by default, a real window at every T from 1k, and a
quarter of full attention's keys at 8k). "attention W=..." is the plain layer with that same window, every
head through local_attention: it separates what the window saves from what the SSM heads cost. Settings
are options, not HYMBA_* env vars (this script refuses those, so a stray one cannot go unseen).

On CUDA it runs as the host trains (bf16 autocast, fp32 master weights) and memory is the peak allocated
by one call; on CPU fp32 and memory is the bytes autograd saves for backward (the activations). Compiled
means torch.compile(dynamic=False, fullgraph=True) with inductor, each contender compiled once per T (its
first call, timed apart as the compile time and excluded; a recompile while timing is an error). Timings
are medians of interleaved samples (A, B, C, D, A, B, ...). On a shared CPU, run it alone: an OpenMP
thread that loses its core stalls the others at every barrier.

    python3 bench/bench_speed.py --out bench/results/speed_context_cpu.md  # T = 1k..16k at 16,384 tokens, width 512,
                                                                           # 8 heads / 4 KV, window 512; steps 9x128
    python3 bench/bench_speed.py --seqs 1024,8192 --compile-seqs 8192      # fewer T; inductor at 8k only
    python3 bench/bench_speed.py --window 1024 --step-layers '4;all'       # another window; two hybrid step models
    python3 bench/bench_speed.py --quick                                   # small shapes, eager only: a smoke run in seconds
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchkit  # noqa: F401  (first: it sets the import paths)

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import hymba_layer
import speedkit
import train_gpt
from bench_quality import PRESETS
from speedkit import (GRAD_ACCUM, CHALLENGE, SHAPE_VARS, StepShape, at_seq, command_line, compile_label, compiled_once,
                      describe_device, first_call_s, interleaved_medians, scan_error, scan_inputs, sync, timer, training_step)

GOAL_SEQ, GOAL = 8192, 0.5  # issue 17: one windowed hybrid layer at most 0.5x a full attention layer at 8k


def quality_shape(preset: str, about: str, **overrides) -> StepShape:
    """A bench_quality.py preset as train_gpt.py trains it on one process (vocab 1024, the built-in sp1024 data)."""
    settings = {k: v for k, v in {**CHALLENGE, **PRESETS[preset], **overrides}.items() if k in SHAPE_VARS}
    return StepShape(settings, GRAD_ACCUM, PRESETS[preset]["TRAIN_BATCH_TOKENS"] // (GRAD_ACCUM * settings["TRAIN_SEQ_LEN"]), about)


STEP_SHAPES = {
    **speedkit.STEP_SHAPES,
    "9x128": quality_shape("cpu", "bench_quality.py's l9_* configs on preset cpu: RESULTS.md's '9 blocks x 128' rows", NUM_LAYERS=9),
    "9x64": quality_shape("l9", "bench_quality.py preset l9"),
}


class WindowOnly(nn.Module):
    """A stand-in for HybridHeads with no SSM heads: hymba_attention then sends every head of the layer through
    the hybrid layer's windowed attention (local_attention on SDPA), so the plain attention layer with the same
    window is timed by the same code path as the hybrid's attention heads."""

    heads = kv_heads = 0
    carry = None  # never scores with state

    def __init__(self, window: int, group: int):
        super().__init__()
        self.window, self.group = window, group  # group: the layer's query heads per KV head

    def forward(self, q: torch.Tensor, *rest) -> torch.Tensor:  # q, k, v, starts[, carry]
        return q  # (batch, T, 0, head_dim): no SSM heads


def attention_layers(dim: int, heads: int, kv_heads: int, ssm_heads: int, chunk: int, conv: int, window: int,
                     seed: int = 0) -> dict[str, nn.Module]:
    """The layers compared, by name: train_gpt.py's CausalSelfAttention plain ("attention"), with the hybrid
    heads of HymbaConfig(ssm_heads, (0,), chunk, conv, 0) ("hybrid"), and with `window` (when not 0) the same two
    with that window ("attention W=..." through WindowOnly, "hybrid W=..."). Each output projection is random,
    not zero as the host starts it, so the backward pass does its real work."""
    group = heads // kv_heads
    names = ["attention", "hybrid"] + ([f"attention W={window}", f"hybrid W={window}"] if window else [])
    layers = {}
    for name in names:
        torch.manual_seed(seed)
        layer = train_gpt.CausalSelfAttention(dim, heads, kv_heads, 10000.0, 1.5)
        nn.init.normal_(layer.proj.weight, std=0.02)
        w = window if "W=" in name else 0
        if name.startswith("hybrid"):
            layer.hymba = hymba_layer.HybridHeads(ssm_heads, ssm_heads // group, dim // heads,
                                                  hymba_layer.HymbaConfig(ssm_heads, (0,), chunk, conv, w))
        elif w:
            layer.hymba = WindowOnly(w, group)
        layers[name] = layer
    return layers


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="1024,2048,4096,8192,16384", help="T values of the layer table")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per layer call at every T (rows = tokens / T)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ssm-heads", type=int, help="SSM heads of the hybrid layer (default: half, as HYMBA_SSM_HEADS)")
    p.add_argument("--chunk", type=int, default=64, help="scan chunk Q (HYMBA_SCAN_CHUNK)")
    p.add_argument("--conv", type=int, default=hymba_layer.HymbaConfig.conv, help="conv taps on the SSM heads (HYMBA_CONV; default: the module's)")
    p.add_argument("--window", type=int, default=512, help="the window W of the windowed contenders (HYMBA_WINDOW; 0: none)")
    p.add_argument("--samples", type=int, default=5, help="timed samples per layer contender (median reported)")
    p.add_argument("--reps", type=int, default=1, help="layer fwd+bwd calls per sample")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed calls per layer contender before its samples, beyond its first call (eager: also the CPU memory count; compiled: the compile)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the layers compiled with inductor (default: on, off with --quick)")
    p.add_argument("--compile-seqs", help="the T values at which compiled layers are timed (default: all of --seqs)")
    p.add_argument("--profile-seq", type=int, help=f"T of the profile and the chunk table (default {GOAL_SEQ} if in --seqs, else the largest)")
    p.add_argument("--step-shape", default="9x128", choices=sorted(STEP_SHAPES),
                   help="the whole step's model (default 9x128): " + "; ".join(f"{k}: {v.about}" for k, v in STEP_SHAPES.items()))
    p.add_argument("--step-seqs", default="1024,4096,8192", help="T values of the whole-step table (empty: no step table)")
    p.add_argument("--step-tokens", type=int, default=8192, help="tokens per training step at every T")
    p.add_argument("--step-layers", default="all",
                   help="HYMBA_LAYERS of the hybrid step model, windowed; ';' separates several models (e.g. '4;all'); all = every block")
    p.add_argument("--step-samples", type=int, default=3, help="timed steps per model and T")
    p.add_argument("--step-compile", action="store_true", help="time the steps compiled with inductor, not eager")
    p.add_argument("--scan-lengths", default="1024,4096", help="T values of the scan against its reference (empty: none)")
    p.add_argument("--chunks", default="16,32,64,128,256", help="chunk sizes Q of the scan fwd+bwd table (empty: none)")
    p.add_argument("--quick", action="store_true", help="small shapes and few samples, eager only (smoke test)")
    p.add_argument("--out", help="also write the tables to this markdown file")
    p.add_argument("--backend", default="inductor", help=argparse.SUPPRESS)  # tests: "eager" traces with dynamo, compiles nothing
    args = p.parse_args(argv)
    stray = sorted(k for k, v in os.environ.items() if k.startswith("HYMBA_") and v.strip())
    if stray:
        p.error(f"{', '.join(stray)} set: this script takes the hybrid's settings as options (--window, --ssm-heads, --chunk, --conv, --step-layers)")
    if args.quick:
        args.seqs, args.tokens, args.dim, args.heads, args.kv_heads, args.window = "64,128", 256, 64, 4, 2, 32
        args.chunk, args.samples, args.step_shape, args.step_seqs, args.step_tokens, args.warmup = 16, 3, "tiny", "32,64", 128, 1
        args.step_samples, args.scan_lengths, args.chunks = 2, "64,128", "16,64"
    if args.compile is None:
        args.compile = not args.quick
    args.seqs, args.step_seqs = ints(args.seqs), ints(args.step_seqs)
    args.compile_seqs = (ints(args.compile_seqs) if args.compile_seqs is not None else args.seqs) if args.compile else []
    group = args.heads // args.kv_heads
    if args.ssm_heads is None:
        args.ssm_heads = group * (args.kv_heads // 2)
    if args.heads % args.kv_heads or args.ssm_heads % group or not 0 < args.ssm_heads < args.heads:
        p.error(f"--ssm-heads {args.ssm_heads}: whole groups of {group} heads, leaving attention at least one")
    bad = [T for T in args.seqs if args.tokens % T] + [T for T in args.step_seqs if args.step_tokens % T]
    if bad or not set(args.compile_seqs) <= set(args.seqs):
        p.error(f"every T must divide its tokens (--tokens {args.tokens}, --step-tokens {args.step_tokens}): {bad}; "
                "--compile-seqs must be among --seqs")
    if args.profile_seq is None:
        args.profile_seq = GOAL_SEQ if GOAL_SEQ in args.seqs else max(args.seqs)
    if args.profile_seq not in args.seqs:
        p.error("--profile-seq must be among --seqs")
    return args


def memory_mib(fn, device: torch.device) -> float:
    """CUDA: peak memory allocated by one call above what was there before. CPU (no allocator
    statistics): the bytes of the tensors autograd saves for backward - the activation memory, which
    is what grows with batch x tokens - counted once per storage."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def top_ops(fn, device: torch.device, calls: int = 2, top: int = 8) -> list[tuple[str, float, float]]:
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


def log(line: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {line}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """The device a run times on, and the options; each table's function reads what it needs from here."""

    args: argparse.Namespace
    cuda: bool = field(init=False)
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)
    t_start: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.measure = timer(self.device)
        self.ssm_heads, self.head_dim = self.args.ssm_heads, self.args.dim // self.args.heads
        self.groups = self.ssm_heads // (self.args.heads // self.args.kv_heads)

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.cuda)

    def log(self, line: str) -> None:
        log(line, self.t_start)


def fmt(d: dict, key, spec: str) -> str:
    return format(d[key], spec) if key in d else "-"


def cols(n: int) -> str:
    return "|---" * n + "|"


@dataclass
class LayerTimes:
    """Table 1's measurements: per (name, mode, T) ms and MiB, per (name, T) compile seconds, the profiles."""

    names: list[str]
    params: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)
    mem: dict = field(default_factory=dict)
    compile_s: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)

    def ratio(self, a: str | None, b: str | None, mode: str, T: int) -> float | None:
        return self.ms[a, mode, T] / self.ms[b, mode, T] if a and b and (a, mode, T) in self.ms else None


def measure_layers(run: Run) -> LayerTimes:
    """Every contender at each T, forward + backward, eager (and compiled), interleaved; memory; compile
    time; at --profile-seq the windowed hybrid's (else the hybrid's) top ops."""
    args, device = run.args, run.device
    layer_args = (args.dim, args.heads, args.kv_heads, args.ssm_heads, args.chunk, args.conv, args.window)
    times = LayerTimes(list(attention_layers(*layer_args)))
    profiled = times.names[3] if args.window else times.names[1]
    compiled = lambda layer: torch.compile(layer, dynamic=False, fullgraph=True, backend=args.backend)
    for T in args.seqs:
        rows = args.tokens // T
        layers = {name: layer.to(device) for name, layer in attention_layers(*layer_args).items()}
        times.params = {name: sum(p.numel() for p in layer.parameters()) for name, layer in layers.items()}
        x = torch.randn(rows, T, args.dim, device=device, dtype=run.dtype, requires_grad=True)
        modes = ["eager", "compiled"] if T in args.compile_seqs else ["eager"]
        steps = {}
        for name, layer in layers.items():
            for mode in modes:
                call = compiled(layer) if mode == "compiled" else layer

                def step(call=call, layer=layer):
                    with run.autocast():
                        y = call(x)
                    y.float().square().mean().backward()
                    layer.zero_grad(set_to_none=True)
                    x.grad = None

                steps[name, mode] = step
        for name in layers:  # the first eager call fills the Rotary caches before any compile (first_call_s); on CPU
            # it also counts the bytes saved for backward (saved tensors hooks see none inside a compiled graph)
            if run.cuda:
                steps[name, "eager"]()
            else:
                times.mem[name, "eager", T] = memory_mib(steps[name, "eager"], device)
        for name in layers:
            if "compiled" in modes:
                times.compile_s[name, T] = first_call_s(steps[name, "compiled"], device)
        run.log(f"T={T}: {rows} x {T}, first calls done{' (compiled)' if 'compiled' in modes else ''}")
        with compiled_once():
            for (name, mode), ms in interleaved_medians(steps, args.samples, args.reps, run.measure, warmup=args.warmup).items():
                times.ms[name, mode, T] = ms
            if run.cuda:  # the peak of a call after the warm ones (the first also allocates workspaces)
                for name, mode in steps:
                    times.mem[name, mode, T] = memory_mib(steps[name, mode], device)
            if T == args.profile_seq:
                times.profiles = {mode: top_ops(steps[profiled, mode], device) for mode in modes}
        run.log(f"T={T}: " + ", ".join(f"{n} {m} {times.ms[n, m, T]:.1f} ms" for n, m in steps))
        del steps, layers, x
        torch._dynamo.reset()  # the next T compiles afresh (dynamic=False): no cache entries pile up
    return times


def layer_tables(run: Run, times: LayerTimes) -> list[str]:
    """The goal line, the layer table (ms and ratios), memory and compile time."""
    args, W = run.args, run.args.window
    attn, hyb, attn_w, hyb_w = (times.names + [None, None])[:4]
    shown = lambda r: "-" if r is None else f"{r:.2f}x"
    ratio_cols = [(f"{hyb} / {attn}", hyb, attn)] + ([(f"{hyb_w} / {attn}", hyb_w, attn), (f"{hyb_w} / {attn_w}", hyb_w, attn_w),
                                                     (f"{attn_w} / {attn}", attn_w, attn)] if W else [])
    modes = ["eager", "compiled"] if args.compile_seqs else ["eager"]
    layer_rows = [f"| {T} | {args.tokens // T} x {T} | {mode} | " + " | ".join(fmt(times.ms, (n, mode, T), ".2f") for n in times.names)
                  + " | " + " | ".join(shown(times.ratio(a, b, mode, T)) for _, a, b in ratio_cols) + " |"
                  for T in args.seqs for mode in modes if (attn, mode, T) in times.ms]
    goal_name = hyb_w or hyb
    goal = [(mode, times.ratio(goal_name, attn, mode, GOAL_SEQ)) for mode in modes]
    goal_text = ", ".join(f"**{r:.2f}x** {mode} ({'met' if r <= GOAL else 'not met'})" for mode, r in goal if r is not None)
    goal_line = (f"{goal_name} / {attn} at T={GOAL_SEQ}: {goal_text}" if goal_text else
                 f"T={GOAL_SEQ} is not among --seqs: not measured in this run")
    mem_label = "peak MiB allocated by one call" if run.cuda else "MiB saved for backward (activations)"
    mem_rows = [f"| {T} | {mode} | " + " | ".join(fmt(times.mem, (n, mode, T), ".1f") for n in times.names) + " |"
                for T in args.seqs for mode in modes if (attn, mode, T) in times.mem]
    compile_rows = [f"| {T} | " + " | ".join(fmt(times.compile_s, (n, T), ".1f") for n in times.names) + " |" for T in args.compile_seqs]
    H = run.ssm_heads
    return [
        f"## Goal: one windowed hybrid layer at most {GOAL}x a full attention layer at T={GOAL_SEQ}",
        "",
        goal_line,
        "",
        f"## One layer against context, forward + backward, {args.tokens:,} tokens per call (rows x T), width {args.dim}, "
        f"{args.heads} heads / {args.kv_heads} KV",
        "",
        "| T | rows x T | mode | " + " | ".join(f"{n} ms" for n in times.names) + " | " + " | ".join(c for c, _, _ in ratio_cols) + " |",
        cols(3 + len(times.names) + len(ratio_cols)),
        *layer_rows,
        "",
        f"Median of {args.samples} interleaved samples ({args.reps} call{'s' if args.reps > 1 else ''} each) over all contenders of a T, "
        f"eager and compiled together, after each contender's first call and {args.warmup} warm-up call(s). attention: full causal attention (SDPA, is_causal); W=: the window "
        "(hymba_layer.local_attention); hybrid: "
        f"{args.heads - H} attention + {H} SSM heads.",
        "",
        f"## Memory, {mem_label}",
        "",
        "| T | mode | " + " | ".join(times.names) + " |",
        cols(2 + len(times.names)),
        *mem_rows,
        *(["", "## Compile time, s (first call: tracing and compiling forward and backward; not in the times above)", "",
           "| T | " + " | ".join(times.names) + " |", cols(1 + len(times.names)), *compile_rows] if compile_rows else []),
        "",
    ]


def profile_table(run: Run, times: LayerTimes) -> list[str]:
    """Where the profiled layer's time goes at --profile-seq (empty when not measured)."""
    if not times.profiles:
        return []
    args = run.args
    name = times.names[3] if args.window else times.names[1]
    return [
        f"## Where the {name} layer's time goes at T={args.profile_seq}: top ops by self {'GPU' if run.cuda else 'CPU'} time "
        f"(torch.profiler, 2 fwd+bwd calls of {args.tokens // args.profile_seq} x {args.profile_seq})",
        "",
        "| mode | op | ms per call | share |",
        cols(4),
        *(f"| {mode} | `{op[:70]}` | {ms:.2f} | {share:.0%} |" for mode, ops in times.profiles.items() for op, ms, share in ops),
        "",
    ]


def step_table(run: Run) -> list[str]:
    """Whole training steps by T: the plain GPT against windowed hybrid GPTs, equal tokens per step (empty
    without --step-seqs)."""
    args, W = run.args, run.args.window
    if not args.step_seqs:
        return []
    shape0 = STEP_SHAPES[args.step_shape]
    n_layers = shape0.settings["NUM_LAYERS"]
    hybrid_env = lambda layers: {"HYMBA_LAYERS": ",".join(map(str, range(n_layers))) if layers == "all" else layers,
                                 "HYMBA_SCAN_CHUNK": str(args.chunk), "HYMBA_CONV": str(args.conv), **({"HYMBA_WINDOW": str(W)} if W else {})}
    models = {"baseline": {}, **{f"hybrid layers {layers}" + (f" W={W}" if W else ""): hybrid_env(layers.strip())
                                 for layers in args.step_layers.split(";") if layers.strip()}}
    step_ms, step_opt, step_params, step_peak, step_compile = {}, {}, {}, {}, {}
    for T in args.step_seqs:
        shape = at_seq(shape0, T, args.step_tokens)
        train_steps = {name: training_step(shape, settings, run.device, args.backend if args.step_compile else None)
                       for name, settings in models.items()}
        with compiled_once():
            for name, ms in interleaved_medians({n: s.step for n, s in train_steps.items()}, args.step_samples, 1, run.measure, warmup=1).items():
                step_ms[name, T] = ms
        for name, s in train_steps.items():
            step_opt[name, T] = statistics.median(s.optimizer_ms)
            step_params[name] = s.params
            if s.peak_mib is not None:
                step_peak[name, T] = s.peak_mib
            if s.compile_s is not None:
                step_compile[name, T] = s.compile_s
        run.log(f"step T={T}: " + ", ".join(f"{n} {step_ms[n, T]:.0f} ms" for n in models))
        del train_steps
        torch._dynamo.reset()
    fb = lambda n, T: step_ms[n, T] - step_opt[n, T]
    step_rows = [f"| {T} | {args.step_tokens // T} x {T} | {name} | {step_ms[name, T]:.1f} | {step_opt[name, T]:.1f} | {fb(name, T):.1f} "
                 f"| {step_ms[name, T] / step_ms['baseline', T]:.2f}x | {fb(name, T) / fb('baseline', T):.2f}x | {fmt(step_peak, (name, T), '.0f')} "
                 f"| {fmt(step_compile, (name, T), '.1f')} |" for T in args.step_seqs for name in models]
    run.log("steps done")
    s = shape0.settings
    return [
        f"## Whole training step by T, forward + backward + Muon/Adam step, {'compiled' if args.step_compile else 'eager'} "
        f"({s['NUM_LAYERS']} blocks x {s['MODEL_DIM']}, {s['NUM_HEADS']} heads / {s['NUM_KV_HEADS']} KV, vocab "
        f"{s['VOCAB_SIZE']}; {args.step_tokens:,} tokens per step as one micro-batch)",
        "",
        "| T | rows x T | model | step ms | optimizer ms | fwd+bwd ms | step / baseline | fwd+bwd / baseline | peak MiB | compile s |",
        cols(10),
        *step_rows,
        "",
        f"train_gpt.py's build_model and build_optimizers, random tokens; median of {args.step_samples} interleaved steps; the "
        "optimizer part is timed inside each step (a sync before and after), fwd+bwd is the step less it. Hybrid models: "
        + "; ".join(f"{n}: " + " ".join(f"{k}={v}" for k, v in env.items()) for n, env in models.items() if env)
        + " (HYMBA_SSM_HEADS: half). params: " + ", ".join(f"{n} {p:,}" for n, p in step_params.items()) + ".",
        "",
    ]


def scan_tables(run: Run) -> list[str]:
    """The scan alone at the layer's SSM shape: forward against the step-by-step loop, fwd+bwd by chunk size;
    compiled on CUDA (as it trains), eager on CPU (a compile per length and chunk size is minutes there)."""
    args, device, H, G, P = run.args, run.device, run.ssm_heads, run.groups, run.head_dim
    scan = torch.compile(hymba_layer.ssd_scan, fullgraph=True, backend=args.backend) if run.cuda else hymba_layer.ssd_scan
    scan_mode = "compiled" if run.cuda else "eager"
    scan_rows, chunk_rows = [], []
    T_c = args.profile_seq
    b_c = args.tokens // T_c
    with torch._dynamo.config.patch(recompile_limit=64):
        for T in ints(args.scan_lengths):
            xs, log_a, B, C = inputs = scan_inputs(H, G, P, 1, T, device, run.dtype, seed=T)
            with torch.no_grad():
                fns = {"ssd_scan": lambda: scan(xs, log_a, B, C, args.chunk), "reference": lambda: hymba_layer.ssd_scan_reference(xs, log_a, B, C)}
                ms = interleaved_medians(fns, 3, 1, run.measure, warmup=1)
                err = scan_error(fns["ssd_scan"]()[0], inputs)
            scan_rows.append(f"| {T} | 1 x {H} x {P} x {P} ({G} B groups) | {ms['ssd_scan']:.2f} | {ms['reference']:.2f} "
                             f"| {ms['reference'] / ms['ssd_scan']:.1f}x | {err:.1e} |")
        chunks = ints(args.chunks)
        if chunks:
            leaves = [t.requires_grad_() for t in scan_inputs(H, G, P, b_c, T_c, device, run.dtype, seed=1)]

            def scan_step(q):
                y, _ = scan(*leaves, q)
                y.float().square().mean().backward()
                for t in leaves:
                    t.grad = None

            chunk_ms = interleaved_medians({q: (lambda q=q: scan_step(q)) for q in chunks}, 3, 1, run.measure, warmup=1)
            chunk_mem = {q: memory_mib(lambda q=q: scan_step(q), device) for q in chunks} if not run.cuda else {}
            best = min(chunk_ms.values())
            chunk_rows = [f"| {q} | {chunk_ms[q]:.2f} | {chunk_ms[q] / best:.2f}x | {fmt(chunk_mem, q, '.1f')} |" for q in chunks]
    run.log("scan done")
    lines = []
    if scan_rows:
        lines += [
            f"## Scan, forward, {scan_mode} (rows x heads x P x N; error: max |y - y_ref| / max |y_ref|, the reference in fp64; chunk {args.chunk})",
            "",
            "| T | shape | ssd_scan ms | reference ms | speedup | max rel err |",
            cols(6),
            *scan_rows,
            "",
        ]
    if chunk_rows:
        lines += [
            f"## Scan chunk size Q, forward + backward, {scan_mode} ({b_c} x {T_c} tokens, {H} heads x P {P} x N {P}, {G} B groups)",
            "",
            f"| Q | median ms | vs fastest | {'MiB saved for backward' if not run.cuda else '-'} |",
            cols(4),
            *chunk_rows,
            "",
        ]
    return lines


def header(run: Run, device_name: str, times: LayerTimes) -> list[str]:
    args, H, G, P = run.args, run.ssm_heads, run.groups, run.head_dim
    return [
        "# Cost of the hybrid layer against context",
        "",
        f"command: `{command_line()}`",
        "",
        f"device: {device_name}; torch {torch.__version__}; {'bf16 autocast, TF32' if run.cuda else 'fp32'}; "
        f"compiled: {compile_label(args.backend) + ' at T in ' + str(args.compile_seqs) if args.compile_seqs else 'not measured (eager only)'}",
        f"hybrid layer: CausalSelfAttention({args.dim}, {args.heads}, {args.kv_heads}, 10000.0, 1.5) with "
        f".hymba = HybridHeads({H}, {G}, {P}, HymbaConfig({H}, (0,), {args.chunk}, {args.conv}, window)): "
        f"{args.heads - H} attention heads + {H} SSM heads; window W={args.window or 'none'}",
        "params: " + ", ".join(f"{n} {times.params[n]:,}" for n in times.names),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    run = Run(parse_args(argv))
    if run.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device_name = describe_device(run.device)  # on a shared CPU other processes skew timings: this says how much
    times = measure_layers(run)
    lines = [*layer_tables(run, times), *step_table(run)]
    lines = [*header(run, device_name, times), *lines, *profile_table(run, times), *scan_tables(run)]
    lines.append(f"wall time of this benchmark: {time.perf_counter() - run.t_start:.0f} s"
                 + (f"; load average at the end: {os.getloadavg()[0]:.1f}" if not run.cuda else ""))
    text = "\n".join(lines).rstrip() + "\n"
    print(text, end="")
    if run.args.out:
        Path(run.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(run.args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
