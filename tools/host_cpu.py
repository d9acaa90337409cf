"""A CPU copy of a challenge host script (the root train_gpt.py or a PR #1493-family one), for tests
and CPU benchmarks of hymba_layer.py inside it.

    python tools/host_cpu.py ../shared/hosts/root_train_gpt.py --host root --out /tmp/root_cpu.py [--patch]

The copy swaps the CUDA device plumbing for the CPU, bf16 for fp32 (a CPU without bf16 units runs bf16
matmuls ~30x slower than fp32; the hybrid layer's bf16 numerics are tested on their own) and, in
PR #1493, FlashAttention 3 for SDPA and two Python 3.12 f-strings for 3.11 ones: the model, optimizer,
export and scoring code is the host's, unchanged. Every swap must match, so a changed host fails
loudly instead of silently running something else. A probe writes which parameters each optimizer
holds to optimizer_groups.json. Run the copy with TORCHDYNAMO_DISABLE=1 (no compile on CPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import patch_host  # noqa: E402

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

SWAPS = {  # host -> [(what the script has, what the CPU copy runs instead)]
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
}



def cpu_copy(name: str, text: str) -> str:
    """`text` (the host `name`, plain or self-extracting, patched or not) with its CUDA plumbing swapped."""
    source, payload = patch_host.unwrap(text)
    for old, new in SWAPS[name]:
        if old not in source:
            raise ValueError(f"{name}: the CPU copy expected {old!r} in the script; is it the {name} host?")
        source = source.replace(old, new)
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
