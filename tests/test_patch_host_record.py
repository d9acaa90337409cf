"""tools/patch_host.py on today's record family (record_0429_train_gpt.py): plain source although it builds a
self-extracting wrapper in a function, every model it builds swapped where it is built, the inline attention
of its test-time-training paths routed with the block's own attention module."""
import ast
import base64
import lzma
import shutil
import subprocess

import pytest

from hosts import MODULE_SOURCE, host_text, patch_host
from test_patch_host import HOOK, calls, host_part


def patched_record():
    return patch_host.patch_text(host_text("record_0429"), MODULE_SOURCE)


def test_a_script_that_only_builds_a_wrapper_in_a_function_is_plain_source():
    text = host_text("record_0429")
    assert 'exec(L.decompress(B.b85decode("' in text  # in _compressed_code_size, which measures the code
    assert patch_host.unwrap(text) == (text, None)
    assert patch_host.find_wrapper(patched_record()) is None and patch_host.unpatch(patched_record()) == text  # patched as plain text


def test_every_model_is_swapped_in_the_function_that_builds_it():
    swaps = calls(host_part(patched_record()), {"hymba_layer.build_and_swap_hymba_layers"})
    # deserialize() builds the model that is scored and that test-time training starts from (ttt_model)
    assert [(where, ast.unparse(c.args[0])) for where, c in swaps] == [("deserialize", "eval_model"), ("train_model", "base_model")]
    assert ("    eval_model = GPT(h).to(device).bfloat16()\n    hymba_layer.build_and_swap_hymba_layers(eval_model)  # hymba:"
            in patched_record())


def test_the_packed_document_call_keeps_its_keywords_and_the_ttt_paths_use_the_blocks_attention():
    source = host_part(patched_record())
    varlen, dense, *ttt = [c for _, c in calls(source, {HOOK})]
    assert ast.unparse(varlen) == (f"{HOOK}(self, flash_attn_varlen_func, q[0], k[0], v[0], cu_seqlens_q=cu_seqlens, "
                                   "cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True, "
                                   "window_size=(-1, -1))")
    assert ast.unparse(dense) == f"{HOOK}(self, flash_attn_3_func, q, k, v, causal=True)"
    # _block_with_lora / _parallel_block_with_lora: `attn = block.attn`, then attention inline
    assert [ast.unparse(c) for c in ttt] == [f"{HOOK}(attn, flash_attn_3_func, q, k, v, causal=True)"] * 2


def test_the_module_goes_right_after_the_kernel_imports():
    source = patched_record()
    begin = source.index(patch_host.BEGIN)
    assert source[:begin].endswith("from flash_attn_interface import (\n    flash_attn_func as flash_attn_3_func,\n    flash_attn_varlen_func,\n)\n")
    assert source[begin:].split(patch_host.END + "\n", 1)[1].startswith("from concurrent.futures import ThreadPoolExecutor\n")


def records_code_size(text):
    """`Code size (compressed)` as the record logs it: its own _compressed_code_size (pyminify, lzma, base85 wrapper)."""
    record = host_text("record_0429")
    [step] = [s for s in ast.parse(record).body if isinstance(s, ast.FunctionDef) and s.name == "_compressed_code_size"]
    namespace = {"subprocess": subprocess, "lzma": lzma, "base64": base64}
    exec(ast.get_source_segment(record, step), namespace)
    return namespace["_compressed_code_size"](text)[1]


@pytest.mark.skipif(shutil.which("pyminify") is None, reason="the record's code size step runs pyminify (pip install python-minifier)")
def test_the_records_own_minifier_shrinks_the_inlined_module():
    added = records_code_size(patched_record()) - records_code_size(host_text("record_0429"))
    # inlined as a string passed to exec, the module's docstrings and comments were counted: about its source packed
    assert 0 < added < len(base64.b85encode(lzma.compress(MODULE_SOURCE.encode()))) * 0.7
