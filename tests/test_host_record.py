"""Today's record stack (../shared/hosts/record_0429_train_gpt.py: banked weights, packed documents with varlen
FlashAttention 3, Triton kernels, GPTQ int6 + LQER export, phased LoRA TTT) run end to end on the CPU,
unpatched, in tests/host_cpu.py's copy: FA3 -> SDPA stand-ins (the varlen one exact per segment), Triton
paths off, CUDA -> CPU. One tiny run trains, quantizes and scores it with the host's own code; the stand-ins
are checked against plain attention on their own. The patched copy (tools/patch_host.py) keeps those swaps
and runs it without HYMBA_LAYERS (same losses and scores) and with two hybrid layers (trains, GPTQ-exports, scores
through the host's TTT path with the hybrid heads in it)."""
import collections
import json
import math
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import corpus_docs, grab, real_tokenizer
from hosts import MODULE_SOURCE, host_env, host_text, patch_host, sp8192_data_dir, write_script
import host_cpu

# 4 banked layers x 128 (4 heads of 32, 2 KV heads, RoPE on 16 dims, XSA everywhere), blocks 1-2 looped once from
# half of training, parallel lanes from block 2, SmearGate + sparse head gate (int8-quantized) as the record runs
# them; MLP 8x: the fc/proj matrices are 1024 x 128 = 131,072 > 65,536 elements, so GPTQ quantizes them (and the
# 8192 x 128 tied embedding); 8 steps of 8 micro-steps x 512 packed tokens cut at 128; EMA 0.5 so that 8 steps
# show in the post-EMA model; phased TTT on 12 short val docs, 3 batches of 4, 2 global-SGD phases.
TINY = dict(
    SEED=1337, VOCAB_SIZE=8192, NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=8, ROPE_DIMS=16,
    TRAIN_SEQ_LEN=128, ROPE_TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128, TTT_EVAL_SEQ_LEN=128, TRAIN_BATCH_TOKENS=4096,
    VAL_BATCH_TOKENS=8192, ITERATIONS=8, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=1, MAX_WALLCLOCK_SECONDS=0,
    NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, ENABLE_LOOPING_AT=0.5, PARALLEL_START_LAYER=2, XSA_LAST_N=4, EMA_DECAY=0.5,
    SMEAR_GATE_ENABLED=1, SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5, GATED_ATTN_QUANT_GATE=1,
    GPTQ_CALIBRATION_BATCHES=2, COMPRESSOR="lzma", TTT_LORA_RANK=4, TTT_BATCH_SIZE=4, TTT_CHUNK_SIZE=32,
    PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_NUM_PHASES=2, GLOBAL_TTT_CHUNK_TOKENS=128, GLOBAL_TTT_BATCH_SEQS=2)
SCORES = ("diagnostic pre-quantization post-ema", "diagnostic quantized", "quantized_ttt_phased")
VAL_DOCS, VAL_DOC_MAX_TOKENS = 12, 350


# ----------------------------------------------------------------------------- the FA3 stand-ins, on their own

def standins() -> dict:
    namespace = {"torch": torch, "F": F}
    exec(host_cpu.FA3_STANDINS, namespace)
    return namespace


