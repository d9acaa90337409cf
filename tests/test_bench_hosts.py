"""bench/bench_hosts.py's record and pr1493_64 families: the settings put the hybrid layer where the question is
asked (head size 64, XSA on its block), and each bench-only variant does what it says in the record's own classes
(the patched CPU copy, imported as test_compile_hosts imports it):
  nodecay   the hybrid dynamics in a scalar-AdamW group of their own with weight_decay 0, the host's other
            scalars keeping ADAM_WD;
  xsa-attn  XSA leaves the SSM heads' output unchanged and still projects the attention heads'.
The variants run as the code bench_hosts.py inlines into the copy (variant_code), not as imported functions."""
import re

import pytest
import torch
import torch.nn.functional as F

import bench_hosts
import patch_host
from hosts import host_text
from test_compile_hosts import hparams, hybrid_record_gpt, load_host

DYNAMICS = ("dt_weight", "A_log", "dt_bias", "D", "conv_weight")
# 3 banked layers x 256 (4 heads of 64, 2 KV: block 0 gets 2 attention + 2 SSM heads), XSA on every block,
# SmearGate and the sparse head gate on as the record runs them
SHAPE = dict(vocab_size=1024, num_layers=3, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=2, rope_dims=16,
             train_seq_len=64, rope_train_seq_len=64, num_loops=1, loop_start=1, loop_end=1, parallel_start_layer=2,
             xsa_last_n=3, smear_gate_enabled=True, sparse_attn_gate_enabled=True)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return load_host("record", tmp_path_factory)


@pytest.fixture
def hybrid(record):
    """(h, the record's GPT with block 0 hybrid: module defaults, conv taps on)."""
    h = hparams(record, **SHAPE)
    return h, hybrid_record_gpt(record, h)


def apply_variant(record, name: str, monkeypatch) -> None:
    """The variant's inlined code run in the host's namespace, as in the bench's copy; the host's classes are put
    back after the test (monkeypatch restores the attributes the variant replaces)."""
    monkeypatch.setattr(record.Optimizers, "__init__", record.Optimizers.__init__)
    monkeypatch.setattr(record.CausalSelfAttention, "_xsa_efficient", record.CausalSelfAttention._xsa_efficient)
    monkeypatch.setattr(record, "HybridHeads", record.HybridHeads)
    exec(bench_hosts.variant_code([name]), dict(vars(record)))


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("family, host", [("record", "record"), ("pr1493_64", "pr1493")])
def test_the_head_size_64_families_run_the_hybrid_layer_with_xsa_on(family, host):
    s = bench_hosts.SETTINGS[family]
    assert s["MODEL_DIM"] // s["NUM_HEADS"] == 64 and s["NUM_HEADS"] // s["NUM_KV_HEADS"] == 2
    hybrid_block = int(bench_hosts.HYBRID["HYMBA_LAYERS"])
    assert s["NUM_LAYERS"] - s["XSA_LAST_N"] <= hybrid_block  # the host turns XSA on for its last XSA_LAST_N blocks
    assert s["ITERATIONS"] >= 200
    assert list(bench_hosts.RUNS[family]) == [host, f"{host}+hymba", f"{host}+hymba nodecay", f"{host}+hymba xsa-attn",
                                              f"{host}+control"]


# ----------------------------------------------------------------------------- nodecay

def scalar_groups(record, h, model):
    groups = record.Optimizers(h, model).optimizer_scalar.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], g["lr"], g.get("base_lr"), {names[id(p)] for p in g["params"]}) for g in groups]


def test_the_record_decays_the_dynamics_with_its_other_scalars(record, hybrid):
    """Without the variant (the module's default routing): one scalar group, ADAM_WD on the dynamics too."""
    h, model = hybrid
    [(wd, _, _, names)] = scalar_groups(record, h, model)
    assert wd == h.adam_wd == 0.02
    assert {f"blocks.0.attn.hymba.{n}" for n in DYNAMICS} <= names


