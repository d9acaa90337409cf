"""tools/patch_host.py on the challenge's three real hosts and on small synthetic ones: every attention-kernel
call routed through hymba_attention with the right layer, a swap after every model build, the module inlined
where what it names is defined, idempotent, reversible, atomic, self-extracting scripts packed again the way
they were, and one-line refusals that leave the file byte for byte as it was."""
import ast
import base64
import lzma
import os
import re
import subprocess
import sys
import types
import zlib

import pytest

from conftest import REPO
from hosts import MODULE_SOURCE, host_text, patch_host

TOOL = [sys.executable, str(REPO / "tools" / "patch_host.py")]
HOSTS = ["root", "pr1493", "record_0429"]
HOOK = "hymba_layer.hymba_attention"
KERNELS = set(patch_host.KERNELS)
# (class.function, layer, kernel) of every hooked call, in source order; the models each `= GPT(` builds
HOOKS = {
    "root": [("CausalSelfAttention.forward", "self", "F.scaled_dot_product_attention")],
    "pr1493": [("CausalSelfAttention.forward", "self", "flash_attn_3_func")],
    "record_0429": [("CausalSelfAttention.forward", "self", "flash_attn_varlen_func"),
                    ("CausalSelfAttention.forward", "self", "flash_attn_3_func"),
                    ("GPT._block_with_lora", "attn", "flash_attn_3_func"),
                    ("GPT._parallel_block_with_lora", "attn", "flash_attn_3_func")],
}
SWAPS = {"root": ["base_model"], "pr1493": ["eval_model", "base_model"], "record_0429": ["eval_model", "base_model"]}


def patch(path, *extra):
    return subprocess.run([*TOOL, str(path), *extra], capture_output=True, text=True)


def py311(source):
    """PR #1493's two Python 3.12 f-strings as 3.11 can read them (the tests run on either)."""
    return source.replace('{", ".join(', "{', '.join(").replace('glob("fineweb_train_*.bin")', "glob('fineweb_train_*.bin')")


def host_part(source):
    """The patched script without the inlined module."""
    start = source.index(patch_host.BEGIN)
    return source[:start] + source[source.index(patch_host.END) + len(patch_host.END) + 1:]


def calls(source, names):
    """(class.function, call) for every call of one of `names`, in source order."""
    found = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Call) and ast.unparse(child.func) in names:
                found.append((".".join(scope), child))
            visit(child, scope + [child.name] if isinstance(child, (ast.ClassDef, ast.FunctionDef)) else scope)
    visit(ast.parse(py311(source)), [])
    return found


def hooks(source):
    return [(where, ast.unparse(c.args[0]), ast.unparse(c.args[1])) for where, c in calls(host_part(source), {HOOK})]


# ---- the real hosts ----

@pytest.mark.parametrize("name", HOSTS)
def test_patch_routes_every_kernel_call_and_swaps_after_every_model_build(tmp_path, name):
    path = tmp_path / "train_gpt.py"
    path.write_text(host_text(name), encoding="utf-8")
    proc = patch(path)
    assert proc.returncode == 0, proc.stderr
    source, wrapper = patch_host.unwrap(path.read_text(encoding="utf-8"))
    assert (wrapper is not None) == (name == "pr1493")  # a self-extracting script stays self-extracting
    assert source.count(MODULE_SOURCE) == 1  # every byte of code that runs is in the one counted file
    host = host_part(source)
    assert hooks(source) == HOOKS[name]
    assert calls(host, KERNELS) == []  # no kernel call left unrouted
    # each hook passes the kernel's own arguments, in their order
    original = calls(patch_host.unwrap(host_text(name))[0], KERNELS)
    for (_, before), (_, after) in zip(original, calls(host, {HOOK}), strict=True):
        assert [ast.dump(a) for a in after.args[2:]] == [ast.dump(a) for a in before.args]
        assert [ast.dump(k) for k in after.keywords] == [ast.dump(k) for k in before.keywords]
    assert re.findall(r"build_and_swap_hymba_layers\((\w+)\)", host) == SWAPS[name]
    # the module comes after the kernel imports the hooks name, before the attention class
    begin = source.index(patch_host.BEGIN)
    assert source.index("import torch.nn.functional as F" if name == "root" else "flash_attn_func as flash_attn_3_func") < begin
    assert begin < source.index("class CausalSelfAttention")
    compile(py311(source), name, "exec")
    # it shows what it changed: the hooks, and the module as one line
    assert "+<hymba_layer.py: " in proc.stdout and f"build_and_swap_hymba_layers({SWAPS[name][-1]})" in proc.stdout
    assert re.search(rf"^\+.*{re.escape(HOOK)}\(self, ", proc.stdout, re.M)
    assert MODULE_SOURCE[:2000] not in proc.stdout