def plain_attention(q, k, v):
    """Causal softmax attention of one sequence, (T, heads, head_dim), KV heads shared by groups as FA3 does."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(torch.ones(q.size(0), q.size(0), dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def test_varlen_standin_attends_exactly_within_each_segment():
    torch.manual_seed(0)
    bounds = [0, 5, 6, 20, 37]  # a 1-token segment too; padded to 64 entries by repeating the total, as the host does
    cu = torch.full((64,), bounds[-1], dtype=torch.int32)
    cu[: len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
    q = torch.randn(37, 4, 8, requires_grad=True)
    k, v = torch.randn(37, 2, 8), torch.randn(37, 2, 8)
    out = standins()["flash_attn_varlen_func"](q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=17, max_seqlen_k=17,
                                               causal=True, window_size=(-1, -1))
    q_ref = q.detach().clone().requires_grad_()
    ref = torch.cat([plain_attention(q_ref[s:e], k[s:e], v[s:e]) for s, e in zip(bounds, bounds[1:])])
    assert out.shape == (37, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, plain_attention(q, k, v), atol=1e-3)  # attention over the whole row differs
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-4, atol=1e-5)


def test_dense_standin_is_causal_gqa_attention_per_row():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    out = standins()["flash_attn_3_func"](q, k, v, causal=True)
    torch.testing.assert_close(out, torch.stack([plain_attention(*row) for row in zip(q, k, v)]), rtol=1e-5, atol=1e-5)


def test_varlen_standin_refuses_what_it_cannot_do_exactly():
    varlen = standins()["flash_attn_varlen_func"]
    q = torch.randn(8, 2, 4)
    cu, other = torch.tensor([0, 4, 8], dtype=torch.int32), torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="unsupported varlen call"):
        varlen(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=4, causal=True, window_size=(2, 0))
    with pytest.raises(ValueError, match="unsupported varlen call"):
        varlen(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=other, max_seqlen_q=5, max_seqlen_k=5, causal=True)
    with pytest.raises(ValueError, match="unsupported varlen call"):  # segments must cover the packed row
        varlen(q, q, q, cu_seqlens_q=cu[:2], cu_seqlens_k=cu[:2], max_seqlen_q=4, max_seqlen_k=4, causal=True)
    with pytest.raises(AssertionError, match="max_seqlen"):
        varlen(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3, max_seqlen_k=3, causal=True)


# ----------------------------------------------------------------------------- the copy's swaps

def test_cpu_copy_leaves_no_cuda_triton_or_fa3_path():
    copy = host_cpu.cpu_copy("record", host_text("record"))
    for gone in ("flash_attn_interface", "import triton", 'device_type="cuda"', 'torch.device("cuda"', '"nccl"',
                 ".pin_memory()", "fused=True", "GPT(h).to(device).bfloat16()", "use_fused = True", '"FUSED_CE_ENABLED"'):
        assert gone not in copy, gone
    assert host_cpu.FA3_STANDINS in copy and copy.count("probe_optimizers(base_model, optimizers)") == 1
    assert copy.count("minified = pyminify_or_plain(") == 1
    compile(copy, "train_gpt.py", "exec")  # Python 3.11


def test_cpu_copy_refuses_a_record_whose_code_moved():
    text = host_text("record")
    with pytest.raises(ValueError, match=r"'\.pin_memory\(\)' 3 time\(s\) in the script, found it 4"):
        host_cpu.cpu_copy("record", text + "\nx = torch.zeros(1).pin_memory()\n")
    with pytest.raises(ValueError, match="flash_attn_interface"):
        host_cpu.cpu_copy("record", text.replace("    flash_attn_varlen_func,\n", ""))


# ----------------------------------------------------------------------------- one tiny run, end to end

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The corpus in sp8192 shards: 12 short docs (<= 350 tokens) for validation and TTT, the rest for training."""
    sp = real_tokenizer(8192)
    docs = corpus_docs()
    val = [i for i, d in enumerate(docs) if len(sp.encode(d)) <= VAL_DOC_MAX_TOKENS][:VAL_DOCS]
    return sp8192_data_dir(tmp_path_factory.mktemp("data8192"), [docs[i] for i in val],
                           [d for i, d in enumerate(docs) if i not in val], seq_len=TINY["EVAL_SEQ_LEN"])