def test_nodecay_moves_exactly_the_dynamics_to_a_group_without_decay(record, hybrid, monkeypatch):
    h, model = hybrid
    apply_variant(record, "nodecay", monkeypatch)
    (wd, lr, base_lr, host), (wd0, lr0, base_lr0, moved) = scalar_groups(record, h, model)
    assert moved == {f"blocks.0.attn.hymba.{n}" for n in DYNAMICS}
    assert wd0 == 0.0 and (lr0, base_lr0) == (lr, base_lr) == (h.scalar_lr, h.scalar_lr)
    assert wd == h.adam_wd and not any(".hymba." in n for n in host)
    assert {"blocks.0.attn.q_gain", "blocks.0.attn.attn_gate_w", "blocks.1.attn_scale", "smear_lambda"} <= host


def test_nodecay_leaves_the_dynamics_where_only_decay_would_move_them(record, hybrid, monkeypatch):
    """One scalar-AdamW step on zero gradients: Adam's own update is 0, so only decay moves a parameter: the host's
    scalars shrink by lr * ADAM_WD, the dynamics stay put."""
    h, model = hybrid
    apply_variant(record, "nodecay", monkeypatch)
    opt = record.Optimizers(h, model).optimizer_scalar
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for n in DYNAMICS:
        name = f"blocks.0.attn.hymba.{n}"
        assert torch.equal(params[name], before[name]), name
    shrunk = before["blocks.0.attn.q_gain"] * (1 - h.scalar_lr * h.adam_wd)
    torch.testing.assert_close(params["blocks.0.attn.q_gain"].detach(), shrunk)


# ----------------------------------------------------------------------------- xsa-attn

def head_outputs(attn, x, weights, xsa: bool) -> torch.Tensor:
    """The attention module's per-head output before its output projection, (batch, T, heads, head_dim), with XSA on
    or off (the record keeps it in _last_proj_input while calibrating)."""
    attn.use_xsa, attn._calib = xsa, True
    try:
        with torch.no_grad():
            attn(x, *weights)
        return attn._last_proj_input.view(*x.shape[:2], attn.num_heads, attn.head_dim)
    finally:
        attn.use_xsa, attn._calib = True, False


def attention_inputs(model, block: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, SHAPE["model_dim"], generator=gen)
    q_w, k_w, v_w, out_w = (0.1 * torch.randn(w.shape, generator=gen) for w in model._bank_weights(block)[:4])
    return x, (q_w, k_w, v_w, out_w)


def test_xsa_attn_spares_the_ssm_heads_and_still_projects_the_attention_heads(record, hybrid, monkeypatch):
    _, model = hybrid
    attn = model.blocks[0].attn
    assert attn.use_xsa and attn.hymba.heads == 2  # heads 0-1 attention (KV head 0), heads 2-3 SSM (KV head 1)
    x, weights = attention_inputs(model, 0)
    off, host_on = head_outputs(attn, x, weights, False), head_outputs(attn, x, weights, True)
    assert not torch.allclose(host_on[:, :, 2:], off[:, :, 2:], atol=1e-3)  # the host's XSA reaches the SSM heads
    apply_variant(record, "xsa-attn", monkeypatch)
    on = head_outputs(attn, x, weights, True)
    torch.testing.assert_close(on[:, :, 2:], off[:, :, 2:], rtol=0, atol=0)  # SSM heads: untouched
    assert not torch.allclose(on[:, :, :2], off[:, :, :2], atol=1e-3)  # attention heads: projected ...
    torch.testing.assert_close(on[:, :, :2], host_on[:, :, :2], rtol=1e-6, atol=1e-6)  # ... exactly as the host does
    v = F.linear(x, weights[2]).view(2, 40, 2, 64)[:, :, 0]  # KV head 0's values, the attention heads' own
    along_v = (on[:, :, :2] * F.normalize(v, dim=-1)[:, :, None]).sum(-1)
    assert along_v.abs().max() < 1e-5 * on.abs().max()  # nothing left along v: XSA's projection


