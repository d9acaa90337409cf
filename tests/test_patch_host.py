"""tools/patch_host.py on the challenge's two real hosts: hooks in the right places, the module inlined,
idempotent, atomic, self-extracting scripts kept self-extracting, and one-line refusals that leave the
file byte for byte as it was."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from hosts import MODULE_SOURCE, host_text, patch_host

TOOL = [sys.executable, str(REPO / "tools" / "patch_host.py")]


def patch(path, *extra):
    return subprocess.run([*TOOL, str(path), *extra], capture_output=True, text=True)


@pytest.mark.parametrize("name,swaps", [("root", ["base_model"]), ("pr1493", ["eval_model", "base_model"])])
def test_patch_inlines_the_module_and_swaps_after_every_model_build(tmp_path, name, swaps):
    path = tmp_path / "train_gpt.py"
    path.write_text(host_text(name), encoding="utf-8")
    proc = patch(path)
    assert proc.returncode == 0, proc.stderr
    source, payload = patch_host.unwrap(path.read_text(encoding="utf-8"))
    assert (payload is not None) == (name == "pr1493")  # a self-extracting script stays self-extracting
    assert source.count(MODULE_SOURCE) == 1  # every byte of code that runs is in the one counted file
    assert re.findall(r"build_and_swap_hymba_layers\((\w+)\)", source.replace(MODULE_SOURCE, "")) == swaps
    # the module comes right after apply_rotary_emb, before CausalSelfAttention uses the host classes
    assert source.index("def apply_rotary_emb(") < source.index(patch_host.BEGIN) < source.index("class CausalSelfAttention")
    assert "hymba_layer.register_host_classes(CastedLinear, Rotary, apply_rotary_emb)" in source
    compile(source.replace('{", ".join(', "{', '.join(").replace('glob("fineweb_train_*.bin")', "glob('f')"), name, "exec")
    # it shows what it changed: the hooks, and the module as one line
    assert f"+<hymba_layer.py: " in proc.stdout and f"build_and_swap_hymba_layers({swaps[-1]})" in proc.stdout
    assert MODULE_SOURCE[:2000] not in proc.stdout


@pytest.mark.parametrize("name", ["root", "pr1493"])
def test_patching_twice_changes_nothing_and_check_says_so(tmp_path, name):
    path = tmp_path / "train_gpt.py"
    path.write_text(host_text(name), encoding="utf-8")
    assert patch(path, "--check").returncode == 1
    assert patch(path).returncode == 0
    once = path.read_bytes()
    proc = patch(path)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout and path.read_bytes() == once
    assert patch(path, "--check").returncode == 0


def test_an_older_inlined_module_is_replaced_by_the_current_one(tmp_path):
    old = patch_host.patch_text(host_text("root"), MODULE_SOURCE.replace("ssm_state: int = 16", "ssm_state: int = 8"))
    updated = patch_host.patch_text(old, MODULE_SOURCE)
    assert updated == patch_host.patch_text(host_text("root"), MODULE_SOURCE)
    assert patch_host.unpatch(updated) == host_text("root")  # unpatching gives the original back, exactly


@pytest.mark.parametrize("edit,looked_for", [
    (("def apply_rotary_emb(", "def rotate("), "found no top-level `def apply_rotary_emb(`"),
    (("class CastedLinear(nn.Linear)", "class Linear8(nn.Linear)"), "found no top-level `class CastedLinear`"),
    (("        rope_base: float,\n        qk_gain_init: float,", "        rope_base: float,\n        gain: float,"), "CausalSelfAttention.__init__(self, dim, num_heads"),
    (("    base_model = GPT(", "    base_model = make_gpt("), "the model built as `name = GPT(...)`"),
    (("    ).to(device).bfloat16()\n", "    ).to(device).bfloat16(); x = 1 if True else 0\n"), None),
])
def test_a_script_it_cannot_patch_is_refused_in_one_line_and_left_untouched(tmp_path, edit, looked_for):
    text = host_text("root")
    assert edit[0] in text
    path = tmp_path / "train_gpt.py"
    path.write_text(text.replace(edit[0], edit[1]), encoding="utf-8")
    before = path.read_bytes()
    proc = patch(path)
    if looked_for is None:  # `; more code` after the build is fine: the swap goes right after it
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot patch" in proc.stderr and "the file is unchanged" in proc.stderr
    assert looked_for in proc.stderr
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["train_gpt.py"]


def test_hand_written_hooks_are_refused(tmp_path):
    path = tmp_path / "train_gpt.py"
    path.write_text(host_text("root").replace("import torch\n", "import torch\nimport hymba_layer\n", 1), encoding="utf-8")
    proc = patch(path)
    assert proc.returncode == 2 and "hooks added by hand" in proc.stderr


def test_a_failed_write_leaves_the_original(tmp_path, monkeypatch):
    path = tmp_path / "train_gpt.py"
    path.write_text(host_text("root"), encoding="utf-8")

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(patch_host.os, "replace", fail)
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
