"""TRAINING and validity: the compile warm-up leaves no trace, the EMA averages what it should, every validity
rule is checked against what the run measured, and knob typos fail."""

from __future__ import annotations

import types

import pytest
import torch

import train_gpt as tg
from conftest import shard, tiny_args


CPU_PLACE = tg.Place(distributed=False, rank=0, world_size=1, device=torch.device("cpu"))


def tiny_run(tmp_path, **env) -> tuple[types.SimpleNamespace, list[str]]:
    """Knobs for 8 micro-batches of 2 sequences on one CPU process, and one training shard of random tokens."""
    args = tiny_args(TRAIN_BATCH_TOKENS=8 * 32 * 2, **env)
    gen = torch.Generator().manual_seed(0)
    files = [str(shard(tmp_path / "fineweb_train_000000.bin", torch.randint(0, 128, (20_000,), generator=gen)))]
    return types.SimpleNamespace(args=args, device=CPU_PLACE.device), files


def snapshot(model, optimizers) -> tuple[dict, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [{k: v for k, v in opt.state_dict().items()} for opt in optimizers])


def test_warm_up_restores_weights_optimizer_state_and_data_position(tmp_path):
    run, files = tiny_run(tmp_path)
    torch.manual_seed(0)
    model = tg.GPT(run.args)
    optimizers = tg.build_optimizers(model, run.args)
    step = tg.make_train_step(model, model, optimizers, run.args, CPU_PLACE)
    new_loader = lambda: tg.DistributedTokenLoader(files, 128, 0, 1, run.device)  # noqa: E731
    weights, _ = snapshot(model, optimizers)
    calls = []

    def counting_step(loader, progress):
        calls.append(progress)
        return step(loader, progress)

    loader = tg.warm_up(counting_step, model, optimizers, new_loader, 3, lambda msg: None)
    assert calls == [0.0] * 3  # it trained
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # and took it all back
    assert all(len(opt.state) == 0 for opt in optimizers)  # no momentum, no Adam moments, no step counts
    assert loader.stream.file_idx == 0 and loader.stream.pos == 0  # the data starts from the beginning
    # the timed run then follows exactly the path of a run with no warm-up
    torch.manual_seed(0)
    fresh = tg.GPT(run.args)
    fresh_opts = tg.build_optimizers(fresh, run.args)
    fresh_step = tg.make_train_step(fresh, fresh, fresh_opts, run.args, CPU_PLACE)
    fresh_loader = new_loader()
    for _ in range(2):
        assert torch.equal(step(loader, 0.5), fresh_step(fresh_loader, 0.5))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_warm_up_of_zero_steps_trains_nothing(tmp_path):
    run, files = tiny_run(tmp_path)
    model = tg.GPT(run.args)
    optimizers = tg.build_optimizers(model, run.args)
    loader = tg.warm_up(lambda *a: pytest.fail("a step ran"), model, optimizers,
                        lambda: tg.DistributedTokenLoader(files, 128, 0, 1, run.device), 0, print)
    assert loader.stream.pos == 0


def test_ema_decay_follows_the_run_fraction():
    model = torch.nn.Linear(4, 4)
    ema = tg.ExponentialMovingAverage(model, horizon_frac=0.05)
    # 100 steps at 50% of the run: ~200 steps in all, a horizon of 10 steps, decay 0.9
    assert ema.decay(100, 0.5) == pytest.approx(0.9)
    assert ema.decay(1000, 0.5) == pytest.approx(1 - 1 / 100)
    assert ema.decay(1, 1e-9) == pytest.approx(1 / 11)  # the first steps: a short horizon (step / (step + 10))
    for step, progress in ((5, 0.01), (50, 0.2), (400, 0.9)):
        assert 0 < ema.decay(step, progress) < 1


