"""POST-TRAINING QUANTIZATION: RTN and GPTQ ranges, GPTQ's advantage on real inputs, the artifact round trip and
the size rule."""

from __future__ import annotations

import io
import lzma

import pytest
import torch

import train_gpt as tg
from conftest import markov_batches, tiny_args, tiny_env


def hessian_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, H: torch.Tensor) -> float:
    d = (w.double() - q.double() * scale.double()[:, None])
    return float(torch.trace(d @ H.double() @ d.T))


def check_range(q: torch.Tensor, scale: torch.Tensor, rows: int, bits: int) -> None:
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8
    assert scale.dtype == torch.float16 and scale.shape == (rows,)
    assert (scale > 0).all()
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT trained ~30 steps on a Markov chain, with GPTQ Hessians from 4 calibration batches."""
    torch.manual_seed(0)
    args = tiny_args()
    model = tg.GPT(args)
    optimizers = tg.build_optimizers(model, args)
    batches = markov_batches(args.vocab_size, 34, 16, args.train_seq_len, seed=0)
    first = None
    for x, y in batches[:30]:
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
    assert loss.item() < first - 0.5, "the tiny model did not train"
    model.eval()
    hessians = tg.collect_hessians(model, batches[30:], torch.device("cpu"), False)
    return args, model, hessians, batches


def group_weight(model, name):
    group = next(g for g in tg.gptq_groups(model) if g[0] == name)
    state = model.state_dict()
    return torch.cat([state[f"{n}.weight"] for n in group]).float()


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize("bits", [5, 8])
def test_quantize_rtn_range_and_clip_search(bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 40)
    w[3] *= 10  # rows of different magnitude get their own scale
    w[5, 7] = 25.0  # an outlier
    q, scale = tg.quantize_rtn(w, bits)
    check_range(q, scale, 24, bits)
    qmax = 2 ** (bits - 1) - 1
    assert (q.abs().amax(dim=1) == qmax).all()  # every row uses its full range
    # the clip search never does worse than no clipping (scale = absmax / qmax, fp16-rounded)
    plain = (w.abs().amax(dim=1) / qmax).half().float()
    plain_err = ((w - (w / plain[:, None]).round().clamp(-qmax, qmax) * plain[:, None]) ** 2).sum(1)
    err = ((w - q.float() * scale.float()[:, None]) ** 2).sum(1)
    assert (err <= plain_err + 1e-6).all()
    assert scale[3] > 5 * scale[0]


@pytest.mark.parametrize("bits", [5, 8])
def test_gptq_range(trained, bits):
    _, model, hessians, _ = trained
    w = group_weight(model, "blocks.2.attn.c_q")  # Q, K and V stacked: 64 + 32 + 32 rows
    q, scale = tg.gptq_quantize(w, hessians["blocks.2.attn.c_q"], bits, 16, 0.01)
    assert q.shape == w.shape
    check_range(q, scale, w.size(0), bits)
    assert int(q.abs().max()) == 2 ** (bits - 1) - 1


def test_collect_hessians_covers_every_gptq_group(trained):
    args, model, hessians, batches = trained
    groups = tg.gptq_groups(model)
    assert set(hessians) == {g[0] for g in groups}
    names = {n for g in groups for n in g}
    for i, block in enumerate(model.blocks):
        assert f"blocks.{i}.mlp.fc" in names and f"blocks.{i}.mlp.proj" in names
        if block.attn is not None:
            assert [f"blocks.{i}.attn.c_q", f"blocks.{i}.attn.c_k", f"blocks.{i}.attn.c_v"] in groups
        if block.ssm is not None:
            assert f"blocks.{i}.ssm.in_proj" in names and f"blocks.{i}.ssm.out_proj" in names
    # each Hessian is the sum of x^T x over all calibration tokens: symmetric PSD, trace = sum of squared inputs
    H = hessians["blocks.2.mlp.fc"]
    torch.testing.assert_close(H, H.T)
    assert torch.linalg.eigvalsh(H.double()).min() > -1e-6 * H.diagonal().max()
    inputs = []
    hook = model.blocks[2].mlp.fc.register_forward_hook(lambda _m, inp, _o: inputs.append(inp[0]))
    try:
        with torch.no_grad():
            for x, _ in batches[30:]:
                model.hidden(x)
    finally:
        hook.remove()
    X = torch.cat([i.reshape(-1, i.size(-1)) for i in inputs])
    assert X.size(0) == 4 * 16 * args.train_seq_len
    torch.testing.assert_close(H, X.T @ X, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- GPTQ beats round-to-nearest


@pytest.mark.parametrize("name", ["blocks.2.mlp.fc", "blocks.3.attn.c_q", "blocks.0.ssm.in_proj"])
@pytest.mark.parametrize("bits", [5, 8])
def test_gptq_beats_rtn_on_a_trained_layer(trained, name, bits):
    _, model, hessians, _ = trained
    w, H = group_weight(model, name), hessians[name]
    q_g, s_g = tg.gptq_quantize(w, H, bits, 16, 0.01)
    q_r, s_r = tg.quantize_rtn(w, bits)
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
            q_g, s_g = tg.gptq_quantize(w, H, bits, block_size, 0.01)
            q_r, s_r = tg.quantize_rtn(w, bits)
            check_range(q_g, s_g, rows, bits)
            assert hessian_error(w, q_g, s_g, H) < 0.5 * hessian_error(w, q_r, s_r, H)


def test_gptq_dead_inputs():
    """An input that never fires (zero Hessian row/column) must not break the solve; its weights become 0."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(512, 16, generator=gen)
    X[:, 5] = 0
    w = torch.randn(8, 16, generator=gen)
    q, scale = tg.gptq_quantize(w, X.T @ X, 5, 4, 0.01)
    check_range(q, scale, 8, 5)
    assert (q[:, 5] == 0).all()
    assert (q[:, :5] != 0).any()


