"""Muon (torch.optim.Muon) and the Muon/Adam parameter split (golf_conventions 3.3-3.4)."""
import math
import subprocess
import sys

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import train_gpt
from conftest import REPO

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the host's quintic Newton-Schulz (a, b, c)
CPU = torch.device("cpu")


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    return _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, steps, 1e-7).float()


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_five_newton_schulz_steps_put_singular_values_in_half_to_three_halves(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g)
    assert out.shape == shape
    s = torch.linalg.svdvals(out)
    assert 0.5 <= s.min().item() and s.max().item() <= 1.5
    assert torch.linalg.svdvals(newton_schulz(g, steps=1)).min().item() < 0.2  # one step is not enough
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert (out - u @ vh).norm() / (u @ vh).norm() < 0.3  # close to the orthogonal polar factor U V^T


def test_torch_muon_defaults_are_the_host_coefficients():
    from torch.optim import _muon
    assert (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C) == NS_COEFFICIENTS


def tiny_gpt(hparams, **settings):
    args = hparams(VOCAB_SIZE=64, NUM_LAYERS=3, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=2, **settings)
    torch.manual_seed(0)
    model, _ = train_gpt.build_model(args, CPU)
    return model, args


def names_by_optimizer(model, optimizers):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [sorted(name_of[id(p)] for g in opt.param_groups for p in g["params"]) for opt in optimizers]


