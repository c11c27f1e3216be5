"""TRANSFORMER / S4D MODULES and OPTIMIZERS: causality, kernel orientation, XSA, initialisation, parameter routing,
schedules."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import randomize_, tiny_args

VOCAB, T = 128, 32
ROOT = Path(__file__).resolve().parent.parent


def direct_causal_conv(u: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_lag taps[:, lag] * u[t - lag], the definition, as a double loop."""
    B, T_, C = u.shape
    y = torch.zeros_like(u)
    for t in range(T_):
        for lag in range(taps.size(1)):
            if t - lag >= 0:
                y[:, t] += taps[:, lag] * u[:, t - lag]
    return y


def channel_major(u: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [C, B, T], the layout the convolutions take and return."""
    return u.permute(2, 0, 1)


def channel_last(y: torch.Tensor) -> torch.Tensor:
    return y.permute(1, 2, 0)


def make_ids(seed: int = 0, batch: int = 2, bos_positions=(0, 16)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, T), generator=gen)
    for p in bos_positions:
        ids[:, p] = 1
    return ids


def changed(ids: torch.Tensor, t: int) -> torch.Tensor:
    out = ids.clone()
    out[:, t] = (out[:, t] - 4 + 37) % (VOCAB - 4) + 4  # a different ordinary token, never BOS
    assert not torch.equal(out[:, t], ids[:, t]) and (out[:, t] != 1).all()
    return out


# ---------------------------------------------------------------- causality of the whole model


@pytest.mark.parametrize("kernel", ["fir", "s4d"])
@pytest.mark.parametrize("mode", ["replace", "parallel"])
def test_gpt_is_causal(kernel, mode):
    args = tiny_args(SSM_KERNEL=kernel, SSM_MODE=mode)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(args)).eval()
    ids = make_ids(seed=1)
    targets = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h0, l0 = model.hidden(ids), model.token_losses(ids, targets)
        for t in (1, 5, 8, 9, 15, 17, 24, 31):
            ids2 = changed(ids, t)
            h1, l1 = model.hidden(ids2), model.token_losses(ids2, targets)
            torch.testing.assert_close(h1[:, :t], h0[:, :t], atol=2e-5, rtol=0)
            torch.testing.assert_close(l1[:, :t], l0[:, :t], atol=2e-5, rtol=0)
            assert (h1[:, t] - h0[:, t]).abs().max() > 1e-3  # the change is seen from position t on
            if t < T - 1:
                assert (l1[:, t:] - l0[:, t:]).abs().max() > 1e-4


@pytest.mark.parametrize("kernel", ["fir", "s4d"])
def test_s4d_mixer_matters_and_is_causal_on_its_own(kernel):
    """The S4D layers carry signal in the randomised model (so the causality test above exercises them), and the
    mixer alone is causal."""
    args = tiny_args(SSM_KERNEL=kernel)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(args)).eval()
    ids = make_ids(seed=3)
    with torch.no_grad():
        h = model.hidden(ids)
        saved = model.blocks[0].ssm.out_proj.weight.clone()
        model.blocks[0].ssm.out_proj.weight.zero_()
        assert (model.hidden(ids) - h).abs().max() > 1e-3
        model.blocks[0].ssm.out_proj.weight.copy_(saved)

        mixer = model.blocks[0].ssm
        x = torch.randn(2, T, args.model_dim)
        y0 = mixer(x)
        for t in (0, 3, 8, 20):
            x2 = x.clone()
            x2[:, t] += torch.randn(args.model_dim)
            y1 = mixer(x2)
            torch.testing.assert_close(y1[:, :t], y0[:, :t], atol=1e-5, rtol=0)
            assert (y1[:, t] - y0[:, t]).abs().max() > 1e-4


def test_block0_input_does_not_see_previous_document():
    """SmearGate is the only token mixing before the first block: at and after a BOS, the input of
    block 0 must not depend on the previous document's tokens (attention in later layers may, legitimately)."""
    args = tiny_args()
    torch.manual_seed(0)
    model = randomize_(tg.GPT(args)).eval()
    captured = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach().clone()))
    try:
        ids = make_ids(seed=4, bos_positions=(0, 16))
        with torch.no_grad():
            model.hidden(ids)
            base = captured.pop()
            for t in (1, 10, 15):  # tokens of the first document, including the one right before BOS
                model.hidden(changed(ids, t))
                x = captured.pop()
                torch.testing.assert_close(x[:, 16:], base[:, 16:], atol=0, rtol=0)
                # ... while inside a document the next position does see the previous token
                if t + 1 < 16:
                    assert (x[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4
    finally:
        hook.remove()


def test_smear_gate_is_identity_at_bos_and_first_position():
    torch.manual_seed(0)
    smear = tg.SmearGate(8, bos_id=1)
    with torch.no_grad():
        smear.gate.copy_(torch.randn(8))
    x = torch.randn(2, 10, 8)
    ids = torch.randint(4, 50, (2, 10))
    ids[0, 4] = ids[1, 7] = ids[1, 8] = 1
    out = smear(x, ids)
    g = torch.sigmoid(smear.gate)
    for b in range(2):
        for t in range(10):
            if t == 0 or ids[b, t] == 1:
                torch.testing.assert_close(out[b, t], x[b, t], atol=0, rtol=0)
            else:
                torch.testing.assert_close(out[b, t], x[b, t] + g * (x[b, t - 1] - x[b, t]))


def test_forward_is_mean_of_token_losses():
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tiny_args()))
    ids, targets = make_ids(seed=5), torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, targets), model.token_losses(ids, targets).mean())


