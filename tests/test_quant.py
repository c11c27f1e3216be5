"""CALIBRATION, QUANTIZATION, BIT ALLOCATION AND THE ARTIFACT: calibration statistics against direct computation,
GPTQ ranges and its advantage over rounding, predicted loss against measured loss, the width allocator's budget,
the artifact round trip at every width, and the size rule."""

from __future__ import annotations

import lzma
import math
import random

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import tiny_args, tiny_env, train_tiny

CPU = torch.device("cpu")


def hessian_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, H: torch.Tensor) -> float:
    d = (w.double() - q.double() * scale.double()[:, None])
    return float(torch.trace(d @ H.double() @ d.T))


def qmax_of(rows: int, bits: int) -> torch.Tensor:
    return torch.full((rows,), 2.0 ** (bits - 1) - 1)


def check_range(q: torch.Tensor, scale: torch.Tensor, rows: int, bits: int) -> None:
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8
    assert scale.dtype == torch.float16 and scale.shape == (rows,)
    assert (scale > 0).all()
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT trained 30 steps on a Markov chain, with calibration statistics from 4 more batches."""
    args = tiny_args()
    model, batches = train_tiny(args)
    stats = tg.collect_calibration(model, batches[30:], CPU, False)
    return args, model, stats, batches


def rtn(w: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-row rounding to the nearest level (scale = row max / qmax): what GPTQ must beat."""
    scale = (w.abs().amax(dim=1) / qmax).clamp_min(1e-8)
    return (w / scale[:, None]).round().clamp(-qmax[:, None], qmax[:, None]), scale


def group_weight(model, name):
    group = next(g for g in tg.gptq_groups(model) if g[0] == name)
    state = model.state_dict()
    return torch.cat([state[f"{n}.weight"] for n in group]).float()


def mean_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(x, y)) for x, y in batches) / len(batches)


# ---------------------------------------------------------------- calibration statistics


def test_calibration_statistics_match_direct_computation(trained):
    args, model, stats, batches = trained
    groups = tg.gptq_groups(model)
    assert set(stats["hessians"]) == {g[0] for g in groups} | {"tok_emb"}
    assert stats["tokens"] == 4 * 16 * args.train_seq_len
    names = {n for g in groups for n in g}
    for i, block in enumerate(model.blocks):
        assert f"blocks.{i}.mlp.fc" in names and f"blocks.{i}.mlp.proj" in names
        if block.attn is not None:
            assert [f"blocks.{i}.attn.c_q", f"blocks.{i}.attn.c_k", f"blocks.{i}.attn.c_v"] in groups
        if block.ssm is not None:
            assert f"blocks.{i}.ssm.in_proj" in names and f"blocks.{i}.ssm.out_proj" in names
    # direct: inputs and output gradients of one matrix, the head's input and logit gradients, lookup counts
    fc = model.blocks[2].mlp.fc
    seen = {"x": [], "g": [], "h": [], "logit_g": []}

    def record(_module, inputs, output) -> None:
        seen["x"].append(inputs[0].detach())
        output.register_hook(lambda g: seen["g"].append(g))

    hook = fc.register_forward_hook(record)
    try:
        for x, y in batches[30:]:
            h = model.hidden(x)
            raw = model.head(h)
            raw.register_hook(lambda g: seen["logit_g"].append(g))
            seen["h"].append(h.detach())
            F.cross_entropy(model.softcap(raw).reshape(-1, raw.size(-1)), y.reshape(-1), reduction="sum").backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    X = torch.cat([v.reshape(-1, v.size(-1)) for v in seen["x"]])
    torch.testing.assert_close(stats["hessians"]["blocks.2.mlp.fc"], X.T @ X, rtol=1e-4, atol=1e-3)
    G = torch.cat([v.reshape(-1, v.size(-1)) for v in seen["g"]])
    torch.testing.assert_close(stats["grad_energy"]["blocks.2.mlp.fc"], G.square().sum(0), rtol=1e-4, atol=1e-9)
    Hh = torch.cat([v.reshape(-1, v.size(-1)) for v in seen["h"]])
    torch.testing.assert_close(stats["hessians"]["tok_emb"], Hh.T @ Hh, rtol=1e-4, atol=1e-3)
    L = torch.cat([v.reshape(-1, v.size(-1)) for v in seen["logit_g"]])
    torch.testing.assert_close(stats["grad_energy"]["tok_emb"], L.square().sum(0), rtol=1e-4, atol=1e-9)
    ids = torch.cat([x.reshape(-1) for x, _ in batches[30:]])
    assert torch.equal(stats["counts"]["tok_emb"], torch.bincount(ids, minlength=args.vocab_size).double())
    assert not any(p.grad is not None for p in model.parameters())  # calibration leaves no gradients behind
    H = stats["hessians"]["blocks.2.mlp.fc"]
    assert torch.linalg.eigvalsh(H.double()).min() > -1e-6 * H.diagonal().max()