def test_xsa_attn_leaves_plain_attention_modules_as_the_host_has_them(record, hybrid, monkeypatch):
    _, model = hybrid
    attn = model.blocks[1].attn
    assert attn.use_xsa and getattr(attn, "hymba", None) is None
    x, weights = attention_inputs(model, 1)
    host_on = head_outputs(attn, x, weights, True)
    apply_variant(record, "xsa-attn", monkeypatch)
    torch.testing.assert_close(head_outputs(attn, x, weights, True), host_on, rtol=0, atol=0)


# ----------------------------------------------------------------------------- control

def test_control_keeps_softmax_heads_with_taps_in_the_record_and_no_dynamics(record, monkeypatch):
    """Built after the variant runs, the record's hybrid block holds the control: its only `.hymba.` parameter is the
    taps; with identity taps every head's output is the host's own attention's, exactly; moved taps change the
    last two heads (the SSM heads' place) and nothing else."""
    apply_variant(record, "control", monkeypatch)
    h = hparams(record, **SHAPE)
    model = hybrid_record_gpt(record, h)
    attn = model.blocks[0].attn
    assert type(attn.hymba).__name__ == "ControlHeads"
    assert [n for n, _ in model.named_parameters() if ".hymba." in n] == ["blocks.0.attn.hymba.conv_weight"]
    x, weights = attention_inputs(model, 0)
    control = head_outputs(attn, x, weights, False)
    heads = attn.hymba
    del attn.hymba  # the host's own kernel on every head
    host = head_outputs(attn, x, weights, False)
    attn.hymba = heads
    torch.testing.assert_close(control, host, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        heads.conv_weight[:, 1] = 0.5
    moved = head_outputs(attn, x, weights, False)
    torch.testing.assert_close(moved[:, :, :2], host[:, :, :2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(moved[:, :, 2:], host[:, :, 2:], atol=1e-3)


# ----------------------------------------------------------------------------- inlining

def test_variants_are_inlined_once_before_the_main_guard_of_each_host(tmp_path):
    record = bench_hosts.with_variants(host_text("record"), ["nodecay", "xsa-attn", "control"])
    guard = record.index('\nif __name__ == "__main__":')
    assert record.index("dynamics_without_decay(Optimizers)\n") < record.index(
        "xsa_on_attention_heads_only(CausalSelfAttention)\n") < record.index("class ControlHeads(") < record.index(
        "heads_as_softmax_control(HybridHeads)\n") < guard
    script = bench_hosts.script_for("pr1493", True, tmp_path, ["xsa-attn"])  # self-extracting: inlined inside
    source, _ = patch_host.unwrap(script.read_text(encoding="utf-8"))
    assert len(re.findall(r"^xsa_on_attention_heads_only\(CausalSelfAttention\)$", source, re.M)) == 1
    assert source.index("xsa_on_attention_heads_only(CausalSelfAttention)") < source.index("if __name__=='__main__'")
    compile(source, "train_gpt.py", "exec")


def test_a_host_without_one_main_guard_is_refused():
    with pytest.raises(ValueError, match="found 0"):
        bench_hosts.with_variants("x = 1\n", ["nodecay"])
    with pytest.raises(ValueError, match="found 2"):
        bench_hosts.with_variants('if __name__ == "__main__":\n    pass\nif __name__ == "__main__":\n    pass\n', ["nodecay"])


def test_set_overrides_a_setting_and_refuses_what_is_not_key_value():
    args = bench_hosts.parse_args(["--family", "record", "--out", "x", "--set", "ITERATIONS=800", "--set", "ADAM_WD=0"])
    assert args.overrides == {"ITERATIONS": "800", "ADAM_WD": "0"}
    for bad in ("ITERATIONS", "iterations=800", "ITERATIONS="):
        with pytest.raises(SystemExit):
            bench_hosts.parse_args(["--family", "record", "--out", "x", "--set", bad])
