"""
S4D-Lin / XSA-attention hybrid for the Parameter Golf 16 MB track, in one file.

Data flows top to bottom: hyperparameters -> data -> tokenizer/bpb -> model -> optimizer -> training ->
export (GPTQ int5 + lzma) -> evaluation of the round-tripped artifact.

    torchrun --standalone --nproc_per_node=8 train_gpt.py      # competition run
    python3 train_gpt.py                                      # no GPU and no data: small self-made demo on CPU
"""

from __future__ import annotations

import copy
import difflib
import glob
import io
import json
import lzma
import math
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

try:  # FlashAttention 3 (Hopper) when installed; PyTorch SDPA otherwise.
    from flash_attn_interface import flash_attn_func as fa3_attention
except ImportError:
    fa3_attention = None

SIZE_LIMIT_BYTES = 16_000_000
DEFAULT_DATA_PATH = "./data/datasets/fineweb10B_sp1024"
DEFAULT_TOKENIZER_PATH = "./data/tokenizers/fineweb_1024_bpe.model"
DEMO_DIR = "./demo_data"

# -----------------------------
# HYPERPARAMETERS
# -----------------------------

# Environment families this script owns: a variable with one of these prefixes that is not a known knob is a
# typo, and silently ignoring it would run a different experiment from the one the user asked for.
OWNED_PREFIXES = (
    "TRAIN_", "VAL_", "EVAL_", "SSM_", "XSA_", "GPTQ_", "MUON_", "EMA_", "ADAM_", "BIGRAM_", "VE_", "QUANT_",
    "ROPE_", "QK_", "WARMDOWN_", "WARMUP_", "MLP_", "MODEL_", "TIED_", "MATRIX_", "SCALAR_", "LOGIT_",
    "SMEAR_", "EMBED_", "NUM_LAYER", "NUM_HEAD", "NUM_KV", "MAX_WALLCLOCK", "MIN_LR", "GRAD_CLIP", "BETA",
    "ITERATION", "SEED", "VOCAB", "ARTIFACT", "TOKENIZER", "DATA_PATH",
)

# The no-GPU, no-data demo: a model small enough to train, export and evaluate on two CPU cores in about a
# minute. Only defaults change; anything set in the environment still wins.
DEMO_DEFAULTS = {
    "DATA_PATH": DEMO_DIR, "TOKENIZER_PATH": f"{DEMO_DIR}/demo_512_bpe.model", "VOCAB_SIZE": "512",
    "NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "32", "TRAIN_BATCH_TOKENS": "4096",
    "ITERATIONS": "150", "MAX_WALLCLOCK_SECONDS": "90", "WARMUP_STEPS": "0", "TRAIN_LOG_EVERY": "25",
    "SSM_LAYERS": "0", "SSM_KERNEL_SIZE": "32", "XSA_LAST_N": "4", "VE_LAYERS": "3", "BIGRAM_VOCAB_SIZE": "512",
    "BIGRAM_DIM": "32", "VE_DIM": "32", "GPTQ_CALIB_SEQS": "16", "GPTQ_RESERVE_SECONDS": "2",
    "EVAL_BATCH_SEQS": "16", "MATRIX_LR": "0.02", "TIED_EMBED_LR": "0.03",
}


