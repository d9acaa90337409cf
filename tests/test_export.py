"""int8 export: quantize -> torch bytes -> compress -> decompress -> load -> dequantize, and the atomic
file write (golf_conventions 4.1-4.2)."""
import io
import os

import pytest
import torch

import train_gpt


FLOOR_STEP_FP16 = torch.tensor(1 / 127).half().float().item()  # 0.00787353515625


def per_row_matrix() -> torch.Tensor:
    """256 x 512 fp32 (131,072 > 65,536 numel, so it is quantized per row), rows of four kinds:
    0-63   uniform in +-127*s with s = 2^-6 or 2^-4 and both extremes present: the clip is exactly
           127*s, so the scale is exact in fp16 and nothing is clipped;
    64-127 N(0, 0.02): clip/127 < 1/127, so the step is the 1/127 floor;
    128-191 N(0, 1) plus one outlier of 40.0 at column = row: the outlier is clipped;
    192-254 N(0, 1);  255 all zeros."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g)
    for r in range(64):
        s = 2.0 ** (-6 if r % 2 == 0 else -4)
        w[r] = (torch.rand(512, generator=g) * 2 - 1) * 127 * s
        w[r, 3], w[r, 400] = 127 * s, -127 * s
    w[64:128] *= 0.02
    for r in range(128, 192):
        w[r, r] = 40.0
    w[255] = 0
    return w


def make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    conv = (torch.rand(4, 128, 160, generator=g) * 2 - 1) * 127 * 2.0**-5  # 81,920 numel, not 2-D
    conv[0, 0, 0], conv[3, 127, 159] = 127 * 2.0**-5, -127 * 2.0**-5     # clip exactly 127 * 2^-5
    small_bf16 = (torch.rand(8, generator=g) + 0.5).bfloat16()             # fp16-representable values
    return {
        "blocks.0.mlp.fc.weight": per_row_matrix(),
        "tok_emb.weight": (torch.randn(1024, 96, generator=g) * 0.5).bfloat16(),
        "blocks.0.conv.weight": conv,
        "blocks.0.attn_scale": torch.randn(96, generator=g),
        "blocks.0.mlp_scale": torch.randn(96, generator=g),
        "blocks.0.resid_mix": torch.randn(2, 96, generator=g),
        "blocks.0.attn.q_gain": torch.randn(2, generator=g),
        "skip_weights": torch.randn(1, 96, generator=g),
        "blocks.0.attn.c_q.weight": torch.randn(64, 64, generator=g),  # 4,096 numel: passthrough fp16
        "bias_bf16": small_bf16,
        "at_limit.weight": torch.randn(256, 256, generator=g),         # 65,536 numel: still passthrough
        "above_limit.weight": torch.randn(256, 257, generator=g),      # 65,792 numel: quantized
        "step": torch.tensor([3, -7, 2**40]),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.tensor([-128, 0, 127], dtype=torch.int8),
    }


def roundtrip(state, compressor="zlib"):
    container, payload = train_gpt.quantize_state_dict_int8(state)
    blob = train_gpt.compress(train_gpt.torch_bytes(container), compressor)
    loaded = torch.load(io.BytesIO(train_gpt.decompress(blob, compressor)), map_location="cpu")
    return container, payload, blob, train_gpt.dequantize_state_dict_int8(loaded)


@pytest.fixture(scope="module")
def exported():
    state = make_state()
    container, payload, blob, restored = roundtrip(state)
    return state, container, payload, restored


def test_container_layout_and_payload_bytes(exported):
    state, container, payload, restored = exported
    assert container["__quant_format__"] == "int8_clean_per_row_v1"
    assert sorted(container["quantized"]) == ["above_limit.weight", "blocks.0.conv.weight", "blocks.0.mlp.fc.weight", "tok_emb.weight"]
    assert container["qmeta"] == {n: {"scheme": "per_row", "axis": 0} for n in ["above_limit.weight", "blocks.0.mlp.fc.weight", "tok_emb.weight"]}
    assert container["dtypes"] == {"above_limit.weight": "float32", "blocks.0.conv.weight": "float32",
                                   "blocks.0.mlp.fc.weight": "float32", "tok_emb.weight": "bfloat16"}
    assert container["passthrough_orig_dtypes"] == {"blocks.0.attn.c_q.weight": "float32", "bias_bf16": "bfloat16", "at_limit.weight": "float32"}
    int8 = 131_072 + 98_304 + 81_920 + 65_792
    scales = 2 * (256 + 1024 + 256) + 4               # fp16 per row; one fp32 scalar for the 3-D tensor
    passthrough = 4 * (96 + 96 + 192 + 2 + 96) + 2 * (4096 + 8 + 65_536) + 8 * 3 + 3 + 3
    assert payload == int8 + scales + passthrough == 521_402
    assert restored.keys() == state.keys()
    assert {n: (t.dtype, t.shape) for n, t in restored.items()} == {n: (t.dtype, t.shape) for n, t in state.items()}


def test_rows_with_exact_scales_are_within_half_a_step(exported):
    state, container, _, restored = exported
    w, w2 = state["blocks.0.mlp.fc.weight"][:64], restored["blocks.0.mlp.fc.weight"][:64]
    step = torch.tensor([2.0**-6, 2.0**-4] * 32)
    assert torch.equal(container["scales"]["blocks.0.mlp.fc.weight"][:64].float(), step)
    err = (w - w2).abs().amax(dim=1)
    assert bool((err <= step / 2).all()) and bool((err > step / 4).all())  # the bound is tight, not vacuous
    assert torch.equal(w2[:, 3], 127 * step) and torch.equal(w2[:, 400], -127 * step)  # extremes exact


def test_rows_below_unit_range_use_the_one_over_127_step(exported):
    state, container, _, restored = exported
    w, w2 = state["blocks.0.mlp.fc.weight"][64:128], restored["blocks.0.mlp.fc.weight"][64:128]
    assert container["scales"]["blocks.0.mlp.fc.weight"][64:128].float().unique().tolist() == [FLOOR_STEP_FP16]
    q = container["quantized"]["blocks.0.mlp.fc.weight"][64:128].float()
    assert torch.equal(w2, q * FLOOR_STEP_FP16)
    # half a 1/127 step, plus what rounding the scale to fp16 moves the largest level
    assert float((w - w2).abs().max()) <= 0.5 / 127 + float(q.abs().max()) * abs(1 / 127 - FLOOR_STEP_FP16)


def test_outlier_is_clipped_to_the_row_percentile_and_other_entries_keep_the_bound(exported):
    state, container, _, restored = exported
    w, w2 = state["blocks.0.mlp.fc.weight"], restored["blocks.0.mlp.fc.weight"]
    clip = torch.quantile(w.abs(), 0.9999984, dim=1)  # the spec's per-row clip
    scale32 = (clip / 127).clamp_min(1 / 127)
    scale16 = container["scales"]["blocks.0.mlp.fc.weight"].float()
    assert torch.equal(scale16, scale32.half().float())
    bound = scale32 / 2 + 127 * (scale32 - scale16).abs()
    err = (torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None]) - w2).abs().amax(dim=1)
    assert bool((err <= bound + 1e-7).all())
    rows = torch.arange(128, 192)
    outliers = w2[rows, rows]
    assert torch.equal(outliers, 127 * scale16[rows])            # the outlier lands on the top level
    assert bool((outliers < 40.0).all()) and bool((outliers > 39.9).all())  # ...just below 40 (clipped)


def test_all_zero_row_dequantizes_to_zeros(exported):
    _, container, _, restored = exported
    assert container["scales"]["blocks.0.mlp.fc.weight"][255].item() == FLOOR_STEP_FP16
    assert restored["blocks.0.mlp.fc.weight"][255].abs().sum().item() == 0.0


def test_large_non_matrix_uses_one_fp32_scale(exported):
    state, container, _, restored = exported
    scale = container["scales"]["blocks.0.conv.weight"]
    assert scale.dtype == torch.float32 and scale.ndim == 0 and scale.item() == 2.0**-5
    err = (state["blocks.0.conv.weight"] - restored["blocks.0.conv.weight"]).abs().max().item()
    assert 2.0**-7 < err <= 2.0**-6


def test_bf16_embedding_is_quantized_per_row_and_restored_as_bf16(exported):
    state, container, _, restored = exported
    w, w2 = state["tok_emb.weight"].float(), restored["tok_emb.weight"]
    assert w2.dtype == torch.bfloat16
    scale = container["scales"]["tok_emb.weight"].float()
    q = container["quantized"]["tok_emb.weight"].float()
    assert torch.equal(w2, (q * scale[:, None]).bfloat16())
    # half a step, plus the fp16 scale's rounding (2^-11 relative) times the top level 127, plus
    # rounding the result to bf16 (2^-9 relative)
    err = (w - w2.float()).abs()
    assert bool((err <= scale[:, None] * (0.5 + 127 * 2.0**-11) * (1 + 2.0**-10) + w.abs() * 2.0**-8).all())


def test_control_tensors_pass_through_bit_exact_in_fp32(exported):
    state, container, _, restored = exported
    for name in ["blocks.0.attn_scale", "blocks.0.mlp_scale", "blocks.0.resid_mix", "blocks.0.attn.q_gain", "skip_weights"]:
        assert container["passthrough"][name].dtype == torch.float32
        assert restored[name].dtype == torch.float32 and torch.equal(restored[name], state[name]), name


def test_small_float_tensors_are_stored_fp16_and_restored_to_their_dtype(exported):
    state, container, _, restored = exported
    for name in ["blocks.0.attn.c_q.weight", "at_limit.weight", "bias_bf16"]:
        assert container["passthrough"][name].dtype == torch.float16, name
    cq, cq2 = state["blocks.0.attn.c_q.weight"], restored["blocks.0.attn.c_q.weight"]
    assert cq2.dtype == torch.float32 and torch.equal(cq2, cq.half().float()) and not torch.equal(cq2, cq)
    assert restored["bias_bf16"].dtype == torch.bfloat16 and torch.equal(restored["bias_bf16"], state["bias_bf16"])


def test_numel_limit_65536_passes_through_and_one_row_more_is_quantized(exported):
    _, container, _, restored = exported
    assert "at_limit.weight" in container["passthrough"] and "above_limit.weight" in container["quantized"]
    assert container["quantized"]["above_limit.weight"].dtype == torch.int8


def test_non_float_tensors_pass_through_exactly(exported):
    state, _, _, restored = exported
    for name in ["step", "mask", "codes"]:
        assert restored[name].dtype == state[name].dtype and torch.equal(restored[name], state[name]), name


@pytest.mark.parametrize("compressor, magic", [("zlib", b"\x78\xda"), ("zstd", b"\x28\xb5\x2f\xfd")])
def test_both_compressors_roundtrip_the_container(compressor, magic):
    state = make_state()
    container, _, blob, restored = roundtrip(state, compressor)
    assert blob[: len(magic)] == magic  # zlib level 9 header / zstd frame magic
    raw = train_gpt.torch_bytes(container)
    assert train_gpt.decompress(train_gpt.compress(raw, compressor), compressor) == raw
    direct = train_gpt.dequantize_state_dict_int8(container)
    assert all(torch.equal(restored[n], direct[n]) for n in state)
    assert len(blob) < len(raw)


# ----------------------------------------------------------------------------- write_atomic

def test_write_atomic_writes_the_bytes_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "final_model.int8.ptz"
    train_gpt.write_atomic(str(path), b"old")
    train_gpt.write_atomic(str(path), b"new bytes")
    assert path.read_bytes() == b"new bytes"
    assert os.listdir(tmp_path) == ["final_model.int8.ptz"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_interrupted_write_keeps_the_previous_file_and_no_temp_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "final_model.int8.ptz"
    path.write_bytes(b"previous artifact")

    def interrupted(*args, **kwargs):
        raise OSError(f"simulated failure in os.{failing}")
    monkeypatch.setattr(train_gpt.os, failing, interrupted)
    with pytest.raises(OSError, match="simulated failure"):
        train_gpt.write_atomic(str(path), b"half-written new artifact")
    monkeypatch.undo()
    assert path.read_bytes() == b"previous artifact"
    assert os.listdir(tmp_path) == ["final_model.int8.ptz"]
