"""Artifact bytes that hybrid layers add to today's record stack, measured with the record's own export.

    python3 bench/bench_bytes.py                       # ../shared/hosts/record_0429_train_gpt.py, layers "5" and "3,8"
    python3 bench/bench_bytes.py --layers 0 0,5 0,3,5,8 --conv 4 --script path/to/record/train_gpt.py

The record script is patched (tools/patch_host.py) and turned into its CPU copy (tests/host_cpu.py), then
imported, not run: its GPT is built at the record's default shape (11 x 512, 8 heads / 4 KV, vocab 8192, MLP
4x), once plain and once per --layers with the hybrid heads swapped in (`build_and_swap_hymba_layers`, the
HYMBA_* env vars). The state dict goes through the record's own unbanking, `gptq_mixed_quantize` (int6 GPTQ
over 65,536 elements, int8 for `attn_gate_w`, fp16 passthrough for the rest; identity Hessians, since only the
routing and the byte count matter here), `torch.save` and `_compress` (byte shuffle + brotli-11 by default).
The base model's quantized tensors are computed once and shared, so the difference between two artifacts is
exactly the hybrid tensors plus their share of the container and of the compressor's choices. The dynamics
are filled with random values (trained values do not compress; zeros and ones would flatter the count).

The compressed difference is noisy: the record byte-shuffles the whole torch.save blob (even and odd bytes
apart), so any entry that shifts the rest of the container by an odd number of bytes changes how every big
tensor after it compresses. Each row is therefore shown beside a control: a dummy entry of the same raw size
(random fp16, another name) added instead. The raw container bytes are exact; what the compressed bytes say
beyond the control's spread is noise of the container, not a cost of the hybrid heads.
Code bytes: the inlined module's cost as the record counts code (make_record.wrapped_size: lzma + base85 of the
script; the record also runs pyminify first, not installed here, which would make both smaller).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import tempfile
from pathlib import Path

from benchkit import SHARED  # first: it sets the import paths

import host_cpu
import patch_host
from make_record import wrapped_size

RECORD = SHARED / "hosts" / "record_0429_train_gpt.py"


def load_copy(script: Path, compressor: str):
    """The patched CPU copy of the record, imported as a module (its main() does not run)."""
    text = host_cpu.cpu_copy("record", patch_host.patch_text(script.read_text(encoding="utf-8"), patch_host.MODULE.read_text(encoding="utf-8")))
    path = Path(tempfile.mkdtemp()) / "record_cpu_copy.py"
    path.write_text(text, encoding="utf-8")
    os.environ["COMPRESSOR"] = compressor  # read by the record's Hyperparameters at import
    spec = importlib.util.spec_from_file_location("record_cpu_copy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", type=Path, default=RECORD, help=f"a record script of the banked family (default: {RECORD.name})")
    p.add_argument("--layers", nargs="+", default=["5", "3,8"], help="HYMBA_LAYERS settings to measure (default: 5 and 3,8)")
    p.add_argument("--conv", type=int, default=4, help="HYMBA_CONV for every measurement (default 4, as the module)")
    p.add_argument("--compressor", default="brotli", choices=["brotli", "lzma"], help="the record's COMPRESSOR (default brotli)")
    args = p.parse_args(argv)
    if not args.script.is_file():
        p.error(f"--script {args.script}: no such file; expected a record train_gpt.py of the banked family")
    if args.compressor == "brotli" and importlib.util.find_spec("brotli") is None:
        p.error("--compressor brotli needs the brotli package: python3 -m pip install brotli (or use --compressor lzma)")
    import torch

    rec = load_copy(args.script, args.compressor)
    h = rec.Hyperparameters()
    for k in [k for k in os.environ if k.startswith("HYMBA_")]:
        del os.environ[k]

    def state(layers: str) -> dict:
        torch.manual_seed(0)
        model = rec.GPT(h)
        if layers:
            os.environ.update(HYMBA_LAYERS=layers, HYMBA_CONV=str(args.conv))
            rec.hymba_layer.build_and_swap_hymba_layers(model, log=lambda line: print(f"  {line}"))
            del os.environ["HYMBA_LAYERS"], os.environ["HYMBA_CONV"]
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if ".hymba." in name:
                        param.copy_(torch.randn(param.shape, generator=g))
        return rec._unbank_state_dict(model.state_dict(), h.num_layers)

    print(f"record: {args.script} at {h.num_layers} x {h.model_dim}, {h.num_heads}/{h.num_kv_heads} heads, vocab {h.vocab_size}, "
          f"MLP {h.mlp_mult}x; compressor {args.compressor}; HYMBA_CONV={args.conv}")
    base = state("")
    hessians = {n: torch.eye(t.shape[1]) for n, t in base.items() if t.is_floating_point() and t.ndim == 2 and t.numel() > 65536}
    base_w, base_m = rec.gptq_mixed_quantize(base, hessians, h)

    def artifact(extra: dict) -> tuple[int, int, dict]:
        """(raw container bytes, compressed bytes, routes) of the base model plus `extra` tensors."""
        w, m = rec.gptq_mixed_quantize(extra, {}, h) if extra else ({}, {})
        buf = io.BytesIO()
        torch.save({"w": {**base_w, **w}, "m": {**base_m, **m}}, buf)
        return len(buf.getvalue()), len(rec._compress(buf.getvalue(), args.compressor)), m

    raw0, plain, _ = artifact({})
    script_text = args.script.read_text(encoding="utf-8")
    patched_text = patch_host.patch_text(script_text, patch_host.MODULE.read_text(encoding="utf-8"))
    rows = [f"| plain | 0 | - | {raw0:,} | {plain:,} | - | - |"]
    g = torch.Generator().manual_seed(2)
    for layers in args.layers:
        extra = {n: t for n, t in state(layers).items() if n not in base}
        raw, size, meta = artifact(extra)
        n = len(layers.split(","))
        routes = ", ".join(sorted(set(meta.values())))
        rows.append(f"| HYMBA_LAYERS={layers} | {sum(t.numel() for t in extra.values()):,} ({routes}) | {n} | {raw:,} ({raw - raw0:+,}) | "
                    f"{size:,} | {size - plain:+,} | {(raw - raw0) / n:+,.0f} |")
        control = {f"control.{i}": torch.randn(t.shape, generator=g) for i, t in enumerate(extra.values())}
        raw_c, size_c, _ = artifact(control)
        rows.append(f"| control: same tensor sizes, other names | | | {raw_c:,} ({raw_c - raw0:+,}) | {size_c:,} | {size_c - plain:+,} | |")
    print("\n| model | hybrid params (route) | hybrid layers | raw container bytes (added) | compressed bytes | compressed added "
          "| raw added per layer |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    script_bytes, patched_bytes = wrapped_size(script_text, minify=False), wrapped_size(patched_text, minify=False)
    print(f"\ncode: the script {script_bytes:,} bytes as the record counts it without pyminify, patched "
          f"{patched_bytes:,} (+{patched_bytes - script_bytes:,}: the inlined hymba_layer.py, once for any number of layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
