"""Per-document LoRA TTT (TTT_MODE=lora): no loss counted for a target depends on a later token, within a document,
across chunk boundaries, across documents and the global phase, and across ranks; the flag that says so is measured
from the positions each update read; every target is scored once with the same bytes as the other passes; a
document's score does not depend on the order or company it is scored in; with no learning rate it is the
document-isolated pass, which on a stream of one document is the sliding pass."""

from __future__ import annotations

import math

import pytest
import torch

import train_gpt as tg
from conftest import markov_batches, randomize_, tiny_args, train_tiny
from test_distributed import run_on_two_ranks

BOS = 1
# 8-target chunks in 32-token windows, 3 documents a batch; the phase follows the documents starting in the first
# quarter of the stream (here the first three, targets [0, 200)).
LORA_ENV = dict(EVAL_SEQ_LEN="32", EVAL_STRIDE="8", TTT_MODE="lora", TTT_LORA_CHUNK="8",
                TTT_LORA_DOCS="3", TTT_LORA_RANK="4", TTT_LORA_LR="0.001", TTT_CHUNK_TOKENS="64",
                TTT_PHASE_FRAC="0.25", TTT_PHASE_LR="0.01")
# Documents of 70, 5, 125 (across the phase bound), 133, 1, 126 and 139 targets: several longer than the window.
DOC_STARTS = (0, 70, 75, 200, 333, 334, 460)
CPU = torch.device("cpu")


def doc_stream(n: int = 600, seed: int = 3, starts=DOC_STARTS) -> torch.Tensor:
    (x, y), = markov_batches(128, 1, 1, n - 1, seed=seed)
    tokens = torch.cat((x[0, :1], y[0]))
    tokens[tokens == BOS] = 2  # the only documents are the ones placed here
    tokens[list(starts)] = BOS
    return tokens


def val_of(tokens: torch.Tensor) -> dict:
    n = tokens.numel() - 1
    return {"tokens": tokens, "target_bytes": 1 + torch.arange(n) % 3}  # unequal bytes, so their sum means something


