"""The chunked SSD scan against the step-by-step recurrence: exactness in fp64, gradients, fp32 accuracy,
state carrying, tracing under torch.compile(fullgraph=True), and the GPU's precisions (bf16 autocast, TF32)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_inductor
from hymba_layer import ssd_scan, ssd_scan_reference


def inputs(b=2, T=100, H=4, P=8, G=2, N=5, log_a_low=-3.0, log_a_high=0.0, dtype=torch.float64, seed=0, state=False):
    """x, log_a (uniform in [log_a_low, log_a_high]), B, C and optionally an initial state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    log_a = log_a_low + (log_a_high - log_a_low) * torch.rand(b, T, H, generator=g, dtype=dtype)
    B, C = torch.randn(b, T, G, N, generator=g, dtype=dtype), torch.randn(b, T, H, N, generator=g, dtype=dtype)
    s0 = torch.randn(b, H, P, N, generator=g, dtype=dtype) if state else None
    return x, log_a, B, C, s0


def max_rel_error(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("chunk", [1, 2, 16, 64, 128])
@pytest.mark.parametrize("T", [1, 63, 100, 200, 1100])
def test_matches_reference_fp64_for_any_length_and_chunk(T, chunk):
    x, log_a, B, C, _ = inputs(T=T)
    y, s = ssd_scan(x, log_a, B, C, chunk)
    y_ref, s_ref = ssd_scan_reference(x, log_a, B, C)
    assert y.shape == x.shape and s.shape == (2, 4, 8, 5)
    assert y.dtype == s.dtype == torch.float64
    assert max_rel_error(y, y_ref) < 1e-12
    assert max_rel_error(s, s_ref) < 1e-12


@pytest.mark.parametrize("low,high", [(-20.0, -5.0), (-20.0, 0.0), (-1e-4, 0.0), (0.0, 0.0)], ids=["strong", "mixed", "near_zero", "none"])
def test_matches_reference_fp64_across_decay_strengths(low, high):
    """log_a down to -20 per step (the state is forgotten at once) and up to 0 (kept forever)."""
    x, log_a, B, C, s0 = inputs(T=150, log_a_low=low, log_a_high=high, state=True)
    y, s = ssd_scan(x, log_a, B, C, 64, initial_state=s0)
    y_ref, s_ref = ssd_scan_reference(x, log_a, B, C, initial_state=s0)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert max_rel_error(y, y_ref) < 1e-12
    assert max_rel_error(s, s_ref) < 1e-12


@pytest.mark.parametrize("G", [1, 2, 4])
def test_groups_share_B(G):
    """Head h reads B of group h // (H/G): equal to giving every head its own copy of its group's B."""
    x, log_a, B, C, s0 = inputs(T=80, H=4, G=G, state=True)
    y, s = ssd_scan(x, log_a, B, C, 32, initial_state=s0)
    y_heads, s_heads = ssd_scan(x, log_a, B.repeat_interleave(4 // G, 2), C, 32, initial_state=s0)
    y_ref, _ = ssd_scan_reference(x, log_a, B, C, initial_state=s0)
    assert max_rel_error(y, y_heads) < 1e-12 and max_rel_error(s, s_heads) < 1e-12
    assert max_rel_error(y, y_ref) < 1e-12


def test_initial_state_decays_into_the_output():
    """With zero input the output is exactly exp(sum of log_a up to t) * S0 C_t."""
    x, log_a, B, C, s0 = inputs(T=70, state=True)
    y, s = ssd_scan(torch.zeros_like(x), log_a, B, C, 16, initial_state=s0)
    decay = log_a.cumsum(1).exp()  # (b, T, H)
    expected = decay[..., None] * torch.einsum("bhpn,bthn->bthp", s0, C)
    assert max_rel_error(y, expected) < 1e-12
    assert max_rel_error(s, decay[:, -1, :, None, None] * s0) < 1e-12


def test_gradcheck_all_inputs():
    x, log_a, B, C, s0 = inputs(b=1, T=7, H=2, P=2, G=1, N=3, log_a_low=-2.0, state=True)
    args = [t.requires_grad_() for t in (x, log_a, B, C, s0)]
    assert torch.autograd.gradcheck(lambda x, a, B, C, s0: ssd_scan(x, a, B, C, 4, initial_state=s0), args)


def test_gradients_finite_under_strong_decay():
    """The -inf above the segment-sum diagonal must not leak nan into the backward pass."""
    x, log_a, B, C, s0 = inputs(T=64, log_a_low=-20.0, dtype=torch.float32, state=True)
    args = [t.requires_grad_() for t in (x, log_a, B, C, s0)]
    y, s = ssd_scan(*args[:4], 16, initial_state=args[4])
    (y.square().sum() + s.square().sum()).backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in args)


def test_float32_long_sequence_accuracy():
    """fp32 at T=1024, chunk 64: max |y - y_ref| / max |y_ref| < 1e-4, the reference in fp64. The
    decays mix fast-forgetting heads (log_a near -5) with slow ones (near 0)."""
    x, log_a, B, C, s0 = inputs(b=1, T=1024, H=4, P=16, G=2, N=16, log_a_low=-5.0, dtype=torch.float64, state=True)
    log_a[..., :2] *= 1e-3  # two heads keep their state for hundreds of steps
    y_ref, s_ref = ssd_scan_reference(x, log_a, B, C, initial_state=s0)
    y, s = ssd_scan(*(t.float() for t in (x, log_a, B, C)), 64, initial_state=s0.float())
    assert y.dtype == torch.float32
    assert max_rel_error(y, y_ref) < 1e-4
    assert max_rel_error(s, s_ref) < 1e-4


def test_carrying_the_final_state_splits_a_sequence():
    x, log_a, B, C, s0 = inputs(T=150, state=True)
    y, s = ssd_scan(x, log_a, B, C, 32, initial_state=s0)
    y1, s1 = ssd_scan(x[:, :70], log_a[:, :70], B[:, :70], C[:, :70], 32, initial_state=s0)
    y2, s2 = ssd_scan(x[:, 70:], log_a[:, 70:], B[:, 70:], C[:, 70:], 32, initial_state=s1)
    assert max_rel_error(torch.cat([y1, y2], 1), y) < 1e-12
    assert max_rel_error(s2, s) < 1e-12


def test_compiles_fullgraph_and_matches_eager():
    x, log_a, B, C, s0 = inputs(T=100, dtype=torch.float32, state=True)
    compiled = torch.compile(ssd_scan, fullgraph=True, backend="aot_eager")
    y, s = compiled(x, log_a, B, C, 32, initial_state=s0)
    y_eager, s_eager = ssd_scan(x, log_a, B, C, 32, initial_state=s0)
    assert max_rel_error(y, y_eager) < 1e-6 and max_rel_error(s, s_eager) < 1e-6
    y_none, _ = compiled(x, log_a, B, C, 32)  # no initial state: zeros
    assert max_rel_error(y_none, ssd_scan_reference(x, log_a, B, C)[0]) < 1e-4


def test_bfloat16_inputs_keep_dtype_and_stay_close():
    """Matmuls in bf16, decays in fp32: y comes back bf16, within bf16 rounding of the reference."""
    x, log_a, B, C, _ = inputs(T=256, log_a_low=-1.0)
    y, s = ssd_scan(x.bfloat16(), log_a.float(), B.bfloat16(), C.bfloat16(), 64)
    y_ref, _ = ssd_scan_reference(x, log_a, B, C)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert max_rel_error(y, y_ref) < 0.02


def test_bf16_autocast_error_is_within_a_few_times_attentions():
    """Under bf16 autocast (x, B, C bf16) the scan's max relative error against the fp64 recurrence stays
    within 4x what bf16 SDPA makes against fp64 at the same shape (2 x 256 tokens, 4 heads of 16; log_a in
    [-3, 0]). Measured 1.65x here (1.25x to 2.1x over 5 seeds); log-decays summed in bf16 give 6x to 78x."""
    x, log_a, B, C, _ = inputs(b=2, T=256, H=4, P=16, G=2, N=16, log_a_low=-3.0)
    with torch.autocast("cpu", torch.bfloat16):
        y, _ = ssd_scan(x.bfloat16(), log_a.float(), B.bfloat16(), C.bfloat16(), 64)
    scan_error = max_rel_error(y, ssd_scan_reference(x, log_a, B, C)[0])
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 256, 16, generator=g, dtype=torch.float64) for _ in range(3))
    with torch.autocast("cpu", torch.bfloat16):
        attn = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    attn_error = max_rel_error(attn, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert y.dtype == torch.bfloat16 and 1e-3 < attn_error < 2e-2
    assert scan_error < 4 * attn_error


def test_minus_infinity_restarts_the_state():
    """log_a = -inf at a step forgets everything before it: equal to the reference, and to scanning each
    segment alone from a zero state; gradients stay finite."""
    x, log_a, B, C, _ = inputs(b=1, T=300, state=False)
    starts = [0, 1, 2, 64, 65, 130, 191, 192, 299]  # chunk edges, adjacent starts, the last step
    log_a[:, starts] = -torch.inf
    y, s = ssd_scan(x, log_a, B, C, 64)
    y_ref, s_ref = ssd_scan_reference(x, log_a, B, C)
    assert max_rel_error(y, y_ref) < 1e-12 and max_rel_error(s, s_ref) < 1e-12
    for lo, hi in zip(starts, starts[1:] + [300]):
        y_alone, _ = ssd_scan(x[:, lo:hi], log_a[:, lo:hi], B[:, lo:hi], C[:, lo:hi], 64)
        assert max_rel_error(y[:, lo:hi], y_alone) < 1e-12
    args = [t.float().requires_grad_() for t in (x, log_a.clamp(min=-50), B, C)]
    y, s = ssd_scan(args[0], args[1].masked_fill(torch.isinf(log_a), -torch.inf), args[2], args[3], 64)
    (y.square().sum() + s.square().sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in args)


def test_exact_at_the_record_hosts_row_length():
    """98,304 tokens (1,536 chunks of 64, the record stack's packed row) in fp32 against the fp64 recurrence:
    max relative error < 1e-5, slow heads (log_a ~ -1e-4: the state spans the whole row) and fast ones,
    with document restarts. A scan that hands states over by differences of running sums fails this."""
    T = 98_304
    x, log_a, B, C, s0 = inputs(b=1, T=T, H=2, P=4, G=1, N=4, log_a_low=-2.0, log_a_high=-1.0, state=True)
    log_a[..., 0] *= 1e-4
    log_a[:, [5_000, 50_001, 98_000], 1] = -torch.inf
    y_ref, s_ref = ssd_scan_reference(x, log_a, B, C, initial_state=s0)
    y, s = ssd_scan(*(t.float() for t in (x, log_a, B, C)), 64, initial_state=s0.float())
    assert max_rel_error(y, y_ref) < 1e-5 and max_rel_error(s, s_ref) < 1e-5


@needs_inductor
def test_compiles_with_inductor_and_matches_eager():
    """The real backend (C++ codegen on CPU), with a state restart: same output as eager."""
    x, log_a, B, C, s0 = inputs(T=200, dtype=torch.float32, state=True)
    log_a[:, 70] = -torch.inf
    compiled = torch.compile(ssd_scan, fullgraph=True, backend="inductor")
    y, s = compiled(x, log_a, B, C, 32, initial_state=s0)
    y_eager, s_eager = ssd_scan(x, log_a, B, C, 32, initial_state=s0)
    assert max_rel_error(y, y_eager) < 1e-5 and max_rel_error(s, s_eager) < 1e-5


def to_tf32(t):
    """Round fp32 to TF32 (10 mantissa bits, to nearest): what a TF32 matmul does to its inputs."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_state_hand_over_adds_little_to_bf16_error(monkeypatch):
    """Under bf16 autocast only the hand-over of states between chunks (step 3, autocast off) runs in fp32,
    which a CUDA host with TF32 allowed rounds to TF32. Emulated: every einsum that runs with autocast off
    gets TF32-rounded inputs. The scan's max relative error against fp64 (T=1024, slow and fast heads, an
    initial state) grows by less than 10% over exact fp32 hand-over."""
    x, log_a, B, C, s0 = inputs(b=1, T=1024, H=4, P=16, G=2, N=16, log_a_low=-5.0, state=True)
    log_a[..., :2] *= 1e-3  # two heads keep their state for hundreds of steps
    y_ref, _ = ssd_scan_reference(x, log_a, B, C, initial_state=s0)
    args = [t.float() for t in (x, log_a, B, C)]

    def error():
        with torch.autocast("cpu", torch.bfloat16):
            y, _ = ssd_scan(*args, 64, initial_state=s0.float())
        return max_rel_error(y, y_ref), y

    exact_error, y_exact = error()
    einsum, rounded = torch.einsum, []

    def tf32_einsum(equation, *operands):
        if not torch.is_autocast_enabled("cpu"):
            rounded.append(equation)
            operands = [to_tf32(t) for t in operands]
        return einsum(equation, *operands)

    monkeypatch.setattr(torch, "einsum", tf32_einsum)
    tf32_error, y = error()
    assert rounded and not torch.equal(y, y_exact)  # the rounding took effect
    assert tf32_error < 1.1 * exact_error
