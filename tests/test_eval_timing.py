"""scripts/eval_timing.py: the re-cut documents have the asked mean length, and only its cuts are BOS tokens."""

from __future__ import annotations

import sys

import numpy as np

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import eval_timing  # noqa: E402


def test_cut_documents_replaces_the_documents_with_log_normal_ones_of_the_asked_mean():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 50, size=400_000)
    tokens[rng.integers(0, tokens.size, size=300)] = 1  # the documents the tokens came in
    cut = eval_timing.cut_documents(tokens, bos_id=1, mean=811.0, sigma=1.0, seed=3)
    starts = np.flatnonzero(cut == 1)
    lengths = np.diff(np.append(starts, cut.size))
    assert starts[0] == 0 and cut.size == tokens.size
    assert abs(lengths[:-1].mean() / 811.0 - 1) < 0.08  # ~490 documents: the mean within a few percent
    assert np.median(lengths) < 0.8 * lengths.mean()  # skewed as a log-normal is, not evenly spaced
    kept = np.ones(cut.size, dtype=bool)
    kept[starts] = False
    assert np.array_equal(cut[kept & (tokens != 1)], tokens[kept & (tokens != 1)])  # the text is unchanged
    assert not np.any(cut[kept] == 1)  # every earlier BOS is gone


def test_lora_work_replays_the_lora_pass_updates_and_positions():
    """The plan counts what evaluate_lora runs: its updates, and the positions its forwards read."""
    import torch
    from conftest import tg, tiny_args

    args = tiny_args(TTT_LORA_DOCS=3, TTT_PHASE_FRAC=0.3)
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, args.vocab_size, size=1500)
    tokens[[0, 40, 41, 300, 333, 700, 1010, 1011, 1200]] = 1  # documents of 1 to 390 targets, one in the phase
    model = tg.GPT(args).eval()
    read = []
    forward = model.token_losses
    model.token_losses = lambda ids, targets, lora=None: (read.append(ids.numel()) if lora else None) or forward(
        ids, targets, lora)
    val = {"tokens": torch.from_numpy(tokens), "target_bytes": torch.ones(tokens.size - 1, dtype=torch.int64)}
    *_, facts = tg.evaluate_lora(model, val, args, 0, 1, False)
    updates, positions = eval_timing.lora_work(tg, tg.find_documents(torch.from_numpy(tokens), 1), args)
    assert facts["phase"] and (updates, positions) == (facts["updates"], sum(read)) and updates > 10


def test_split_documents_are_the_documents_of_the_cut_stream():
    import torch
    from conftest import tg

    for n, seed in ((5_000, 0), (20_001, 7)):
        cut = eval_timing.cut_documents(np.full(n + 1, 5), bos_id=1, mean=300.0, sigma=1.0, seed=seed)
        expected = tg.find_documents(torch.from_numpy(cut), 1)
        assert np.array_equal(eval_timing.split_documents(n, 300.0, 1.0, seed), expected)


def test_the_lora_pass_costs_less_a_target_on_a_bigger_split():
    """Why the LoRA pass is projected by its plan, not by its targets: on the official split's size its cost a target
    is lower than on a small re-cut sample, and the busiest of 8 GPUs carries about an eighth of the whole."""
    from conftest import tg

    args = tg.Hyperparameters(env={})
    small = eval_timing.split_documents(300_000, 811.0, 1.0, 3)
    big = eval_timing.split_documents(tg.OFFICIAL_VAL_TARGETS[8192], 811.0, 1.0, 3)
    def load(documents: np.ndarray, rank: int, world: int) -> tuple[float, float]:  # its batches' cost, the phase's
        *_, plans, phase = tg.plan_lora(documents, args, rank, world)
        return sum(cost for plan in plans for _, cost in plan), phase

    one = eval_timing.lora_cost(tg, small, args, 1)
    assert one == sum(load(small, 0, 1)) and load(small, 0, 1)[1] > 0
    whole, busiest = eval_timing.lora_cost(tg, big, args, 1), eval_timing.lora_cost(tg, big, args, 8)
    loads = [load(big, rank, 8) for rank in range(8)]
    # the busiest rank's load, phase included; the ranks' batches together are the whole plan's
    assert busiest == max(map(sum, loads)) and sum(b for b, _ in loads) == load(big, 0, 1)[0]
    assert whole / tg.OFFICIAL_VAL_TARGETS[8192] < 0.5 * one / 300_000
    assert whole / 8 <= busiest and max(b for b, _ in loads) <= 1.1 * sum(b for b, _ in loads) / 8  # ~an eighth