def test_calibration_sums_stay_fp32_under_autocast(trained):
    """On the GPU calibration runs under bf16 autocast; the sums it keeps must not be rounded to bf16."""
    args, model, stats, batches = trained
    mixed = tg.collect_calibration(model, batches[30:32], CPU, True)
    for table in ("hessians", "grad_energy"):
        assert all(v.dtype == torch.float32 for v in mixed[table].values()), table
    H = mixed["hessians"]["blocks.2.mlp.fc"]
    torch.testing.assert_close(H, H.T)


# ---------------------------------------------------------------- ranges and GPTQ


def test_row_scales_of_tiny_rows_stay_positive_in_fp16():
    """A row of tiny weights (or zeros) must not get a scale that rounds to 0 in fp16: the quantizer divides by it
    and the artifact stores it."""
    w = torch.randn(6, 16)
    w[1] = 1e-9
    w[2] = 0.0
    w[3] *= 1e-6
    H = torch.eye(16)
    for bits in (4, 8):
        q, scale = tg.gptq_quantize(w, H, qmax_of(6, bits))
        check_range(q, scale, 6, bits)
        restored = q.float() * scale.float()[:, None]
        assert torch.isfinite(restored).all() and (restored - w).abs().max() < 0.5


def test_one_solve_at_several_widths_equals_separate_solves(trained):
    """Rows are independent in GPTQ: stacking a matrix at widths 3..8 in one solve gives, for each width, exactly
    what a solve at that width alone gives. This is what lets the export try every width at the cost of one."""
    _, model, stats, _ = trained
    w = group_weight(model, "blocks.2.attn.c_q")  # Q, K and V stacked: 64 + 32 + 32 rows
    H = stats["hessians"]["blocks.2.attn.c_q"] / stats["tokens"]
    widths = list(range(3, 9))
    q_all, s_all = tg.gptq_quantize(w.repeat(len(widths), 1), H, torch.cat([qmax_of(w.size(0), b) for b in widths]),
                                    16, 0.01)
    for i, bits in enumerate(widths):
        q, s = tg.gptq_quantize(w, H, qmax_of(w.size(0), bits), 16, 0.01)
        rows = slice(i * w.size(0), (i + 1) * w.size(0))
        check_range(q, s, w.size(0), bits)
        assert torch.equal(q_all[rows], q) and torch.equal(s_all[rows], s)
        assert int(q.abs().max()) == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("name", ["blocks.2.mlp.fc", "blocks.3.attn.c_q", "blocks.0.ssm.in_proj", "tok_emb"])
@pytest.mark.parametrize("bits", [4, 5, 8])
def test_gptq_beats_rtn_on_a_trained_layer(trained, name, bits):
    _, model, stats, _ = trained
    w = model.tok_emb.weight.detach() if name == "tok_emb" else group_weight(model, name)
    H = stats["hessians"][name]
    qmax = qmax_of(w.size(0), bits)
    q_g, s_g = tg.gptq_quantize(w, H, qmax, 16, 0.01)
    q_r, s_r = rtn(w, qmax)
    assert hessian_error(w, q_g, s_g, H) < 0.8 * hessian_error(w, q_r, s_r, H)


def test_gptq_beats_rtn_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    n, cols, rows, rank = 2048, 48, 32, 6
    X = torch.randn(n, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) \
        + 0.1 * torch.randn(n, cols, generator=gen)
    H = X.T @ X
    w = torch.randn(rows, cols, generator=gen) * 0.05
    for bits in (4, 5):
        for block_size in (8, 128):  # blocked and single-block error feedback
            q_g, s_g = tg.gptq_quantize(w, H, qmax_of(rows, bits), block_size, 0.01)
            q_r, s_r = rtn(w, qmax_of(rows, bits))
            check_range(q_g, s_g, rows, bits)
            assert hessian_error(w, q_g, s_g, H) < 0.5 * hessian_error(w, q_r, s_r, H)


