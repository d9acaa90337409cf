"""Reproduces the open crash of the record's LoRA TTT forward compiled with dynamic=True (RESULTS.md, "Compiled as
the hosts compile"): the patched record's CPU copy, as tests/test_compile_hosts.py builds it, eager then compiled,
forward and backward at each T given. HY sets HYMBA_* for the run ("" for the plain record).

    python3 bench/repro_ttt_compile.py 48 96                            # hybrid block 0: T=96 aborts (double free)
    HY="HYMBA_LAYERS=0,HYMBA_CONV=0" python3 bench/repro_ttt_compile.py 96   # aborts too
    HY="" python3 bench/repro_ttt_compile.py 96                          # plain record: runs
"""
import os
import pathlib
import sys
import tempfile

import benchkit  # noqa: F401  (import paths)
import torch

import test_compile_hosts as t
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
fwd = lambda a, b, lora: model.forward_ttt(a, b, lora=lora)
comp = torch.compile(fwd, dynamic=True)
gen = torch.Generator().manual_seed(6)
for T in [int(a) for a in sys.argv[1:]]:
    x, y = (torch.randint(0, 1024, (2, T), generator=gen) for _ in range(2))
    for f in (fwd, comp):
        print("T", T, "compiled" if f is comp else "eager", "forward", flush=True)
        l = f(x, y, lora)
        print("backward", flush=True)
        l[:, :48].mean(-1).sum().backward()
    print("ok", T, flush=True)