MATRICES = sorted(f"blocks.{i}.{m}.weight" for i in range(3)
                  for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"))
SCALARS = sorted([f"blocks.{i}.{s}" for i in range(3) for s in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain")] + ["skip_weights"])


def test_tied_model_splits_parameters_embedding_muon_scalars(hparams):
    model, args = tiny_gpt(hparams)
    optimizers = train_gpt.build_optimizers(model, args, CPU)
    assert [type(o).__name__ for o in optimizers] == ["Adam", "Muon", "Adam"]
    groups = names_by_optimizer(model, optimizers)
    assert groups == [["tok_emb.weight"], MATRICES, SCALARS]  # resid_mix is 2-D but a control tensor: Adam
    assert sorted(sum(groups, [])) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    lrs = [(g["lr"], g["base_lr"]) for o in optimizers for g in o.param_groups]
    assert lrs == [(0.05, 0.05), (0.04, 0.04), (0.04, 0.04)]
    muon = optimizers[1].param_groups[0]
    assert (muon["momentum"], muon["nesterov"], muon["ns_steps"], muon["weight_decay"], muon["adjust_lr_fn"]) == (0.95, True, 5, 0.0, "original")
    assert tuple(muon["ns_coefficients"]) == NS_COEFFICIENTS
    for adam in (optimizers[0], optimizers[2]):
        assert (adam.param_groups[0]["betas"], adam.param_groups[0]["eps"], adam.param_groups[0]["weight_decay"]) == ((0.9, 0.95), 1e-8, 0)


def test_untied_model_gives_the_head_its_own_adam(hparams):
    model, args = tiny_gpt(hparams, TIE_EMBEDDINGS=0)
    optimizers = train_gpt.build_optimizers(model, args, CPU)
    assert names_by_optimizer(model, optimizers) == [["tok_emb.weight"], MATRICES, SCALARS, ["lm_head.weight"]]
    assert [o.param_groups[0]["lr"] for o in optimizers] == [0.6, 0.04, 0.04, 0.008]


def test_extra_control_pattern_moves_a_matrix_from_muon_to_adam(hparams, monkeypatch):
    monkeypatch.setattr(train_gpt, "CONTROL_TENSOR_NAME_PATTERNS", ("resid_mix", "attn_scale", "mlp_scale", "q_gain", "skip_weights", "c_v"))
    model, args = tiny_gpt(hparams)
    groups = names_by_optimizer(model, train_gpt.build_optimizers(model, args, CPU))
    c_v = [f"blocks.{i}.attn.c_v.weight" for i in range(3)]
    assert groups[1] == sorted(set(MATRICES) - set(c_v)) and groups[2] == sorted(SCALARS + c_v)


def synthetic_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}


def step_with(model, optimizers, grads):
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    for opt in optimizers:
        opt.step()


def test_first_step_moves_adam_params_by_their_lr_and_muon_params_by_orthogonalized_grad(hparams):
    model, args = tiny_gpt(hparams)
    optimizers = train_gpt.build_optimizers(model, args, CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = synthetic_grads(model, 1)
    step_with(model, optimizers, grads)
    for n, p in model.named_parameters():
        delta = p.detach() - before[n]
        if n in MATRICES:  # lr * sqrt(max(1, rows/cols)) * NS5(grad); NS is scale-free up to its bf16 rounding (~2%)
            step = 0.04 * math.sqrt(max(1, p.shape[0] / p.shape[1]))
            assert torch.allclose(delta, -step * newton_schulz(grads[n]), rtol=0, atol=0.03 * step), n
        else:  # Adam's bias-corrected first step is lr * g / (|g| + eps): ~lr against the gradient
            lr = 0.05 if n == "tok_emb.weight" else 0.04
            assert torch.allclose(delta, -lr * grads[n] / (grads[n].abs() + 1e-8), rtol=1e-5, atol=0), n


def test_second_muon_step_uses_nesterov_momentum(hparams):
    model, args = tiny_gpt(hparams)
    optimizers = train_gpt.build_optimizers(model, args, CPU)
    g1, g2 = synthetic_grads(model, 1), synthetic_grads(model, 2)
    step_with(model, optimizers, g1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step_with(model, optimizers, g2)
    m = 0.95
    for n, p in model.named_parameters():
        if n in MATRICES:  # buf = m*g1 + g2, update = g2 + m*buf (any overall scale is removed by NS)
            step = 0.04 * math.sqrt(max(1, p.shape[0] / p.shape[1]))
            delta = p.detach() - before[n]
            assert torch.allclose(delta, -step * newton_schulz(g2[n] + m * (m * g1[n] + g2[n])), rtol=0, atol=0.03 * step), n
            assert not torch.allclose(delta, -step * newton_schulz(g2[n]), rtol=0, atol=0.03 * step), n


def test_two_training_steps_change_every_parameter_and_lower_the_loss(hparams):
    model, args = tiny_gpt(hparams)
    optimizers = train_gpt.build_optimizers(model, args, CPU)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 64, (4, 32), generator=g), torch.randint(0, 64, (4, 32), generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        loss = model(x, y)
        losses.append(loss.item())
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unchanged == []  # zero-init projections move first; the rest once they carry gradient
    assert losses[0] == pytest.approx(math.log(64), abs=0.01)
    assert losses[2] < losses[0] - 0.1


def test_a_torch_without_muon_is_refused_at_start_in_one_line(tmp_path):
    """torch.optim.Muon arrived in torch 2.9: an older torch stops the run before anything is read or written, with one
    line naming the version found and what needs the newer one (exit 2), not a traceback at the first optimizer step."""
    code = (f"import runpy, torch; torch.__version__ = '2.8.0+cu128'; "
            f"runpy.run_path({str(REPO / 'train_gpt.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "train_gpt.py: error: torch 2.8.0+cu128 is too old: train_gpt.py needs torch >= 2.9 (torch.optim.Muon)"]
    assert not any(tmp_path.iterdir())  # no logs/ written


def newton_schulz_fp64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration X <- a X + (b A + c A^2) X, A = X X^T, on the wide orientation, in float64."""
    a, b, c = NS_COEFFICIENTS
    x = g.double().T if g.size(0) > g.size(1) else g.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if g.size(0) > g.size(1) else x).float()


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_cpu_newton_schulz_is_torchs_iteration_in_fp32(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = train_gpt.newton_schulz_fp32(g, NS_COEFFICIENTS, 5, 1e-7)
    assert out.dtype == torch.float32 and out.shape == shape
    assert (out - newton_schulz_fp64(g)).abs().max() < 1e-5  # fp32 rounding only
    assert (out - newton_schulz(g)).abs().max() < 0.03  # torch's bf16 iteration, within its rounding
    assert (newton_schulz(g) - newton_schulz_fp64(g)).abs().max() > 1e-3  # which the fp32 bound would catch


@pytest.mark.parametrize("bf16_units", [False, True])
def test_muon_on_a_cpu_orthogonalizes_in_fp32_only_without_bf16_units(hparams, monkeypatch, bf16_units):
    """build_optimizers on a CPU without bf16 matmul units (bf16 emulated, ~25x slower) makes torch.optim.Muon
    orthogonalize in fp32: the first step is lr * NS5(grad) to fp32 precision, far tighter than bf16's ~2%. With the
    units (avx512_bf16), torch's own bf16 iteration stays: there it is the faster one."""
    from torch.optim import _muon
    monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz", _zeropower_via_newtonschulz)  # restored after the test
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units)
    model, args = tiny_gpt(hparams)
    optimizers = train_gpt.build_optimizers(model, args, CPU)
    assert _muon._zeropower_via_newtonschulz is (_zeropower_via_newtonschulz if bf16_units else train_gpt.newton_schulz_fp32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = synthetic_grads(model, 1)
    step_with(model, optimizers, grads)
    for n, p in model.named_parameters():
        if n in MATRICES:
            step = 0.04 * math.sqrt(max(1, p.shape[0] / p.shape[1]))
            close = torch.allclose(p.detach() - before[n], -step * newton_schulz_fp64(grads[n]), rtol=0, atol=1e-5 * step)
            assert close != bf16_units, n