def test_ema_holds_the_average_of_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = tg.ExponentialMovingAverage(model, horizon_frac=0.1)
    expected = [p.detach().clone() for p in model.parameters()]
    history = []
    for step in range(1, 31):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        progress = step / 30
        ema.update(step, progress)
        d = ema.decay(step, progress)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        history.append([p.detach().clone() for p in model.parameters()])
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s, e)
    current = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.allclose(s, c) for s, c in zip(ema.shadow, current))  # an average, not the last weights
    ema.copy_to_model()
    for p, s in zip(model.parameters(), ema.shadow):
        assert torch.equal(p, s)


# ---------------------------------------------------------------- validity

GOOD = {"max_wallclock_seconds": 600.0, "train_plus_calibration_s": 599.2, "calibration_within_wallclock": True,
        "train_documents_checked": 240_000, "train_documents_in_val": 0, "train_val_runs": 0,
        "train_hardware": "8x NVIDIA H100 80GB HBM3", "val_max_tokens": 0, "vocab_size": 8192, "val_documents": 50_000,
        "val_tokens": 40_540_160 + 1234, "val_bytes": 151_000_000, "hardware": "8x NVIDIA H100 80GB HBM3",
        "eval_seconds": 412.0, "bytes_total": 15_990_000, "score_first": True, "val_loss": 2.75, "val_bpb": 1.06}


def test_a_run_that_keeps_every_rule_is_valid():
    flags, broken = tg.assess_validity(GOOD)
    assert broken == [] and all(ok is True for ok in flags.values()) and len(flags) == 10


@pytest.mark.parametrize("change,flag,reason", [
    ({"max_wallclock_seconds": 0.0}, "wallclock_cap_set", "MAX_WALLCLOCK_SECONDS=0.0"),
    ({"max_wallclock_seconds": 900.0}, "wallclock_cap_set", "at most 600"),
    ({"max_wallclock_seconds": None}, "wallclock_cap_set", "MAX_WALLCLOCK_SECONDS=None"),
    ({"train_plus_calibration_s": 600.5}, "train_under_600s", "600.5s"),
    ({"calibration_within_wallclock": False}, "calibration_within_wallclock", "calibration"),
    ({"train_documents_in_val": 3, "train_val_runs": 1}, "no_val_data_in_training", "1 in runs of consecutive"),
    ({"train_documents_in_val": 241}, "no_val_data_in_training", "241 of 240000 sampled training documents"),

    ({"val_documents": 49_999}, "official_validation_split", "49999 documents"),
    ({"val_tokens": 40_540_160 - 1}, "official_validation_split", "40540160 targets in whole 2048-token sequences"),
    ({"val_tokens": 300_000}, "official_validation_split", "300000 targets"),
    ({"val_bytes": 9_774_711}, "official_validation_split", "9774711 bytes"),
    ({"vocab_size": 1024}, "official_validation_split", "62021632 targets"),
    ({"hardware": "1x NVIDIA H100 80GB HBM3"}, "eight_h100", "ran on 1x NVIDIA H100 80GB HBM3 and 8x"),
    ({"hardware": "8x NVIDIA H200"}, "eight_h100", "ran on 8x NVIDIA H100 80GB HBM3 and 8x NVIDIA H200, not"),
    ({"hardware": "8x NVIDIA H100 PCIe"}, "eight_h100", "(SXM, HBM3)"),
    ({"train_hardware": "1x NVIDIA H200"}, "eight_h100", "1x NVIDIA H200"),  # a re-export judges both machines
    ({"eval_seconds": 600.1}, "eval_under_600s", "600.1s"),
    ({"bytes_total": 16_000_001}, "artifact_under_16mb", "16000001 bytes"),
    ({"score_first": False}, "score_first", "before they were scored"),
    ({"val_bpb": float("nan")}, "finite_score", "not finite"),
    ({"val_loss": float("inf")}, "finite_score", "not finite"),
])
def test_each_rule_is_checked(change, flag, reason):
    flags, broken = tg.assess_validity(dict(GOOD, **change))
    assert [name for name, ok in flags.items() if ok is not True] == [flag]
    assert flags[flag] is False and len(broken) == 1 and reason in broken[0], broken