@pytest.mark.parametrize("name", HOSTS)
def test_patching_twice_changes_nothing_and_check_says_so(tmp_path, name):
    path = tmp_path / "train_gpt.py"
    path.write_text(host_text(name), encoding="utf-8")
    assert patch(path, "--check").returncode == 1
    assert patch(path).returncode == 0
    once = path.read_bytes()
    proc = patch(path)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout and path.read_bytes() == once
    assert patch(path, "--check").returncode == 0


@pytest.mark.parametrize("name", HOSTS)
def test_unpatching_gives_the_original_back_byte_for_byte(name):
    original = patch_host.unwrap(host_text(name))[0]
    patched = patch_host.unwrap(patch_host.patch_text(host_text(name), MODULE_SOURCE))[0]
    assert patch_host.unpatch(patched) == original
    assert patch_host.patch_source(patched, MODULE_SOURCE) == patched


def test_an_older_inlined_module_is_replaced_by_the_current_one():
    old = patch_host.patch_text(host_text("root"), MODULE_SOURCE.replace("ssm_state: int = 16", "ssm_state: int = 8"))
    updated = patch_host.patch_text(old, MODULE_SOURCE)
    assert updated == patch_host.patch_text(host_text("root"), MODULE_SOURCE)
    assert patch_host.unpatch(updated) == host_text("root")


def refused(tmp_path, text, *args):
    """The tool's one-line refusal of `text`, after checking it left the file as it was."""
    path = tmp_path / "train_gpt.py"
    path.write_text(text, encoding="utf-8")
    proc = patch(path, *args)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot patch" in proc.stderr and "the file is unchanged" in proc.stderr
    assert path.read_text(encoding="utf-8") == text and os.listdir(tmp_path) == ["train_gpt.py"]
    return proc.stderr


@pytest.mark.parametrize("edit,looked_for", [
    (("class CausalSelfAttention(nn.Module):", "class SelfAttention(nn.Module):"), "found no top-level `class CausalSelfAttention`"),
    (("self.attn = CausalSelfAttention(", "self.mixer = CausalSelfAttention("), "`.attn = CausalSelfAttention(...)`"),
    (("    base_model = GPT(", "    base_model = make_gpt("), "found no model built as `name = GPT(...)`"),
])
def test_a_root_script_without_an_anchor_is_refused(tmp_path, edit, looked_for):
    assert edit[0] in host_text("root")
    assert looked_for in refused(tmp_path, host_text("root").replace(edit[0], edit[1]))


def test_code_after_the_model_build_on_its_line_gets_the_swap_between(tmp_path):
    text = host_text("root").replace("    ).to(device).bfloat16()\n", "    ).to(device).bfloat16(); x = 1 if True else 0\n")
    patched = patch_host.patch_text(text, MODULE_SOURCE)
    assert ").to(device).bfloat16();hymba_layer.build_and_swap_hymba_layers(base_model); x = 1" in patched
    assert patch_host.unpatch(patched) == text


def test_hand_written_hooks_are_refused(tmp_path):
    text = host_text("root").replace("import torch\n", "import torch\nimport hymba_layer\n", 1)
    assert "hooks added by hand" in refused(tmp_path, text)


def test_a_failed_write_leaves_the_original(tmp_path, monkeypatch):
    path = tmp_path / "train_gpt.py"
    path.write_text(host_text("root"), encoding="utf-8")

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        patch_host.main([str(path)])
    assert path.read_text(encoding="utf-8") == host_text("root") and os.listdir(tmp_path) == ["train_gpt.py"]


def test_out_writes_elsewhere_and_keeps_the_input(tmp_path):
    src, out = tmp_path / "train_gpt.py", tmp_path / "hybrid.py"
    src.write_text(host_text("root"), encoding="utf-8")
    assert patch(src, "--out", out).returncode == 0
    assert src.read_text(encoding="utf-8") == host_text("root") and patch_host.BEGIN in out.read_text(encoding="utf-8")


