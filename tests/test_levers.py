"""LEVERS of the records, each off by default: depth recurrence, parallel residuals, the attention gate, MuonEq-R and
the training-context schedule. Every test here fails if its lever is silently a no-op; with all of them on, the
model stays causal, scores every target once, and its artifact re-scores to the same digits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import markov_batches, randomize_, shard, tiny_args
from test_distributed import STEP, body
from test_end_to_end import EXACT, HANG_TIMEOUT, RUN_ENV, clean_env, data_env, exact_lines, new_workdir, run_evaluate
from test_end_to_end import run_script
from test_model import VOCAB, T, changed, make_ids

# Every lever on a 4-layer model whose layers 0-1 are S4D mixers: the loop runs an S4D and an attention layer.
LEVERS = dict(RECUR_LAYERS="1,2", RECUR_LOOPS="2", PARALLEL_RESIDUAL_FROM="2", ATTN_GATE="12", MUON_ROW_NORM="1")
CPU_PLACE = tg.Place(distributed=False, rank=0, world_size=1, device=torch.device("cpu"))


def block_calls(model: tg.GPT, ids: torch.Tensor) -> list[int]:
    """The blocks a forward pass runs, in order."""
    calls: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model.hidden(ids)
    finally:
        for h in hooks:
            h.remove()
    return calls


# ---------------------------------------------------------------- depth recurrence


def test_recurrence_reuses_the_blocks_and_stores_nothing_more():
    torch.manual_seed(0)
    plain = tg.GPT(tiny_args())
    looped = tg.GPT(tiny_args(RECUR_LAYERS="1,2", RECUR_LOOPS="2"))
    assert looped.looping  # a model built to evaluate is the trained one: loop on
    ids = make_ids()
    assert block_calls(looped, ids) == [0, 1, 2, 1, 2, 1, 2, 3]  # 8 virtual layers from 4 blocks
    looped.looping = False
    assert block_calls(looped, ids) == [0, 1, 2, 3]
    shapes = {k: v.shape for k, v in looped.state_dict().items() if k != "skip_weights"}
    assert shapes == {k: v.shape for k, v in plain.state_dict().items() if k != "skip_weights"}
    # U-Net skips over the virtual order: 4 encoder and 4 decoder layers, the plain order using the first 2
    assert looped.skip_weights.shape == (4, 64) and plain.skip_weights.shape == (2, 64)


def test_recurrence_starts_at_its_fraction_of_the_run(tmp_path):
    args = tiny_args(RECUR_LAYERS="1", RECUR_START_FRAC="0.5", TRAIN_BATCH_TOKENS=str(8 * 32 * 2))
    files = [str(shard(tmp_path / "fineweb_train_000000.bin", torch.randint(0, 128, (20_000,))))]
    model = tg.GPT(args)
    step = tg.make_train_step(model, model, tg.build_optimizers(model, args), args, CPU_PLACE)
    loader = tg.DistributedTokenLoader(files, 128, 0, 1, CPU_PLACE.device)
    calls: list[int] = []
    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i))
    for progress, order in ((0.0, [0, 1, 2, 3]), (0.49, [0, 1, 2, 3]), (0.5, [0, 1, 1, 2, 3]), (1.0, [0, 1, 1, 2, 3])):
        calls.clear()
        step(loader, progress)
        assert calls == order * 8, progress  # 8 micro-batches, each through the order of that point of the run


def test_calibration_sums_a_recurrent_layer_over_its_passes():
    """A looped layer is stored once and quantized once: its H and gradient energy sum over every pass."""
    args = tiny_args(RECUR_LAYERS="1,2")
    torch.manual_seed(0)
    model = randomize_(tg.GPT(args), std=0.05)
    batches = markov_batches(VOCAB, 2, 4, T)
    fc = model.blocks[2].mlp.fc
    xs, gs = [], []

    def record(_module, inputs, output) -> None:
        xs.append(inputs[0].detach().reshape(-1, inputs[0].size(-1)))
        output.register_hook(lambda g: gs.append(g.reshape(-1, g.size(-1))))

    hook = fc.register_forward_hook(record)
    try:
        stats = tg.collect_calibration(model, batches, torch.device("cpu"), False)
    finally:
        hook.remove()
    assert len(xs) == len(gs) == 2 * len(batches)  # two passes per batch
    X, G = torch.cat(xs), torch.cat(gs)
    torch.testing.assert_close(stats["hessians"]["blocks.2.mlp.fc"], X.T @ X, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats["grad_energy"]["blocks.2.mlp.fc"], G.square().sum(0), rtol=1e-4, atol=1e-9)
    assert stats["tokens"] == 2 * 4 * T  # tokens, not passes: the predicted loss stays per token


# ---------------------------------------------------------------- parallel residuals


@pytest.mark.parametrize("layer", [1, 2])  # an S4D layer and an attention layer
def test_parallel_block_is_its_formula(layer):
    args = tiny_args(PARALLEL_RESIDUAL_FROM=str(layer))
    torch.manual_seed(0)
    model = randomize_(tg.GPT(args)).eval()
    block, earlier = model.blocks[layer], model.blocks[layer - 1]
    assert block.parallel and not earlier.parallel
    x, x0 = torch.randn(2, T, 64), torch.randn(2, T, 64)
    with torch.no_grad():
        mixer = block.attn if block.attn is not None else block.ssm
        xm = block.resid_mix[0] * x + block.resid_mix[1] * x0
        h = tg.rms_norm(xm) * block.ln_scale
        parallel = xm + block.mix_scale * mixer(h) + block.mlp_scale * block.mlp(h)
        torch.testing.assert_close(block(x, x0), parallel, rtol=1e-5, atol=1e-5)
        after_mixer = xm + block.mix_scale * mixer(h)
        sequential = after_mixer + block.mlp_scale * block.mlp(tg.rms_norm(after_mixer) * block.ln_scale)
        assert (sequential - parallel).abs().max() > 1e-3  # the two differ, so the check above means something
        block.parallel = False
        torch.testing.assert_close(block(x, x0), sequential, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- attention gate


def proj_input(attn: tg.CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The [B, T, H, D] attention output that reaches the output projection."""
    seen = []
    hook = attn.proj.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            attn(x)
    finally:
        hook.remove()
    return seen[0].view(*x.shape[:2], attn.num_heads, attn.head_dim)