def test_gptq_dead_inputs():
    """An input that never fires (zero Hessian row/column) must not break the solve; its weights become 0."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(512, 16, generator=gen)
    X[:, 5] = 0
    w = torch.randn(8, 16, generator=gen)
    q, scale = tg.gptq_quantize(w, X.T @ X, qmax_of(8, 5), 4, 0.01)
    check_range(q, scale, 8, 5)
    assert (q[:, 5] == 0).all()
    assert (q[:, :5] != 0).any()


# ---------------------------------------------------------------- predicted loss


def ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0] * len(values)
    for rank, i in enumerate(order):
        out[i] = rank
    return out


def test_predicted_loss_tracks_the_measured_loss(trained):
    """The allocator trusts 1/2 sum f (dW H dW^T). Quantize one tensor at 2 bits (an error large enough to
    measure) and measure the calibration loss: the prediction must rank the tensors as the measurement does, and
    match it within 2x where the effect stands well above the noise. Every extra bit must predict less loss."""
    args, model, stats, batches = trained
    options = tg.quantize_candidates({k: v.detach().float() for k, v in model.state_dict().items()}, model, stats,
                                     tiny_args(QUANT_MIN_BITS=2, LQER_RANK=0), CPU)
    matrices = [n for g in tg.gptq_groups(model) for n in g] + ["tok_emb"]
    assert set(options) == {f"{n}.weight" for n in matrices}
    base = mean_loss(model, batches[30:])
    predicted, measured = [], []
    for name, cands in options.items():
        assert [c.bits for c in cands] == list(range(2, 9))
        assert all(a.loss > b.loss > 0 for a, b in zip(cands, cands[1:])), (name, [c.loss for c in cands])
        original = model.state_dict()[name].clone()
        with torch.no_grad():
            model.state_dict()[name].copy_(cands[0].q.float() * cands[0].scale.float()[:, None])
        predicted.append(cands[0].loss)
        measured.append(mean_loss(model, batches[30:]) - base)
        with torch.no_grad():
            model.state_dict()[name].copy_(original)
    big = [(p, m) for p, m in zip(predicted, measured) if p > 1e-2]
    assert len(big) >= 3
    assert all(0.5 < p / m < 2 for p, m in big), big
    rp, rm = ranks(predicted), ranks(measured)
    n = len(rp)
    spearman = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rp, rm)) / (n * (n * n - 1))
    assert spearman > 0.6, spearman


# ---------------------------------------------------------------- LQER


def weighted_error(d: torch.Tensor, w: torch.Tensor, H: torch.Tensor) -> float:
    return float((w.double() * ((d.double() @ H.double()) * d.double()).sum(1)).sum())


def test_lowrank_correction_is_the_weighted_optimum():
    """Before its int8 rounding, the correction leaves exactly the discarded singular values of
    diag(sqrt w) delta L (the optimum, Eckart-Young); it beats the plain SVD of delta in that metric; and the int8
    factors lose little of it."""
    torch.manual_seed(0)
    rows, cols, rank = 48, 32, 4
    X = torch.randn(500, cols) * torch.linspace(0.1, 3, cols)
    H = (X.T @ X / 500).double()
    w = torch.rand(rows).double() ** 4  # very unequal row weights, as the gradient energies are
    delta = torch.randn(rows, cols).double()
    L = torch.linalg.cholesky(H)
    a, sa, b, sb = tg.lowrank_correction(delta, w, L.float(), rank)
    assert a.dtype == b.dtype == torch.int8 and a.shape == (rows, rank) and b.shape == (rank, cols)
    assert sa.dtype == sb.dtype == torch.float16 and int(a.abs().max()) <= 127 and int(b.abs().max()) <= 127
    S = torch.linalg.svdvals(w.sqrt()[:, None] * delta @ L)
    optimum = float(S[rank:].square().sum())
    rounded = weighted_error(delta - tg.lowrank_product((a, sa, b, sb)).double(), w, H)
    U, S0, Vh = torch.linalg.svd(delta, full_matrices=False)
    plain = weighted_error(delta - (U[:, :rank] * S0[:rank]) @ Vh[:rank], w, H)
    assert optimum < plain and rounded < plain
    assert rounded < optimum * 1.02 + 1e-3 * float(S[:rank].square().sum())
    assert rounded < weighted_error(delta, w, H) - 0.9 * float(S[:rank].square().sum())


@pytest.mark.parametrize("case", ["zero rows", "tiny rows", "no weight", "dead inputs"])
def test_lowrank_correction_stays_finite_and_optimal_at_the_edges(case):
    """Rows of zero or 1e-12 weight (outputs the loss barely reads) and never-active inputs keep the factors
    finite, with fp16 scales in range, and the correction still reaches the weighted optimum."""
    torch.manual_seed(1)
    rows, cols, rank = 40, 24, 3
    X = torch.randn(200, cols) * torch.linspace(0.1, 3, cols)
    H = (X.T @ X / 200).double()
    w = torch.rand(rows).double()
    delta = torch.randn(rows, cols).double() * 0.01
    if case == "zero rows":
        w[::3] = 0
    elif case == "tiny rows":
        w[::2] *= 1e-12
    elif case == "no weight":
        w.zero_()
    elif case == "dead inputs":
        H[:, :5] = 0
        H[:5, :] = 0
        delta[:, :5] = 0
    L = tg.damped_cholesky((H + torch.diag((H.diagonal() == 0).double())).float(), 0.0).double()
    a, sa, b, sb = tg.lowrank_correction(delta, w, L.float(), rank)
    assert torch.isfinite(sa.float()).all() and torch.isfinite(sb.float()).all() and (sa > 0).all() and (sb > 0).all()
    corrected = delta - tg.lowrank_product((a, sa, b, sb)).double()
    assert torch.isfinite(corrected).all()
    S = torch.linalg.svdvals(w.sqrt()[:, None] * delta @ L)
    optimum, before = float(S[rank:].square().sum()), weighted_error(delta, w, H)
    after = weighted_error(corrected, w, H)
    assert after <= optimum + 0.02 * (before - optimum) + 1e-30, (after, optimum, before)


def test_lqer_candidates_lower_the_predicted_and_the_measured_loss(trained, monkeypatch):
    """Each GPTQ matrix gets, at each width, a corrected candidate on the same grid: it predicts less loss, and
    installing it measurably lowers the calibration loss where the prediction says so."""
    args, model, stats, batches = trained
    monkeypatch.setattr(tg, "QUANT_MAX_BITS", 3)  # widths 2 and 3: coarse grids, where corrections matter most
    options = tg.quantize_candidates({k: v.detach().float() for k, v in model.state_dict().items()}, model, stats,
                                     tiny_args(QUANT_MIN_BITS=2, LQER_RANK=2), CPU)
    gptq = {f"{n}.weight" for g in tg.gptq_groups(model) for n in g} | {"tok_emb.weight"}
    base = mean_loss(model, batches[30:])
    gains = []
    for name, cands in options.items():
        if name not in gptq:
            assert all(c.rank == 0 for c in cands)
            continue
        assert [(c.bits, c.rank) for c in cands] == [(2, 0), (2, 2), (3, 0), (3, 2)]
        plain, corrected = cands[0], cands[1]
        assert corrected.q is plain.q and corrected.loss < plain.loss
        measured = []
        for c in (plain, corrected):
            original = model.state_dict()[name].clone()
            with torch.no_grad():
                model.state_dict()[name].copy_(c.weight())
            measured.append(mean_loss(model, batches[30:]) - base)
            with torch.no_grad():
                model.state_dict()[name].copy_(original)
        gains.append((plain.loss - corrected.loss, measured[0] - measured[1]))
    # One matrix's effect on 4 batches is measured within about 1e-3 nats at 2 bits: each large predicted gain must
    # be measured, and the predicted gains above 3e-4 must add up to what the measurements add up to.
    assert all(m > 0.2 * p for p, m in gains if p > 1e-2) and any(p > 1e-2 for p, _ in gains), sorted(gains)
    big = [(p, m) for p, m in gains if p > 3e-4]
    assert len(big) >= 5, big
    total_p, total_m = sum(p for p, _ in big), sum(m for _, m in big)
    assert total_p / 3 < total_m < total_p * 3, (total_p, total_m)


def test_the_allocator_buys_lqer_and_the_artifact_keeps_it(trained):
    """At a target with room, the allocator takes some corrections; the artifact stores their factors exactly and
    the dequantized weight includes them; without LQER the same target predicts more loss."""
    args, model, stats, _ = trained
    code, target = 20_000, 140_000
    artifact, lines = tg.quantize_model(model, stats, tiny_args(QUANT_TARGET_BYTES=target, LQER_RANK=4), code, CPU)
    without, _ = tg.quantize_model(model, stats, tiny_args(QUANT_TARGET_BYTES=target, LQER_RANK=0), code, CPU)
    corrected = {n: c for n, c in artifact["tensors"].items() if c.rank}
    assert corrected and all(c.rank == 4 and c.lowrank_bytes > 0 for c in corrected.values())
    assert "lqer_rank:4" in "\n".join(lines) and f"lqer:{len(corrected)} " in lines[-1]
    assert sum(c.loss for c in artifact["tensors"].values()) < sum(c.loss for c in without["tensors"].values())
    blob = tg.serialize_artifact(artifact)
    assert code + len(blob) <= target
    back = tg.deserialize_artifact(blob)
    state = tg.dequantize_state(back)
    for name, c in artifact["tensors"].items():
        got = back["tensors"][name]
        assert got.rank == c.rank and got.lowrank_bytes == c.lowrank_bytes
        for x, y in zip(got.lowrank or (), c.lowrank or ()):
            assert torch.equal(x, y)
        assert torch.equal(state[name], c.weight())
    name, c = next(iter(corrected.items()))
    assert not torch.equal(c.weight(), c.q.float() * c.scale.float()[:, None])
    # corrupt factors are refused like any other corruption
    a, sa, b_, sb = c.lowrank
    for bad in ((a, sa, b_[:, 1:], sb), (a[1:], sa, b_, sb), (a, sa[:1], b_, sb)):
        broken = tg.QuantCandidate(c.bits, c.q, c.scale, 0.0, bad)
        extra = tg.encode_quantized(*bad)
        broken.blob, broken.lowrank_bytes = tg.encode_quantized(c.q, c.scale) + extra, len(extra)
        tampered = dict(artifact, tensors=dict(artifact["tensors"], **{name: broken}))
        with pytest.raises(ValueError, match="x.ptz is not an artifact"):
            tg.deserialize_artifact(tg.serialize_artifact(tampered), "x.ptz")


# ---------------------------------------------------------------- width allocation


def fake_options(seed: int, n: int = 12) -> dict:
    """Tensors with random sizes and sensitivities: bytes grow and loss falls ~4x per extra bit."""
    rng = random.Random(seed)
    options = {}
    for i in range(n):
        size, sens = rng.randint(100, 5000), rng.random() ** 3
        cands = []
        for b in range(3, 9):
            c = tg.QuantCandidate(b, torch.zeros(1, 1, dtype=torch.int8), torch.ones(1).half(), sens * 4.0 ** -b)
            c.blob = b"x" * (size * b // 8 + rng.randint(0, 9))
            cands.append(c)
        options[f"t{i}"] = cands
    return options


@pytest.mark.parametrize("seed", range(6))
def test_choose_widths_stays_in_budget_and_spends_it(seed):
    options = fake_options(seed)
    low = sum(len(c[0].blob) for c in options.values())
    high = sum(len(c[-1].blob) for c in options.values())
    for budget in (low, (3 * low + high) // 4, (low + high) // 2, high - 1, high, high * 2):
        choice = tg.choose_widths(options, budget)
        spent = sum(len(options[n][i].blob) for n, i in choice.items())
        assert spent <= budget
        # nothing else fits: every remaining single upgrade would cross the budget (greedy ends only when stuck)
        for n, i in choice.items():
            for j in range(i + 1, len(options[n])):
                assert spent + len(options[n][j].blob) - len(options[n][i].blob) > budget
        loss = sum(options[n][i].loss for n, i in choice.items())
        if budget >= high:
            assert all(i == len(options[n]) - 1 for n, i in choice.items())
        # better than spending the same bytes uniformly: the widest uniform width that fits
        for b in range(len(next(iter(options.values()))) - 1, -1, -1):
            if sum(len(c[b].blob) for c in options.values()) <= budget:
                assert loss <= sum(c[b].loss for c in options.values()) + 1e-15
                break


def test_choose_widths_takes_a_smaller_upgrade_when_the_steepest_does_not_fit():
    options = {"A": []}
    for bits, size, loss in ((4, 100, 10.0), (5, 200, 9.9), (6, 210, 1.0)):
        options["A"].append(tg.QuantCandidate(bits, torch.zeros(1, 1, dtype=torch.int8), torch.ones(1).half(), loss))
        options["A"][-1].blob = b"x" * size
    assert tg.choose_widths(options, 205) == {"A": 1}  # 6 bits is the steeper step, but only 5 bits fits
    assert tg.choose_widths(options, 210) == {"A": 2}


def test_choose_widths_never_buys_a_candidate_without_a_loss():
    options = {"t": []}
    for size, loss in ((10, 1.0), (12, math.nan), (20, 0.1)):
        options["t"].append(tg.QuantCandidate(5, torch.zeros(1, 1, dtype=torch.int8), torch.ones(1).half(), loss))
        options["t"][-1].blob = b"x" * size
    assert tg.choose_widths(options, 100) == {"t": 2}
    assert tg.choose_widths(options, 15) == {"t": 0}


def test_choose_widths_prefers_the_sensitive_tensor_and_refuses_an_impossible_budget():
    options = fake_options(0, n=2)
    for c in options["t0"]:
        c.loss *= 1000
    first = len(options["t0"][1].blob) - len(options["t0"][0].blob)
    low = sum(len(c[0].blob) for c in options.values())
    choice = tg.choose_widths(options, low + first)
    assert choice["t0"] >= 1 and choice["t1"] == 0
    with pytest.raises(ValueError, match="QUANT_MIN_BITS"):
        tg.choose_widths(options, low - 1)


@pytest.mark.parametrize("shape,target", [
    ({}, 110_000), ({}, 140_000), ({}, 250_000), ({"MODEL_DIM": "96", "NUM_HEADS": "4"}, 250_000),
    ({"NUM_LAYERS": "3", "SSM_LAYERS": "0"}, 110_000), ({"VOCAB_SIZE": "256"}, 150_000)])
def test_allocator_lands_under_the_target(shape, target):
    """The measured total (code + serialized artifact) never exceeds QUANT_TARGET_BYTES, and what is left unspent
    is less than the cheapest upgrade still available."""
    args = tiny_args(**shape, QUANT_TARGET_BYTES=target)
    model, batches = train_tiny(args, steps=8)
    stats = tg.collect_calibration(model, batches[8:10], CPU, False)
    code = 20_000
    artifact, lines = tg.quantize_model(model, stats, args, code, CPU)
    total = code + len(tg.serialize_artifact(artifact))
    assert total <= target, (total, target)
    widths = {c.bits for c in artifact["tensors"].values()}
    assert min(widths) >= args.quant_min_bits and max(widths) <= tg.QUANT_MAX_BITS
    assert lines[-1].startswith("quant_summary alloc:1") and len(lines) == len(artifact["tensors"]) + 1
    narrowest = tg.quantize_model(model, stats, tiny_args(**shape, QUANT_UNIFORM_BITS=4), code, CPU)[0]
    assert code + len(tg.serialize_artifact(narrowest)) <= total  # it spent bytes, and only where it could
    if max(widths) < tg.QUANT_MAX_BITS:
        assert target - total < 0.15 * target


def test_allocator_refuses_a_target_below_the_narrowest_widths(trained):
    args, model, stats, _ = trained
    with pytest.raises(ValueError, match="narrowest widths"):
        tg.quantize_model(model, stats, tiny_args(QUANT_TARGET_BYTES=90_000), 20_000, CPU)


# ---------------------------------------------------------------- the artifact


def test_quantize_model_covers_every_tensor(trained):
    args, model, stats, _ = trained
    uniform = tiny_args(QUANT_UNIFORM_BITS=5)
    artifact, _ = tg.quantize_model(model, stats, uniform, 1000, CPU)
    state = model.state_dict()
    assert set(artifact["tensors"]) | set(artifact["passthrough"]) == set(state)
    assert not set(artifact["tensors"]) & set(artifact["passthrough"])
    matrices = {f"{n}.weight" for g in tg.gptq_groups(model) for n in g} | {"tok_emb.weight"}
    assert set(artifact["tensors"]) == matrices
    for name, c in artifact["tensors"].items():
        assert c.bits == 5 and c.rank == 0 and c.q.shape == state[name].shape
        check_range(c.q, c.scale, state[name].size(0), 5)
    for name, t in artifact["passthrough"].items():
        assert t.dtype in (torch.float16, torch.float32)
        assert (t.float() - state[name]).abs().max() <= 1e-3 * state[name].abs().max()
    assert artifact["config"]["SSM_LAYERS"] == "0,1" and artifact["config"]["NUM_LAYERS"] == "4"
    assert set(artifact["config"]) == set(tg.MODEL_KEYS)
    assert tg.artifact_tag(artifact) == "int5"
    mixed = tg.quantize_model(model, stats, tiny_args(QUANT_MIN_BITS=4, QUANT_TARGET_BYTES=140_000), 20_000, CPU)[0]
    assert len({c.bits for c in mixed["tensors"].values()}) > 1 and tg.artifact_tag(mixed) == "mixed"


def test_passthrough_dtype():
    assert tg.passthrough_dtype(torch.linspace(-1, 1, 100)) == torch.float16
    assert tg.passthrough_dtype(torch.tensor([1e5, 1.0])) == torch.float32  # fp16 overflows
    assert tg.passthrough_dtype(torch.tensor([1.0, 1.0 + 3e-3])) == torch.float16
    assert tg.passthrough_dtype(torch.tensor([2048.0, 2049.0])) == torch.float16  # within 1e-3 of the max
    assert tg.passthrough_dtype(torch.tensor([0.001, 2049.0, 1e4])) == torch.float16


@pytest.mark.parametrize("kernel", ["fir", "s4d"])
def test_s4d_kernel_parameters_are_never_quantized_whatever_their_size(kernel):
    # 128 channels x 520 taps = 66,560 values: larger than the 65,536-value "small tensor" limit of other scripts
    args = tiny_args(MODEL_DIM="128", SSM_KERNEL=kernel, SSM_KERNEL_SIZE="520", SSM_STATE_DIM="1040")
    torch.manual_seed(0)
    model = tg.GPT(args)
    batches = [(torch.randint(0, args.vocab_size, (2, 32)), torch.randint(0, args.vocab_size, (2, 32)))
               for _ in range(2)]
    artifact, _ = tg.quantize_model(model, tg.collect_calibration(model, batches, CPU, False),
                                    tiny_args(QUANT_UNIFORM_BITS=5), 0, CPU)
    ssm = {n: t for n, t in model.state_dict().items() if ".ssm." in n and "proj" not in n}
    assert ssm and max(t.numel() for t in ssm.values()) > 65_536
    for name, t in ssm.items():
        assert name not in artifact["tensors"], name
        kept = artifact["passthrough"][name].float()
        assert (kept - t).abs().max() <= 1e-3 * t.abs().max(), name


def test_artifact_round_trip_at_every_width(trained):
    """Values, scales and widths survive serialization at every width the allocator can choose, and the
    dequantized model is the quantized one."""
    args, model, stats, batches = trained
    for bits in range(2, 9):
        wide = tiny_args(QUANT_UNIFORM_BITS=bits)
        artifact, _ = tg.quantize_model(model, stats, wide, 0, CPU)
        blob = tg.serialize_artifact(artifact)
        assert blob.startswith(tg.ARTIFACT_MAGIC)
        back = tg.deserialize_artifact(blob)
        assert back["config"] == artifact["config"]
        for name, c in artifact["tensors"].items():
            got = back["tensors"][name]
            assert got.bits == c.bits == bits and torch.equal(got.q, c.q) and torch.equal(got.scale, c.scale)
        for name, t in artifact["passthrough"].items():
            assert back["passthrough"][name].dtype == t.dtype and torch.equal(back["passthrough"][name], t)
        state = tg.dequantize_state(back)
        for name, c in artifact["tensors"].items():
            assert torch.equal(state[name], c.q.float() * c.scale.float()[:, None])
    # rebuild the model from the artifact's own config, as scripts/evaluate.py does, and load strictly
    rebuilt_args = tg.Hyperparameters(env=dict(tiny_env(), **back["config"]))
    fresh = tg.GPT(rebuilt_args)
    fresh.load_state_dict(tg.dequantize_state(back), strict=True)
    fresh.eval()
    x, y = batches[31]
    with torch.no_grad():
        ref, got = model.token_losses(x, y), fresh.token_losses(x, y)
        untrained = tg.GPT(rebuilt_args).token_losses(x, y)
    assert abs(float(got.mean()) - float(ref.mean())) < 0.05
    assert float((got - ref).abs().mean()) < 0.1 * float((untrained - ref).abs().mean())


def test_more_bits_round_trip_closer(trained):
    args, model, stats, batches = trained
    x, y = batches[32]
    with torch.no_grad():
        ref = model.token_losses(x, y)
    errors = []
    for bits in (3, 8):
        bits_args = tiny_args(QUANT_UNIFORM_BITS=bits)
        fresh = tg.GPT(bits_args)
        artifact, _ = tg.quantize_model(model, stats, bits_args, 0, CPU)
        fresh.load_state_dict(tg.dequantize_state(tg.deserialize_artifact(tg.serialize_artifact(artifact))))
        with torch.no_grad():
            errors.append(float((fresh.token_losses(x, y) - ref).abs().mean()))
    assert errors[1] < errors[0]


def test_deserialize_rejects_non_artifacts(trained):
    args, model, stats, _ = trained
    artifact = tg.quantize_model(model, stats, tiny_args(QUANT_UNIFORM_BITS=5), 0, CPU)[0]  # blobs included
    blob = tg.serialize_artifact(artifact)
    tg.deserialize_artifact(blob)
    name = next(iter(artifact["tensors"]))
    short_scales = dict(artifact, tensors=dict(artifact["tensors"]))
    c = artifact["tensors"][name]
    short_scales["tensors"][name] = tg.QuantCandidate(c.bits, c.q, c.scale[:2], 0.0)
    short_scales["tensors"][name].blob = tg.encode_quantized(c.q, c.scale[:2])
    factors_without_rank = dict(artifact, tensors=dict(artifact["tensors"]))  # LQER bytes (empty ones) at rank 0
    forged = factors_without_rank["tensors"][name] = tg.QuantCandidate(c.bits, c.q, c.scale, 0.0)
    empty = lzma.compress(b"", format=lzma.FORMAT_RAW, filters=tg.LZMA_FILTERS)
    forged.blob, forged.lowrank_bytes = tg.encode_quantized(c.q, c.scale) + empty, len(empty)
    for bad in (b"definitely not an artifact", blob[:-1], blob + b"\0", blob[:20] + bytes(10) + blob[30:],
                tg.ARTIFACT_MAGIC + blob[len(tg.ARTIFACT_MAGIC) + 1:], tg.serialize_artifact(short_scales),
                tg.serialize_artifact(dict(artifact, config={"NUM_LAYERS": 4})),
                tg.serialize_artifact(factors_without_rank)):
        with pytest.raises(ValueError, match="model.ptz is not an artifact"):
            tg.deserialize_artifact(bad, "model.ptz")


def test_tensors_from_bytes_takes_exactly_its_bytes():
    data = torch.arange(6, dtype=torch.int8).numpy().tobytes() + torch.ones(2, dtype=torch.float16).numpy().tobytes()
    q, scale = tg.tensors_from_bytes(data, [(torch.int8, [2, 3]), (torch.float16, [2])])
    assert q.tolist() == [[0, 1, 2], [3, 4, 5]] and scale.tolist() == [1.0, 1.0]
    assert tg.tensors_from_bytes(b"", [(torch.int8, [0, 4])])[0].shape == (0, 4)
    for specs in ([(torch.int8, [2, 3])], [(torch.int8, [2, 3]), (torch.float16, [3])], [(torch.int8, [-2, 5])],
                  [(torch.int8, [-2, -5])]):
        with pytest.raises(ValueError, match="left over|bytes for a"):
            tg.tensors_from_bytes(data, specs)


def test_an_empty_tensor_survives_the_artifact():
    """One layer leaves the U-Net no skip connection: a (0, dim) parameter, which must round-trip too."""
    args = tiny_args(NUM_LAYERS=1, SSM_LAYERS="", QUANT_UNIFORM_BITS=5)
    model = tg.GPT(args)
    assert model.skip_weights.numel() == 0
    batches = [(torch.randint(0, 128, (2, 32)), torch.randint(0, 128, (2, 32)))]
    artifact, _ = tg.quantize_model(model, tg.collect_calibration(model, batches, CPU, False), args, 0, CPU)
    back = tg.deserialize_artifact(tg.serialize_artifact(artifact))
    assert back["passthrough"]["skip_weights"].shape == (0, 64)


def test_submission_bytes():
    code = b"c" * 1000
    for n_model in (0, 12345, tg.SIZE_LIMIT_BYTES - 1000 - 1, tg.SIZE_LIMIT_BYTES - 1000,
                    tg.SIZE_LIMIT_BYTES - 1000 + 1):
        blob = b"x" * n_model
        sizes = tg.submission_bytes(code, blob)
        assert sizes["bytes_code"] == 1000 and sizes["bytes_model"] == n_model
        assert sizes["bytes_total"] == len(code) + len(blob)
        assert sizes["under_limit"] is (len(code) + len(blob) <= 16_000_000)
    assert tg.submission_bytes(code, b"x" * (16_000_000 - 1000))["under_limit"] is True
    assert tg.submission_bytes(code, b"x" * (16_000_000 - 999))["under_limit"] is False
    # bytes, not characters: the code is counted in UTF-8 bytes
    assert tg.submission_bytes("▁".encode("utf-8"), b"")["bytes_total"] == 3