# ---------------------------------------------------------------- the artifact


def test_quantize_model_covers_every_tensor(trained):
    args, model, hessians, _ = trained
    artifact = tg.quantize_model(model, hessians, args)
    assert artifact["format"] == tg.ARTIFACT_FORMAT
    state = model.state_dict()
    assert set(artifact["tensors"]) == set(state)
    gptq_names = {f"{n}.weight" for g in tg.gptq_groups(model) for n in g}
    tables = {"tok_emb.weight", "bigram.embed.weight", "bigram.proj.weight", "ve_table.weight", "ve_proj.weight"}
    for name, entry in artifact["tensors"].items():
        if name in gptq_names:
            assert entry["bits"] == args.quant_bits
            check_range(entry["q"], entry["scale"], state[name].size(0), args.quant_bits)
            assert entry["q"].shape == state[name].shape
        elif name in tables:
            assert entry["bits"] == args.embed_quant_bits
        else:
            assert "w" in entry and torch.equal(entry["w"], state[name].float())
    assert artifact["tensors"]["blocks.0.ssm.kernel_taps"]["w"].dtype == torch.float32
    assert artifact["config"]["SSM_LAYERS"] == "0,1" and artifact["config"]["NUM_LAYERS"] == "4"
    assert set(artifact["config"]) == set(tg.ARTIFACT_KEYS)


@pytest.mark.parametrize("kernel", ["fir", "s4d"])
def test_s4d_kernel_parameters_are_never_quantized_whatever_their_size(kernel):
    # 128 channels x 1024 taps = 131,072 values: larger than any "small tensor" threshold
    args = tiny_args(MODEL_DIM="128", SSM_KERNEL=kernel, SSM_KERNEL_SIZE="1024", SSM_STATE_DIM="2048")
    torch.manual_seed(0)
    model = tg.GPT(args)
    batches = [(torch.randint(0, args.vocab_size, (2, 32)), None) for _ in range(2)]
    hessians = tg.collect_hessians(model, batches, torch.device("cpu"), use_autocast=False)
    tensors = tg.quantize_model(model, hessians, args)["tensors"]
    ssm = {n: t for n, t in model.state_dict().items() if ".ssm." in n and "proj" not in n}
    assert ssm and max(t.numel() for t in ssm.values()) > 65_536
    for name, t in ssm.items():
        assert "q" not in tensors[name] and torch.equal(tensors[name]["w"], t.float()), name


def test_artifact_round_trip(trained):
    args, model, hessians, batches = trained
    blob = tg.serialize_artifact(tg.quantize_model(model, hessians, args))
    assert isinstance(blob, bytes) and blob[:6] == b"\xfd7zXZ\x00"  # xz container
    artifact = tg.deserialize_artifact(blob)
    original = tg.quantize_model(model, hessians, args)
    assert artifact["config"] == original["config"]
    for name, entry in original["tensors"].items():
        for key, value in entry.items():
            got = artifact["tensors"][name][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value

    # rebuild the model from the artifact's own config, as EVAL_ARTIFACT does, and load strictly
    rebuilt_args = tg.Hyperparameters(env=dict(tiny_env(), **artifact["config"]))
    fresh = tg.GPT(rebuilt_args)
    fresh.load_state_dict(tg.dequantize_state(artifact), strict=True)
    fresh.eval()
    x, y = batches[31]
    with torch.no_grad():
        ref = model.token_losses(x, y)
        got = fresh.token_losses(x, y)
        untrained = tg.GPT(rebuilt_args).token_losses(x, y)
    assert abs(float(got.mean()) - float(ref.mean())) < 0.05
    assert float((got - ref).abs().mean()) < 0.1 * float((untrained - ref).abs().mean())


def test_more_bits_round_trip_closer(trained):
    args, model, hessians, batches = trained
    x, y = batches[32]
    with torch.no_grad():
        ref = model.token_losses(x, y)
    errors = []
    for bits in (3, 8):
        bits_args = tiny_args(QUANT_BITS=bits)
        fresh = tg.GPT(bits_args)
        state = tg.dequantize_state(tg.deserialize_artifact(
            tg.serialize_artifact(tg.quantize_model(model, hessians, bits_args))))
        fresh.load_state_dict(state, strict=True)
        with torch.no_grad():
            errors.append(float((fresh.token_losses(x, y) - ref).abs().mean()))
    assert errors[1] < errors[0]


def test_deserialize_rejects_non_artifacts():
    with pytest.raises(ValueError, match="model.ptz is not a"):
        tg.deserialize_artifact(b"definitely not an artifact", "model.ptz")
    with pytest.raises(ValueError, match="model.ptz is not a"):
        tg.deserialize_artifact(lzma.compress(b"not a torch file"), "model.ptz")
    for obj in ({"format": "something_else", "tensors": {}}, {"tensors": {}}, [1, 2, 3]):
        buf = io.BytesIO()
        torch.save(obj, buf)
        with pytest.raises(ValueError, match=tg.ARTIFACT_FORMAT):
            tg.deserialize_artifact(lzma.compress(buf.getvalue()))


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
