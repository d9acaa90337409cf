"""A CPU copy of a challenge host script (the root train_gpt.py, a PR #1493-family one, or the banked-weights
record of 2026-04-29), for tests and CPU benchmarks of hymba_layer.py inside it.

    PYTHONPATH=tools python3 tests/host_cpu.py ../shared/hosts/root_train_gpt.py --host root --out /tmp/root_cpu.py [--patch]
    PYTHONPATH=tools python3 tests/host_cpu.py ../shared/hosts/record_0429_train_gpt.py --host record --out /tmp/record_cpu.py

The copy swaps the CUDA device plumbing for the CPU, bf16 for fp32 (a CPU without bf16 units runs bf16
matmuls ~30x slower than fp32; the hybrid layer's bf16 numerics are tested on their own) and, in
PR #1493, FlashAttention 3 for SDPA and two Python 3.12 f-strings for 3.11 ones: the model, optimizer,
export and scoring code is the host's, unchanged. Every swap must match, so a changed host fails
loudly instead of silently running something else. A probe writes which parameters each optimizer
holds to optimizer_groups.json. Run the copy with TORCHDYNAMO_DISABLE=1 (no compile on CPU).

The record (`--host record`, plain source) also gets, in the copy only: `flash_attn_3_func` and
`flash_attn_varlen_func` as SDPA stand-ins with FA3's keyword API (the varlen one with a block-diagonal
causal mask from `cu_seqlens`, built on the device: it compiles whole); a `triton` stub whose kernels raise
if launched, with both Triton paths off (`FUSED_CE_ENABLED` forced to 0, `MLP.use_fused` False); no pinned memory, unfused AdamW,
gloo; and, where `pyminify` is not installed, its code-size step counts the unminified code (it logs
so). Each of its swaps must match a fixed number of times. It needs no Python 3.12 swap (it compiles
on 3.11), and it reads no wrapper (`unwrap` is only for the self-extracting hosts). Swaps never touch
a block inlined by tools/patch_host.py, only the host's own code around it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import patch_host  # tools/ (pytest's pythonpath; PYTHONPATH=tools on the command line)

# after the imports: no-op CUDA calls, and the probe (param names per optimizer -> optimizer_groups.json)
PRELUDE = '''
torch.cuda.synchronize = lambda *a, **k: None  # CPU test copy
torch.cuda.max_memory_allocated = torch.cuda.max_memory_reserved = lambda *a, **k: 0
def probe_optimizers(model, optimizers):
    import json
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names.get(id(p), "?") for g in o.param_groups for p in g["params"]] for o in optimizers]
    json.dump({"params": sorted(names.values()), "optimizers": groups}, open("optimizer_groups.json", "w"))
'''
FA3_ON_SDPA = ("def flash_attn_3_func(q, k, v, causal=True):  # (batch, T, heads, head_dim), as FA3\n"
               "    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,"
               " enable_gqa=k.size(2) != q.size(2)).transpose(1, 2)\n")

# the record's FlashAttention 3 imports, as stand-ins with FA3's keyword API (the objects a patched host hands
# to hymba_layer as its kernels). Packed varlen attention never crosses a segment [cu[i], cu[i+1]) (the host pads
# cu_seqlens by repeating the total: empty segments): one block-diagonal causal mask built from cu_seqlens on the
# device, so the record's model compiles whole (fullgraph=True) with it; the checks that need cu_seqlens' values
# on the host run in eager only. The mask is tokens x tokens: test sizes.
VARLEN_ON_SDPA = (
    "def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, window_size=(-1, -1)):\n"
    "    # packed (tokens, heads, head_dim), as FA3; attention never crosses a segment\n"
    "    T = q.size(0)\n"
    "    if tuple(window_size) != (-1, -1):\n"
    "        raise ValueError(f'CPU stand-in: unsupported varlen call (window {window_size}; only (-1, -1))')\n"
    "    if not torch.compiler.is_compiling():  # eager: checks that read cu_seqlens on the host\n"
    "        cu = cu_seqlens_q.tolist()\n"
    "        if cu != cu_seqlens_k.tolist() or cu[0] != 0 or cu[-1] != T or cu != sorted(cu):\n"
    "            raise ValueError(f'CPU stand-in: unsupported varlen call (cu_seqlens {cu[:8]}..., {T} tokens)')\n"
    "        longest = max(e - s for s, e in zip(cu, cu[1:]))\n"
    "        assert longest <= max_seqlen_q, f'segment of {longest} tokens > max_seqlen {max_seqlen_q}'\n"
    "    seg = torch.zeros(T + 1, dtype=torch.int32, device=q.device).scatter(0, cu_seqlens_q.long(), 1)[:T].cumsum(0)  # segment of each token\n"
    "    pos = torch.arange(T, device=q.device)\n"
    "    mask = (seg[:, None] == seg[None, :]) & ((pos[:, None] >= pos[None, :]) | (not causal))  # (query, key)\n"
    "    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, tokens, head_dim)\n"
    "    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=ks.size(1) != qs.size(1))[0].transpose(0, 1)\n")
FA3_STANDINS = FA3_ON_SDPA + VARLEN_ON_SDPA
# `import triton` in the copy: no Triton needed, and a launched kernel fails loudly (both paths are off)
NO_TRITON = (
    "class triton:  # CPU test copy: stand-in for the Triton import; kernels are defined, never run\n"
    "    class jit:\n"
    "        def __init__(self, fn):\n"
    "            self.__name__ = fn.__name__\n"
    "        def __getitem__(self, grid):\n"
    "            raise RuntimeError(f'CPU test copy: Triton kernel {self.__name__} launched')\n"
    "class tl:\n"
    "    constexpr = 'tl.constexpr'\n"
    "TensorDescriptor = None\n")
# the record's code-size step: pyminify where installed, else the plain code (the copy says so)
PYMINIFY_OR_PLAIN = '''
def pyminify_or_plain(cmd, input, **kwargs):
    import shutil, types
    if shutil.which(cmd[0]):
        return subprocess.run(cmd, input=input, **kwargs)
    log(f"CPU test copy: {cmd[0]} not installed, the code size counts the code unminified")
    return types.SimpleNamespace(stdout=input)
'''

SWAPS = {  # host -> [(what the script has, what the CPU copy runs instead[, how many times it must match])]
    "root": [
        ('    if not torch.cuda.is_available():\n        raise RuntimeError("CUDA is required")\n', ""),
        ('device = torch.device("cuda", local_rank)', 'device = torch.device("cpu")'),
        ("    torch.cuda.set_device(device)\n", ""),
        ('backend="nccl", device_id=device', 'backend="gloo"'),
        ('device_type="cuda", dtype=torch.bfloat16, enabled=True', 'device_type="cpu", enabled=False'),
        (").to(device).bfloat16()", ").to(device).float()"),
        ("X = G.bfloat16()", "X = G.float()"),
        ('["nvidia-smi"]', '["echo", "no GPU: CPU test copy"]'),
        ("device_ids=[local_rank], ", ""),
        ("from torch.nn.parallel import DistributedDataParallel as DDP\n", "from torch.nn.parallel import DistributedDataParallel as DDP\n" + PRELUDE),
        ("    n_params = sum(p.numel() for p in base_model.parameters())\n",
         "    probe_optimizers(base_model, optimizers)\n    n_params = sum(p.numel() for p in base_model.parameters())\n"),
    ],
    "pr1493": [
        ("from flash_attn_interface import flash_attn_func as flash_attn_3_func\n", FA3_ON_SDPA + PRELUDE),
        ('{", ".join(sorted(categories[cat]))}', "{', '.join(sorted(categories[cat]))}"),
        ('glob("fineweb_train_*.bin")', "glob('fineweb_train_*.bin')"),
        ("if not torch.cuda.is_available():raise RuntimeError('CUDA is required')", "pass"),
        ("device=torch.device('cuda',local_rank);torch.cuda.set_device(device)", "device=torch.device('cpu')"),
        ("torch.device('cuda',h.local_rank)", "torch.device('cpu')"),
        ("backend='nccl',device_id=device", "backend='gloo'"),
        ("device_type='cuda',dtype=torch.bfloat16,enabled=True", "device_type='cpu',enabled=False"),
        ("device_type='cuda',dtype=torch.bfloat16", "device_type='cpu',enabled=False"),
        ("GPT(h).to(device).bfloat16()", "GPT(h).to(device).float()"),
        ("X=G.bfloat16()", "X=G.float()"),
        ("['nvidia-smi']", "['echo','no GPU: CPU test copy']"),
        ("device_ids=[h.local_rank],", ""),
        ("optimizers=Optimizers(h,base_model);", "optimizers=Optimizers(h,base_model);probe_optimizers(base_model,optimizers);"),
    ],
    "record": [
        ("from flash_attn_interface import (\n    flash_attn_func as flash_attn_3_func,\n    flash_attn_varlen_func,\n)\n",
         FA3_STANDINS + PRELUDE + PYMINIFY_OR_PLAIN, 1),
        ("import triton\nimport triton.language as tl\nfrom triton.tools.tensor_descriptor import TensorDescriptor\n", NO_TRITON, 1),
        ('fused_ce_enabled = bool(int(os.environ.get("FUSED_CE_ENABLED", "1")))',
         "fused_ce_enabled = False  # CPU test copy: the fused CE is a Triton kernel", 1),
        (".use_fused = True", ".use_fused = False", 2),  # MLP.__init__, and after GPTQ calibration
        ('    if not torch.cuda.is_available():\n        raise RuntimeError("CUDA is required")\n', "", 1),
        ('    device = torch.device("cuda", local_rank)\n    torch.cuda.set_device(device)\n', '    device = torch.device("cpu")\n', 1),
        ('device = torch.device("cuda", h.local_rank)', 'device = torch.device("cpu")', 1),  # serialize()
        ('backend="nccl", device_id=device', 'backend="gloo"', 1),
        ('device_type="cuda", dtype=torch.bfloat16, enabled=True', 'device_type="cpu", enabled=False', 3),
        ('device_type="cuda", dtype=torch.bfloat16)', 'device_type="cpu", enabled=False)', 4),
        ("GPT(h).to(device).bfloat16()", "GPT(h).to(device).float()", 2),  # train_model(), deserialize()
        ("X = G.bfloat16()", "X = G.float()", 1),
        (".pin_memory()", "", 3),
        ("fused=True", "fused=False", 4),  # AdamW: token, scalar, TTT LoRA, TTT warmup
        ("    minified = subprocess.run(\n", "    minified = pyminify_or_plain(\n", 1),
        ("    optimizers = Optimizers(h, base_model)\n",
         "    optimizers = Optimizers(h, base_model)\n    probe_optimizers(base_model, optimizers)\n", 1),
    ],
}
SELF_EXTRACTING = {"pr1493"}  # the hosts shipped as exec(lzma.decompress(base64.b85decode("...")))



def cpu_copy(name: str, text: str) -> str:
    """`text` (the host `name`, plain or self-extracting, patched or not) with its CUDA plumbing swapped."""
    source, payload = patch_host.unwrap(text) if name in SELF_EXTRACTING else (text, None)
    # a block inlined by tools/patch_host.py is hymba_layer.py's own code: the swaps are for the host's
    start = source.find(patch_host.BEGIN)
    end = source.index(patch_host.END, start) + len(patch_host.END) if start >= 0 else -1
    host, block, rest = (source[:start], source[start:end], source[end:]) if start >= 0 else (source, "", "")
    for old, new, *times in SWAPS[name]:
        found = host.count(old) + rest.count(old)
        if not found or (times and found != times[0]):
            expected = f"{times[0]} time(s)" if times else "at least once"
            raise ValueError(f"{name}: the CPU copy expected {old!r} {expected} in the script, found it {found} time(s); "
                             f"is it the {name} host?")
        host, rest = host.replace(old, new), rest.replace(old, new)
    source = host + block + rest
    return source if payload is None else patch_host.wrap(text, payload, source)




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", type=Path)
    p.add_argument("--host", required=True, choices=sorted(SWAPS), help="which family the script is")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--patch", action="store_true", help="patch it with tools/patch_host.py first")
    args = p.parse_args(argv)
    text = args.script.read_text(encoding="utf-8")
    try:
        if args.patch:
            text = patch_host.patch_text(text, patch_host.MODULE.read_text(encoding="utf-8"))
        args.out.write_text(cpu_copy(args.host, text), encoding="utf-8")
    except (ValueError, patch_host.PatchError) as e:
        print(f"host_cpu.py: {args.script}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
