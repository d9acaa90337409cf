"""tools/patch_host.py on the challenge's three real hosts and on small synthetic ones: every attention-kernel
call routed through hymba_attention with the right layer, a swap after every model build, the module inlined
as code where what it names is defined (minified in a self-extracting script, running as the module does),
idempotent, reversible, atomic, self-extracting scripts packed again the way they were, and one-line refusals
(a top-level name the module defines too, among them) that leave the file byte for byte as it was."""
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
    # every byte of code that runs is in the one counted file: the module as written, minified where the script is
    assert source.count(patch_host.module_code(MODULE_SOURCE, minify=wrapper is not None)) == 1
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
    assert ("(self-extracting, hymba_layer.py minified: " in proc.stdout) == (wrapper is not None)
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
    assert patch_host.patch_source(patched, MODULE_SOURCE, minify=name == "pr1493") == patched


@pytest.mark.parametrize("name", HOSTS)
def test_an_older_inlined_module_is_replaced_by_the_current_one(name):
    older = MODULE_SOURCE.replace("scan_chunk: int = 64", "scan_chunk: int = 32")
    assert older != MODULE_SOURCE
    old = patch_host.patch_text(host_text(name), older)
    updated = patch_host.patch_text(old, MODULE_SOURCE)
    assert old != updated == patch_host.patch_text(host_text(name), MODULE_SOURCE)
    assert patch_host.unpatch(patch_host.unwrap(updated)[0]) == patch_host.unwrap(host_text(name))[0]


def exec_block(source):
    """The block as the tool wrote it before it inlined the module as code: a string passed to exec."""
    return (f"{patch_host.BEGIN}\nimport sys, types\nhymba_layer = types.ModuleType('hymba_layer')\n"
            f"sys.modules['hymba_layer'] = hymba_layer\nexec(compile(r'''{source}''', 'hymba_layer.py', 'exec'), "
            f"hymba_layer.__dict__)\n{patch_host.END}\n")


@pytest.mark.parametrize("name", HOSTS)
def test_a_module_inlined_in_the_earlier_exec_form_is_replaced_by_code(name):
    current = patch_host.patch_text(host_text(name), MODULE_SOURCE)
    source, wrapper = patch_host.unwrap(current)
    older = source.replace(block_of(source), exec_block(MODULE_SOURCE))
    older = older if wrapper is None else patch_host.wrap(current, wrapper, older)
    assert older != current and patch_host.patch_text(older, MODULE_SOURCE) == current


# ---- the module inlined as code ----

def block_of(source):
    return source[source.index(patch_host.BEGIN):source.index(patch_host.END) + len(patch_host.END) + 1]


@pytest.mark.parametrize("name", HOSTS)
def test_the_module_is_inlined_as_code_that_the_hooks_find_by_name(name):
    source, wrapper = patch_host.unwrap(patch_host.patch_text(host_text(name), MODULE_SOURCE))
    block = block_of(source)
    tree = ast.parse(block)
    defined = {s.name for s in tree.body if isinstance(s, (ast.FunctionDef, ast.ClassDef))}
    assert {"hymba_attention", "build_and_swap_hymba_layers", "HybridHeads", "ssd_scan"} <= defined
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) in ("exec", "compile")]
    # the hooks' `hymba_layer` is the script's own module (its globals hold the definitions), bound last in the block
    assert ast.unparse(tree.body[-1]) == "hymba_layer = __import__('sys').modules[__name__]"
    if wrapper is None:  # as written: a host's own minifier (the record's) shrinks it with the rest
        assert block == f"{patch_host.BEGIN}\n{MODULE_SOURCE}{patch_host.NAMESPACE}\n{patch_host.END}\n"
    else:  # a self-extracting script holds minified code: no docstring, no comment but the markers
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)]
        assert [line for line in block.splitlines() if line.lstrip().startswith("#")] == [patch_host.BEGIN, patch_host.END]
        assert len(block) < len(MODULE_SOURCE) * 0.6


def minifier_form(form, monkeypatch):
    """The tool's minifier for a self-extracting script as `form` says: python-minifier (skip without it) or not installed."""
    if form == "python-minifier":
        pytest.importorskip("python_minifier")
    elif form == "without python-minifier":
        monkeypatch.setitem(sys.modules, "python_minifier", None)  # `import python_minifier` raises ImportError
        assert "pip install python-minifier" in patch_host.minifier()


@pytest.mark.parametrize("form", ["python-minifier", "without python-minifier"])
def test_a_self_extracting_script_grows_by_its_minified_module(form, monkeypatch):
    minifier_form(form, monkeypatch)
    original = host_text("pr1493")
    added = len(patch_host.patch_text(original, MODULE_SOURCE)) - len(original)
    # the module as written, packed into the payload, would add about its own source packed (measured 0.95 of it)
    assert 0 < added < len(base64.b85encode(lzma.compress(MODULE_SOURCE.encode()))) * 0.7