def test_a_prefix_breaks_the_split_rule_and_leaves_the_eval_time_unassessed():
    flags, broken = tg.assess_validity(dict(GOOD, val_max_tokens=131072))
    assert flags["official_validation_split"] is False and "VAL_MAX_TOKENS=131072" in broken[0]
    assert flags["eval_under_600s"] is None and len(broken) == 1


def test_honest_repeats_of_validation_documents_are_not_a_leak():
    """A few validation documents recurring singly among 240,000 sampled training documents (the web repeats pages)
    keep the rule; one run of consecutive ones, or more than 1 in 1,000, breaks it."""
    assert tg.assess_validity(dict(GOOD, train_documents_in_val=12))[0]["no_val_data_in_training"] is True
    assert tg.assess_validity(dict(GOOD, train_documents_in_val=2, train_val_runs=1))[0][
        "no_val_data_in_training"] is False


def test_valid_needs_every_rule_assessed_and_kept():
    all_kept = dict.fromkeys(tg.assess_validity(GOOD)[0], True)
    assert tg.summarize_validity(all_kept) == (True, True, [])
    for name in all_kept:
        for value in (False, None):
            valid, apart, not_assessed = tg.summarize_validity(dict(all_kept, **{name: value}))
            assert valid is False and not_assessed == ([name] if value is None else [])
            assert apart is (name in tg.HARDWARE_AND_DATA_RULES), name  # a proxy's data and GPUs do not count there


def test_the_official_split_of_each_known_vocabulary():
    """The records' logs give the targets cut to whole 2048-token sequences; the raw count is a little larger."""
    for vocab, targets in tg.OFFICIAL_VAL_TARGETS.items():
        for extra in (0, 1, 2047):
            flags, _ = tg.assess_validity(dict(GOOD, vocab_size=vocab, val_tokens=targets + extra))
            assert flags["official_validation_split"] is True, (vocab, extra)
        assert tg.assess_validity(dict(GOOD, vocab_size=vocab, val_tokens=targets + 2048))[0][
            "official_validation_split"] is False
    assert tg.assess_validity(dict(GOOD, val_bytes=151_080_000 * 1.01))[0]["official_validation_split"] is False


def test_what_was_not_assessed_is_not_called_broken():
    """A run that trained nothing has its training rules not assessed (None), and so does a vocabulary without a
    known official split: neither is listed as broken."""
    trained_nothing = {k: v for k, v in GOOD.items() if k not in (
        "max_wallclock_seconds", "train_plus_calibration_s", "calibration_within_wallclock", "train_documents_checked",
        "train_documents_in_val", "train_val_runs", "train_hardware")}
    flags, broken = tg.assess_validity(dict(trained_nothing, vocab_size=512))
    assert {name for name, ok in flags.items() if ok is None} == {
        "wallclock_cap_set", "train_under_600s", "calibration_within_wallclock", "no_val_data_in_training",
        "official_validation_split"}
    assert broken == [] and all(ok for ok in flags.values() if ok is not None)
    assert tg.assess_validity(dict(GOOD, train_documents_checked=0))[0]["no_val_data_in_training"] is None


def test_limits_are_inclusive():
    flags, broken = tg.assess_validity(dict(GOOD, train_plus_calibration_s=600.0, eval_seconds=600.0,
                                            bytes_total=16_000_000))
    assert broken == []


