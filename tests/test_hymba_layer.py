"""HymbaLayer inside the host's GPT: SSM wiring, causality, compile, gradients, parameter counts,
control tensors and export, and the HYMBA_* env var checks."""
import io
import os

import pytest
import torch
import torch.nn.functional as F

import hymba_layer
import train_gpt
from conftest import grab, run_train_gpt, tiny_config
from hymba_layer import HymbaConfig, HymbaLayer, build_and_swap_hymba_layers, ssd_scan_reference

hymba_layer.register_host_classes(train_gpt.CastedLinear, train_gpt.Rotary, train_gpt.apply_rotary_emb)

# a tiny host: width 32, 4 heads of 8, 2 KV heads, 4 blocks
VOCAB, LAYERS, DIM, HEADS, KV_HEADS = 64, 4, 32, 4, 2
HEAD_DIM, KV_WIDTH = DIM // HEADS, KV_HEADS * DIM // HEADS


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("HYMBA_"):
            monkeypatch.delenv(k)


def hybrid_gpt(monkeypatch, seed=0, **env):
    """A host GPT with HYMBA_* = env swapped in; returns (model, swapped indices, log lines)."""
    for k, v in env.items():
        monkeypatch.setenv(f"HYMBA_{k.upper()}", str(v))
    torch.manual_seed(seed)
    model = train_gpt.GPT(VOCAB, LAYERS, DIM, HEADS, KV_HEADS, 2, True, 0.005, 30.0, 10000.0, 1.5)
    lines = []
    swapped = build_and_swap_hymba_layers(model, lines.append)
    return model, swapped, lines


def config(**overrides):
    return HymbaConfig(**{**dict(layers=(1,), ssm_heads=2, scan_chunk=8), **overrides})


def layer(cfg, seed=0):
    """A standalone hybrid layer with a random (not zero) output projection, so its output is not 0."""
    torch.manual_seed(seed)
    m = HymbaLayer(DIM, HEADS, KV_HEADS, 10000.0, 1.5, cfg=cfg)
    torch.nn.init.normal_(m.proj.weight, std=0.2)
    return m


def tokens(seed=0, b=2, t=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g), torch.randint(0, VOCAB, (b, t), generator=g)


# ----------------------------------------------------------------------------- the SSM branch

def test_ssm_branch_is_the_mamba2_recurrence():
    """Without conv and gate: y = scan(dt x, -dt exp(A_log), B, C) + D x, with dt = softplus(W_dt u + dt_bias).
    fp64 throughout except W_dt u, which the layer rounds to fp32 (dt is computed in fp32)."""
    torch.manual_seed(0)
    ssm = layer(config(conv=0, gate=False, groups=2)).ssm.double()
    with torch.no_grad():
        ssm.D.uniform_(0.5, 1.5)
    u = torch.randn(2, 20, DIM, dtype=torch.float64)
    x, B, C = ssm.in_proj(u).split([2 * HEAD_DIM, 2 * 16, 2 * 16], dim=-1)
    x, B, C = x.view(2, 20, 2, HEAD_DIM), B.view(2, 20, 2, 16), C.view(2, 20, 2, 16)
    dt = F.softplus(ssm.dt_proj(u).float().double() + ssm.dt_bias)
    y_ref, _ = ssd_scan_reference(x * dt[..., None], -dt * ssm.A_log.exp(), B, C)
    y_ref = (y_ref + ssm.D[:, None] * x).reshape(2, 20, -1)
    assert torch.allclose(ssm(u), y_ref, rtol=1e-10, atol=1e-12)


def test_ssm_inits_follow_mamba2():
    ssm = layer(config()).ssm
    decay_rates = ssm.A_log.exp()
    dt = F.softplus(ssm.dt_bias)
    assert ((decay_rates >= 1) & (decay_rates <= 16)).all()
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5))).all()
    assert torch.equal(ssm.D, torch.ones(2))
    assert all(p.dtype == torch.float32 and p.ndim == 1 for p in (ssm.A_log, ssm.dt_bias, ssm.D))


# ----------------------------------------------------------------------------- the hybrid layer