class Hyperparameters:
    """Every knob, read once from the environment, validated, and listed in `values` for the log."""

    def __init__(self, env: dict[str, str] | None = None, defaults: dict[str, str] | None = None):
        self._env = dict(os.environ if env is None else env)
        self._defaults = defaults or {}
        self.values: dict[str, object] = {}

        # Data and run identity.
        self.data_path = self._str("DATA_PATH", DEFAULT_DATA_PATH)
        self.tokenizer_path = self._str("TOKENIZER_PATH", DEFAULT_TOKENIZER_PATH)
        self.vocab_size = self._int("VOCAB_SIZE", 1024, lo=2, hi=65536)
        self.run_id = self._str("RUN_ID", str(uuid.uuid4()))
        self.seed = self._int("SEED", 1337, lo=0)
        self.artifact_path = self._str("ARTIFACT_PATH", "final_model.int5.ptz")
        self.eval_artifact = self._str("EVAL_ARTIFACT", "")  # set: evaluate this artifact, train nothing
        self.compile = self._bool("COMPILE", True)

        # Training length. MAX_WALLCLOCK_SECONDS=0 means "no cap": ITERATIONS alone ends the run.
        self.iterations = self._int("ITERATIONS", 20000, lo=1)
        self.max_wallclock_seconds = self._float("MAX_WALLCLOCK_SECONDS", 600.0, lo=0.0)
        self.warmup_steps = self._int("WARMUP_STEPS", 20, lo=0)
        self.train_batch_tokens = self._int("TRAIN_BATCH_TOKENS", 786_432, lo=1)
        self.train_seq_len = self._int("TRAIN_SEQ_LEN", 2048, lo=2)
        self.val_loss_every = self._int("VAL_LOSS_EVERY", 0, lo=0)
        self.train_log_every = self._int("TRAIN_LOG_EVERY", 100, lo=1)

        # Schedules, as fractions of the run so that a 150 s proxy and a 600 s run both get the whole shape.
        self.warmdown_frac = self._float("WARMDOWN_FRAC", 0.5, lo=0.0, hi=1.0)
        self.min_lr_frac = self._float("MIN_LR_FRAC", 0.0, lo=0.0, hi=1.0)
        self.muon_momentum = self._float("MUON_MOMENTUM", 0.99, lo=0.0, hi=0.9999)
        self.muon_momentum_warmup_start = self._float("MUON_MOMENTUM_WARMUP_START", 0.92, lo=0.0, hi=0.9999)
        self.muon_momentum_warmup_frac = self._float("MUON_MOMENTUM_WARMUP_FRAC", 0.2, lo=0.0, hi=1.0)
        self.ema_enabled = self._bool("EMA_ENABLED", True)
        self.ema_horizon_frac = self._float("EMA_HORIZON_FRAC", 0.05, lo=1e-4, hi=1.0)

        # Model shape.
        self.num_layers = self._int("NUM_LAYERS", 11, lo=1)
        self.model_dim = self._int("MODEL_DIM", 512, lo=8)
        self.num_heads = self._int("NUM_HEADS", 8, lo=1)
        self.num_kv_heads = self._int("NUM_KV_HEADS", 4, lo=1)
        self.mlp_mult = self._float("MLP_MULT", 3.0, lo=0.25)
        self.mlp_leaky_slope = self._float("MLP_LEAKY_SLOPE", 0.5, lo=0.0, hi=1.0)
        self.rope_dims = self._int("ROPE_DIMS", 16, lo=0)
        self.rope_base = self._float("ROPE_BASE", 10000.0, lo=1.0)
        self.qk_gain_init = self._float("QK_GAIN_INIT", 1.5, lo=0.0)
        self.logit_softcap = self._float("LOGIT_SOFTCAP", 30.0, lo=0.0)
        self.tied_embed_init_std = self._float("TIED_EMBED_INIT_STD", 0.005, lo=0.0)
        self.xsa_last_n = self._int("XSA_LAST_N", 11, lo=0)
        self.bigram_vocab_size = self._int("BIGRAM_VOCAB_SIZE", 2048, lo=0)
        self.bigram_dim = self._int("BIGRAM_DIM", 128, lo=1)
        self.ve_layers = self._int_list("VE_LAYERS", "9,10")
        self.ve_dim = self._int("VE_DIM", 128, lo=1)
        self.smear_gate = self._bool("SMEAR_GATE", True)

        # S4D-Lin mixers.
        self.ssm_layers = self._int_list("SSM_LAYERS", "0,1")
        self.ssm_mode = self._choice("SSM_MODE", "replace", ("replace", "parallel"))
        self.ssm_kernel = self._choice("SSM_KERNEL", "fir", ("fir", "s4d"))
        self.ssm_kernel_size = self._int("SSM_KERNEL_SIZE", 64, lo=1)
        self.ssm_state_dim = self._int("SSM_STATE_DIM", 64, lo=2)
        self.ssm_dt_min = self._float("SSM_DT_MIN", 1e-3, lo=1e-6)
        self.ssm_dt_max = self._float("SSM_DT_MAX", 1e-1, lo=1e-6)
        self.ssm_rate_min = self._float("SSM_RATE_MIN", 0.05, lo=1e-6)
        self.ssm_rate_max = self._float("SSM_RATE_MAX", 2.0, lo=1e-6)

        # Optimizers.
        self.matrix_lr = self._float("MATRIX_LR", 0.025, lo=0.0)
        self.scalar_lr = self._float("SCALAR_LR", 0.025, lo=0.0)
        self.tied_embed_lr = self._float("TIED_EMBED_LR", 0.035, lo=0.0)
        self.muon_backend_steps = self._int("MUON_BACKEND_STEPS", 5, lo=1)
        self.muon_wd = self._float("MUON_WD", 0.04, lo=0.0)
        self.adam_wd = self._float("ADAM_WD", 0.04, lo=0.0)
        self.beta1 = self._float("BETA1", 0.9, lo=0.0, hi=0.9999)
        self.beta2 = self._float("BETA2", 0.95, lo=0.0, hi=0.99999)
        self.adam_eps = self._float("ADAM_EPS", 1e-8, lo=0.0)
        self.grad_clip_norm = self._float("GRAD_CLIP_NORM", 0.3, lo=0.0)

        # Export. Calibration reads training data, so its time is reserved inside the training wall clock.
        self.quant_bits = self._int("QUANT_BITS", 5, lo=2, hi=8)
        self.embed_quant_bits = self._int("EMBED_QUANT_BITS", 8, lo=2, hi=8)
        self.gptq_calib_seqs = self._int("GPTQ_CALIB_SEQS", 64, lo=1)
        self.gptq_reserve_seconds = self._float("GPTQ_RESERVE_SECONDS", 8.0, lo=0.0)
        self.gptq_block_size = self._int("GPTQ_BLOCK_SIZE", 128, lo=1)
        self.gptq_damp = self._float("GPTQ_DAMP", 0.01, lo=0.0)

        # Evaluation. EVAL_STRIDE=0 skips the sliding pass.
        self.eval_seq_len = self._int("EVAL_SEQ_LEN", 2048, lo=2)
        self.eval_stride = self._int("EVAL_STRIDE", 64, lo=0)
        self.eval_batch_seqs = self._int("EVAL_BATCH_SEQS", 32, lo=1)
        self.val_max_tokens = self._int("VAL_MAX_TOKENS", 0, lo=0)  # 0 = the whole split (the official score)

        self._check_consistency()
        self._check_unknown()

    # Typed readers: each records the value for the log and names the variable in every error.
    def _raw(self, name: str, default: object) -> str:
        return self._env.get(name, self._defaults.get(name, str(default)))

    def _record(self, name: str, value):
        self.values[name] = value
        return value

    def _number(self, name: str, default, cast, lo, hi):
        raw = self._raw(name, default)
        try:
            value = cast(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={raw!r} must be finite")
        if lo is not None and value < lo:
            raise ValueError(f"{name}={value} is below its minimum {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"{name}={value} is above its maximum {hi}")
        return self._record(name, value)

    def _int(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        return self._number(name, default, int, lo, hi)

    def _float(self, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        return self._number(name, default, float, lo, hi)

    def _bool(self, name: str, default: bool) -> bool:
        raw = self._raw(name, int(default))
        if raw not in ("0", "1"):
            raise ValueError(f"{name}={raw!r} must be 0 or 1")
        return self._record(name, raw == "1")

    def _str(self, name: str, default: str) -> str:
        return self._record(name, self._raw(name, default))

    def _choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        raw = self._raw(name, default)
        if raw not in options:
            raise ValueError(f"{name}={raw!r} must be one of {', '.join(options)}")
        return self._record(name, raw)

    def _int_list(self, name: str, default: str) -> tuple[int, ...]:
        raw = self._raw(name, default).strip()
        try:
            items = tuple(int(x) for x in raw.replace(" ", "").split(",") if x != "")
        except ValueError:
            raise ValueError(f"{name}={raw!r} must be a comma-separated list of integers") from None
        if len(set(items)) != len(items):
            raise ValueError(f"{name}={raw!r} lists a value twice")
        return self._record(name, items)

    def _check_consistency(self) -> None:
        n = self.num_layers
        for name, layers in (("SSM_LAYERS", self.ssm_layers), ("VE_LAYERS", self.ve_layers)):
            bad = [i for i in layers if not 0 <= i < n]
            if bad:
                raise ValueError(f"{name} has layer(s) {bad} outside 0..{n - 1} (NUM_LAYERS={n})")
        if self.model_dim % self.num_heads:
            raise ValueError(f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        if head_dim % 2 or self.rope_dims % 2 or self.rope_dims > head_dim:
            raise ValueError(f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim {head_dim}")
        if self.ssm_mode == "replace":
            no_attention = sorted(set(self.ve_layers) & set(self.ssm_layers))
            if no_attention:
                raise ValueError(f"VE_LAYERS {no_attention} are S4D layers with no attention (SSM_MODE=replace)")
        if self.ssm_kernel == "s4d" and self.ssm_state_dim % 2:
            raise ValueError(f"SSM_STATE_DIM={self.ssm_state_dim} must be even (complex modes come in pairs)")
        if self.ssm_dt_min > self.ssm_dt_max or self.ssm_rate_min > self.ssm_rate_max:
            raise ValueError("SSM_DT_MIN/SSM_RATE_MIN must not exceed SSM_DT_MAX/SSM_RATE_MAX")
        if self.eval_stride > self.eval_seq_len:
            raise ValueError(f"EVAL_STRIDE={self.eval_stride} must not exceed EVAL_SEQ_LEN={self.eval_seq_len}")
        if self.max_wallclock_seconds and self.gptq_reserve_seconds >= self.max_wallclock_seconds:
            raise ValueError("GPTQ_RESERVE_SECONDS must be smaller than MAX_WALLCLOCK_SECONDS")

    def _check_unknown(self) -> None:
        known = set(self.values)
        for name in sorted(self._env):
            if name.startswith(OWNED_PREFIXES) and name not in known:
                hint = difflib.get_close_matches(name, sorted(known), n=1)
                raise ValueError(f"unknown environment variable {name}" + (f" (did you mean {hint[0]}?)" if hint else ""))

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(grad_accum_steps, sequences per micro-batch): the global batch is the same on 1, 2, 4 or 8 GPUs."""
        if world_size < 1 or 8 % world_size:
            raise ValueError(f"WORLD_SIZE={world_size} must divide 8 so the global batch stays the same")
        grad_accum = 8 // world_size
        per_micro = world_size * grad_accum * self.train_seq_len
        if self.train_batch_tokens % per_micro:
            raise ValueError(
                f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of "
                f"WORLD_SIZE*grad_accum*TRAIN_SEQ_LEN = {world_size}*{grad_accum}*{self.train_seq_len}")
        return grad_accum, self.train_batch_tokens // per_micro


# -----------------------------
# DATA LOADING
# -----------------------------
# Shard format: 256 little-endian int32 (magic 20240520, version 1, token count, zeros), then uint16 tokens.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


def read_shard_header(path: str | Path) -> int:
    """Validate one shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard not found: {path}")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"shard {path} is {size} bytes, shorter than its {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(f"shard {path} has magic {int(header[0])}, expected {SHARD_MAGIC}")
    if int(header[1]) != SHARD_VERSION:
        raise ValueError(f"shard {path} has version {int(header[1])}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if num_tokens <= 0 or size != expected:
        raise ValueError(f"shard {path} is {size} bytes but its header promises {num_tokens} tokens ({expected} bytes)")
    return num_tokens


def load_data_shard(path: str | Path) -> Tensor:
    num_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=SHARD_HEADER_BYTES)
    return torch.from_numpy(tokens.astype(np.int32))


def write_data_shard(path: str | Path, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"token ids must fit in uint16 to be written to {path}")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def check_token_range(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    top = int(tokens.max())
    if top >= vocab_size:
        raise ValueError(f"{what} holds token id {top}, outside VOCAB_SIZE={vocab_size}: wrong tokenizer or data")


def find_shards(data_path: str, split: str) -> list[str]:
    """Sorted shard paths of one split, every header checked before any model is built."""
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {split} shards match {pattern}")
    for f in files:
        read_shard_header(f)
    return files


class TokenStream:
    """Reads shards in order and wraps around; take(n) returns the next n tokens."""

    def __init__(self, files: list[str], vocab_size: int):
        self.files, self.vocab_size, self.file_idx = files, vocab_size, -1
        self._advance()

    def _advance(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.files)
        path = self.files[self.file_idx]
        self.tokens, self.pos = load_data_shard(path), 0
        check_token_range(self.tokens.numpy(), self.vocab_size, f"shard {path}")

    def take(self, n: int) -> Tensor:
        chunks = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self._advance()
            k = min(n, self.tokens.numel() - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class DistributedTokenLoader:
    """Each call takes one global micro-batch span from the stream; rank r keeps its own disjoint slice."""

    def __init__(self, files: list[str], vocab_size: int, rank: int, world_size: int, device: torch.device):
        self.stream, self.rank, self.world_size, self.device = TokenStream(files, vocab_size), rank, world_size, device

    def next_batch(self, seqs: int, seq_len: int) -> tuple[Tensor, Tensor]:
        per_rank = seqs * seq_len + 1
        chunk = self.stream.take(per_rank * self.world_size)
        local = chunk[self.rank * per_rank:(self.rank + 1) * per_rank].to(torch.int64)
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        return local[:-1].view(seqs, seq_len), local[1:].view(seqs, seq_len)


# -----------------------------
# TOKENIZER-AGNOSTIC EVALUATION SETUP
# -----------------------------
# bpb = (loss / ln 2) * tokens / bytes. Bytes follow the official rule: a piece's UTF-8 bytes without its
# leading "▁"; that space adds one byte only when the previous token is not a boundary (control/unknown/unused),
# so a leading space right after BOS is not counted. Byte-fallback pieces are one byte.


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not path.endswith(".model") or not os.path.isfile(path):
        raise FileNotFoundError(f"TOKENIZER_PATH={path} is not an existing SentencePiece .model file")
    sp = spm.SentencePieceProcessor(model_file=path)
    if int(sp.vocab_size()) != vocab_size:
        raise ValueError(f"tokenizer {path} has {int(sp.vocab_size())} pieces but VOCAB_SIZE={vocab_size}")
    return sp


def build_sentencepiece_luts(sp: spm.SentencePieceProcessor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base_bytes, has_leading_space, is_boundary) per token id."""
    n = int(sp.vocab_size())
    base_bytes = np.zeros(n, dtype=np.int64)
    has_leading_space = np.zeros(n, dtype=bool)
    is_boundary = np.ones(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return base_bytes, has_leading_space, is_boundary


def target_byte_counts(tokens: np.ndarray, luts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Bytes of each target tokens[1:], given the token before it."""
    base_bytes, has_leading_space, is_boundary = luts
    prev, tgt = tokens[:-1], tokens[1:]
    return base_bytes[tgt] + (has_leading_space[tgt] & ~is_boundary[prev])


def load_validation_tokens(data_path: str, max_tokens: int = 0) -> np.ndarray:
    tokens = np.concatenate([load_data_shard(f).numpy() for f in find_shards(data_path, "val")])
    if max_tokens:
        tokens = tokens[:max_tokens]
    if tokens.size < 2:
        raise ValueError(f"the validation split under {data_path} has fewer than 2 tokens")
    return tokens



# -----------------------------
# TRANSFORMER / S4D MODULES
# -----------------------------


class CastedLinear(nn.Linear):
    """fp32 master weight, cast to the activation dtype at the matmul (bf16 under autocast on the GPU)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)


class Rotary(nn.Module):
    """Rotary position embedding on the first `rope_dims` channels of each head; the rest carry no position."""

    def __init__(self, rope_dims: int, base: float, max_len: int):
        super().__init__()
        self.rope_dims = rope_dims
        inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / max(rope_dims, 1))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, H, D]
        r = self.rope_dims
        if r == 0:
            return x
        T = x.size(1)
        cos, sin = self.cos[:T, None, :].to(x.dtype), self.sin[:T, None, :].to(x.dtype)
        x1, x2, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q: [B, T, H, D]; k, v: [B, T, Hkv, D] (grouped-query, never repeated in memory). Returns [B, T, H, D]."""
    if fa3_attention is not None and q.is_cuda:
        out = fa3_attention(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the token's own (unit) value vector."""
    B, T, H, D = y.shape
    groups = H // v.size(2)
    y = y.view(B, T, v.size(2), groups, D)
    v_hat = F.normalize(v, dim=-1).unsqueeze(3)
    y = y - (y * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return y.view(B, T, H, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_dims: int, rope_base: float,
                 qk_gain_init: float, use_xsa: bool, max_len: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.rotary = Rotary(rope_dims, rope_base, max_len)
        self.use_xsa = use_xsa

    def forward(self, x: Tensor, value_embed: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x)
        if value_embed is not None:
            v = v + value_embed
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q = self.rotary(rms_norm(q)) * self.q_gain.to(x.dtype)[:, None]
        k = self.rotary(rms_norm(k))
        y = causal_attention(q, k, v)
        if self.use_xsa:
            y = exclusive_self_attention(y, v)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, leaky_slope: float):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)
        self.leaky_slope = leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.leaky_slope).square())


def fir_causal_conv(u: Tensor, taps: Tensor) -> Tensor:
    """u: [B, T, C]; taps: [C, K] indexed by lag (taps[:, 0] multiplies the current token). Returns [B, T, C].
    Time is cut into chunks of K steps. Each output chunk depends on its own chunk and the one before, through a
    [K, 2K] Toeplitz matrix per channel, so the whole convolution is one batched matmul on the tensor cores
    (a depthwise F.conv1d runs several times slower here)."""
    B, T, C = u.shape
    K = taps.size(1)
    pad = (-T) % K
    x = F.pad(u, (0, 0, K, pad))  # a zero chunk of history before t=0; whole chunks at the end
    chunks = x.view(B, (T + pad) // K + 1, K, C)
    windows = torch.cat((chunks[:, :-1], chunks[:, 1:]), dim=2)  # [B, n, 2K, C]: previous chunk, this chunk
    lag = (torch.arange(K, device=u.device)[:, None] + K) - torch.arange(2 * K, device=u.device)[None, :]
    toeplitz = torch.where((lag >= 0) & (lag < K), taps[:, lag.clamp(0, K - 1)], 0.0)  # [C, K, 2K]
    y = torch.einsum("cij,bnjc->bnic", toeplitz.to(u.dtype), windows)
    return y.reshape(B, -1, C)[:, :T]


def fft_causal_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """u: [B, T, C]; kernel: [C, L] indexed by lag, L >= T. Linear (not circular) convolution via a 2T FFT."""
    T = u.size(1)
    n = 2 * T
    u_f = torch.fft.rfft(u.float(), n=n, dim=1)
    k_f = torch.fft.rfft(kernel[:, :T].float().t(), n=n, dim=0)
    return torch.fft.irfft(u_f * k_f, n=n, dim=1)[:, :T].to(u.dtype)


class S4DLinMixer(nn.Module):
    """Gated causal depthwise long convolution: out_proj(sigmoid(gate) * (kernel * u)), [gate, u] = in_proj(x).

    kernel="fir": SSM_KERNEL_SIZE free taps per channel, initialised as exp(-r * lag) normalised to sum 1, with
    rates r log-spaced across channels (fast channels see the last few tokens, slow ones tens of tokens).
    kernel="s4d": the S4D-Lin kernel K[l] = 2 Re(sum_n C~_n exp(dt A_n l)) with A_n = -1/2 + i pi n, zero-order
    hold (C~ = C (exp(dt A) - 1) / A) and learned log step sizes: damped oscillations as long as the sequence,
    applied with an FFT. Complex arithmetic is written out in real tensors so torch.compile can fuse it.
    The output projection starts at zero, so a new mixer leaves the residual stream untouched."""

    def __init__(self, dim: int, kernel_kind: str, kernel_size: int, state_dim: int, dt_range: tuple[float, float],
                 rate_range: tuple[float, float]):
        super().__init__()
        self.kernel_kind = kernel_kind
        self.in_proj = CastedLinear(dim, 2 * dim)
        self.out_proj = CastedLinear(dim, dim, zero_init=True)
        if kernel_kind == "fir":
            rates = torch.logspace(math.log10(rate_range[0]), math.log10(rate_range[1]), dim)
            taps = torch.exp(-rates[:, None] * torch.arange(kernel_size, dtype=torch.float32)[None, :])
            self.kernel_taps = nn.Parameter(taps / taps.sum(dim=1, keepdim=True))
        else:
            modes = state_dim // 2
            log_dt = torch.empty(dim).uniform_(math.log(dt_range[0]), math.log(dt_range[1]))
            self.log_dt = nn.Parameter(log_dt)
            self.log_a_real = nn.Parameter(torch.full((dim, modes), math.log(0.5)))
            self.a_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(dim, 1))
            self.c_real = nn.Parameter(torch.randn(dim, modes) * math.sqrt(0.5))
            self.c_imag = nn.Parameter(torch.randn(dim, modes) * math.sqrt(0.5))

    def kernel(self, length: int) -> Tensor:
        """[C, length] impulse response indexed by lag (fir: its K taps, zero beyond)."""
        if self.kernel_kind == "fir":
            taps = self.kernel_taps
            return F.pad(taps, (0, max(0, length - taps.size(1))))[:, :length]
        dt = self.log_dt.exp()[:, None]
        a_re, a_im = -self.log_a_real.exp(), self.a_imag
        da_re, da_im = a_re * dt, a_im * dt
        # ZOH: C~ = C * (exp(dt A) - 1) / A, written out for complex numbers.
        x_re = da_re.exp() * da_im.cos() - 1.0
        x_im = da_re.exp() * da_im.sin()
        denom = a_re.square() + a_im.square()
        q_re, q_im = (x_re * a_re + x_im * a_im) / denom, (x_im * a_re - x_re * a_im) / denom
        c_re = self.c_real * q_re - self.c_imag * q_im
        c_im = self.c_real * q_im + self.c_imag * q_re
        lags = torch.arange(length, device=dt.device, dtype=torch.float32)
        magnitude = torch.exp(da_re[..., None] * lags)
        angle = da_im[..., None] * lags
        return 2.0 * (magnitude * (c_re[..., None] * angle.cos() - c_im[..., None] * angle.sin())).sum(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        gate, u = self.in_proj(x).chunk(2, dim=-1)
        if self.kernel_kind == "fir":
            y = fir_causal_conv(u, self.kernel_taps)
        else:
            y = fft_causal_conv(u, self.kernel(u.size(1)))
        return self.out_proj(torch.sigmoid(gate) * y)


class Block(nn.Module):
    """Pre-norm residual block. Its sequence mixer is attention, an S4D mixer ("replace"), or both summed through
    a learned per-channel gate ("parallel"); then a LeakyReLU^2 MLP. x0 (the embedding) is mixed back in."""

    def __init__(self, layer_idx: int, dim: int, args: Hyperparameters, use_attention: bool, use_ssm: bool,
                 use_xsa: bool, max_len: int):
        super().__init__()
        self.ln_scale = 1.0 / math.sqrt(layer_idx + 1)
        self.attn = CausalSelfAttention(dim, args.num_heads, args.num_kv_heads, args.rope_dims, args.rope_base,
                                        args.qk_gain_init, use_xsa, max_len) if use_attention else None
        self.ssm = S4DLinMixer(dim, args.ssm_kernel, args.ssm_kernel_size, args.ssm_state_dim,
                               (args.ssm_dt_min, args.ssm_dt_max),
                               (args.ssm_rate_min, args.ssm_rate_max)) if use_ssm else None
        self.ssm_gate = nn.Parameter(torch.zeros(dim)) if use_attention and use_ssm else None
        self.mlp = MLP(dim, int(args.mlp_mult * dim), args.mlp_leaky_slope)
        self.mix_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor, value_embed: Tensor | None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.ln_scale
        if self.attn is not None and self.ssm is not None:
            mixed = self.attn(h, value_embed) + torch.sigmoid(self.ssm_gate).to(x.dtype) * self.ssm(h)
        elif self.attn is not None:
            mixed = self.attn(h, value_embed)
        else:
            mixed = self.ssm(h)
        x = x + self.mix_scale.to(x.dtype) * mixed
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_scale)


class BigramHashEmbedding(nn.Module):
    """Embedding of a hash of (previous token, token). A BOS token or the first position uses a reserved bucket,
    so nothing crosses a document boundary."""

    def __init__(self, buckets: int, bigram_dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.embed = nn.Embedding(buckets, bigram_dim)
        self.proj = CastedLinear(bigram_dim, model_dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, ids: Tensor) -> Tensor:
        prev = F.pad(ids[:, :-1], (1, 0))
        hashed = torch.bitwise_xor(36313 * ids, 27191 * prev) % (self.buckets - 1)
        first = torch.zeros_like(ids, dtype=torch.bool)
        first[:, 0] = True
        return torch.where(first | (ids == self.bos_id), self.buckets - 1, hashed)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(self.bucket_ids(ids))) * self.scale.to(self.embed.weight.dtype)


class SmearGate(nn.Module):
    """x_t <- x_t + g * (x_{t-1} - x_t), with a learned per-channel gate g; never at a BOS token (whose previous
    token belongs to another document) nor at the first position."""

    def __init__(self, dim: int, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        allowed = (ids != self.bos_id).to(x.dtype)[..., None]
        allowed[:, 0] = 0
        return x + torch.sigmoid(self.gate).to(x.dtype) * allowed * (prev - x)


class GPT(nn.Module):
    def __init__(self, args: Hyperparameters, bos_id: int = 1):
        super().__init__()
        dim, n = args.model_dim, args.num_layers
        max_len = max(args.train_seq_len, args.eval_seq_len)
        self.logit_softcap = args.logit_softcap
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        self.bigram = BigramHashEmbedding(args.bigram_vocab_size, args.bigram_dim, dim, bos_id) \
            if args.bigram_vocab_size >= 2 else None
        self.smear = SmearGate(dim, bos_id) if args.smear_gate else None
        ssm_layers = set(args.ssm_layers)
        attention_layers = [i for i in range(n) if i not in ssm_layers or args.ssm_mode == "parallel"]
        xsa_layers = set(attention_layers[max(0, len(attention_layers) - args.xsa_last_n):])
        self.blocks = nn.ModuleList(
            Block(i, dim, args, use_attention=i in attention_layers, use_ssm=i in ssm_layers,
                  use_xsa=i in xsa_layers, max_len=max_len) for i in range(n))
        # U-Net: the first half pushes its outputs, the second half adds them back in reverse order.
        self.num_encoder = n // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder, n - self.num_encoder), dim))
        # Value embeddings: one shared table, added to V in the listed layers with a learned scale per layer.
        self.ve_layers = {layer: i for i, layer in enumerate(sorted(args.ve_layers))}
        if self.ve_layers:
            kv_dim = args.num_kv_heads * (dim // args.num_heads)
            self.ve_table = nn.Embedding(args.vocab_size, args.ve_dim)
            self.ve_proj = CastedLinear(args.ve_dim, kv_dim, zero_init=True)
            self.ve_scales = nn.Parameter(torch.ones(len(self.ve_layers)))
        self._init_weights(args.tied_embed_init_std)

    def _init_weights(self, embed_std: float) -> None:
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        for module in self.modules():
            if isinstance(module, CastedLinear) and not module.zero_init:
                nn.init.orthogonal_(module.weight)
        if self.bigram is not None:
            nn.init.normal_(self.bigram.embed.weight, std=0.02)
        if self.ve_layers:
            nn.init.normal_(self.ve_table.weight, std=0.02)

    def hidden(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, ids)
        x0 = x
        ve = self.ve_proj(self.ve_table(ids)) if self.ve_layers else None
        skips: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            slot = self.ve_layers.get(i)
            x = block(x, x0, None if slot is None else ve * self.ve_scales[slot].to(x.dtype))
            if i < self.num_encoder:
                skips.append(x)
        return rms_norm(x)

    def logits(self, h: Tensor) -> Tensor:
        logits = F.linear(h, self.tok_emb.weight.to(h.dtype)).float()
        if self.logit_softcap > 0:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy (nats) over all positions."""
        logits = self.logits(self.hidden(ids))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def token_losses(self, ids: Tensor, targets: Tensor) -> Tensor:
        """[B, T] cross-entropy of every position."""
        logits = self.logits(self.hidden(ids))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)


def kernel_report(model: GPT, length: int) -> list[str]:
    """Per S4D layer: how many channels kept a monotone decay, grew one negative lobe, or oscillate, and the lag
    holding 90% of each channel's kernel mass (the effective memory length)."""
    lines = []
    for i, block in enumerate(model.blocks):
        if block.ssm is None:
            continue
        with torch.no_grad():
            k = block.ssm.kernel(length).float().cpu()
        mag = k.abs()
        peak = mag.max(dim=1, keepdim=True).values.clamp_min(1e-12)
        significant = mag > 0.01 * peak
        signs = torch.where(significant, torch.sign(k), torch.zeros_like(k))
        flips = torch.zeros(k.size(0), dtype=torch.long)
        for c in range(k.size(0)):
            s = signs[c][signs[c] != 0]
            flips[c] = int((s[1:] != s[:-1]).sum()) if s.numel() > 1 else 0
        non_increasing = (mag[:, 1:] <= mag[:, :-1] + 1e-3 * peak).all(dim=1)
        monotone = (flips == 0) & non_increasing
        one_lobe = flips == 1
        oscillating = flips >= 2
        other = ~(monotone | one_lobe | oscillating)
        cum = mag.cumsum(dim=1) / mag.sum(dim=1, keepdim=True).clamp_min(1e-12)
        memory = (cum < 0.9).sum(dim=1).float() + 1
        q = torch.quantile(memory, torch.tensor([0.1, 0.5, 0.9]))
        lines.append(
            f"kernel_report layer:{i} kind:{block.ssm.kernel_kind} channels:{k.size(0)} monotone:{int(monotone.sum())} "
            f"negative_lobe:{int(one_lobe.sum())} oscillating:{int(oscillating.sum())} other:{int(other.sum())} "
            f"memory90_p10:{q[0]:.0f} memory90_p50:{q[1]:.0f} memory90_p90:{q[2]:.0f}")
    return lines


# -----------------------------
# OPTIMIZERS
# -----------------------------


def zeropower_via_newtonschulz5(G: Tensor, steps: int) -> Tensor:
    """Orthogonalise a stack of matrices [N, m, n] with the quintic Newton-Schulz iteration of Muon."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then an orthogonalised update. Matrices of one shape form one group. Gradients arrive
    averaged over ranks, so every rank holds the same momentum; each rank orthogonalises only its share of a
    group's matrices (one batched call) and an all-gather assembles the update. That divides the Newton-Schulz
    work by the world size, and every rank applies bit-identical updates, so the replicas cannot drift even
    where the GPU's matmuls are not bitwise reproducible."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float, orthogonalize=None,
                 rank: int = 0, world_size: int = 1):
        by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        super().__init__([{"params": ps} for ps in by_shape.values()],
                         dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))
        self.orthogonalize = orthogonalize or zeropower_via_newtonschulz5
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = group["params"]
            grads = torch.stack([p.grad for p in params])
            state = self.state[params[0]]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grads)
            buf = state["momentum_buffer"]
            buf.lerp_(grads, 1 - group["momentum"])
            nesterov = grads.lerp_(buf, group["momentum"])
            if self.world_size > 1:
                share = -(-len(params) // self.world_size)  # zero matrices pad the last shares (NS maps 0 to 0)
                padded = F.pad(nesterov, (0, 0, 0, 0, 0, share * self.world_size - len(params)))
                mine = self.orthogonalize(padded[self.rank * share:(self.rank + 1) * share], group["backend_steps"])
                update = torch.empty((share * self.world_size, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
                dist.all_gather_into_tensor(update, mine.contiguous())
                update = update[:len(params)]
            else:
                update = self.orthogonalize(nesterov, group["backend_steps"])
            update = update * max(1.0, params[0].size(0) / params[0].size(1)) ** 0.5
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, [u.to(params[0].dtype) for u in update.unbind(0)], alpha=-group["lr"])


def split_parameters(model: GPT) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(matrices for Muon, embedding tables for Adam with decay, everything else for Adam without decay).
    Every CastedLinear weight is a matrix; S4D kernel parameters are not, so Adam trains them."""
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear)]
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    taken = {id(p) for p in matrices + embeddings}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    return matrices, embeddings, scalars


def build_optimizers(model: GPT, args: Hyperparameters, orthogonalize=None, rank: int = 0,
                     world_size: int = 1) -> list[torch.optim.Optimizer]:
    matrices, embeddings, scalars = split_parameters(model)
    fused = next(model.parameters()).is_cuda
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused)
    optimizers = [
        Muon(matrices, args.matrix_lr, args.muon_momentum, args.muon_backend_steps, args.muon_wd, orthogonalize,
             rank, world_size),
        torch.optim.AdamW(embeddings, lr=args.tied_embed_lr, weight_decay=args.adam_wd, **adam),
        torch.optim.AdamW(scalars, lr=args.scalar_lr, weight_decay=0.0, **adam),
    ]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(progress: float, args: Hyperparameters) -> float:
    """1 until the last WARMDOWN_FRAC of the run, then linear down to MIN_LR_FRAC at its end."""
    if args.warmdown_frac <= 0 or progress < 1 - args.warmdown_frac:
        return 1.0
    return max(args.min_lr_frac, (1.0 - progress) / args.warmdown_frac)


def muon_momentum_at(progress: float, args: Hyperparameters) -> float:
    if args.muon_momentum_warmup_frac <= 0:
        return args.muon_momentum
    t = min(progress / args.muon_momentum_warmup_frac, 1.0)
    return args.muon_momentum_warmup_start + t * (args.muon_momentum - args.muon_momentum_warmup_start)


class ExponentialMovingAverage:
    """EMA of the weights whose horizon is a fraction of the (estimated) run, so short and long runs average
    over the same share of their training; the first steps use a shorter horizon (step-aware warm-up)."""

    def __init__(self, model: nn.Module, horizon_frac: float):
        self.params = list(model.parameters())
        self.shadow = [p.detach().clone() for p in self.params]
        self.horizon_frac = horizon_frac

    def decay(self, step: int, progress: float) -> float:
        estimated_steps = step / max(progress, 1e-9)
        horizon = max(1.0, self.horizon_frac * estimated_steps)
        return min(1.0 - 1.0 / horizon, step / (step + 10.0))

    @torch.no_grad()
    def update(self, step: int, progress: float) -> None:
        torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.decay(step, progress))

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.shadow)


# -----------------------------
# POST-TRAINING QUANTIZATION (GPTQ) AND THE ARTIFACT
# -----------------------------
# Block matrices: full-Hessian GPTQ at QUANT_BITS (int5: values in [-15, 15]) with act-order, blocked error
# feedback and a per-row scale chosen by a clip search. Embedding tables and the small projections outside the
# blocks: per-row round-to-nearest at EMBED_QUANT_BITS. Everything else (gains, gates, S4D kernels) stays fp32.
# Values are stored one per int8 byte with fp16 scales; lzma then codes the small alphabet.

ARTIFACT_FORMAT = "s4d_xsa_gptq_v2"
# Knobs an artifact fixes: evaluating it rebuilds the model from these, whatever the environment says.
ARTIFACT_KEYS = ("QUANT_BITS", "VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "MLP_LEAKY_SLOPE",
              "ROPE_DIMS", "ROPE_BASE", "QK_GAIN_INIT", "LOGIT_SOFTCAP", "XSA_LAST_N", "BIGRAM_VOCAB_SIZE",
              "BIGRAM_DIM", "VE_LAYERS", "VE_DIM", "SMEAR_GATE", "SSM_LAYERS", "SSM_MODE", "SSM_KERNEL",
              "SSM_KERNEL_SIZE", "SSM_STATE_DIM")
# Clip levels (fractions of a row's max) searched for each row's scale. A finer step costs bits after
# compression: at int5 the MSE-best clip (~0.8) costs ~0.15 bits per weight more than no clip, so the low-bit
# GPTQ matrices only search coarse clips; GPTQ's error feedback absorbs most of the extra rounding error.
CLIP_FRACTIONS_FINE = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
CLIP_FRACTIONS_COARSE = (1.0, 0.95, 0.9)
# LZMA2 with a cheap match finder: quantized weights are nearly i.i.d. symbols, so long-match search is wasted
# time; measured on int5 data this codes ~2% smaller than preset 9 and ~8x faster.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "mode": lzma.MODE_NORMAL, "mf": lzma.MF_BT2, "nice_len": 8,
                 "depth": 1}]


def env_string(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def choose_row_scales(w: Tensor, bits: int, column_weight: Tensor | None = None,
                      fractions: tuple[float, ...] = CLIP_FRACTIONS_FINE) -> Tensor:
    """Per-row scale (fp16-representable) minimising the (column-weighted) rounding error over clip levels."""
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1).clamp_min(1e-8)
    cw = torch.ones(w.size(1), device=w.device) if column_weight is None else column_weight
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / qmax
    for frac in fractions:
        scale = (absmax * frac / qmax).half().float().clamp_min(1e-8)
        err = ((w - (w / scale[:, None]).round().clamp(-qmax, qmax) * scale[:, None]).square() * cw).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best.half().float()


def quantize_rtn(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row round-to-nearest with a clip search: (int8 values, fp16 scales)."""
    w = w.float()
    qmax = 2 ** (bits - 1) - 1
    scale = choose_row_scales(w, bits)
    return (w / scale[:, None]).round().clamp(-qmax, qmax).to(torch.int8), scale.half()


def gptq_quantize(w: Tensor, hessian: Tensor, bits: int, block_size: int, damp: float) -> tuple[Tensor, Tensor]:
    """GPTQ of w [rows, cols] given the input Hessian [cols, cols]: (int8 values, fp16 per-row scales)."""
    qmax = 2 ** (bits - 1) - 1
    w, H = w.float().clone(), hessian.float().clone()
    cols = w.size(1)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale = choose_row_scales(w, bits, H.diagonal(), CLIP_FRACTIONS_COARSE)
    perm = torch.argsort(H.diagonal(), descending=True)  # act-order: the most active inputs first
    w, H = w[:, perm], H[perm][:, perm]
    for attempt in range(6):  # a near-singular Hessian gets more damping rather than a crash
        Hd = H.clone()
        Hd.diagonal().add_(damp * (10 ** attempt) * H.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            break
    else:
        raise RuntimeError("GPTQ: the calibration Hessian stayed singular after damping")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    q = torch.zeros_like(w)
    s = scale[:, None]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w_blk, h_blk = w[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err_blk = torch.zeros_like(w_blk)
        for j in range(i2 - i1):
            col = w_blk[:, j:j + 1]
            q_col = (col / s).round().clamp(-qmax, qmax)
            q[:, i1 + j:i1 + j + 1] = q_col
            err = (col - q_col * s) / h_blk[j, j]
            w_blk[:, j:] -= err * h_blk[j:j + 1, j:]
            err_blk[:, j:j + 1] = err
        w[:, i2:] -= err_blk @ Hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int8), scale.half()


def gptq_groups(model: GPT) -> list[list[str]]:
    """Block matrices grouped by the input they read: Q, K and V share one Hessian and are solved as one matrix."""
    groups = []
    for name, module in model.named_modules():
        if not name.startswith("blocks."):
            continue
        if isinstance(module, CausalSelfAttention):
            groups.append([f"{name}.c_q", f"{name}.c_k", f"{name}.c_v"])
            groups.append([f"{name}.proj"])
        elif isinstance(module, (MLP,)):
            groups += [[f"{name}.fc"], [f"{name}.proj"]]
        elif isinstance(module, S4DLinMixer):
            groups += [[f"{name}.in_proj"], [f"{name}.out_proj"]]
    return groups


@torch.no_grad()
def collect_hessians(model: GPT, batches, device: torch.device, use_autocast: bool) -> dict[str, Tensor]:
    """Sum of x^T x over every calibration token, for the first module of each GPTQ group (eager, with hooks)."""
    modules = dict(model.named_modules())
    hessians: dict[str, Tensor] = {}
    hooks = []
    for group in gptq_groups(model):
        name = group[0]

        def hook(_module, inputs, _output, name=name):
            x = inputs[0].reshape(-1, inputs[0].size(-1)).float()
            if name not in hessians:
                hessians[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
            hessians[name].addmm_(x.T, x)

        hooks.append(modules[name].register_forward_hook(hook))
    try:
        for x, _ in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                model.hidden(x)
    finally:
        for h in hooks:
            h.remove()
    return hessians


def quantize_model(model: GPT, hessians: dict[str, Tensor], args: Hyperparameters) -> dict:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tables = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Embedding, CastedLinear))}
    tensors: dict[str, dict] = {}
    for group in gptq_groups(model):
        weights = [state[f"{n}.weight"] for n in group]
        q, scale = gptq_quantize(torch.cat(weights), hessians[group[0]], args.quant_bits, args.gptq_block_size,
                                 args.gptq_damp)
        row = 0
        for n, w in zip(group, weights):
            rows = w.size(0)
            tensors[f"{n}.weight"] = {"q": q[row:row + rows].cpu(), "scale": scale[row:row + rows].cpu(),
                                      "bits": args.quant_bits}
            row += rows
    for name, t in state.items():
        if name in tensors:
            continue
        if name in tables:  # embeddings and the projections outside the blocks
            q, scale = quantize_rtn(t, args.embed_quant_bits)
            tensors[name] = {"q": q.cpu(), "scale": scale.cpu(), "bits": args.embed_quant_bits}
        else:
            tensors[name] = {"w": t.float().cpu()}
    config = {k: env_string(args.values[k]) for k in ARTIFACT_KEYS}
    return {"format": ARTIFACT_FORMAT, "config": config, "tensors": tensors}


def dequantize_state(artifact: dict) -> dict[str, Tensor]:
    out = {}
    for name, entry in artifact["tensors"].items():
        out[name] = entry["q"].float() * entry["scale"].float()[:, None] if "q" in entry else entry["w"]
    return out


def serialize_artifact(artifact: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(artifact, buf)
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, filters=LZMA_FILTERS)


def deserialize_artifact(blob: bytes, source: str = "artifact") -> dict:
    try:
        artifact = torch.load(io.BytesIO(lzma.decompress(blob)), map_location="cpu", weights_only=True)
    except Exception as e:  # lzma, unpickling and format errors all mean the same thing to the user
        raise ValueError(f"{source} is not a {ARTIFACT_FORMAT} artifact ({type(e).__name__}: {e})") from None
    if not isinstance(artifact, dict) or artifact.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{source} is not a {ARTIFACT_FORMAT} artifact")
    return artifact


def submission_bytes(code: bytes, model_blob: bytes) -> dict[str, int | bool]:
    """The size rule: UTF-8 bytes of this script plus the compressed model, against 16,000,000 (decimal)."""
    total = len(code) + len(model_blob)
    return {"bytes_code": len(code), "bytes_model": len(model_blob), "bytes_total": total,
            "under_limit": total <= SIZE_LIMIT_BYTES}


# -----------------------------
# EVALUATION
# -----------------------------


def plan_windows(num_targets: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows that score every target exactly once: (window start, first scored position in the window).
    The first window scores all its positions; each later one scores the `stride` targets after the last
    scored one, with the longest context the window allows. stride == seq_len gives non-overlapping windows
    (the last one slides back so it is full, and scores only the targets not yet scored)."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride {stride} must be in 1..{seq_len}")
    starts, firsts = [0], [0]
    scored = seq_len
    while scored < num_targets:
        end = min(scored + stride, num_targets)
        starts.append(end - seq_len)
        firsts.append(scored - (end - seq_len))
        scored = end
    return np.asarray(starts, dtype=np.int64), np.asarray(firsts, dtype=np.int64)


@torch.no_grad()
def evaluate(token_losses, val: dict, seq_len: int, stride: int, batch_seqs: int, rank: int, world_size: int,
             device: torch.device, use_autocast: bool) -> tuple[float, float, int]:
    """(val_loss nats/token, val_bpb, tokens scored) over the whole validation stream."""
    tokens, target_bytes = val["tokens"], val["target_bytes"]
    num_targets = tokens.numel() - 1
    seq_len = min(seq_len, num_targets)
    starts, firsts = plan_windows(num_targets, seq_len, min(stride, seq_len) if stride else seq_len)
    per_rank = -(-len(starts) // world_size)
    lo, hi = rank * per_rank, min(len(starts), (rank + 1) * per_rank)
    offsets = torch.arange(seq_len, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, tokens, bytes
    for b0 in range(lo, hi, batch_seqs):
        idx = np.arange(b0, min(b0 + batch_seqs, hi))
        s = torch.from_numpy(starts[idx]).to(device)
        f = torch.from_numpy(firsts[idx]).to(device)
        if len(idx) < batch_seqs:  # keep one static shape for the compiled graph: pad with unscored windows
            pad = batch_seqs - len(idx)
            s = torch.cat((s, s[-1:].expand(pad)))
            f = torch.cat((f, torch.full((pad,), seq_len, device=device, dtype=f.dtype)))
        pos = s[:, None] + offsets[None, :]
        x, y = tokens[pos], tokens[pos + 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            losses = token_losses(x, y)
        mask = offsets[None, :] >= f[:, None]  # multiplied, not indexed: boolean indexing would sync the host
        sums[0] += (losses.double() * mask).sum()
        sums[1] += mask.sum()
        sums[2] += (target_bytes[pos] * mask).sum()
    if world_size > 1:
        dist.all_reduce(sums)
    loss_sum, count, byte_count = sums.tolist()
    if int(count) != num_targets:
        raise RuntimeError(f"evaluation scored {int(count)} targets, expected each of {num_targets} exactly once")
    val_loss = loss_sum / count
    return val_loss, val_loss / math.log(2) * count / byte_count, int(count)


# -----------------------------
# DEMO DATA (no GPU and no FineWeb: a small language the script writes itself)
# -----------------------------


def make_demo_text(num_docs: int, seed: int) -> list[str]:
    """Documents in a toy English with agreement, arithmetic and recurring names, so a model has things to learn."""
    rng = random.Random(seed)
    names = ["Ada", "Boris", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena"]
    nouns = ["river", "garden", "engine", "letter", "mountain", "window", "market", "violin", "bridge", "forest",
             "lantern", "harbour", "castle", "meadow", "station", "library"]
    adjectives = ["old", "quiet", "bright", "narrow", "golden", "broken", "distant", "small", "ancient", "green"]
    verbs = [("visits", "visited"), ("paints", "painted"), ("repairs", "repaired"), ("watches", "watched"),
             ("describes", "described"), ("finds", "found"), ("builds", "built"), ("remembers", "remembered")]
    places = ["the north", "the valley", "the city", "the coast", "the island", "the old town"]
    docs = []
    for _ in range(num_docs):
        hero, noun = rng.choice(names), rng.choice(nouns)
        sentences = [f"{hero} and the {noun}"]
        for _ in range(rng.randint(4, 14)):
            kind = rng.random()
            present, past = rng.choice(verbs)
            if kind < 0.35:
                sentences.append(f"{hero} {past} the {rng.choice(adjectives)} {noun} in {rng.choice(places)}.")
            elif kind < 0.6:
                other = rng.choice(nouns)
                sentences.append(f"Every day {hero} {present} a {rng.choice(adjectives)} {other} near the {noun}.")
            elif kind < 0.8:
                a, b = rng.randint(1, 49), rng.randint(1, 49)
                sentences.append(f"{hero} counted {a} and {b}, which makes {a + b}.")
            else:
                sentences.append(f"The {noun} of {hero} was {rng.choice(adjectives)}, and {hero} liked it.")
        docs.append(" ".join(sentences))
    return docs


def make_demo_data(directory: str, vocab_size: int = 512) -> None:
    """Writes demo tokenizer and shards into `directory` once (a few seconds)."""
    out = Path(directory)
    model_path = out / f"demo_{vocab_size}_bpe.model"
    if model_path.is_file() and list(out.glob("fineweb_val_*.bin")):
        return
    out.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = make_demo_text(12_000, seed=1), make_demo_text(400, seed=2)
    text_path = out / "demo_text.txt"
    text_path.write_text("\n".join(train_docs[:3000]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text_path), model_prefix=str(out / f"demo_{vocab_size}_bpe"), vocab_size=vocab_size,
        model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, add_dummy_prefix=False, character_coverage=1.0,
        num_threads=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = [tok for doc in sp.encode(docs) for tok in [sp.bos_id()] + doc]
        write_data_shard(out / f"fineweb_{split}_000000.bin", np.asarray(ids, dtype=np.uint16))


# -----------------------------
# TRAINING, EXPORT AND ROUND-TRIP EVALUATION
# -----------------------------


def evaluate_artifact(artifact: dict, model: GPT, token_losses, val: dict, args: Hyperparameters, rank: int,
                      world_size: int, device: torch.device, use_cuda: bool, log0) -> dict:
    """Dequantize the decoded artifact over every tensor of `model`, then score the whole validation
    stream: non-overlapping windows, then sliding windows (the headline). Every target is scored once."""
    model.load_state_dict(dequantize_state(artifact), strict=True)
    results = {}
    passes = [("roundtrip", args.eval_seq_len)] + ([("sliding_window", args.eval_stride)] if args.eval_stride else [])
    for label, stride in passes:
        if use_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, bpb, count = evaluate(token_losses, val, args.eval_seq_len, stride, args.eval_batch_seqs, rank,
                                    world_size, device, use_cuda)
        if use_cuda:
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - t0)
        tag = f"final_int{args.quant_bits}_{label}"
        log0(f"{tag} val_loss:{loss:.4f} val_bpb:{bpb:.4f} seq_len:{args.eval_seq_len} stride:{stride} "
             f"tokens:{count} eval_time:{ms:.0f}ms")
        log0(f"{tag}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        results[label] = {"val_loss": loss, "val_bpb": bpb, "eval_seconds": ms / 1000}
    return results


def main() -> None:
    code_bytes = Path(__file__).read_bytes()
    launch = time.perf_counter()

    # DISTRIBUTED + DEVICE SETUP. Configuration errors surface here, before any data or model work.
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available()
    demo = not use_cuda and "DATA_PATH" not in os.environ and not os.path.isdir(DEFAULT_DATA_PATH)
    args = Hyperparameters(defaults=DEMO_DEFAULTS if demo else None)
    eval_only = bool(args.eval_artifact)
    if eval_only:  # the artifact fixes the model's shape; the environment still sets data and evaluation
        artifact_blob = Path(args.eval_artifact).read_bytes()
        artifact = deserialize_artifact(artifact_blob, args.eval_artifact)  # decoded once, used twice
        env = dict(os.environ)
        env.update(artifact["config"])
        args = Hyperparameters(env=env, defaults=DEMO_DEFAULTS if demo else None)
    grad_accum, micro_seqs = args.batch_layout(world_size)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    master = rank == 0
    compile_on = use_cuda and args.compile

    os.makedirs("logs", exist_ok=True)
    logfile = f"logs/{args.run_id}.txt"
    factsfile = f"logs/{args.run_id}.json"

    def log0(msg: str, console: bool = True) -> None:
        if not master:
            return
        if console:
            print(msg, flush=True)
        with open(logfile, "a", encoding="utf-8") as f:
            f.write(msg + "\n")

    facts: dict = {"run_id": args.run_id, "seed": args.seed, "world_size": world_size, "status": "started"}

    def write_facts() -> None:
        if master:
            Path(factsfile).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")

    log0(code_bytes.decode("utf-8"), console=False)
    log0("=" * 100, console=False)
    log0(f"Running Python {sys.version.split()[0]} PyTorch {torch.__version__}", console=False)
    if use_cuda:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
        log0(smi.stdout, console=False)
    if demo:
        log0(f"demo: no CUDA device and no data at {DEFAULT_DATA_PATH}: running the embedded demo "
             f"(self-generated text and tokenizer in {DEMO_DIR}, small model, CPU)")
    log0("hyperparameters:")
    for name, value in args.values.items():
        log0(f"  {name}: {env_string(value)}")
    if args.val_max_tokens:
        log0(f"WARNING: VAL_MAX_TOKENS={args.val_max_tokens} scores a prefix of the validation split: not an official score")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # TOKENIZER + VALIDATION DATA
    if demo and master:
        make_demo_data(DEMO_DIR)
    if distributed:
        dist.barrier()
    sp = load_tokenizer(args.tokenizer_path, args.vocab_size)
    luts = build_sentencepiece_luts(sp)
    val_np = load_validation_tokens(args.data_path, args.val_max_tokens)
    check_token_range(val_np, args.vocab_size, "the validation split")
    byte_counts = target_byte_counts(val_np, luts)
    val = {"tokens": torch.from_numpy(val_np.astype(np.int64)).to(device),
           "target_bytes": torch.from_numpy(byte_counts).to(device)}
    log0(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={args.tokenizer_path}")
    log0(f"val_loader:shards pattern={args.data_path}/fineweb_val_*.bin tokens:{val_np.size} "
         f"targets:{val_np.size - 1} target_bytes:{int(byte_counts.sum())}")
    facts.update(val_tokens=int(val_np.size - 1), val_bytes=int(byte_counts.sum()))

    # MODEL
    base_model = GPT(args, bos_id=sp.bos_id()).to(device)
    token_losses = torch.compile(base_model.token_losses, dynamic=False, fullgraph=True) if compile_on \
        else base_model.token_losses
    attention_kind = "flash_attn_3" if fa3_attention is not None and use_cuda else "sdpa"
    xsa_layers = [i for i, b in enumerate(base_model.blocks) if b.attn is not None and b.attn.use_xsa]
    log0(f"model_params:{sum(p.numel() for p in base_model.parameters())} attention:{attention_kind} "
         f"ssm_layers:{env_string(args.ssm_layers) or 'none'} ssm_mode:{args.ssm_mode} ssm_kernel:{args.ssm_kernel} "
         f"xsa_layers:{env_string(tuple(xsa_layers)) or 'none'}")
    log0(f"world_size:{world_size} grad_accum_steps:{grad_accum} micro_batch_seqs:{micro_seqs} compile:{compile_on}")
    log0(f"legality: calibration on training shards inside the training wall clock (GPTQ_RESERVE_SECONDS="
         f"{args.gptq_reserve_seconds:g}); no validation tokens in training or calibration; no test-time "
         f"adaptation; every validation target scored exactly once, causally")

    if eval_only:
        results = evaluate_artifact(artifact, base_model, token_losses, val, args, rank, world_size, device,
                                    use_cuda, log0)
        facts.update(status="evaluated", artifact=args.eval_artifact, results=results,
                     **submission_bytes(code_bytes, artifact_blob))
        write_facts()
        if distributed:
            dist.destroy_process_group()
        return

    train_files = find_shards(args.data_path, "train")
    log0(f"train_loader:dataset:{args.data_path} train_shards:{len(train_files)}")
    compiled = torch.compile(base_model, dynamic=False, fullgraph=True) if compile_on else base_model
    model = DDP(compiled, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False) \
        if distributed else compiled
    orthogonalize = torch.compile(zeropower_via_newtonschulz5) if compile_on else None
    optimizers = build_optimizers(base_model, args, orthogonalize, rank, world_size)
    loader = DistributedTokenLoader(train_files, args.vocab_size, rank, world_size, device)

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize()

    def train_step(progress: float) -> Tensor:
        mult = lr_multiplier(progress, args)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult
        for group in optimizers[0].param_groups:
            group["momentum"] = muon_momentum_at(progress, args)
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = loader.next_batch(micro_seqs, args.train_seq_len)
            if distributed:
                model.require_backward_grad_sync = micro == grad_accum - 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                loss = model(x, y)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), args.grad_clip_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss_sum / grad_accum

    # COMPILE PRIMING: real steps that warm every kernel, then the initial weights, optimizer state and data
    # position are restored so the timed run starts from scratch.
    if args.warmup_steps:
        initial_model = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        initial_optimizers = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        for i in range(args.warmup_steps):
            train_step(0.0)
            if i + 1 in (1, args.warmup_steps) or (i + 1) % 10 == 0:
                log0(f"warmup_step:{i + 1}/{args.warmup_steps}")
        base_model.load_state_dict(initial_model)
        for opt, saved in zip(optimizers, initial_optimizers):
            opt.load_state_dict(saved)
        loader = DistributedTokenLoader(train_files, args.vocab_size, rank, world_size, device)

    # MAIN TRAINING LOOP. The clock counts training steps only (not validation); GPTQ_RESERVE_SECONDS of the
    # MAX_WALLCLOCK_SECONDS budget are kept for calibration, which also reads training data.
    budget_ms = 1000 * (args.max_wallclock_seconds - args.gptq_reserve_seconds) if args.max_wallclock_seconds else 0
    ema = ExponentialMovingAverage(base_model, args.ema_horizon_frac) if args.ema_enabled else None
    training_ms, elapsed_ms, step, stop_after_step = 0.0, 0.0, 0, None
    sync()
    log0(f"time_to_first_step:{time.perf_counter() - launch:.1f}s (setup, compile and warm-up)")
    t0 = time.perf_counter()
    while True:
        last_step = step == args.iterations or (stop_after_step is not None and step >= stop_after_step)
        if args.val_loss_every and step > 0 and (last_step or step % args.val_loss_every == 0):
            sync()
            training_ms += 1000 * (time.perf_counter() - t0)
            loss, bpb, _ = evaluate(token_losses, val, args.eval_seq_len, args.eval_seq_len, args.eval_batch_seqs,
                                    rank, world_size, device, use_cuda)
            log0(f"step:{step}/{args.iterations} val_loss:{loss:.4f} val_bpb:{bpb:.4f} "
                 f"train_time:{training_ms:.0f}ms step_avg:{training_ms / step:.2f}ms")
            sync()
            t0 = time.perf_counter()
        if last_step:
            break
        progress = max(step / args.iterations, elapsed_ms / budget_ms if budget_ms else 0.0)
        train_loss = train_step(min(progress, 1.0))
        step += 1
        if ema is not None:
            ema.update(step, max(progress, 1e-9))
        elapsed_ms = training_ms + 1000 * (time.perf_counter() - t0)
        if budget_ms and distributed:  # every rank must follow the same schedule, or the replicas drift apart
            shared = torch.tensor(elapsed_ms, device=device, dtype=torch.float64)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            elapsed_ms = shared.item()
        if budget_ms and stop_after_step is None and elapsed_ms >= budget_ms:
            stop_after_step = step
        if step <= 10 or step % args.train_log_every == 0 or step in (args.iterations, stop_after_step):
            if distributed:  # the global batch's mean, so logs of 1 and 8 GPUs compare line by line
                dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
            log0(f"step:{step}/{args.iterations} train_loss:{train_loss.item():.4f} "
                 f"train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms")
    sync()
    training_ms += 1000 * (time.perf_counter() - t0)
    if stop_after_step is not None:
        log0(f"stopping_early: wallclock_cap train_time:{training_ms:.0f}ms step:{step}/{args.iterations}")
    tokens_per_s = step * args.train_batch_tokens / (training_ms / 1000)
    log0(f"train_summary steps:{step} train_time:{training_ms:.0f}ms step_avg:{training_ms / step:.2f}ms "
         f"tokens_per_s:{tokens_per_s:.0f}")
    if use_cuda:
        log0(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
             f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    facts.update(steps=step, step_avg_ms=training_ms / step, train_time_ms=training_ms, tokens_per_s=tokens_per_s)

    # The exported weights are the EMA's. Calibration runs on them, on the next unseen training tokens.
    if ema is not None:
        ema.copy_to_model()
    if distributed:  # every replica must hold the same weights; a drift would mean rank 0 exports an outlier
        sums = torch.stack([p.detach().double().sum() for p in base_model.parameters()])
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        in_sync = bool(torch.equal(low, high))
        spread = ((high - low).abs() / high.abs().clamp_min(1e-30)).max().item()
        log0(f"replicas_in_sync:{in_sync} max_relative_spread:{spread:.3g}"
             + ("" if in_sync else " WARNING: the ranks' weights differ"))
    t_cal = time.perf_counter()
    calib_per_rank = -(-args.gptq_calib_seqs // world_size)
    calib_batches = []
    while calib_per_rank > 0:
        n = min(micro_seqs, calib_per_rank)
        calib_batches.append(loader.next_batch(n, args.train_seq_len))
        calib_per_rank -= n
    hessians = collect_hessians(base_model, calib_batches, device, use_cuda)
    if distributed:
        for h in hessians.values():
            dist.all_reduce(h)
    sync()
    calibration_ms = 1000 * (time.perf_counter() - t_cal)
    total_ms = training_ms + calibration_ms
    within = not args.max_wallclock_seconds or total_ms <= 1000 * args.max_wallclock_seconds
    log0(f"gptq_calibration seqs:{args.gptq_calib_seqs} source:train_shards time:{calibration_ms:.0f}ms "
         f"train_plus_calibration:{total_ms:.0f}ms within_wallclock:{within}")
    if not within:
        log0(f"WARNING: training + calibration took {total_ms / 1000:.1f}s, over MAX_WALLCLOCK_SECONDS="
             f"{args.max_wallclock_seconds:g}: raise GPTQ_RESERVE_SECONDS")
    facts.update(calibration_ms=calibration_ms, train_plus_calibration_s=total_ms / 1000,
                 calibration_within_wallclock=within)
    for line in kernel_report(base_model, args.train_seq_len):
        log0(line)

    t_eval = time.perf_counter()
    pre_loss, pre_bpb, _ = evaluate(token_losses, val, args.eval_seq_len, args.eval_seq_len, args.eval_batch_seqs,
                                    rank, world_size, device, use_cuda)
    log0(f"pre_export val_loss:{pre_loss:.4f} val_bpb:{pre_bpb:.4f} weights:{'ema' if ema else 'final'} "
         f"eval_time:{1000 * (time.perf_counter() - t_eval):.0f}ms")
    facts.update(pre_quant_val_loss=pre_loss, pre_quant_val_bpb=pre_bpb)

    # EXPORT: rank 0 quantizes, compresses and writes the artifact; every rank then reads it back. A failure on
    # rank 0 is shared at once, so the other ranks stop too instead of waiting at a barrier.
    export_ok = torch.ones((), device=device)
    export_error = None
    if master:
        try:
            t_export = time.perf_counter()
            blob = serialize_artifact(quantize_model(base_model, hessians, args))
            Path(args.artifact_path).write_bytes(blob)
            export_s = time.perf_counter() - t_export
        except Exception as e:
            export_ok.zero_()
            export_error = e
            log0(f"ERROR: export failed: {type(e).__name__}: {e}")
    if distributed:
        dist.all_reduce(export_ok, op=dist.ReduceOp.MIN)
    if not bool(export_ok.item()):
        if distributed:
            dist.destroy_process_group()
        if export_error is not None:
            raise export_error
        raise SystemExit("export failed on rank 0")
    if master:
        sizes = submission_bytes(code_bytes, blob)
        log0(f"Serialized model int{args.quant_bits}+lzma: {sizes['bytes_model']} bytes ({args.artifact_path})")
        log0(f"Code size: {sizes['bytes_code']} bytes")
        log0(f"Total submission size int{args.quant_bits}+lzma: {sizes['bytes_total']} bytes")
        log0(f"export_time:{export_s:.1f}s (GPTQ + serialization + lzma)")
        if not sizes["under_limit"]:
            log0(f"ERROR: total submission size {sizes['bytes_total']} bytes exceeds {SIZE_LIMIT_BYTES}: "
                 f"this run is NOT a valid submission")
        facts.update(status="exported", export_seconds=export_s, **sizes)
        write_facts()

    blob = Path(args.artifact_path).read_bytes()
    results = evaluate_artifact(deserialize_artifact(blob, args.artifact_path), base_model, token_losses, val, args,
                                rank, world_size, device, use_cuda, log0)
    headline = results.get("sliding_window", results["roundtrip"])
    eval_seconds = sum(r["eval_seconds"] for r in results.values())
    sizes = submission_bytes(code_bytes, blob)
    facts.update(
        status="evaluated", val_loss=headline["val_loss"], val_bpb=headline["val_bpb"], results=results,
        eval_time_seconds=eval_seconds, **sizes,
        valid=sizes["under_limit"] and within,
        compliance={"train_under_600s": total_ms <= 600_000,
                    "artifact_under_16mb": sizes["under_limit"], "eval_under_600s": eval_seconds <= 600,
                    "calibration": "training shards, inside the training wall clock",
                    "no_val_data_in_training": True, "score_first": True, "no_ttt": True, "no_slot": True,
                    "no_pre_quant_ttt": True, "no_etlb": True, "no_ngram_cache": True},
        hardware=f"{world_size}x {torch.cuda.get_device_name(device) if use_cuda else 'CPU'}",
        pytorch_version=torch.__version__, config={k: env_string(v) for k, v in args.values.items()})
    write_facts()
    log0(f"submission_facts:{factsfile} valid:{facts['valid']}")
    if distributed:
        dist.destroy_process_group()
    if not sizes["under_limit"]:
        raise SystemExit(f"artifact too large: {sizes['bytes_total']} > {SIZE_LIMIT_BYTES} bytes")


if __name__ == "__main__":
    main()