def test_training_ends_holding_the_ema_weights(tmp_path, monkeypatch):
    """The exported weights are the EMA's: train_model returns a model whose parameters equal the EMA's shadow,
    not the last step's raw weights."""
    monkeypatch.setattr(tg, "EMA_HORIZON_FRAC", 0.5)
    run, files = tiny_run(tmp_path, ITERATIONS="6", WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0")
    seen = {}

    class Spy(tg.ExponentialMovingAverage):
        def copy_to_model(self) -> None:
            seen["raw"] = [p.detach().clone() for p in self.params]
            seen["shadow"] = [s.clone() for s in self.shadow]
            super().copy_to_model()

    monkeypatch.setattr(tg, "ExponentialMovingAverage", Spy)
    torch.manual_seed(0)
    model = tg.GPT(run.args)
    tg.train_model(model, run.args, CPU_PLACE, files, lambda *a, **k: None, 0.0)
    assert seen, "the EMA was never copied into the model"
    params = list(model.parameters())
    assert all(torch.equal(p, s) for p, s in zip(params, seen["shadow"]))
    assert any(not torch.equal(p, r) for p, r in zip(params, seen["raw"]))  # an average, not the last step


# ---------------------------------------------------------------- knob typos


@pytest.mark.parametrize("typo,meant", [
    ("MAX_WALLCLOK_SECONDS", "MAX_WALLCLOCK_SECONDS"), ("ITERATONS", "ITERATIONS"), ("ITERATINOS", "ITERATIONS"),
    ("RUNID", "RUN_ID"), ("SEDE", "SEED"), ("MATRIXLR", "MATRIX_LR"), ("MAX_WALCLOK_SECONDS", "MAX_WALLCLOCK_SECONDS"),
    ("COMPILLE", "COMPILE"), ("EVAL_STRDE", "EVAL_STRIDE"), ("TOKENISER_PATH", "TOKENIZER_PATH"),
])
def test_a_knob_typo_is_an_error_with_the_suggestion(typo, meant):
    with pytest.raises(ValueError) as exc:
        tg.Hyperparameters(env={typo: "1"})
    assert typo in str(exc.value) and f"did you mean {meant}?" in str(exc.value)


def test_lowercase_knobs_and_misspelt_knobs_before_consistency_errors():
    with pytest.raises(ValueError, match="did you mean TTT_LORA_LR"):
        tg.Hyperparameters(env={"ttt_lora_lr": "0.01"})
    for name, error in (("ttt_lr", "ttt_lr was deleted"), ("rope_base", "constant ROPE_BASE = 10000.0"),
                        ("eval_artifact", "scripts/evaluate.py --artifact"), ("ROPE_BASES", "did you mean ROPE_BASE")):
        with pytest.raises(ValueError, match=error):
            tg.Hyperparameters(env={name: "1"})
    with pytest.raises(ValueError, match="MODEL_DIMS .*did you mean MODEL_DIM"):  # not "512 / 6 heads"
        tg.Hyperparameters(env={"MODEL_DIMS": "384", "NUM_HEADS": "6"})


def test_a_default_that_does_not_fit_says_it_is_a_default():
    with pytest.raises(ValueError, match="the default: set SSM_LAYERS"):
        tg.Hyperparameters(env={"NUM_LAYERS": "1"})


def test_launcher_accelerator_and_shell_variables_are_not_knobs():
    env = {name: "1" for name in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME",
        "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "TORCHINDUCTOR_MIX_ORDER_REDUCTION", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING",
        "NCCL_DEBUG", "NCCL_NVLS_ENABLE", "PYTHONUNBUFFERED", "PYTHONPATH", "PATH", "HOME", "USER", "SHELL", "PWD",
        "TERM", "LANG", "LC_ALL", "HOSTNAME", "NUM_THREADS", "MAX_JOBS", "DATA_DIR", "TMPDIR", "CI", "OUT",
        "TRAINING_NOTES", "VIRTUAL_ENV", "CONDA_PREFIX", "HF_HOME", "TRITON_CACHE_DIR", "LD_LIBRARY_PATH",
        "TOKENIZERS_PARALLELISM", "ARTIFACTORY_URL", "CHECKPOINTS_DIR", "http_proxy", "no_proxy", "path")}
    tg.Hyperparameters(env=env)


def test_typo_distance():
    assert tg.typo_distance("ITERATIONS", "ITERATIONS") == 0
    assert tg.typo_distance("ITERATONS", "ITERATIONS") == 1
    assert tg.typo_distance("ITERATINOS", "ITERATIONS") == 1  # two neighbours swapped
    assert tg.typo_distance("NUM_THREADS", "NUM_HEADS") == 2
    assert not tg.looks_like_typo("NUM_THREADS", "NUM_HEADS")
    assert tg.looks_like_typo("MAX_WALCLOK_SECONDS", "MAX_WALLCLOCK_SECONDS")