@pytest.mark.parametrize("merge,meta_tok,conv", [("concat", 0, 4), ("concat", 3, 0), ("mean", 3, 4)])
def test_causal_earlier_outputs_ignore_later_inputs(merge, meta_tok, conv):
    """Changing the input at positions >= 13 leaves outputs before 13 unchanged (T=29: chunks of 8 and
    a padded last chunk), and does change later ones."""
    m = layer(config(merge=merge, meta_tok=meta_tok, conv=conv)).double()
    x = torch.randn(2, 29, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 13:] = torch.randn(2, 16, DIM, dtype=torch.float64)
    y, y2 = m(x), m(x2)
    assert torch.allclose(y[:, :13], y2[:, :13], rtol=0, atol=1e-12)
    assert (y[:, 13:] - y2[:, 13:]).abs().amin(dim=-1).gt(1e-6).all()


def test_zero_init_output_projection_makes_block_identity(monkeypatch):
    model, *_ = hybrid_gpt(monkeypatch, layers="1")
    attn = model.blocks[1].attn
    assert attn.proj._zero_init and torch.count_nonzero(attn.proj.weight) == 0
    assert torch.equal(attn(torch.randn(2, 10, DIM)), torch.zeros(2, 10, DIM))


@pytest.mark.parametrize("env", [dict(layers="1"), dict(layers="1,2", merge="mean", meta_tok=2, kv_share=1, groups=2, scan_chunk=8)],
                         ids=["defaults", "mean_meta_kvshare_groups"])
def test_compiled_fullgraph_matches_eager(monkeypatch, env):
    model, *_ = hybrid_gpt(monkeypatch, **env)
    for p in model.parameters():  # leave the zero init so every path carries signal
        torch.nn.init.normal_(p, std=0.1)
    x, y = tokens(t=20)
    loss = model(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, y)
    loss_c.backward()
    assert abs(loss_c.item() - loss.item()) < 1e-5
    assert all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6) for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize("merge", ["concat", "mean"])
