"""The challenge's real host scripts (../shared/hosts/) as CPU test subjects.

A test copy swaps the CUDA device plumbing for the CPU (and, in PR #1493, FlashAttention 3 for SDPA
and two Python 3.12 f-strings for 3.11 ones), for the test only: the model, optimizer, export and
scoring code is the host's, unchanged. Every swap must match, so a changed host fails loudly instead
of silently running something else. A probe also writes which parameters each optimizer holds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env

sys.path.insert(0, str(REPO / "tools"))
import patch_host  # noqa: E402

HOSTS = REPO.parent / "shared" / "hosts"
MODULE_SOURCE = (REPO / "hymba_layer.py").read_text(encoding="utf-8")

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
        ('device_type="cuda"', 'device_type="cpu"'),
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
        ("device_type='cuda'", "device_type='cpu'"),
        ("['nvidia-smi']", "['echo','no GPU: CPU test copy']"),
        ("device_ids=[h.local_rank],", ""),
        ("optimizers=Optimizers(h,base_model);", "optimizers=Optimizers(h,base_model);probe_optimizers(base_model,optimizers);"),
    ],
}


def host_text(name: str) -> str:
    """The fixture script as shipped; skips the test where ../shared/hosts/ is absent."""
    path = HOSTS / f"{name}_train_gpt.py"
    if not path.is_file():
        pytest.skip(f"{path} not present (the challenge's host scripts are test fixtures of this project's workspace)")
    return path.read_text(encoding="utf-8")


def cpu_copy(name: str, text: str) -> str:
    """`text` (the host `name`, plain or self-extracting, patched or not) with its CUDA plumbing swapped."""
    source, payload = patch_host.unwrap(text)
    for old, new in SWAPS[name]:
        assert old in source, f"{name}: the CPU test copy expected {old!r} in the script"
        source = source.replace(old, new)
    return source if payload is None else patch_host.wrap(text, payload, source)


def write_script(path: Path, name: str, patched: bool) -> Path:
    text = host_text(name)
    if patched:
        text = patch_host.patch_text(text, MODULE_SOURCE)
    path.write_text(cpu_copy(name, text), encoding="utf-8")
    return path


def host_env(**settings) -> dict[str, str]:
    """A clean env for a host run on CPU: no compile (its graph is tested elsewhere), one thread."""
    env = clean_env(**settings)
    env.update(TORCHDYNAMO_DISABLE="1", PYTHONHASHSEED="0")
    return env
