"""HYPERPARAMETERS: validation errors name the variable, defaults are the competition run, batch layout;
and plan_windows (EVALUATION) scores every target exactly once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg
from scripts import demo
from conftest import tiny_args, tiny_env


def error_for(**env) -> str:
    with pytest.raises(ValueError) as exc:
        tg.Hyperparameters(env={k: str(v) for k, v in env.items()})
    return str(exc.value)


@pytest.mark.parametrize("name,value", [
    ("NUM_LAYERS", "x"), ("NUM_LAYERS", "3.0"), ("MATRIX_LR", "fast"), ("MATRIX_LR", "nan"), ("SCALAR_LR", "inf"),
    ("SSM_LAYERS", "0,a"),
])
def test_non_numbers(name, value):
    assert name in error_for(**{name: value})


@pytest.mark.parametrize("name,value", [
    ("VOCAB_SIZE", "1"), ("VOCAB_SIZE", "65537"), ("QUANT_MIN_BITS", "9"), ("QUANT_UNIFORM_BITS", "9"), ("ITERATIONS", "0"),
    ("WARMDOWN_FRAC", "1.5"), ("MAX_WALLCLOCK_SECONDS", "-1"), ("MUON_MOMENTUM", "1.0"), ("EVAL_STRIDE", "-1"),
])
def test_out_of_range(name, value):
    msg = error_for(**{name: value})
    assert name in msg and ("minimum" in msg or "maximum" in msg)


@pytest.mark.parametrize("value", ["yes", "true", "2", "", " 1"])
def test_bool_must_be_0_or_1(value):
    assert "COMPILE" in error_for(COMPILE=value)


def test_bool_values():
    assert tiny_args(COMPILE="0").compile is False
    assert tiny_args(COMPILE="1").compile is True


def test_bad_choice():
    msg = error_for(SSM_MODE="foo")
    assert "SSM_MODE" in msg and "replace" in msg and "parallel" in msg
    assert "SSM_KERNEL" in error_for(SSM_KERNEL="fft")
    assert "TTT_MODE" in error_for(TTT_MODE="1") and tiny_args(TTT_MODE="off").ttt_mode == "off"


@pytest.mark.parametrize("value", ["head,q", "mlp,mlp", "head;mlp", ""])
def test_lora_targets_are_a_subset_of_the_sites(value):
    msg = error_for(TTT_LORA_TARGETS=value)
    assert "TTT_LORA_TARGETS" in msg and "head, attn, ssm, mlp" in msg
    assert tiny_args(TTT_LORA_TARGETS="mlp, head").ttt_lora_targets == ("mlp", "head")


def test_a_lora_chunk_must_fit_the_window():
    msg = error_for(TTT_MODE="lora", EVAL_SEQ_LEN="32", EVAL_STRIDE="8", TTT_LORA_CHUNK="48")
    assert "TTT_LORA_CHUNK=48" in msg and "EVAL_SEQ_LEN=32" in msg
    assert tiny_args(TTT_MODE="off", TTT_LORA_CHUNK="48").ttt_lora_chunk == 48  # only lora reads it


@pytest.mark.parametrize("layers", ["0,11", "-1", "11"])
def test_ssm_layers_out_of_range(layers):
    msg = error_for(SSM_LAYERS=layers)
    assert "SSM_LAYERS" in msg and "NUM_LAYERS=11" in msg


def test_duplicate_layer():
    assert "SSM_LAYERS" in error_for(SSM_LAYERS="2,2", SSM_MODE="parallel")


def test_model_dim_not_divisible_by_heads():
    msg = error_for(MODEL_DIM="100", NUM_HEADS="8")
    assert "MODEL_DIM" in msg and "NUM_HEADS" in msg
    assert "NUM_KV_HEADS" in error_for(NUM_HEADS="8", NUM_KV_HEADS="3")


def test_rope_dims_checked():
    assert "ROPE_DIMS" in error_for(ROPE_DIMS="7")
    assert "ROPE_DIMS" in error_for(MODEL_DIM="128", NUM_HEADS="8", ROPE_DIMS="32")  # head dim 16


def test_s4d_state_dim_must_be_even():
    assert "SSM_STATE_DIM" in error_for(SSM_KERNEL="s4d", SSM_STATE_DIM="7")
    assert tg.Hyperparameters(env={"SSM_KERNEL": "fir", "SSM_STATE_DIM": "7"}).ssm_state_dim == 7


def test_unknown_variable_with_owned_prefix():
    msg = error_for(SSM_LAYER="0")
    assert "SSM_LAYER" in msg and "did you mean SSM_LAYERS" in msg
    assert "EVAL_STRIDES" in error_for(EVAL_STRIDES="64")
    msg = error_for(QUANT_TOTALLY_NEW="1")
    assert "QUANT_TOTALLY_NEW" in msg
    # typos of the baseline-named knobs are caught too: MAX_WALLCLOCK_SECOND=150 must not run for 600 s
    for typo, meant in (("MAX_WALLCLOCK_SECOND", "MAX_WALLCLOCK_SECONDS"), ("NUM_LAYER", "NUM_LAYERS"),
                        ("ITERATION", "ITERATIONS"), ("SEEDS", "SEED"), ("MUON_MOMENTUMS", "MUON_MOMENTUM"),
                        ("MIN_LR", "MIN_LR_FRAC"), ("VOCAB", "VOCAB_SIZE"), ("DATA_PATHS", "DATA_PATH")):
        msg = error_for(**{typo: "1"})
        assert typo in msg and f"did you mean {meant}" in msg, msg
    # variables outside the owned families are none of the script's business
    tg.Hyperparameters(env={"HOME": "/root", "TRAINING_NOTES": "x", "CUDA_VISIBLE_DEVICES": "", "MAX_JOBS": "4",
                            "NUM_THREADS": "2", "DATA_DIR": "/data", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})


def test_eval_stride_above_seq_len():
    msg = error_for(EVAL_SEQ_LEN="128", EVAL_STRIDE="129")
    assert "EVAL_STRIDE" in msg and "EVAL_SEQ_LEN" in msg
    assert tg.Hyperparameters(env={"EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "128"}).eval_stride == 128


def test_the_wallclock_must_exceed_the_calibration_reserve():
    for cap in ("8", "2.5"):
        assert f"MAX_WALLCLOCK_SECONDS={cap} must exceed the 8 s kept for calibration" in \
            error_for(MAX_WALLCLOCK_SECONDS=cap)
    tg.Hyperparameters(env={"MAX_WALLCLOCK_SECONDS": "8.5"})
    tg.Hyperparameters(env={"MAX_WALLCLOCK_SECONDS": "0"})  # no cap: no reserve to check


def test_defaults_are_the_competition_configuration():
    a = tg.Hyperparameters(env={})
    assert a.num_layers == 11 and a.model_dim == 512
    assert a.ssm_layers == (0, 1) and a.ssm_mode == "replace"
    assert a.train_batch_tokens == 786_432 and a.train_seq_len == 2048
    assert a.max_wallclock_seconds == 600 and a.eval_stride == 64 and a.ssm_kernel == "fir"
    assert a.vocab_size == 8192 and a.eval_seq_len == 2048 and a.val_max_tokens == 0
    assert a.quant_uniform_bits == 0 and a.quant_target_bytes <= 16_000_000 and a.ttt_mode == "lora"
    assert a.values["NUM_LAYERS"] == 11 and a.values["SSM_LAYERS"] == (0, 1)
    # fractions of the run, not step counts
    assert 0 < a.warmdown_frac <= 1 and 0 < tg.MUON_MOMENTUM_WARMUP[1] <= 1


def test_the_demo_knobs_are_valid_and_the_environment_wins():
    data = Path("/demo/data")
    args = tg.Hyperparameters(env=demo.demo_environment(data, {}))
    assert args.model_dim == 128 and args.vocab_size == 512 and args.data_path == str(data)
    assert args.ssm_layers == (0, 1)  # the default architecture, scaled down
    assert tg.Hyperparameters(env=demo.demo_environment(data, {"MODEL_DIM": "64"})).model_dim == 64
    grad_accum, seqs = args.batch_layout(1)
    assert grad_accum * seqs * args.train_seq_len == args.train_batch_tokens


def test_values_record_every_knob():
    a = tiny_args(SSM_MODE="parallel")
    assert a.values["SSM_MODE"] == "parallel" and a.values["MODEL_DIM"] == 64
    assert all(name.isupper() for name in a.values)
    assert set(tg.MODEL_KEYS) <= set(a.values)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_batch_layout_keeps_global_batch(world):
    a = tg.Hyperparameters(env={})
    grad_accum, seqs = a.batch_layout(world)
    assert grad_accum == 8 // world
    assert world * grad_accum * seqs * a.train_seq_len == a.train_batch_tokens
    assert seqs == 48


@pytest.mark.parametrize("world", [3, 0, 5, 16])
def test_batch_layout_bad_world_size(world):
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        tg.Hyperparameters(env={}).batch_layout(world)


@pytest.mark.parametrize("world", [1, 2, 8])
def test_batch_layout_indivisible_batch(world):
    # a global batch must split into 8 micro-batches of whole TRAIN_SEQ_LEN sequences on any world size
    for tokens in (786_432 + 2048, 1000, 8 * 2048 - 1):
        with pytest.raises(ValueError, match="TRAIN_BATCH_TOKENS"):
            tg.Hyperparameters(env={"TRAIN_BATCH_TOKENS": str(tokens)}).batch_layout(world)
    assert tg.Hyperparameters(env={"TRAIN_BATCH_TOKENS": str(8 * 2048)}).batch_layout(world) == (8 // world, 1)


# ---------------------------------------------------------------- plan_windows


CASES = [(100, 16, 16), (100, 16, 5), (100, 16, 1), (16, 16, 4), (17, 16, 16), (17, 16, 3), (1000, 64, 64),
         (1000, 64, 32), (999, 64, 7), (33, 32, 32), (2047, 128, 128), (2049, 128, 64)]


@pytest.mark.parametrize("num_targets,seq_len,stride", CASES)
def test_plan_windows_scores_every_target_once(num_targets, seq_len, stride):
    starts, firsts = tg.plan_windows(num_targets, seq_len, stride)
    assert starts.dtype == firsts.dtype == np.int64 and len(starts) == len(firsts)
    hits = np.zeros(num_targets, dtype=np.int64)
    for start, first in zip(starts.tolist(), firsts.tolist()):
        assert 0 <= start and start + seq_len <= num_targets  # every window is full and inside the stream
        assert 0 <= first < seq_len
        hits[start + first:start + seq_len] += 1
    assert (hits == 1).all()
    assert starts[0] == 0 and firsts[0] == 0
    # after the first window each scored target has at least seq_len - stride tokens of context
    assert (firsts[1:] >= seq_len - stride).all()
    assert (np.diff(starts) > 0).all()


def test_plan_windows_non_overlapping_when_stride_is_seq_len():
    starts, firsts = tg.plan_windows(64, 16, 16)
    assert starts.tolist() == [0, 16, 32, 48] and firsts.tolist() == [0, 0, 0, 0]
    starts, firsts = tg.plan_windows(70, 16, 16)  # the last window slides back and scores only the new 6
    assert starts.tolist() == [0, 16, 32, 48, 54] and firsts.tolist() == [0, 0, 0, 0, 10]


@pytest.mark.parametrize("stride", [0, -4, 33])
def test_plan_windows_rejects_a_stride_outside_the_window(stride):
    with pytest.raises(ValueError, match="stride"):
        tg.plan_windows(100, 32, stride)


def test_the_vocabulary_picks_the_official_data_and_tokenizer():
    a = tg.Hyperparameters(env={})
    assert a.vocab_size == 8192 and a.data_path == "./data/datasets/fineweb10B_sp8192"
    assert a.tokenizer_path == "./data/tokenizers/fineweb_8192_bpe.model"
    b = tg.Hyperparameters(env={"VOCAB_SIZE": "1024"})
    assert b.data_path == "./data/datasets/fineweb10B_sp1024"
    assert b.tokenizer_path == "./data/tokenizers/fineweb_1024_bpe.model"
    assert tg.Hyperparameters(env={"VOCAB_SIZE": "1024", "DATA_PATH": "/d"}).data_path == "/d"  # the environment wins


@pytest.mark.parametrize("name", ["QKV_CONV_SIZE", "BIGRAM_VOCAB_SIZE", "VE_LAYERS", "EMBED_GPTQ", "SMEAR_GATE",
                                  "TTT_LR", "TTT_EPOCHS", "TTT_LORA_OPTIMIZER", "VAL_LOSS_EVERY"])
def test_a_deleted_knob_is_an_error_not_ignored(name):
    assert f"{name} was deleted with its feature" in error_for(**{name: "1"})
    assert "unknown environment variable BETA2" in error_for(BETA2="0.99")


@pytest.mark.parametrize("name", tg.FIXED_KNOBS)
def test_a_knob_become_constant_names_the_constant_and_its_value(name):
    value = getattr(tg, name)
    assert isinstance(value, (int, float)) and name not in tg.Hyperparameters(env={}).values
    assert f"{name} is no knob any more: it is the constant {name} = {value} here" in error_for(**{name: "1"})


@pytest.mark.parametrize("name,way", [("EVAL_ARTIFACT", "scripts/evaluate.py --artifact"),
                                      ("EXPORT_CHECKPOINT", "scripts/evaluate.py --checkpoint"),
                                      ("QUANT_ALLOC", "QUANT_UNIFORM_BITS"), ("QUANT_BITS", "QUANT_UNIFORM_BITS"),
                                      ("SSM_LR", "SCALAR_LR"),
                                      ("TTT_ENABLED", "TTT_MODE=off")])
def test_a_moved_knob_names_the_new_way(name, way):
    assert way in error_for(**{name: "x"})
