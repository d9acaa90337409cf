"""bench/attribution_heads.py: the attribution table's control and Hymba-parallel head forms are what they claim."""
import pytest
import torch
import torch.nn.functional as F

import attribution_heads
import hymba_layer
import train_gpt

CPU = torch.device("cpu")


def build(hparams, monkeypatch, heads_class=None, **hymba):
    """train_gpt's model, 3 blocks x 256 (4 heads of 64, 2 KV heads), seed 0, with `heads_class` as the hybrid heads
    where HYMBA_* settings are given."""
    args = hparams(VOCAB_SIZE=64, NUM_LAYERS=3, MODEL_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, **hymba)
    if heads_class is not None:
        monkeypatch.setattr(hymba_layer, "HybridHeads", heads_class)
    # the swap appends the dynamics' names to the host's routing list: restored after the test
    monkeypatch.setattr(train_gpt, "CONTROL_TENSOR_NAME_PATTERNS", train_gpt.CONTROL_TENSOR_NAME_PATTERNS)
    torch.manual_seed(0)
    model, _ = train_gpt.build_model(args, CPU, log=lambda line: None)
    return model


def tokens(seed=1, batch=2, t=48):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, t), generator=g), torch.randint(0, 64, (batch, t), generator=g)


def train_a_little(model):
    """A few Adam steps on every parameter so that zero-init projections and identity taps move."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for seed in range(3):
        model(*tokens(seed)).backward()
        opt.step()
        opt.zero_grad()


def test_control_at_init_is_the_plain_model_and_its_taps_then_change_it(hparams, monkeypatch):
    """Identity taps on softmax heads' values change nothing: the control starts as the plain model exactly (same
    seed, same weights), so any difference the table shows is what the taps learn."""
    plain = build(hparams, monkeypatch)
    control = build(hparams, monkeypatch, attribution_heads.ControlHeads, HYMBA_LAYERS="1")
    assert [n for n, _ in control.named_parameters() if ".hymba." in n] == ["blocks.1.attn.hymba.conv_weight"]
    train_a_little(plain)  # the zero-init output projections move, so attention's output reaches the loss
    control.load_state_dict(plain.state_dict(), strict=False)
    x, y = tokens()
    assert torch.allclose(control(x, y), plain(x, y), atol=1e-6, rtol=0)
    with torch.no_grad():
        control.blocks[1].attn.hymba.conv_weight[:, 1] = 0.5  # half of the previous token's value
    assert not torch.allclose(control(x, y), plain(x, y), atol=1e-4, rtol=0)  # 100x the tolerance above


def test_parallel_heads_mix_normalised_attention_and_ssm_by_per_head_weights(hparams):
    cfg = hymba_layer.HymbaConfig(ssm_heads=2, layers=(0,), conv=2)
    torch.manual_seed(0)
    par = attribution_heads.ParallelHeads(2, 1, 64, cfg)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 40, n, 64, generator=g) for n in (2, 1, 1))
    with torch.no_grad():
        par.conv_weight[:, 1] = 0.3
    ssm = hymba_layer.HybridHeads.forward(par, q, k, v, None)
    v_taps = hymba_layer.causal_conv(v.flatten(2), par.conv_weight, None).view_as(v)
    attn = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v_taps.expand(-1, -1, 2, -1))),
                                          is_causal=True).transpose(1, 2)
    with torch.no_grad():
        par.beta_attn.copy_(torch.tensor([1.0, 0.0]))
        par.beta_ssm.copy_(torch.tensor([0.5, 2.0]))
    out = par(q, k, v, None)
    assert torch.allclose(out[:, :, 0], (F.rms_norm(attn[:, :, 0], (64,)) + 0.5 * ssm[:, :, 0]) / 2, atol=1e-5)
    assert torch.allclose(out[:, :, 1], ssm[:, :, 1], atol=1e-5)  # beta_attn 0, beta_ssm 2: the SSM alone


def test_control_on_packed_documents_is_each_document_alone():
    """Packed documents (starts marks each one's first token, as the record's varlen batches arrive): every token
    sees only its own document through the softmax and the taps, so the packed output is each document run alone."""
    cfg = hymba_layer.HymbaConfig(ssm_heads=2, layers=(0,), conv=4)
    control = attribution_heads.ControlHeads(2, 1, 64, cfg)
    with torch.no_grad():
        control.conv_weight[:, 1:] = 0.3  # taps that reach back 3 tokens, across a boundary if not restarted
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 30, n, 64, generator=g) for n in (2, 1, 1))
    bounds = [0, 7, 8, 19, 30]  # a one-token document among them
    starts = torch.zeros(1, 30, dtype=torch.bool)
    starts[0, bounds[:-1]] = True
    packed = control(q, k, v, starts)
    alone = torch.cat([control(q[:, a:b], k[:, a:b], v[:, a:b], None) for a, b in zip(bounds, bounds[1:])], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(control(q, k, v, None)[:, 8:], alone[:, 8:], atol=1e-3)  # unpacked: documents mix


def test_the_variants_refuse_what_they_cannot_do():
    cfg = hymba_layer.HymbaConfig(ssm_heads=2, layers=(0,))
    q, k, v = torch.zeros(1, 8, 2, 64), torch.zeros(1, 8, 1, 64), torch.zeros(1, 8, 1, 64)
    with pytest.raises(ValueError, match="no EVAL_CARRY_STATE"):
        attribution_heads.ControlHeads(2, 1, 64, cfg)(q, k, v, None, carry={})
    parallel = attribution_heads.ParallelHeads(2, 1, 64, cfg)
    with pytest.raises(ValueError, match="dense rows without EVAL_CARRY_STATE only"):
        parallel(q, k, v, torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dense rows without EVAL_CARRY_STATE only"):
        parallel(q, k, v, None, carry={})