# ---------------------------------------------------------------- kernel orientation


@pytest.mark.parametrize("T_,K", [(13, 5), (5, 8), (16, 4), (1, 3), (7, 7), (24, 8)])
def test_fir_causal_conv_matches_direct_definition(T_, K):
    gen = torch.Generator().manual_seed(T_ * 100 + K)
    u = torch.randn(2, T_, 3, generator=gen, dtype=torch.float64)
    taps = torch.randn(3, K, generator=gen, dtype=torch.float64)
    y = channel_last(tg.fir_causal_conv(channel_major(u), taps))
    torch.testing.assert_close(y, direct_causal_conv(u, taps), atol=1e-12, rtol=0)


def test_fir_delta_taps_identity_and_shift():
    u = torch.randn(2, 11, 3, dtype=torch.float64)
    K = 4
    ident = torch.zeros(3, K, dtype=torch.float64)
    ident[:, 0] = 1
    torch.testing.assert_close(channel_last(tg.fir_causal_conv(channel_major(u), ident)), u, atol=0, rtol=0)
    for d in range(1, K):
        taps = torch.zeros(3, K, dtype=torch.float64)
        taps[:, d] = 1
        y = channel_last(tg.fir_causal_conv(channel_major(u), taps))
        assert (y[:, :d] == 0).all()
        torch.testing.assert_close(y[:, d:], u[:, :-d], atol=0, rtol=0)


@pytest.mark.parametrize("T_,L", [(13, 13), (9, 20), (16, 16)])
def test_fft_causal_conv_matches_direct_definition(T_, L):
    gen = torch.Generator().manual_seed(T_ + L)
    u = torch.randn(2, T_, 3, generator=gen)
    kernel = torch.randn(3, L, generator=gen)
    ref = direct_causal_conv(u.double(), kernel.double()).float()
    torch.testing.assert_close(channel_last(tg.fft_causal_conv(channel_major(u), kernel)), ref, atol=1e-5, rtol=1e-5)
    delta = torch.zeros(3, L)
    delta[:, 2] = 1
    y = channel_last(tg.fft_causal_conv(channel_major(u), delta))
    assert y[:, :2].abs().max() < 1e-5
    torch.testing.assert_close(y[:, 2:], u[:, :-2], atol=1e-5, rtol=0)


def fir_mixer(dim=16, K=8):
    return tg.S4DLinMixer(dim, "fir", K, 8)


def test_fir_mixer_init_is_normalised_monotone_decay():
    mixer = fir_mixer(dim=16, K=8)
    k = mixer.kernel(8).detach()
    assert k.shape == (16, 8)
    torch.testing.assert_close(k.sum(dim=1), torch.ones(16))
    assert (k[:, 1:] < k[:, :-1]).all()  # strictly decreasing in lag: the largest weight is the current token
    assert (k > 0).all()
    assert (k.argmax(dim=1) == 0).all()
    # channels differ in memory: the fastest channel puts more weight on lag 0 than the slowest
    assert k[:, 0].max() > k[:, 0].min() + 0.1
    # kernel(length) pads with zeros beyond K and truncates below K
    long = mixer.kernel(20).detach()
    torch.testing.assert_close(long[:, :8], k)
    assert (long[:, 8:] == 0).all()
    torch.testing.assert_close(mixer.kernel(5).detach(), k[:, :5])