@pytest.mark.parametrize("width", [12, 64])  # the sparse gate of #1787 and the dense one of #1784
def test_attention_gate_starts_at_one_half_and_gates_each_head(width):
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tiny_args(ATTN_GATE=str(width))))
    for p in (b.attn.gate for b in model.blocks if b.attn is not None):
        p.data.zero_()  # as built
    attn = model.blocks[2].attn
    assert attn.gate.shape == (4, width)
    x = torch.randn(2, T, 64)
    gated = proj_input(attn, x)
    gate, attn.gate = attn.gate, None
    plain = proj_input(attn, x)
    attn.gate = gate
    torch.testing.assert_close(gated, 0.5 * plain)  # every head starts at half its output
    with torch.no_grad():
        gate.normal_(0, 1.0)
    expected = torch.sigmoid(x[..., :width] @ gate.detach().T)  # [B, T, H]: one value per token and head
    assert expected.std(dim=-1).mean() > 0.1  # heads are gated differently
    torch.testing.assert_close(proj_input(attn, x), expected[..., None] * plain, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MuonEq-R


@pytest.mark.parametrize("row_norm", [False, True])
def test_muon_row_norm_equalises_the_rows_before_orthogonalising(row_norm):
    seen = []

    def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
        seen.append(g.clone())
        return tg.zeropower_via_newtonschulz5(g, steps)

    params = [torch.nn.Parameter(torch.zeros(8, 16)) for _ in range(2)]
    opt = tg.Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.0, orthogonalize=orthogonalize,
                  row_norm=row_norm)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(8, 16, generator=gen) * torch.logspace(-2, 1, 8)[:, None]  # rows of unequal size
    opt.step()
    norms = seen[0].norm(dim=-1)
    if row_norm:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:
        assert norms.max() > 100 * norms.min()
    assert tg.build_optimizers(tg.GPT(tiny_args(MUON_ROW_NORM="1")), tiny_args(MUON_ROW_NORM="1"))[0].row_norm


# ---------------------------------------------------------------- the training-context schedule