def run_copy(folder: Path, patched: bool, data_dir: Path) -> str:
    script = write_script(folder / "train_gpt.py", "record", patched)
    run_id = f"record_{uuid.uuid4().hex[:12]}"  # TTT keeps its counters in /tmp/ttt_*_{RUN_ID}
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=600,
                              env=host_env(**TINY, RUN_ID=run_id, DATA_DIR=f"{data_dir}/"))
    finally:
        for name in ("counter", "prefix_counter", "pause_flag"):
            Path(f"/tmp/ttt_{name}_{run_id}").unlink(missing_ok=True)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def original(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("record")
    return folder, run_copy(folder, False, data_dir)


def train_losses(out: str) -> dict:
    return {int(step): loss for step, loss in grab(r"^(\d+)/8 train_loss: {n} ", out)}


def scores(out: str) -> dict:
    return {label: (float(loss), float(bpb)) for label, loss, bpb in
            re.findall(r"^(.+?) val_loss:([-\w.]+) val_bpb:([-\w.]+) eval_time:\d+ms$", out, re.M)}


def test_record_trains_on_the_cpu_and_its_loss_falls(original):
    out = original[1]
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 1.0  # measured: 8.98 -> 6.27
    assert re.search(r"^layer_loop:enabled step:4 .* encoder:\[0, 1, 2\] decoder:\[1, 2, 3\]$", out, re.M)
    [(_, bpb)] = grab(r"^8/8 val_loss: {n} val_bpb: {n}$", out)
    assert 0 < bpb < 4


def test_record_prints_its_prequant_quantized_and_ttt_scores(original):
    out = original[1]
    found = scores(out)
    assert set(SCORES) <= set(found), found
    for label in SCORES:
        loss, bpb = found[label]
        assert math.isfinite(bpb) and 0 < bpb < 4, (label, bpb)
    # phased TTT: 12 docs in 3 batches, two global-SGD phases on the scored prefix (packed varlen rows), then done
    assert re.search(r"^ttt_phased: total_docs:12 prefix_docs:4 suffix_docs:8 num_phases:2 boundaries:\[2, 4\]$", out, re.M)
    assert [int(p) for p in re.findall(r"^ttpp: phase:(\d)/2 ", out, re.M)] == [1, 2]
    assert len(re.findall(r"^tttg: c\d+/\d+ lr:", out, re.M)) >= 2
    assert len(re.findall(r"^ttp: b\d/3 ", out, re.M)) == 3


def test_every_parameter_is_in_exactly_one_optimizer(original):
    groups = json.loads((original[0] / "optimizer_groups.json").read_text())
    tok, muon, scalar = groups["optimizers"]  # the record: token AdamW, Muon (banks), scalar AdamW
    counts = collections.Counter(n for g in groups["optimizers"] for n in g)
    assert set(counts) == set(groups["params"]) and set(counts.values()) == {1}
    assert tok == ["tok_emb.weight"] and sorted(muon) == ["kv_bank", "mlp_down_bank", "mlp_up_bank", "qo_bank"]
    assert {"smear_gate.weight", "smear_lambda", "blocks.0.attn.attn_gate_w", "skip_weights"} <= set(scalar)


def test_gptq_export_quantizes_the_big_matrices_and_ships_the_artifact(original):
    folder, out = original
    categories = dict(re.findall(r"^  (\S+(?: \(\w+\))?\S*): (.+)$", out, re.M))
    assert set(categories["gptq (int6)"].split(", ")) == {"blocks.mlp.fc.weight", "blocks.mlp.proj.weight"}
    assert "tok_emb.weight" in categories["gptq (int8)+lqer_asym"]
    assert categories["gate_int8_row"] == "blocks.attn.attn_gate_w"
    assert "blocks.attn.c_q.weight" in categories["passthrough (float16)"]  # 128 x 128: too small for GPTQ
    [(hessians,)] = grab(r"^GPTQ:collected {n} Hessians", out)
    assert hessians == 4 * 6 + 1  # c_q c_k c_v proj fc proj per layer, and the tied embedding
    [(shipped,)] = grab(r"^Serialized model quantized\+lzma: {n} bytes$", out)
    assert (folder / "final_model.int6.ptz").stat().st_size == shipped > 0
    assert grab(r"^Code size \(compressed\): {n} bytes$", out)  # pyminify, or where absent the plain code


# ----------------------------------------------------------------------------- the patched copy

def test_patched_copy_keeps_the_cpu_swaps_outside_the_inlined_module(tmp_path):
    copy = write_script(tmp_path / "train_gpt.py", "record", patched=True).read_text(encoding="utf-8")
    patched = patch_host.patch_text(host_text("record"), MODULE_SOURCE)
    block = lambda text: text[text.index(patch_host.BEGIN): text.index(patch_host.END)]
    assert copy.count(patch_host.BEGIN) == 1 and block(copy) == block(patched)  # hymba_layer.py as inlined, untouched
    assert host_cpu.FA3_STANDINS in copy and "flash_attn_interface" not in copy
    assert "hymba_layer.build_and_swap_hymba_layers(base_model)" in copy
    assert "hymba_layer.build_and_swap_hymba_layers(eval_model)" in copy


def test_patched_record_without_hymba_trains_exactly_like_the_original(tmp_path, original, data_dir):
    patched = run_copy(tmp_path, True, data_dir)
    assert "hymba:" not in patched
    assert train_losses(patched) == train_losses(original[1])
    assert scores(patched).keys() == scores(original[1]).keys()
    assert all(scores(patched)[label] == scores(original[1])[label] for label in SCORES)


# which host function called the kernel hook for a hybrid layer, and with which kernel -> hymba_calls.json
CALL_PROBE = """
import atexit as _atexit, collections as _collections, json as _json, sys as _sys
_hymba_calls, _hook = _collections.Counter(), hymba_layer.hymba_attention
def _probed_hook(layer, kernel, *args, **kwargs):
    if getattr(layer, "hymba", None) is not None:
        _hymba_calls[f"{_sys._getframe(1).f_code.co_name}:{kernel.__name__}"] += 1
    return _hook(layer, kernel, *args, **kwargs)
hymba_layer.hymba_attention = _probed_hook
_atexit.register(lambda: _json.dump(_hymba_calls, open("hymba_calls.json", "w")))
"""


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, data_dir):
    """The patched copy with blocks 1 (looped, plain lane) and 3 (parallel lanes) hybrid, conv taps on."""
    folder = tmp_path_factory.mktemp("record_hybrid")
    script = write_script(folder / "train_gpt.py", "record", patched=True)
    text = script.read_text(encoding="utf-8")
    end = text.index(patch_host.END) + len(patch_host.END) + 1
    script.write_text(text[:end] + CALL_PROBE + text[end:], encoding="utf-8")
    run_id = f"record_{uuid.uuid4().hex[:12]}"
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=600,
                              env=host_env(**TINY, RUN_ID=run_id, DATA_DIR=f"{data_dir}/", HYMBA_LAYERS="1,3", HYMBA_CONV="2"))
    finally:
        for name in ("counter", "prefix_counter", "pause_flag"):
            Path(f"/tmp/ttt_{name}_{run_id}").unlink(missing_ok=True)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return folder, proc.stdout