def tiny_model(args: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    return randomize_(tg.GPT(args), std=0.05, seed=seed)


def lora_per_target(tokens: torch.Tensor, seed: int = 0, **env) -> tuple[torch.Tensor, tuple]:
    args = tiny_args(**dict(LORA_ENV, **env))
    per_target = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
    out = tg.evaluate_lora(tiny_model(args, seed), val_of(tokens), args, 0, 1, False, per_target)
    return per_target, out


def changed(tokens: torch.Tensor, t: int) -> torch.Tensor:
    assert tokens[t] != BOS  # the same documents, one token different
    out = tokens.clone()
    out[t] = 2 + (out[t] + 17) % 126
    return out


# Inside the first document, on both sides of chunk boundaries (token 9 is the first one chunk 1 reads), past the
# first window, a document's last token, the short document, the document across the phase bound and the last token
# the phase reads, after the phase, and the stream's last token.
POSITIONS = (5, 9, 10, 40, 69, 72, 84, 150, 199, 201, 335, 400, 598, 599)


def test_the_global_phase_takes_one_step_a_chunk_on_a_cosine_from_its_rate(monkeypatch):
    """Four chunks of the 200 phase targets: one SGD step each, every weight trained, at TTT_PHASE_LR times
    (1 + cos(pi c / 4)) / 2 (above zero to the end), and the weights frozen again afterwards."""
    steps = []
    real = tg.sgd_step

    def spy(token_losses, params, optimizer, *rest):
        steps.append((optimizer.param_groups[0]["lr"], len(params), all(p.requires_grad for p in params)))
        return real(token_losses, params, optimizer, *rest)

    monkeypatch.setattr(tg, "sgd_step", spy)
    args = tiny_args(**LORA_ENV)
    model = tiny_model(args)
    tg.evaluate_lora(model, val_of(doc_stream()), args, 0, 1, False)
    rates = [0.01 * (1 + math.cos(math.pi * c / 4)) / 2 for c in range(4)]
    assert [lr for lr, _, _ in steps] == pytest.approx(rates) and rates[-1] > 0
    assert all(n == len(list(model.parameters())) and trains for _, n, trains in steps)
    assert all(p.requires_grad for p in model.parameters())  # evaluate_lora hands the model back trainable


def test_no_loss_depends_on_a_later_token():
    tokens = doc_stream()
    base, (loss, bpb, count, facts) = lora_per_target(tokens)
    assert count == tokens.numel() - 1 and (base > 0).all()  # every target scored (once: the count is checked)
    assert facts["score_first"] is True and facts["updates_on_unscored_targets"] == 0
    phase = {k: facts["phase"][k] for k in ("documents", "targets", "chunks", "lr")}
    assert facts["documents"] == 7 and phase == {"documents": 3, "targets": 200, "chunks": 4, "lr": 0.01}
    assert facts["phase"]["seconds"] > 0 and facts["phase"]["forecast_seconds"] > 0
    assert facts["on"] == "dequantized artifact" and facts["updates"] > 10
    for t in POSITIONS:
        after, _ = lora_per_target(changed(tokens, t))
        # target j predicts token j + 1: targets before t - 1 never saw token t, in a window or through an update
        assert torch.equal(after[:t - 1], base[:t - 1]), t
        assert not torch.equal(after[t - 1:], base[t - 1:]), t


def test_no_prediction_depends_on_its_own_target(monkeypatch):
    """Target t - 1's loss may change with token t, its answer, but its predicted distribution may not: beside each
    loss the pass here also records the loss a fixed token (0) would have had in the same forward, and that does
    not move at t - 1 either. An update that trained on the next chunk's first target would show here only."""
    real_losses, real_record, probe = tg.GPT.token_losses, tg.record_scores, {}

    def token_losses(self, ids, targets, lora=None):
        with torch.no_grad():
            probe["last"] = real_losses(self, ids, torch.zeros_like(targets), lora).double()
        return real_losses(self, ids, targets, lora)

    def record(losses, pos, now, target_bytes, tally, per_target):
        real_record(losses, pos, now, target_bytes, tally, per_target)
        probe["per_target"].index_put_((pos[now],), probe["last"][now], accumulate=True)

    monkeypatch.setattr(tg.GPT, "token_losses", token_losses)
    monkeypatch.setattr(tg, "record_scores", record)

    def probes(tokens: torch.Tensor) -> torch.Tensor:
        probe["per_target"] = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
        lora_per_target(tokens)
        return probe["per_target"]

    tokens = doc_stream()
    base = probes(tokens)
    for t in (9, 17, 84, 201, 343):  # the first target of a document's next chunk predicts token t
        assert torch.equal(probes(changed(tokens, t))[:t], base[:t]), t


def test_a_document_is_seen_by_its_own_targets_and_after_the_phase_only():
    """Without the phase a document's tokens reach no other document's scores; with it, only documents after the
    phase's bound see those before it."""
    tokens = doc_stream()
    alone, _ = lora_per_target(tokens, TTT_PHASE_FRAC="0")
    with_phase, _ = lora_per_target(tokens)
    for t, (a, z) in ((40, (0, 70)), (250, (200, 333)), (400, (334, 460))):
        after, _ = lora_per_target(changed(tokens, t), TTT_PHASE_FRAC="0")
        differs = torch.nonzero(after != alone).flatten()
        assert differs.min() >= t - 1 and differs.max() < z, t
    after, _ = lora_per_target(changed(tokens, 40))
    differs = torch.nonzero(after != with_phase).flatten()
    assert differs.min() == 39 and differs.max() >= 200  # the phase trained on it, before scoring the rest


def test_the_score_first_flag_is_measured(monkeypatch):
    """The flag comes from the targets each update's loss weights read, against the targets marked scored: hold
    the marks back until the end (every target is still scored once, in the same forwards), and every update and
    every phase step is caught."""
    real, held = tg.record_scores, []

    def marked_late(losses, pos, now, target_bytes, tally, per_target):
        unmarked = dict(tally, scored=torch.zeros_like(tally["scored"]))
        real(losses, pos, now, target_bytes, unmarked, per_target)  # the sums, into the same tensor
        held.append((pos, now))

    monkeypatch.setattr(tg, "record_scores", marked_late)
    _, (_, _, count, facts) = lora_per_target(doc_stream())
    assert count == 599 and held and facts["score_first"] is False
    assert facts["updates_on_unscored_targets"] == facts["updates"] + facts["phase"]["chunks"]


def test_bytes_and_count_are_the_other_passes():
    tokens = doc_stream()
    args = tiny_args(**LORA_ENV)
    model = tiny_model(args)
    val = val_of(tokens)
    passes = [tg.evaluate(model.token_losses, val, 32, 8, 4, 0, 1, CPU, False),
              tg.evaluate_documents(model.token_losses, val, args, BOS, 0, 1, CPU, False),
              tg.evaluate_lora(model, val, args, 0, 1, False)[:3]]
    byte_counts = [loss * count / (math.log(2) * bpb) for loss, bpb, count in passes]
    assert {count for _, _, count in passes} == {599}
    assert byte_counts == pytest.approx([float(val["target_bytes"].sum())] * 3, rel=1e-9)


def test_without_learning_rate_it_is_the_document_isolated_pass():
    tokens = doc_stream()
    frozen, (loss, bpb, count, _) = lora_per_target(tokens, TTT_LORA_LR="0", TTT_PHASE_LR="0")
    args = tiny_args(**LORA_ENV)
    isolated = torch.zeros_like(frozen)
    ref = tg.evaluate_documents(tiny_model(args).token_losses, val_of(tokens), args, BOS, 0, 1, CPU, False, isolated)
    torch.testing.assert_close(frozen, isolated, rtol=0, atol=1e-5)
    assert (loss, bpb, count) == pytest.approx(ref, abs=1e-6)


def test_past_the_deadline_nothing_adapts_and_it_is_the_document_isolated_pass():
    """A deadline already passed leaves the pass what fresh adapters compute, without building them, and skips the
    global phase: every target scored once, as the document-isolated pass scores it."""
    tokens = doc_stream()
    isolated = torch.zeros(599, dtype=torch.float64)
    args = tiny_args(**LORA_ENV)
    ref = tg.evaluate_documents(tiny_model(args).token_losses, val_of(tokens), args, BOS, 0, 1, CPU, False, isolated)
    for frac, skipped in (("0", False), ("0.25", True)):  # no phase asked for; a phase asked for
        args = tiny_args(**dict(LORA_ENV, TTT_PHASE_FRAC=frac))
        late = torch.zeros(599, dtype=torch.float64)
        loss, bpb, count, facts = tg.evaluate_lora(tiny_model(args), val_of(tokens), args, 0, 1, False, late,
                                                   deadline=-math.inf)
        torch.testing.assert_close(late, isolated, rtol=0, atol=1e-5)
        assert (loss, bpb, count) == pytest.approx(ref, abs=1e-6)
        assert facts["updates"] == 0 and facts["documents_not_adapted"] == facts["documents"] == 7
        assert facts["phase"] is None and facts["phase_skipped"] is skipped and facts["score_first"] is True
        _, _, _, timely = tg.evaluate_lora(tiny_model(args), val_of(tokens), args, 0, 1, False)
        assert timely["updates"] > 0 and timely["documents_not_adapted"] == 0 and not timely["phase_skipped"]
        assert (timely["phase"] is None) is not skipped


def test_updates_stop_at_the_deadline_inside_a_batch(monkeypatch):
    """One batch of all seven documents (a first batch adapts whatever the forecast), on a clock that reads one
    second later at each look: the batch starts at 1 s and chunk i looks at 2 + i s, so with the deadline at 5 s the
    adapters take the steps after chunks 0, 1 and 2, score chunk 3 with them as the full pass does, and score the
    rest with them too, without gradients or steps. Every target is still scored once, and every score up to chunk
    3 is the full pass's."""
    tokens = doc_stream()
    args = tiny_args(**dict(LORA_ENV, TTT_LORA_DOCS="7", TTT_PHASE_FRAC="0"))
    full = torch.zeros(599, dtype=torch.float64)
    *_, whole = tg.evaluate_lora(tiny_model(args), val_of(tokens), args, 0, 1, False, full)
    clock = iter(range(10_000))
    monkeypatch.setattr(tg.time, "perf_counter", lambda: float(next(clock)))
    model, forwards, steps = tiny_model(args), [], []
    token_losses, adam_step = model.token_losses, torch.optim.AdamW.step

    def spy(ids, targets, lora=None):  # each chunk's forward: with adapters? with gradients?
        forwards.append((lora is not None, torch.is_grad_enabled()))
        return token_losses(ids, targets, lora)

    model.token_losses = spy
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or adam_step(self, *a, **k))
    cut = torch.zeros(599, dtype=torch.float64)
    *_, count, facts = tg.evaluate_lora(model, val_of(tokens), args, 0, 1, False, cut, deadline=5.0)
    assert count == 599 and facts["score_first"] is True and facts["documents_not_adapted"] == 0
    assert len(steps) == 3 and forwards == [(True, True)] * 3 + [(True, False)] * (len(forwards) - 3)
    assert (whole["updates"], whole["batches_stopped"], facts["updates"], facts["batches_stopped"]) == (17, 0, 3, 1)
    starts = list(DOC_STARTS) + [599]
    chunk = torch.cat([torch.arange(b - a) // 8 for a, b in zip(starts[:-1], starts[1:])])
    assert torch.equal(cut[chunk <= 3], full[chunk <= 3]) and not torch.equal(cut[chunk > 3], full[chunk > 3])


@pytest.mark.parametrize("phase_runs", (True, False))
def test_the_deadline_sees_each_batchs_cost_the_work_left_and_the_pace_of_each_kind(monkeypatch, phase_runs):
    """Batches of one document, each taking one second on a fake clock, adapting or not as a script says, and the
    global phase run or skipped likewise: every decision gets its cost (a batch's or the phase's), the cost of what
    is left after it (the phase priced in until it is decided), and the seconds and cost done so far adapting and
    not."""
    tokens = doc_stream()
    args = tiny_args(**dict(LORA_ENV, TTT_LORA_DOCS="1"))
    clock = [0.0]
    monkeypatch.setattr(tg.time, "perf_counter", lambda: clock[0])
    adapt_documents = tg.adapt_documents

    def one_second(*a, **k):
        adapt_documents(*a, **k)
        clock[0] += 1.0

    calls, script = [], [True, False, False, phase_runs, True, True, False, True]

    def decide(now, deadline, pace, cost, rest):
        calls.append((now, deadline, {k: tuple(v) for k, v in pace.items()}, cost, rest))
        return script[len(calls) - 1]

    monkeypatch.setattr(tg, "adapt_documents", one_second)
    monkeypatch.setattr(tg, "adapt_in_time", decide)
    *_, facts = tg.evaluate_lora(tiny_model(args), val_of(tokens), args, 0, 1, False, deadline=123.0)
    lengths = [70, 5, 125, 133, 1, 126, 139]  # the phase covers the first three documents (200 targets)
    order = [2, 0, 1, 6, 3, 5, 4]  # each group longest first
    costs = [sum(tg.batch_work(tg.np.array([lengths[d]]), args) * tg.np.array([tg.LORA_STEP_POSITIONS, 1]))
             for d in order]
    phase_cost = -(-200 // 64) * tg.LORA_STEP_POSITIONS + 200
    work = costs[:3] + [phase_cost] + costs[3:]  # the phase is decided between the two groups
    assert [c[3] for c in calls] == work and [c[1] for c in calls] == [123.0] * 8
    assert [c[4] for c in calls] == [sum(work[i + 1:]) for i in range(8)]
    done = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for i, ((now, _, pace, _, _), adapted, cost) in enumerate(zip(calls, script, work)):
        assert pace == {k: tuple(v) for k, v in done.items()}
        if i != 3:  # the phase is not a batch: its time is not a pace
            done[adapted][0] += 1.0
            done[adapted][1] += cost
    assert [c[0] for c in calls] == [0.0, 1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0]
    assert facts["documents_not_adapted"] == 3 and facts["updates"] > 0
    assert (facts["phase"] is not None) is phase_runs and facts["phase_skipped"] is not phase_runs


def test_the_deadline_counts_the_evaluation_spent_before_the_passes(monkeypatch):
    """final_evaluation's deadline is 600 s less what the evaluation spent before it (the pre-export pass): with
    all of it spent, no document adapts and the global phase is skipped; with none, every one adapts and the phase
    runs. The log says which."""
    args = tiny_args(**LORA_ENV)
    model, tokens = tiny_model(args), doc_stream()
    artifact = {"tensors": {}, "passthrough": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    place, log, lines = tg.Place(False, 0, 1, CPU), tg.RunLog("unused", False, b""), []
    monkeypatch.setattr(tg.RunLog, "__call__", lambda self, msg, console=True: lines.append(msg))
    for spent, unadapted in ((tg.EVAL_LIMIT_SECONDS, 7), (0.0, 0)):
        model = tiny_model(args)
        results = tg.final_evaluation(model, artifact, model.token_losses, val_of(tokens), args, place, log, spent)
        assert results["ttt"]["documents_not_adapted"] == unadapted
        skipped, said = unadapted > 0, [line for line in lines if line.startswith("ttt:")][-1]
        assert results["ttt"]["phase_skipped"] is skipped and ("global phase skipped, too late" in said) is skipped
        assert ("then every weight on the first 3 documents" in said) is not skipped and "no global phase" not in said


def test_a_batch_adapts_only_if_the_rest_can_still_be_scored_in_time():
    pace = {True: [10.0, 100.0], False: [0.0, 0.0]}  # 0.1 s a unit adapting; scoring not measured yet
    assert tg.adapt_in_time(0.0, 10.0, {True: [0.0, 0.0], False: [0.0, 0.0]}, 1e9, 1e9)  # no pace yet: adapt
    assert not tg.adapt_in_time(10.0, 10.0, {True: [0.0, 0.0], False: [0.0, 0.0]}, 0.0, 0.0)  # too late
    assert tg.adapt_in_time(0.0, 10.0, pace, 50.0, 50.0)  # 5 s + 5 s at the adapting pace: just in time
    assert not tg.adapt_in_time(0.0, 10.0, pace, 50.0, 51.0)
    pace[False] = [1.0, 100.0]  # scoring measured: 0.01 s a unit
    assert tg.adapt_in_time(0.0, 10.0, pace, 90.0, 100.0)  # 9 s + 1 s
    assert not tg.adapt_in_time(0.0, 10.0, pace, 91.0, 100.0)


def test_batch_work_counts_the_chunk_steps_and_positions_of_a_batch():
    args = tiny_args(**LORA_ENV)  # 8-target chunks, 32-token windows
    # documents of 20 and 9 targets: 3 and 2 chunks; windows 8, 16, 20 (capped by the longest document)
    assert tg.batch_work(tg.np.array([20, 9]), args) == (3, 2 * 8 + 2 * 16 + 1 * 20)
    assert tg.batch_work(tg.np.array([100]), args) == (13, 8 + 16 + 24 + 32 * 10)


def test_one_document_is_the_sliding_pass():
    """With no BOS but the first token the whole stream is one document: its windows end every 8 targets and reach
    32 back, the sliding pass's at stride 8."""
    tokens = doc_stream(starts=(0,))
    args = tiny_args(**LORA_ENV)
    model, val = tiny_model(args), val_of(tokens)
    isolated, sliding = torch.zeros(599, dtype=torch.float64), torch.zeros(599, dtype=torch.float64)
    tg.evaluate_documents(model.token_losses, val, args, BOS, 0, 1, CPU, False, isolated)
    tg.evaluate(model.token_losses, val, 32, 8, 4, 0, 1, CPU, False, sliding)
    torch.testing.assert_close(isolated, sliding, rtol=0, atol=1e-5)


def test_documents_score_the_same_in_any_order_and_company():
    """Adapters reset with every batch and start alike, so a document's losses do not depend on where it lies in
    the stream, which documents share its batch, or how many do."""
    tokens = doc_stream()
    bounds = list(DOC_STARTS) + [599]
    docs = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    order = [3, 0, 6, 1, 5, 2, 4]
    shuffled = torch.cat([docs[i] for i in order] + [tokens[599:]])
    base, _ = lora_per_target(tokens, TTT_PHASE_FRAC="0")
    for docs_per_batch in ("1", "7"):
        moved, _ = lora_per_target(shuffled, TTT_PHASE_FRAC="0", TTT_LORA_DOCS=docs_per_batch)
        at = 0
        for i in order:  # every target but a document's last, which predicts the next document's first token
            n = bounds[i + 1] - bounds[i]
            torch.testing.assert_close(moved[at:at + n - 1], base[bounds[i]:bounds[i] + n - 1], rtol=0, atol=1e-5)
            at += n


def test_it_adapts_to_each_document():
    """A model trained on one Markov chain, evaluated on documents of the same chain with their tokens renamed
    (each document its own renaming): its adapters learn each document's renaming as it goes."""
    args = tiny_args(**dict(LORA_ENV, TTT_LORA_LR="0.003", TTT_PHASE_FRAC="0", TTT_LORA_RANK="8"))
    model, _ = train_tiny(args, steps=20)
    others = torch.tensor([0] + list(range(2, 128)))  # every id but BOS
    pieces = []
    for d in range(6):
        renamed = torch.zeros(128, dtype=torch.int64)
        renamed[others] = others[torch.randperm(127, generator=torch.Generator().manual_seed(d))]
        pieces += [torch.tensor([BOS]), renamed[doc_stream(300, seed=10 + d, starts=())]]
    tokens = torch.cat(pieces)
    val = val_of(tokens)
    isolated = tg.evaluate_documents(model.token_losses, val, args, BOS, 0, 1, CPU, False)
    adapted = tg.evaluate_lora(model, val, args, 0, 1, False)
    assert adapted[0] < isolated[0] - 0.3, (adapted[0], isolated[0])


def test_an_evaluation_context_longer_than_training():
    args = tiny_args(**dict(LORA_ENV, TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="48", TTT_LORA_CHUNK="16"))
    model = tiny_model(args)
    assert all(b.attn.rotary.cos.size(0) == 48 for b in model.blocks if b.attn is not None)
    per_target = torch.zeros(599, dtype=torch.float64)
    loss, _, count, facts = tg.evaluate_lora(model, val_of(doc_stream()), args, 0, 1, False, per_target)
    assert count == 599 and (per_target > 0).all() and facts["score_first"] is True and math.isfinite(loss)


TWO_RANKS = r'''
import math, os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import train_gpt as tg
from test_lora_ttt import CPU, LORA_ENV, changed, doc_stream, tiny_model, val_of
from conftest import tiny_args
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def per_target(tokens, rank, world):
    args = tiny_args(**LORA_ENV)
    out = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
    facts = tg.evaluate_lora(tiny_model(args), val_of(tokens), args, rank, world, False, out)[3]
    assert facts["score_first"] is True
    return out


tokens = doc_stream()
two = per_target(tokens, rank, world)
one = per_target(tokens, 0, 1)
assert (two - one).abs().max() < 1e-5, (two - one).abs().max()  # the same as one process, up to float noise
for t in (9, 84, 199, 201, 400):
    after = per_target(changed(tokens, t), rank, world)
    assert torch.equal(after[:t - 1], two[:t - 1]), t
# The phase's decision: rank 1 has run nothing yet, and forecasts at rank 0's pace (0.1 s a unit: 10 s for 100).
paces = ({True: [10.0, 100.0], False: [0.0, 0.0]}, {True: [0.0, 0.0], False: [0.0, 0.0]})
now = time.perf_counter()
assert tg.phase_in_time(now + 5.0, paces[rank], 100.0, 0.0, CPU, world) == (False, 10.0)
assert tg.phase_in_time(now + 60.0, paces[rank], 100.0, 0.0, CPU, world) == (True, 10.0)
args = tiny_args(**LORA_ENV)  # one rank past its deadline: neither runs the global phase, which is collective
facts = tg.evaluate_lora(tiny_model(args), val_of(tokens), args, rank, world, False,
                         deadline=-math.inf if rank == 0 else math.inf)[3]
assert facts["phase"] is None and facts["phase_skipped"] is True, facts
print(f"rank {rank}: two ranks score as one, and score first", flush=True)
tg.leave_process_group()
os._exit(0)
'''


def test_two_ranks_score_as_one_and_score_first_and_agree_on_the_phase(tmp_path):
    run_on_two_ranks(tmp_path, TWO_RANKS, "two ranks score as one", timeout=300)