def test_schedule_stages_and_their_errors():
    args = tg.Hyperparameters(env={"TRAIN_SEQ_SCHEDULE": "1024@0.1, 2048@0.7, 3072@1.0", "TRAIN_SEQ_LEN": "3072"})
    assert args.train_seq_schedule == ((1024, 0.1), (2048, 0.7), (3072, 1.0))
    lengths = [args.train_state(p)[0] for p in (0.0, 0.1, 0.1001, 0.7, 0.71, 1.0)]
    assert lengths == [1024, 1024, 2048, 2048, 3072, 3072]
    assert [args.batch_layout(8, n)[1] for n in (1024, 2048, 3072)] == [96, 48, 32]  # the same tokens per step
    assert tg.GPT(tiny_args(TRAIN_SEQ_SCHEDULE="16@0.5,32@1", EVAL_SEQ_LEN="64")).blocks[2].attn.rotary.cos.size(0) \
        == 64
    for value in ("1024", "1024@x", "2048@0.7,1024@0.1,3072@1", "1024@0.5,3072@0.9", "1@0.5,3072@1", "0@1"):
        with pytest.raises(ValueError, match="TRAIN_SEQ_SCHEDULE"):
            tg.Hyperparameters(env={"TRAIN_SEQ_SCHEDULE": value, "TRAIN_SEQ_LEN": "3072"})
    with pytest.raises(ValueError, match="TRAIN_SEQ_SCHEDULE ends at length 3072, not at TRAIN_SEQ_LEN=2048"):
        tg.Hyperparameters(env={"TRAIN_SEQ_SCHEDULE": "1024@0.5,3072@1"})
    with pytest.raises(ValueError, match="TRAIN_BATCH_TOKENS"):  # 786,432 / 8 micro-batches is no multiple of 1000
        tg.set_up(tg.Hyperparameters(env={"TRAIN_SEQ_SCHEDULE": "1000@0.5,2048@1"}), False, 0, 1, 0)


@pytest.mark.parametrize("env,states", [
    ({}, {(32, False): 0.0}),
    ({"TRAIN_SEQ_SCHEDULE": "16@0.3,32@1"}, {(16, False): 0.0, (32, False): 0.3}),
    ({"TRAIN_SEQ_SCHEDULE": "16@0.3,32@1", "RECUR_LAYERS": "1"},
     {(16, False): 0.0, (32, False): 0.3, (32, True): 0.35}),
    ({"TRAIN_SEQ_SCHEDULE": "16@0.5,32@1", "RECUR_LAYERS": "1"},
     {(16, False): 0.0, (16, True): 0.35, (32, True): 0.5}),
    ({"TRAIN_SEQ_SCHEDULE": "16@0.3,32@1", "RECUR_LAYERS": "1", "RECUR_START_FRAC": "0"},
     {(16, True): 0.0, (32, True): 0.3}),
])
def test_the_warm_up_primes_every_state_of_the_run_and_restores_the_start(tmp_path, env, states):
    args = tiny_args(TRAIN_BATCH_TOKENS=str(8 * 32 * 2), **env)
    found = tg.state_changes(args)
    assert list(found) == list(states) and all(abs(found[s] - p) < 1e-6 for s, p in states.items())
    # every progress a run passes through is in one of these states (the probes miss none)
    assert {args.train_state(i / 1000) for i in range(1001)} == set(states)
    files = [str(shard(tmp_path / "fineweb_train_000000.bin", torch.randint(0, 128, (20_000,))))]
    model = tg.GPT(args)
    optimizers = tg.build_optimizers(model, args)
    step = tg.make_train_step(model, model, optimizers, args, CPU_PLACE)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def recording_step(loader, progress):
        seen.append(args.train_state(progress))
        return step(loader, progress)

    new_loader = lambda: tg.DistributedTokenLoader(files, 128, 0, 1, CPU_PLACE.device)  # noqa: E731
    loader = tg.warm_up(recording_step, model, optimizers, new_loader, 1, print, tuple(found.values()))
    assert seen == list(states)  # one step at least in each state, in the order the run meets them
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert all(len(opt.state) == 0 for opt in optimizers) and loader.stream.pos == 0


def test_a_step_takes_the_same_tokens_at_every_length(tmp_path):
    args = tiny_args(TRAIN_BATCH_TOKENS=str(8 * 32 * 2), TRAIN_SEQ_SCHEDULE="16@0.5,32@1")
    files = [str(shard(tmp_path / "fineweb_train_000000.bin", torch.randint(0, 128, (20_000,))))]
    model = tg.GPT(args)
    step = tg.make_train_step(model, model, tg.build_optimizers(model, args), args, CPU_PLACE)
    loader = tg.DistributedTokenLoader(files, 128, 0, 1, CPU_PLACE.device)
    shapes = []
    real = loader.next_batch
    loader.next_batch = lambda seqs, seq_len: shapes.append((seqs, seq_len)) or real(seqs, seq_len)
    step(loader, 0.5)
    step(loader, 0.6)
    assert shapes == [(4, 16)] * 8 + [(2, 32)] * 8


