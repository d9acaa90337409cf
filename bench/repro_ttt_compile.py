"""Reproduces the crash of the record's LoRA TTT forward compiled with dynamic=True (RESULTS.md, "Compiled as
the hosts compile") and its reductions: eager then compiled, forward and backward at each T given.

MODE picks what is compiled:
    record  the patched record's CPU copy, as tests/test_compile_hosts.py builds it (HY sets HYMBA_* for the run,
            "" for the plain record)
    heads   HybridHeads alone (the record's SSM side: 2 heads, 1 KV group, head_dim 64, conv taps 4)
    scan    ssd_scan alone, at the same shapes
KNOB sets one compile option: simdlen1, cpp_wrapper, freezing, noauto (automatic_dynamic_shapes off),
mark_dynamic (mark_dynamic on T instead of dynamic=True), aot_eager (backend="aot_eager"), none (default).

    python3 bench/repro_ttt_compile.py 48 96                            # hybrid record
    MODE=scan python3 bench/repro_ttt_compile.py 48 96 200 1000
    HY="" python3 bench/repro_ttt_compile.py 96                          # plain record
"""
import os
import pathlib
import sys
import tempfile
import time

import benchkit  # noqa: F401  (import paths)
import torch
import torch._dynamo
import torch._inductor.config

import hymba_layer
import test_compile_hosts as t

MODE, KNOB = os.environ.get("MODE", "record"), os.environ.get("KNOB", "none")
if KNOB == "simdlen1":
    torch._inductor.config.cpp.simdlen = 1
elif KNOB == "cpp_wrapper":
    torch._inductor.config.cpp_wrapper = True
elif KNOB == "freezing":
    torch._inductor.config.freezing = True
elif KNOB == "noauto":
    torch._dynamo.config.automatic_dynamic_shapes = False
elif KNOB not in ("none", "mark_dynamic", "aot_eager"):
    sys.exit(f"KNOB={KNOB!r} is invalid: expected none, simdlen1, cpp_wrapper, freezing, noauto, mark_dynamic or aot_eager")
gen = torch.Generator().manual_seed(6)

if MODE == "record":
    class F:
        def mktemp(self, name): return pathlib.Path(tempfile.mkdtemp(prefix=name))
    record = t.load_host("record", F())
    h = t.hparams(record, **t.TTT)
    torch.manual_seed(0)
    settings = dict(a.split("=") for a in os.environ.get("HY", "HYMBA_LAYERS=0").split(",") if a)
    with t.hymba_settings(**settings):
        model = record.GPT(h).float(); record.restore_fp32_params(model)
        record.hymba_layer.build_and_swap_hymba_layers(model, log=lambda l: None)
    t.jitter(model, 4)
    for p in model.parameters(): p.requires_grad_(False)
    for b in model.blocks: b.attn.rotary(2048, "cpu", torch.float32)
    lora = record.BatchedTTTLoRA(2, model, 4); t.jitter(lora, 5)
    fwd = lambda a, b: model.forward_ttt(a, b, lora=lora)[:, :48].mean(-1).sum()
    inputs = lambda T: [torch.randint(0, 1024, (2, T), generator=gen) for _ in range(2)]
    params = list(lora.parameters())
elif MODE in ("heads", "heads_noconv", "heads_nonorm", "scan"):
    torch.manual_seed(0)
    H, G, D = 2, 1, 64
    if MODE == "heads_nonorm":  # the heads with their output norm taken out
        torch.nn.functional.rms_norm = lambda y, shape: y
    heads = hymba_layer.HybridHeads(H, G, D, hymba_layer.HymbaConfig(H, (0,), conv=0 if MODE == "heads_noconv" else 4))
    t.jitter(heads, 4)
    params = list(heads.parameters())
    if MODE != "scan":
        fwd = lambda q, k, v: heads(q, k, v, None).sin().mean()  # not square: the output is rms-normed
        shapes = lambda T: [(2, T, H, D), (2, T, G, D), (2, T, G, D)]
    else:
        def fwd(x, dt, B, C):
            y, S = hymba_layer.ssd_scan(x, -torch.nn.functional.softplus(dt), B, C, 64)
            return y.square().mean() + S.square().mean()
        shapes = lambda T: [(2, T, H, D), (2, T, H), (2, T, G, D), (2, T, H, D)]
    inputs = lambda T: [torch.randn(s, generator=gen).requires_grad_() for s in shapes(T)]
else:
    sys.exit(f"MODE={MODE!r} is invalid: expected record, heads, heads_noconv, heads_nonorm or scan")

comp = torch.compile(fwd, dynamic=None if KNOB == "mark_dynamic" else True,
                     backend="aot_eager" if KNOB == "aot_eager" else "inductor")
T0 = time.time()
print("MODE", MODE, "KNOB", KNOB, flush=True)
for T in [int(a) for a in sys.argv[1:]]:
    args = inputs(T)
    grads = []
    for f in (fwd, comp):
        print(f"{time.time() - T0:.0f}s", "T", T, "compiled" if f is comp else "eager", "forward", flush=True)
        if f is comp and KNOB == "mark_dynamic":
            for a in args: torch._dynamo.mark_dynamic(a, 1)
        leaves = params + [a for a in args if a.requires_grad]
        for p in leaves: p.grad = None
        loss = f(*args)
        print("backward", flush=True)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in leaves if p.grad is not None])
    errs = [(a - b).abs().max().item() / (a.abs().max().item() + 1e-30) for a, b in zip(*grads)]
    print("ok", T, "rel err vs eager (loss, then each gradient):", " ".join(f"{e:.0e}" for e in errs), flush=True)