@pytest.mark.parametrize("kind", ["fir", "s4d"])
def test_mixer_forward_uses_kernel_by_lag(kind):
    torch.manual_seed(0)
    mixer = tg.S4DLinMixer(16, kind, 8, 8)
    randomize_(mixer, std=0.2)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        gate, u = mixer.in_proj(x).chunk(2, dim=-1)
        conv = direct_causal_conv(u.double(), mixer.kernel(12).double()).float()
        expected = mixer.out_proj(torch.sigmoid(gate) * conv)
        torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-4)


def test_s4d_kernel_real_finite_decaying_and_matches_complex_formula():
    torch.manual_seed(0)
    mixer = tg.S4DLinMixer(32, "s4d", 8, 8)
    L = 4096
    with torch.no_grad():
        k = mixer.kernel(L)
    assert k.shape == (32, L) and k.dtype == torch.float32 and not k.is_complex()
    assert torch.isfinite(k).all()
    assert k[:, -256:].abs().mean() < 0.2 * k[:, :256].abs().mean()
    # K[l] = 2 Re(sum_n C~_n exp(dt A_n l)), C~ = C (exp(dt A) - 1) / A, in complex128
    dt = mixer.log_dt.detach().double().exp()[:, None]
    A = -mixer.log_a_real.detach().double().exp() + 1j * mixer.a_imag.detach().double()
    C = mixer.c_real.detach().double() + 1j * mixer.c_imag.detach().double()
    C_tilde = C * (torch.exp(dt * A) - 1) / A
    lags = torch.arange(L, dtype=torch.float64)
    ref = 2 * (C_tilde[..., None] * torch.exp(dt[..., None] * A[..., None] * lags)).sum(dim=1).real
    torch.testing.assert_close(k.double(), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- attention: XSA and GQA


def test_exclusive_self_attention_orthogonal_to_own_value():
    torch.manual_seed(0)
    B, T_, H, Hkv, D = 2, 6, 4, 2, 8
    y, v = torch.randn(B, T_, H, D), torch.randn(B, T_, Hkv, D)
    out = tg.exclusive_self_attention(y, v)
    assert out.shape == y.shape
    groups = H // Hkv
    for h in range(H):
        own = v[:, :, h // groups]
        dots = (out[:, :, h] * own).sum(-1)
        assert dots.abs().max() < 1e-5
        # only the component along the own value was removed
        removed = y[:, :, h] - out[:, :, h]
        cos = F.cosine_similarity(removed, own, dim=-1).abs()
        assert (cos > 1 - 1e-4).all()
        # the other grouping (h % Hkv) would not be orthogonal: the test can tell them apart
        if h % Hkv != h // groups:
            assert (out[:, :, h] * v[:, :, h % Hkv]).sum(-1).abs().max() > 1e-2


def test_causal_attention_gqa_grouping_matches_repeat_interleave():
    torch.manual_seed(0)
    B, T_, H, Hkv, D = 2, 7, 4, 2, 8
    q, k, v = torch.randn(B, T_, H, D), torch.randn(B, T_, Hkv, D), torch.randn(B, T_, Hkv, D)
    out = tg.causal_attention(q, k, v)
    kk, vv = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T_, T_, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vv)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attention_with_and_without_xsa_differ():
    torch.manual_seed(0)
    kwargs = dict(dim=32, num_heads=4, num_kv_heads=2, rope_dims=8, qk_gain_init=1.5, max_len=16)
    with_xsa = tg.CausalSelfAttention(use_xsa=True, **kwargs)
    randomize_(with_xsa, std=0.2)
    without = tg.CausalSelfAttention(use_xsa=False, **kwargs)
    without.load_state_dict(with_xsa.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        a, b = with_xsa(x), without(x)
    assert (a - b).abs().max() > 1e-3
    # XSA is applied before the output projection: pre-projection outputs are orthogonal to the own values
    captured = {}
    hook = with_xsa.proj.register_forward_pre_hook(lambda _m, inp: captured.setdefault("y", inp[0]))
    try:
        with torch.no_grad():
            with_xsa(x)
            v = with_xsa.c_v(x).view(2, 9, 2, 8)
    finally:
        hook.remove()
    y = captured["y"].view(2, 9, 4, 8)
    for h in range(4):
        assert (y[:, :, h] * v[:, :, h // 2]).sum(-1).abs().max() < 1e-4


def test_xsa_goes_to_last_attention_layers():
    model = tg.GPT(tiny_args(XSA_LAST_N=2))  # layers 0, 1 are S4D (replace); attention layers 2, 3
    assert [b.attn is None for b in model.blocks] == [True, True, False, False]
    assert [b.attn.use_xsa for b in model.blocks[2:]] == [True, True]
    model = tg.GPT(tiny_args(XSA_LAST_N=1, SSM_MODE="parallel"))
    assert [b.attn.use_xsa for b in model.blocks] == [False, False, False, True]


@pytest.mark.parametrize("n", [3, 4, 11])
def test_xsa_last_n_beyond_the_attention_layers_means_all_of_them(n):
    """The default XSA_LAST_N (11) with S4D in layers 0,1 leaves fewer attention layers than N: all get XSA."""
    model = tg.GPT(tiny_args(XSA_LAST_N=n))  # attention layers 2, 3
    assert [b.attn.use_xsa for b in model.blocks[2:]] == [True, True]
    assert not any(b.attn.use_xsa for b in tg.GPT(tiny_args(XSA_LAST_N=0)).blocks if b.attn is not None)


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("kernel", ["fir", "s4d"])
@pytest.mark.parametrize("mode", ["replace", "parallel"])
def test_output_projections_start_at_zero(kernel, mode):
    torch.manual_seed(0)
    model = tg.GPT(tiny_args(SSM_KERNEL=kernel, SSM_MODE=mode))
    seen_ssm = seen_attn = 0
    for block in model.blocks:
        assert (block.mlp.proj.weight == 0).all()
        assert (block.mlp.fc.weight != 0).any()
        if block.attn is not None:
            seen_attn += 1
            assert (block.attn.proj.weight == 0).all()
            assert (block.attn.c_q.weight != 0).any()
        if block.ssm is not None:
            seen_ssm += 1
            assert (block.ssm.out_proj.weight == 0).all()
            assert (block.ssm.in_proj.weight != 0).any()
    assert seen_ssm == 2 and seen_attn == (4 if mode == "parallel" else 2)


@pytest.mark.parametrize("kernel", ["fir", "s4d"])
def test_new_s4d_mixer_adds_nothing(kernel):
    """In a fresh GPT every S4D mixer outputs exactly zero, so in parallel mode its gate does not matter."""
    torch.manual_seed(0)
    model = tg.GPT(tiny_args(SSM_KERNEL=kernel, SSM_MODE="parallel"))
    x = torch.randn(2, 10, 64)
    mixers = [b.ssm for b in model.blocks if b.ssm is not None]
    assert len(mixers) == 2
    with torch.no_grad():
        for mixer in mixers:
            assert (mixer(x) == 0).all()
        ids = make_ids(seed=6)
        h0 = model.hidden(ids)
        for block in model.blocks:
            if block.ssm_gate is not None:
                block.ssm_gate.fill_(5.0)
        torch.testing.assert_close(model.hidden(ids), h0, atol=0, rtol=0)
        # ... which is not true once the output projection is non-zero
        model.blocks[0].ssm.out_proj.weight.normal_()
        assert (model.hidden(ids) - h0).abs().max() > 1e-4


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize("kernel", ["fir", "s4d"])
def test_split_parameters_routes_every_parameter_once(kernel):
    model = tg.GPT(tiny_args(SSM_KERNEL=kernel, SSM_MODE="parallel"))
    matrices, embeddings, scalars = tg.split_parameters(model)
    ids = [id(p) for p in matrices + embeddings + scalars]
    assert len(ids) == len(set(ids)), "a parameter is in two lists"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no list"

    casted = [m for m in model.modules() if isinstance(m, tg.CastedLinear)]
    assert {id(m.weight) for m in casted} == {id(p) for p in matrices}
    assert all(p.ndim == 2 for p in matrices)
    assert {id(p) for p in embeddings} == {id(model.tok_emb.weight)}
    names = {id(p): n for n, p in model.named_parameters()}
    scalar_names = {names[id(p)] for p in scalars}
    kernel_params = ("kernel_taps",) if kernel == "fir" else ("log_dt", "log_a_real", "a_imag", "c_real", "c_imag")
    for i in (0, 1):
        for pname in kernel_params:
            assert f"blocks.{i}.ssm.{pname}" in scalar_names
        assert f"blocks.{i}.ssm_gate" in scalar_names
    assert "skip_weights" in scalar_names and "smear.gate" in scalar_names and "blocks.2.attn.q_gain" in scalar_names


def test_build_optimizers_uses_the_split():
    args = tiny_args(SSM_KERNEL="s4d")
    model = tg.GPT(args)
    muon, adam_embed, adam_scalar = tg.build_optimizers(model, args)
    matrices, embeddings, scalars = tg.split_parameters(model)

    def ids_of(opt):
        return {id(p) for g in opt.param_groups for p in g["params"]}

    assert isinstance(muon, tg.Muon)
    assert ids_of(muon) == {id(p) for p in matrices}
    assert ids_of(adam_embed) == {id(p) for p in embeddings}
    assert ids_of(adam_scalar) == {id(p) for p in scalars}
    assert all(g["weight_decay"] == 0.0 for g in adam_scalar.param_groups)
    for opt in (muon, adam_embed, adam_scalar):
        assert all(g["base_lr"] == g["lr"] for g in opt.param_groups)
    for group in muon.param_groups:  # one shape per group, so each group is orthogonalised in one batched call
        assert len({tuple(p.shape) for p in group["params"]}) == 1


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    G = torch.randn(3, 16, 48)
    X = tg.zeropower_via_newtonschulz5(G, steps=5)
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.5
    tall = tg.zeropower_via_newtonschulz5(G.mT, steps=5)
    torch.testing.assert_close(tall, X.mT, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("warmdown,min_lr", [(0.5, 0.0), (0.3, 0.1), (1.0, 0.0)])
def test_lr_multiplier_is_a_fraction_of_the_run(warmdown, min_lr):
    args = tiny_args(WARMDOWN_FRAC=warmdown, MIN_LR_FRAC=min_lr)
    # the same progress gives the same multiplier whatever the run length
    for p in (0.0, 0.25, 0.5, 0.8, 0.95):
        values = {tg.lr_multiplier(int(p * n) / n, args) for n in (100, 1000, 20000)}
        assert len(values) == 1
    start = 1 - warmdown
    grid = [i / 200 for i in range(201)]
    for p in grid:
        m = tg.lr_multiplier(p, args)
        if p < start:
            assert m == 1.0
        else:
            assert m == pytest.approx(max(min_lr, (1 - p) / warmdown))
    assert tg.lr_multiplier(1.0, args) == pytest.approx(min_lr)
    values = [tg.lr_multiplier(p, args) for p in grid]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))  # never increases
    assert min(values) == pytest.approx(min_lr)


def test_lr_multiplier_without_warmdown_is_constant():
    args = tiny_args(WARMDOWN_FRAC=0)
    assert all(tg.lr_multiplier(p, args) == 1.0 for p in (0.0, 0.5, 0.99, 1.0))


def test_muon_momentum_warmup_is_a_fraction_of_the_run():
    args = tiny_args(MUON_MOMENTUM="0.99")
    start, frac = tg.MUON_MOMENTUM_WARMUP
    assert tg.muon_momentum_at(0.0, args) == pytest.approx(start)
    assert tg.muon_momentum_at(frac / 2, args) == pytest.approx((start + 0.99) / 2)
    for p in (frac, 0.5, 1.0):
        assert tg.muon_momentum_at(p, args) == pytest.approx(0.99)
    for p in (0.05, 0.15):  # the same share of any run length gives the same momentum
        assert {tg.muon_momentum_at(int(p * n) / n, args) for n in (100, 1000, 20000)} == \
            {tg.muon_momentum_at(p, args)}


def test_standalone_modules_start_silent():
    """Zero-init lives in the modules themselves, not only in GPT: a new mixer or MLP outputs exactly zero."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    for module in (fir_mixer(),
                   tg.S4DLinMixer(16, "s4d", 8, 8),
                   tg.MLP(16, 32, 0.5),
                   tg.CausalSelfAttention(16, 4, 2, 4, 1.5, True, 8)):
        assert torch.count_nonzero(module(x)) == 0, type(module).__name__


def test_configure_inductor_turns_mix_order_reduction_off_unless_the_user_set_it(monkeypatch):
    triton_config = torch._inductor.config.triton
    if not hasattr(triton_config, "mix_order_reduction"):
        assert tg.configure_inductor() == "inductor: mix_order_reduction:absent"
        return
    with torch._inductor.config.patch({"triton.mix_order_reduction": True}):
        monkeypatch.delenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", raising=False)
        line = tg.configure_inductor()
        assert triton_config.mix_order_reduction is False
        assert line == "inductor: mix_order_reduction:False"
    with torch._inductor.config.patch({"triton.mix_order_reduction": True}):
        monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", "1")
        assert tg.configure_inductor() == "inductor: mix_order_reduction:True"