def test_lever_knobs_are_checked_and_shape_the_artifact():
    for env, name in (({"RECUR_LAYERS": "1,3"}, "RECUR_LAYERS"), ({"RECUR_LAYERS": "3,4"}, "RECUR_LAYERS"),
                      ({"PARALLEL_RESIDUAL_FROM": "4"}, "PARALLEL_RESIDUAL_FROM"), ({"ATTN_GATE": "65"}, "ATTN_GATE"),
                      ({"RECUR_LOOPS": "0"}, "RECUR_LOOPS"), ({"ATTN_GTE": "1"}, "ATTN_GATE")):
        with pytest.raises(ValueError, match=name):
            tiny_args(**env)
    assert {"RECUR_LAYERS", "RECUR_LOOPS", "PARALLEL_RESIDUAL_FROM", "ATTN_GATE"} <= set(tg.MODEL_KEYS)
    defaults = tg.Hyperparameters(env={})
    assert not defaults.recur_layers and not defaults.parallel_residual_from and not defaults.attn_gate
    assert not defaults.muon_row_norm and defaults.train_seq_schedule == ((2048, 1.0),)


# ---------------------------------------------------------------- every lever on


@pytest.mark.parametrize("mode", ["replace", "parallel"])
def test_every_lever_on_is_causal(mode):
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tiny_args(SSM_MODE=mode, **LEVERS))).eval()
    ids = make_ids(seed=1)
    targets = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h0, l0 = model.hidden(ids), model.token_losses(ids, targets)
        for t in (1, 8, 16, 17, 31):
            ids2 = changed(ids, t)
            h1, l1 = model.hidden(ids2), model.token_losses(ids2, targets)
            torch.testing.assert_close(h1[:, :t], h0[:, :t], atol=2e-5, rtol=0)
            torch.testing.assert_close(l1[:, :t], l0[:, :t], atol=2e-5, rtol=0)
            assert (h1[:, t] - h0[:, t]).abs().max() > 1e-3


def test_every_lever_on_scores_each_target_once_at_a_longer_context():
    args = tiny_args(EVAL_SEQ_LEN="64", EVAL_STRIDE="16", TTT_CHUNK_TOKENS="128", TTT_LORA_CHUNK="16",
                     TTT_LORA_RANK="4", TTT_LORA_DOCS="2", **LEVERS)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(args), std=0.05)
    (x, y), = markov_batches(VOCAB, 1, 1, 499)
    val = {"tokens": torch.cat((x[0, :1], y[0])), "target_bytes": torch.ones(499, dtype=torch.int64)}
    for stride in (64, 16):
        per_target = torch.zeros(499, dtype=torch.float64)
        _, _, count = tg.evaluate(model.token_losses, val, 64, stride, 8, 0, 1, torch.device("cpu"), False, per_target)
        assert count == 499 and (per_target > 0).all()
    val["tokens"][val["tokens"] == 1] = 2
    val["tokens"][[0, 150, 320]] = 1  # three documents (BOS is 1), each longer than the window
    per_target = torch.zeros(499, dtype=torch.float64)
    _, _, count, facts = tg.evaluate_lora(model, val, args, 0, 1, False, per_target)
    assert count == 499 and (per_target > 0).all() and facts["score_first"] and facts["updates"] >= 3


# ---------------------------------------------------------------- a run with every lever on (subprocesses)

# 3 layers (S4D in layer 0), layer 1 looped once from half the run, layer 2 parallel, the sparse gate, MuonEq-R,
# 32 then 64 tokens of context, and evaluation at 128, longer than any training sequence.
LEVER_RUN = dict(RUN_ENV, NUM_LAYERS="3", RECUR_LAYERS="1", RECUR_START_FRAC="0.5", PARALLEL_RESIDUAL_FROM="2",
                 ATTN_GATE="12", MUON_ROW_NORM="1", TRAIN_SEQ_SCHEDULE="32@0.3,64@1", ITERATIONS="12",
                 EVAL_SEQ_LEN="128", EVAL_STRIDE="64", RUN_ID="levers")