def test_hybrid_record_trains_exports_and_scores_like_the_plain_record(hybrid, original):
    """Same data, seed and steps as the unpatched run: the loss drop within 2% of plain's and every score within
    0.01 bpb of plain's, either way. In 8 steps hybrid layers behind the record's zero-init output projection
    move little; SSM heads 10x too loud train faster (drop 1.03x, scores 0.026-0.036 lower)."""
    out = hybrid[1]
    swapped = re.findall(r"^hymba:layer (\d) attn_heads:2 ssm_heads:2 kv_heads:2 head_dim:32 ", out, re.M)
    assert swapped == ["1", "3"] * 3  # the training model and each model deserialize() loads (quantized eval, TTT)
    losses, plain_losses = train_losses(out), train_losses(original[1])
    drop = lambda losses: losses[1] - losses[8]
    assert sorted(losses) == list(range(1, 9))
    assert 0.98 < drop(losses) / drop(plain_losses) < 1.02, (losses, plain_losses)  # measured: 2.7105 / 2.7136
    found, plain = scores(out), scores(original[1])
    assert set(SCORES) <= set(found)
    assert {s: round(found[s][1] - plain[s][1], 4) for s in SCORES if not abs(found[s][1] - plain[s][1]) < 0.01} == {}
    # measured (hybrid - plain): +0.0004 pre-quantization, -0.0009 quantized, -0.0011 phased TTT


def test_hybrid_heads_run_in_training_eval_and_every_ttt_path(hybrid):
    """The kernel hook saw hybrid layers in the packed training rows (varlen), the dense eval/calibration rows
    and both of the record's inline LoRA attention paths: TTT scores hybrid layers as hybrid layers."""
    calls = json.loads((hybrid[0] / "hymba_calls.json").read_text())
    assert {"forward:flash_attn_varlen_func", "forward:flash_attn_3_func", "_block_with_lora:flash_attn_3_func",
            "_parallel_block_with_lora:flash_attn_3_func"} <= set(calls), calls


def test_hybrid_dynamics_have_one_optimizer_and_ship_as_fp16(hybrid):
    folder, out = hybrid
    groups = json.loads((folder / "optimizer_groups.json").read_text())
    counts = collections.Counter(n for g in groups["optimizers"] for n in g)
    dynamics = {n for n in groups["params"] if ".hymba." in n}
    assert dynamics == {f"blocks.{i}.attn.hymba.{n}" for i in (1, 3) for n in ("dt_weight", "A_log", "dt_bias", "D", "conv_weight")}
    assert set(counts) == set(groups["params"]) and set(counts.values()) == {1}
    assert dynamics <= set(groups["optimizers"][2])  # the scalar AdamW: Muon takes only the banks
    categories = dict(re.findall(r"^  (\S+(?: \(\w+\))?\S*): (.+)$", out, re.M))
    assert {f"blocks.attn.hymba.{n}" for n in ("dt_weight", "A_log", "dt_bias", "D", "conv_weight")} <= set(categories["passthrough (float16)"].split(", "))