def test_missing_file_is_a_one_line_error(tmp_path):
    proc = patch(tmp_path / "nope.py")
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_help_describes_the_hooks():
    proc = subprocess.run([*TOOL, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "hymba_layer.hymba_attention(LAYER, KERNEL, q, k, v, ...)" in proc.stdout


# ---- a small synthetic host: what is routed where, and what is refused ----

FAKE = '''import torch
import torch.nn.functional as F
from torch import nn
from flash_attn_interface import flash_attn_varlen_func


def flash_attn_3_func(q, k, v, causal=True):  # a kernel stand-in (as in a CPU copy): not an attention layer's call
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, num_kv_heads, rope_base, qk_gain_init):
        super().__init__()

    def forward(self, q, k, v):
        return flash_attn_3_func(q, k, v, causal=True)

    def forward_packed(self, q, k, v, cu_seqlens):
        return flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, causal=True)[None]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CausalSelfAttention(8, 2, 1, 10000.0, 1.5)


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block()])

    def block_with_lora(self, block, q, k, v):
        attn = block.attn
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)


def main():
    model = GPT()


if __name__ == "__main__":
    main()
'''
FAKE_HOOKS = [("CausalSelfAttention.forward", "self", "flash_attn_3_func"),
              ("CausalSelfAttention.forward_packed", "self", "flash_attn_varlen_func"),
              ("GPT.block_with_lora", "attn", "F.scaled_dot_product_attention")]


def test_a_synthetic_host_is_routed_by_layer_and_a_kernel_stand_in_is_left_alone():
    patched = patch_host.patch_text(FAKE, MODULE_SOURCE)
    assert hooks(patched) == FAKE_HOOKS
    assert [where for where, _ in calls(host_part(patched), KERNELS)] == ["flash_attn_3_func"]  # the stand-in's own body
    assert "    model = GPT()\n    hymba_layer.build_and_swap_hymba_layers(model)  # hymba:" in patched
    # after the last definition it names (here the stand-in kernel), before the attention class
    assert patched.index("def flash_attn_3_func(") < patched.index(patch_host.BEGIN) < patched.index("class CausalSelfAttention")
    assert patch_host.unpatch(patched) == FAKE and patch_host.patch_text(patched, MODULE_SOURCE) == patched


def test_positions_count_characters_where_a_line_has_non_ascii_text_before_the_call():
    text = FAKE.replace("        return flash_attn_3_func(q, k, v, causal=True)",
                        "        note = \"é — ü\"; return flash_attn_3_func(q, k, v, causal=True)")
    patched = patch_host.patch_text(text, MODULE_SOURCE)
    assert f'note = "é — ü"; return {HOOK}(self, flash_attn_3_func, q, k, v, causal=True)' in patched
    assert patch_host.unpatch(patched) == text


@pytest.mark.parametrize("edits,looked_for", [
    ([("return flash_attn_3_func(q, k, v, causal=True)", "return my_attention(q, k, v)")],
     "no attention kernel found in CausalSelfAttention.forward: expected one of F.scaled_dot_product_attention, "
     "torch.nn.functional.scaled_dot_product_attention, flash_attn_3_func, flash_attn_func, flash_attn_varlen_func"),
    ([("        attn = block.attn\n", "")],
     "line 34, in GPT.block_with_lora: F.scaled_dot_product_attention(...) has no attention layer in scope: expected a method"
     " of CausalSelfAttention, or a local `name = ....attn` before the call"),
    ([("cu_seqlens_k=cu_seqlens,", "cu_seqlens_k=cu_seqlens_k,")],
     "in CausalSelfAttention.forward_packed: flash_attn_varlen_func(...) needs the same cu_seqlens_q= and cu_seqlens_k="
     " keywords, and has cu_seqlens_q=cu_seqlens and cu_seqlens_k=cu_seqlens_k"),
    ([("cu_seqlens_k=cu_seqlens, ", "")], "cu_seqlens_k=(missing)"),
    ([("causal=True)[None]", "causal=True, window_size=(128, 0))[None]")], "flash_attn_varlen_func(...) sets `window_size=(128, 0)`"),
    ([("return flash_attn_3_func(q, k, v, causal=True)", "return flash_attn_3_func(q, k, v, causal=False)")],
     "flash_attn_3_func(...) is not causal (it needs `causal=True`)"),
    ([("return flash_attn_3_func(q, k, v, causal=True)", "return flash_attn_3_func(q, k, v)")], "flash_attn_3_func(...) is not causal"),
    ([("attn_mask=None,", "attn_mask=mask,")], "F.scaled_dot_product_attention(...) sets `attn_mask=mask`"),
    ([("(q, k, v, attn_mask=None, is_causal=True)", "(q, k, v, None, 0.0, True)")], "does not pass exactly q, k, v by position"),
    ([("return flash_attn_3_func(q, k, v, causal=True)", "return flash_attn_3_func (q, k, v, causal=True)")],
     "write the call as `flash_attn_3_func(...)`"),
    ([("    model = GPT()\n", "    model = torch.compile(GPT())\n")],
     "line 39: the model built there is not `name = GPT(...)...` (`model = torch.compile(GPT())`)"),
    ([("from flash_attn_interface import flash_attn_varlen_func\n", ""),
      ("    main()\n", "    main()\nfrom flash_attn_interface import flash_attn_varlen_func\n")],
     "`flash_attn_varlen_func` is defined at line 43, after line 41 already runs the model (`if __name__ == \"__main__\":`);"
     " the inlined module needs it before"),
    ([("import torch.nn.functional as F\n", "")], "`F` (of the attention kernel) is not imported or defined at the top level"),
    ([("def main():\n", "def main():\n    return flash_attn_3_func(q, k, v, causal=True) +\n")], "cannot parse it"),
])
def test_a_call_the_hooks_cannot_route_exactly_is_refused(tmp_path, edits, looked_for):
    text = FAKE
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    assert looked_for in refused(tmp_path, text)


# ---- self-extracting scripts ----

RAW = dict(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
FAKE_BROTLI = types.SimpleNamespace(compress=lambda data, quality: zlib.compress(data, 9), decompress=zlib.decompress)
WRAPPERS = {  # form -> (pack, unpack, the wrapper around PAYLOAD)
    "raw LZMA2, base85": (
        lambda d: base64.b85encode(lzma.compress(d, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])),
        lambda p: lzma.decompress(base64.b85decode(p), **RAW),
        'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("PAYLOAD"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n'),
    "xz, base64, decode()": (
        lambda d: base64.b64encode(lzma.compress(d)),
        lambda p: lzma.decompress(base64.b64decode(p), format=lzma.FORMAT_XZ),
        "import base64\nimport lzma\nexec(lzma.decompress(base64.b64decode('PAYLOAD')).decode('utf-8'))\n"),
    "xz, from-imported base85, bytes": (
        lambda d: base64.b85encode(lzma.compress(d)),
        lambda p: lzma.decompress(base64.b85decode(p), format=lzma.FORMAT_XZ),
        'from base64 import b85decode\nimport lzma\nexec(lzma.decompress(b85decode(b"PAYLOAD")))\n'),
    "brotli, base85": (
        lambda d: base64.b85encode(FAKE_BROTLI.compress(d, quality=11)),
        lambda p: FAKE_BROTLI.decompress(base64.b85decode(p)),
        'import brotli, base64\nexec(brotli.decompress(base64.b85decode("PAYLOAD")))\n'),
}


@pytest.mark.parametrize("form", WRAPPERS)
def test_a_self_extracting_script_is_patched_inside_and_packed_again_the_same_way(form, monkeypatch):
    monkeypatch.setitem(sys.modules, "brotli", FAKE_BROTLI)  # brotli's API, so the form is tested without the package
    pack, unpack, wrapper = WRAPPERS[form]
    text = wrapper.replace("PAYLOAD", pack(FAKE.encode()).decode())
    assert patch_host.unwrap(text)[0] == FAKE
    patched = patch_host.patch_text(text, MODULE_SOURCE)
    inner, _ = patch_host.unwrap(patched)
    assert inner == patch_host.patch_source(FAKE, MODULE_SOURCE) and hooks(inner) == FAKE_HOOKS
    assert patch_host.unpatch(inner) == FAKE
    # only the payload changed, and it unpacks the wrapper's way: same decoder, compressor, format and filters
    before, after = wrapper.split("PAYLOAD")
    assert patched.startswith(before) and patched.endswith(after)
    assert unpack(patched[len(before):-len(after)]).decode() == inner
    assert patch_host.patch_text(patched, MODULE_SOURCE) == patched  # current already: the bytes are kept


def test_a_script_that_runs_more_than_one_exec_is_plain_source():
    text = "import lzma, base64\nx = 1\nexec(lzma.decompress(base64.b85decode('abc')))\n"
    assert patch_host.unwrap(text) == (text, None)


@pytest.mark.parametrize("wrapper,looked_for", [
    ('import zlib, base64\nexec(zlib.decompress(base64.b85decode("PAYLOAD")))\n',
     "packed as zlib.decompress(base64.b85decode(...)); this tool unpacks lzma.decompress or brotli.decompress of"
     " base64.b85decode or base64.b64decode"),
    ('import lzma, base64\nexec(lzma.decompress(base64.a85decode("PAYLOAD")))\n', "packed as lzma.decompress(base64.a85decode(...))"),
    ("import lzma\nexec(lzma.decompress(open('code.xz', 'rb').read()))\n",
     "runs `exec(lzma.decompress(open('code.xz', 'rb').read()))`, not exec(<compressor>.decompress(<decoder>(\"...\")))"),
])
def test_a_self_extracting_script_packed_another_way_is_refused(tmp_path, wrapper, looked_for):
    assert looked_for in refused(tmp_path, wrapper.replace("PAYLOAD", base64.b85encode(zlib.compress(FAKE.encode())).decode()))