@pytest.fixture(scope="module")
def lever_run(demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "levers")
    proc = run_script(workdir, clean_env(**data_env(demo_data_dir), **LEVER_RUN))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    log = body((workdir / "logs" / "levers.txt").read_text(encoding="utf-8"))
    return types.SimpleNamespace(workdir=workdir, log=log, artifact=workdir / "final_model.ptz")


def test_a_run_with_every_lever_trains_on_schedule(lever_run):
    log = lever_run.log
    assert "train_states: seq_len:32 recurrence:0 from:0.000, seq_len:64 recurrence:0 from:0.300, " \
           "seq_len:64 recurrence:1 from:0.500" in log
    assert "warmup_step:3/3" in log  # WARMUP_STEPS=2 became one step in each of the three states
    # progress is step / 12: 4/12 is past 0.3, 6/12 reaches 0.5
    assert re.findall(r"^train_state .*$", log, re.M) == ["train_state step:4 seq_len:64 recurrence:0",
                                                          "train_state step:6 seq_len:64 recurrence:1"]
    assert "the loop was never trained" not in log
    config = tg.deserialize_artifact(lever_run.artifact.read_bytes())["config"]
    assert {k: config[k] for k in ("RECUR_LAYERS", "RECUR_LOOPS", "PARALLEL_RESIDUAL_FROM", "ATTN_GATE")} == \
        {"RECUR_LAYERS": "1", "RECUR_LOOPS": "1", "PARALLEL_RESIDUAL_FROM": "2", "ATTN_GATE": "12"}
    assert re.search(r"^quant_tensor blocks\.1\.attn\.c_q\.weight bits:", log, re.M)  # the looped layer, once
    assert len(re.findall(r"^quant_tensor blocks\.1\.attn\.c_q\.weight ", log, re.M)) == 1
    assert set(exact_lines(log)) == {"roundtrip", "sliding_window", "doc_isolated", "ttt"}


def test_the_lever_artifact_rescores_identically(lever_run, demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "levers_eval")
    env = clean_env(**data_env(demo_data_dir), **{k: LEVER_RUN[k] for k in (
        "VOCAB_SIZE", "EVAL_SEQ_LEN", "EVAL_STRIDE", "VAL_MAX_TOKENS", "TTT_CHUNK_TOKENS")}, RUN_ID="levers_eval")
    proc = run_evaluate(workdir, env, "--artifact", str(lever_run.artifact))
    assert proc.returncode == 0, proc.stderr[-5000:]
    again = (workdir / "logs" / "levers_eval.txt").read_text(encoding="utf-8")
    assert {k: v[0] for k, v in exact_lines(again).items()} == {k: v[0] for k, v in exact_lines(lever_run.log).items()}


def test_two_processes_with_every_lever_follow_one(tmp_path_factory, demo_data_dir):
    env = dict(LEVER_RUN, ITERATIONS="8", WARMUP_STEPS="0", TRAIN_BATCH_TOKENS="4096", TRAIN_LOG_EVERY="1",
               EVAL_STRIDE="0", TTT_MODE="off", VAL_MAX_TOKENS="4000", CHECKPOINT_PATH="", **data_env(demo_data_dir))
    curves, finals = {}, {}
    for nproc in (1, 2):
        workdir = new_workdir(tmp_path_factory, f"levers_dist{nproc}")
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if nproc == 2 else []
        proc = subprocess.run([sys.executable, *launcher, "train_gpt.py"], cwd=workdir,
                              env=clean_env(**dict(env, RUN_ID=f"n{nproc}", OMP_NUM_THREADS="1")),
                              capture_output=True, text=True, timeout=HANG_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = body((workdir / "logs" / f"n{nproc}.txt").read_text())
        curves[nproc] = [float(v) for _, v in STEP.findall(log)]
        finals[nproc] = json.loads((workdir / "logs" / f"n{nproc}.json").read_text())["val_loss"]
        assert "train_state step:3 seq_len:64 recurrence:0" in log and "train_state step:4 seq_len:64 recurrence:1" in log
    assert "replicas_in_sync:True" in log and len(curves[1]) == 8
    assert max(abs(a - b) for a, b in zip(curves[1], curves[2])) < 2e-3, curves
    assert abs(finals[1] - finals[2]) < 2e-3 and curves[1][-1] < curves[1][0] - 1.0
    assert EXACT.search(log)