def test_every_parameter_learns(monkeypatch, merge):
    """After a few Adam steps (the zero-init projections open up), every parameter has a nonzero
    gradient: the q projection holds only attention heads, the shared K/V get gradients once."""
    model, *_ = hybrid_gpt(monkeypatch, layers="1,2", merge=merge, meta_tok=2, kv_share=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = tokens(t=16)
    for _ in range(4):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert dead == []
    rows_without_grad = (model.blocks[1].attn.c_q.weight.grad.abs().sum(1) == 0).sum().item()
    assert rows_without_grad == 0


def test_kv_sharing_stores_the_projection_once(monkeypatch):
    model, swapped, lines = hybrid_gpt(monkeypatch, layers="1,2,3", kv_share=1)
    a1, a2, a3 = (model.blocks[i].attn for i in swapped)
    assert a2.c_k is a1.c_k and a2.c_v is a1.c_v and a3.c_k is not a1.c_k  # pairs: (1, 2), then 3 alone
    names = set(model.state_dict())
    assert "blocks.1.attn.c_k.weight" in names and "blocks.2.attn.c_k.weight" not in names and "blocks.3.attn.c_k.weight" in names
    assert [line.split(" kv:")[1].split()[0] for line in lines] == ["own", "shared_with_1", "own"]
    own = sum(p.numel() for p in a1.parameters())
    assert sum(p.numel() for p in a2.parameters()) == own - 2 * DIM * KV_WIDTH


def expected_params(merge="concat", ssm_heads=2, state=16, groups=1, conv=4, gate=True, meta_tok=0):
    """Hybrid layer parameters for the tiny host, term by term."""
    attn_heads = HEADS - ssm_heads
    attn_width = attn_heads * HEAD_DIM
    ssm_width = ssm_heads * HEAD_DIM if merge == "concat" else attn_width
    xbc = ssm_width + 2 * groups * state
    total = DIM * attn_width + 2 * DIM * KV_WIDTH + attn_heads                    # c_q, c_k, c_v, q_gain
    total += DIM * (xbc + ssm_width * gate) + xbc * conv + DIM * ssm_heads + 3 * ssm_heads  # in_proj, conv, dt_proj, A_log/dt_bias/D
    total += (attn_width + ssm_width if merge == "concat" else attn_width) * DIM     # proj
    total += 2 * attn_width * (merge == "mean") + 2 * meta_tok * KV_WIDTH            # merge gains, meta K/V
    return total


@pytest.mark.parametrize("env", [dict(), dict(conv=0, gate=0), dict(state=4, groups=2, conv=2), dict(merge="mean"), dict(merge="mean", meta_tok=5)])
def test_parameter_count(monkeypatch, env):
    model, _, lines = hybrid_gpt(monkeypatch, layers="2", **{("ssm_" + k if k == "state" else k): v for k, v in env.items()})
    n = sum(p.numel() for p in model.blocks[2].attn.parameters())
    assert n == expected_params(**{k: bool(v) if k == "gate" else v for k, v in env.items()})
    assert f"params:{n}" in lines[0]


def test_concat_without_gate_and_conv_replaces_query_heads_by_ssm_heads(monkeypatch):
    """Concat moves SSM heads' query rows (ssm_heads * head_dim * dim) to the SSM's x rows: the layer
    grows only by its B, C and dt rows and three scalars per SSM head, minus the dropped q_gains."""
    host = sum(p.numel() for p in train_gpt.CausalSelfAttention(DIM, HEADS, KV_HEADS, 10000.0, 1.5).parameters())
    model, *_ = hybrid_gpt(monkeypatch, layers="0", conv=0, gate=0)
    hybrid = sum(p.numel() for p in model.blocks[0].attn.parameters())
    assert hybrid - host == DIM * (2 * 16 + 2) + 3 * 2 - 2


# ----------------------------------------------------------------------------- host integration

def test_swap_logs_and_defaults(monkeypatch):
    model, swapped, lines = hybrid_gpt(monkeypatch, layers="3, 1")
    assert swapped == [1, 3]
    assert [type(b.attn).__name__ for b in model.blocks] == ["CausalSelfAttention", "HymbaLayer", "CausalSelfAttention", "HymbaLayer"]
    assert lines[0].startswith("hymba:layer 1 attn_heads:2 kv_heads:2 ssm_heads:2 ssm_head_dim:8 state:16 groups:1 chunk:64 "
                               "conv:4 gate:1 meta_tok:0 kv:own merge:concat rope_dims:0 xsa:0 params:")
    assert len(lines) == 2 and lines[1].startswith("hymba:layer 3 ")


def test_control_patterns_cover_exactly_the_dynamics_tensors(monkeypatch):
    monkeypatch.setattr(train_gpt, "CONTROL_TENSOR_NAME_PATTERNS", train_gpt.CONTROL_TENSOR_NAME_PATTERNS)
    host_patterns = train_gpt.CONTROL_TENSOR_NAME_PATTERNS
    model, *_ = hybrid_gpt(monkeypatch, layers="1,2", merge="mean", meta_tok=2)
    added = [p for p in train_gpt.CONTROL_TENSOR_NAME_PATTERNS if p not in host_patterns]
    assert set(added) <= set(hymba_layer.CONTROL_PATTERNS)
    assert set(hymba_layer.CONTROL_PATTERNS) <= set(train_gpt.CONTROL_TENSOR_NAME_PATTERNS)
    hybrid_control = {n.split(".", 3)[3] for n, _ in model.named_parameters()
                      if n.startswith("blocks.1.attn.") and train_gpt.is_control(n)}
    assert hybrid_control == {"q_gain", "meta_kv", "merge_gain_attn", "merge_gain_ssm", "ssm.A_log", "ssm.dt_bias", "ssm.D", "ssm.conv_weight"}
    plain = train_gpt.GPT(VOCAB, LAYERS, DIM, HEADS, KV_HEADS, 2, True, 0.005, 30.0, 10000.0, 1.5)
    assert not any(p in n for n, _ in plain.named_parameters() for p in hymba_layer.CONTROL_PATTERNS)  # no host tensor matches by accident


def test_int8_export_keeps_dynamics_exact(monkeypatch):
    model, *_ = hybrid_gpt(monkeypatch, layers="1", merge="mean", meta_tok=2)
    state = model.state_dict()
    quant, _ = train_gpt.quantize_state_dict_int8(state)
    restored = train_gpt.dequantize_state_dict_int8(quant)
    for name in ("A_log", "dt_bias", "D", "conv_weight"):
        key = f"blocks.1.attn.ssm.{name}"
        assert restored[key].dtype == torch.float32 and torch.equal(restored[key], state[key])
    assert torch.equal(restored["blocks.1.attn.meta_kv"], state["blocks.1.attn.meta_kv"])
    model.load_state_dict(restored, strict=True)


def test_host_build_model_swaps_and_counts_the_file(monkeypatch):
    for k, v in dict(NUM_LAYERS=LAYERS, MODEL_DIM=DIM, NUM_HEADS=HEADS, NUM_KV_HEADS=KV_HEADS, VOCAB_SIZE=VOCAB, HYMBA_LAYERS=2).items():
        monkeypatch.setenv(k, str(v))
    args = train_gpt.Hyperparameters()
    model, code_files = train_gpt.build_model(args, torch.device("cpu"), log=lambda line: None)
    assert isinstance(model.blocks[2].attn, HymbaLayer) and hymba_layer.__file__ in code_files
    assert "ssm.A_log" in train_gpt.CONTROL_TENSOR_NAME_PATTERNS


def test_train_gpt_trains_and_exports_a_hybrid_model(dataset, tmp_path):
    """40 CPU steps of train_gpt.py with block 1 hybrid (mean merge, meta tokens): the log names the
    layer, the loss falls, the SSM dynamics ship as exact fp32, the int8 roundtrip barely moves val_bpb."""
    settings = tiny_config(dataset, "hybrid", HYMBA_LAYERS=1, HYMBA_MERGE="mean", HYMBA_META_TOK=2)
    stdout = run_train_gpt(tmp_path, settings)
    log = (tmp_path / "logs" / "hybrid.txt").read_text(encoding="utf-8")
    assert "hymba:layer 1 attn_heads:1 kv_heads:1 ssm_heads:1 ssm_head_dim:48 " in stdout
    assert log.count(open(hymba_layer.__file__, encoding="utf-8").read()) == 1  # the counted code includes this file
    losses = dict(grab(r"^step:(\d+)/40 train_loss:{n} ", log))
    assert losses[40] < losses[1] - 1.5  # measured: 6.23 -> 3.23
    container = torch.load(io.BytesIO(train_gpt.decompress((tmp_path / "final_model.int8.ptz").read_bytes(), "zlib")), map_location="cpu")
    final = torch.load(tmp_path / "final_model.pt", map_location="cpu")
    for name in ("ssm.A_log", "ssm.dt_bias", "ssm.D", "ssm.conv_weight", "merge_gain_ssm", "meta_kv"):
        key = f"blocks.1.attn.{name}"
        assert container["passthrough"][key].dtype == torch.float32 and torch.equal(container["passthrough"][key], final[key])
    [(pre_bpb,)] = grab(r"^step:40/40 val_loss:[\d.]+ val_bpb:{n} ", log)
    [(q_bpb,)] = grab(r"^final_int8_zlib_roundtrip_exact val_loss:[\d.]+ val_bpb:{n}$", log)
    assert abs(q_bpb - pre_bpb) < 0.02  # measured: 2.3993 -> 2.4019


# ----------------------------------------------------------------------------- env var checks

@pytest.mark.parametrize("env,message", [
    (dict(LAYERS="a"), "HYMBA_LAYERS='a' is invalid: expected distinct comma-separated block indices in 0..3"),
    (dict(LAYERS="4"), "HYMBA_LAYERS='4' is invalid: expected distinct comma-separated block indices in 0..3"),
    (dict(LAYERS="-1"), "HYMBA_LAYERS='-1' is invalid"),
    (dict(LAYERS="1,1"), "HYMBA_LAYERS='1,1' is invalid: expected distinct"),
    (dict(LAYERS="1,,2"), "HYMBA_LAYERS='1,,2' is invalid"),
    (dict(SSM_HEADS="2"), "HYMBA_SSM_HEADS set but HYMBA_LAYERS is empty"),
    (dict(LAYERS="1", SSM_HEADS="3"), "HYMBA_SSM_HEADS='3' is invalid: expected one of [2] (the heads left for attention, of 4, must be a positive multiple of the 2 KV heads)"),
    (dict(LAYERS="1", SSM_HEADS="4"), "HYMBA_SSM_HEADS='4' is invalid: expected one of [2]"),
    (dict(LAYERS="1", SSM_HEADS="0"), "HYMBA_SSM_HEADS='0' is invalid"),
    (dict(LAYERS="1", SSM_HEADS="two"), "HYMBA_SSM_HEADS='two' is invalid"),
    (dict(LAYERS="1", SSM_STATE="0"), "HYMBA_SSM_STATE='0' is invalid: expected a positive int"),
    (dict(LAYERS="1", SSM_STATE="1.5"), "HYMBA_SSM_STATE='1.5' is invalid: expected a positive int"),
    (dict(LAYERS="1", SCAN_CHUNK="-64"), "HYMBA_SCAN_CHUNK='-64' is invalid: expected a positive int"),
    (dict(LAYERS="1", GROUPS="3"), "HYMBA_GROUPS='3' is invalid: expected a divisor of the SSM heads (2)"),
    (dict(LAYERS="1", CONV="-1"), "HYMBA_CONV='-1' is invalid: expected a kernel size >= 0 (0 = off)"),
    (dict(LAYERS="1", GATE="2"), "HYMBA_GATE='2' is invalid: expected 0 or 1"),
    (dict(LAYERS="1", MERGE="sum"), "HYMBA_MERGE='sum' is invalid: expected concat or mean"),
    (dict(LAYERS="1", META_TOK="-2"), "HYMBA_META_TOK='-2' is invalid: expected an int >= 0"),
    (dict(LAYERS="1,3", KV_SHARE="1"), "HYMBA_KV_SHARE='1' is invalid: expected 0 or 1 (1 needs two adjacent indices in HYMBA_LAYERS, got 1,3)"),
    (dict(LAYERS="1", KV_SHARE="yes"), "HYMBA_KV_SHARE='yes' is invalid"),
    (dict(LAYERS="1", SSM_HEAD="2"), "unknown HYMBA_SSM_HEAD: the hybrid-layer env vars are HYMBA_LAYERS, HYMBA_SSM_HEADS,"),
])
def test_invalid_env_names_the_variable_and_what_is_valid(monkeypatch, env, message):
    with pytest.raises(ValueError) as e:
        hybrid_gpt(monkeypatch, **env)
    assert message in str(e.value)


def test_default_split_that_breaks_gqa_is_reported(monkeypatch):
    """With as many KV heads as heads no head can leave attention: the default is rejected by name."""
    monkeypatch.setenv("HYMBA_LAYERS", "0")
    with pytest.raises(ValueError, match=r"HYMBA_SSM_HEADS=unset \(default 0\) is invalid: expected one of \[\]"):
        HymbaConfig.from_env(HEADS, HEADS, HEAD_DIM, LAYERS)


def test_mean_merge_needs_attention_width_divisible_by_ssm_heads(monkeypatch):
    monkeypatch.setenv("HYMBA_LAYERS", "0")
    monkeypatch.setenv("HYMBA_SSM_HEADS", "6")
    monkeypatch.setenv("HYMBA_MERGE", "mean")
    with pytest.raises(ValueError, match=r"HYMBA_MERGE='mean' is invalid: .*attention width 8 divisible by the SSM heads 6"):
        HymbaConfig.from_env(8, 2, 4, LAYERS)


def test_build_before_register_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(hymba_layer, "CastedLinear", None)
    monkeypatch.setenv("HYMBA_LAYERS", "1")
    model = train_gpt.GPT(VOCAB, LAYERS, DIM, HEADS, KV_HEADS, 2, True, 0.005, 30.0, 10000.0, 1.5)
    with pytest.raises(RuntimeError, match="register_host_classes"):
        build_and_swap_hymba_layers(model)