@pytest.mark.parametrize("form", ["as written", "python-minifier", "without python-minifier"])
def test_the_inlined_code_runs_as_the_module(form, monkeypatch):
    torch = pytest.importorskip("torch")
    import hymba_layer
    minifier_form(form, monkeypatch)
    block = patch_host.inline_block(MODULE_SOURCE, minify=form != "as written")
    if form != "as written":  # minified: no docstring left
        assert not [n for n in ast.walk(ast.parse(block)) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)]
    script = types.ModuleType("inlined_script")
    monkeypatch.setitem(sys.modules, script.__name__, script)
    exec(compile(block, "inlined_script.py", "exec"), vars(script))
    assert script.hymba_layer is script and script.hymba_layer.hymba_attention is script.hymba_attention
    monkeypatch.setenv("HYMBA_LAYERS", "1")
    monkeypatch.setenv("HYMBA_CONV", "2")
    cfg = script.HymbaConfig.from_env(8, 4, 2)  # a frozen dataclass, minified or not
    assert (cfg.layers, cfg.ssm_heads, cfg.conv) == ((1,), 4, 2) and repr(cfg).startswith("HymbaConfig(ssm_heads=4,")
    monkeypatch.setenv("HYMBA_SCAN_CHUNK", "x")
    with pytest.raises(ValueError, match=r"^HYMBA_SCAN_CHUNK='x' is invalid: expected a positive int$"):
        script.HymbaConfig.from_env(8, 4, 2)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 24, 4, 16), torch.randn(2, 24, 2, 16), torch.randn(2, 24, 2, 16)
    outputs = []
    for module in (hymba_layer, script):
        torch.manual_seed(1)
        heads = module.HybridHeads(4, 2, 16, module.HymbaConfig(4, (0,), 8, 2, 0))
        with torch.no_grad():
            heads.D.uniform_()  # D, conv taps and dt weights away from their initial values
            heads.conv_weight.uniform_()
            heads.dt_weight.normal_()
        outputs.append(heads(q, k, v, None))
    assert torch.equal(*outputs)


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


def test_names_the_script_imports_as_the_module_does_or_binds_in_functions_are_no_clash():
    text = FAKE.replace("import torch.nn.functional as F\n", "from torch.nn import functional as F\nimport os, math\n")
    text = text.replace("def main():\n", "def main():\n    local_attention = ssd_scan = os.environ.get('X')\n")
    assert patch_host.unpatch(patch_host.patch_text(text, MODULE_SOURCE)) == text


@pytest.mark.parametrize("module", ["from __future__ import annotations\n" + MODULE_SOURCE,
                                    '"""doc"""\nfrom __future__ import annotations\nimport sys\n'])
def test_a_module_with_a_future_import_is_refused(module):
    line = module.split("\n").index("from __future__ import annotations") + 1
    with pytest.raises(patch_host.PatchError, match=rf"^hymba_layer.py line {line}: `from __future__ import ...` cannot be "
                                                    r"inlined mid-script; remove it \(the module must run without it\)$"):
        patch_host.patch_text(FAKE, module)


def test_a_module_defining_a_builtin_name_is_refused():
    with pytest.raises(patch_host.PatchError, match=r"^hymba_layer.py defines the builtin name\(s\) open at its top level"):
        patch_host.patch_text(FAKE, MODULE_SOURCE + "\nopen = None\n")


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
    # a top-level name the inlined module defines too: one definition would replace the other
    ([("\n\ndef main():", "\n\ndef segsum(x):\n    return x\n\n\ndef main():")],
     "it defines `segsum` (line 38) at its top level, as hymba_layer.py does; inlined as code, one definition would replace"
     " the other: rename the script's"),
    ([("import torch.nn.functional as F\n", "import torch.nn.functional as F\nimport math, numpy as nn\n")], "defines `nn` (line 3)"),
    ([("from torch import nn\n", "from torch import nn\nF = torch.nn.functional\n")], "defines `F` (line 2)"),
    ([("    model = GPT()\n", "    global ENV_VARS\n    model = GPT()\n")], "defines `ENV_VARS` (line 39)"),
    ([('if __name__ == "__main__":\n', 'for ssd_scan in ():\n    pass\nif __name__ == "__main__":\n')], "defines `ssd_scan` (line 42)"),
    ([("from torch import nn\n", "from torch import nn\nfrom os import *\n")],
     "line 4: `from os import *` binds names that cannot be checked against hymba_layer.py's; import the names it uses"),
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
    assert inner == patch_host.patch_source(FAKE, MODULE_SOURCE, minify=True) and hooks(inner) == FAKE_HOOKS
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
