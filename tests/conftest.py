"""Shared helpers for the train_gpt.py test suite (CPU only, tiny configurations, data made in tmp dirs)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import train_gpt as tg  # noqa: E402  (importing must not run main())
from scripts import demo  # noqa: E402

SCRIPT_PATH = REPO_ROOT / "train_gpt.py"

# The default architecture scaled down: S4D mixers in layers 0-1 (in place of attention), XSA on the attention
# layers, SmearGate, U-Net skips, the tied embedding.
TINY_ENV = {
    "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "VOCAB_SIZE": "128",
    "TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "32", "EVAL_STRIDE": "8", "SSM_KERNEL_SIZE": "8", "SSM_STATE_DIM": "8",
    "TTT_LORA_CHUNK": "8", "RUN_ID": "pytest",
}


def tiny_env(**overrides: object) -> dict[str, str]:
    env = dict(TINY_ENV)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def tiny_args(**overrides: object) -> tg.Hyperparameters:
    """A validated tiny Hyperparameters; keyword overrides are environment variables (SSM_MODE="parallel")."""
    return tg.Hyperparameters(env=tiny_env(**overrides))


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (zero-initialised projections included) so that every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def markov_batches(vocab: int, n_batches: int, seqs: int, seq_len: int, seed: int = 0):
    """(x, y) batches from a fixed random first-order Markov chain: data a model can learn something from."""
    gen = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1234)) * 3, dim=1)
    out = []
    for _ in range(n_batches):
        seq = torch.empty(seqs, seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, vocab, (seqs,), generator=gen)
        for t in range(1, seq_len + 1):
            seq[:, t] = torch.multinomial(trans[seq[:, t - 1]], 1, generator=gen)[:, 0]
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def train_tiny(args, steps: int = 30, seed: int = 0):
    """A tiny GPT trained `steps` steps on markov_batches (and checked to learn when steps >= 30); returns it with
    its batches plus 4 more, for calibration or evaluation."""
    torch.manual_seed(seed)
    model = tg.GPT(args)
    optimizers = tg.build_optimizers(model, args)
    batches = markov_batches(args.vocab_size, steps + 4, 16, args.train_seq_len, seed=seed)
    first = None
    for x, y in batches[:steps]:
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
    assert steps < 30 or loss.item() < first - 0.5, "the tiny model did not train"
    model.eval()
    return model, batches


# Non-ASCII text for the byte-counting tests: 2-byte (é, ü), 3-byte (日, 東) characters in the vocabulary, and
# characters never seen in training (☃, Ω) that only byte fallback can encode.
NON_ASCII_DOCS = [
    "Ada visited the café in Zürich, naïve and happy.",
    "Émile liked crème brûlée über alles.",
    "日本 and 東京 are far from the river.",
]


@pytest.fixture(scope="session")
def small_sp(tmp_path_factory):
    """A SentencePiece BPE model (400 pieces, byte fallback, no dummy prefix) trained in well under a second."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("small_sp")
    text = out / "text.txt"
    text.write_text("\n".join(demo.make_demo_text(600, seed=5) + NON_ASCII_DOCS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "small"), model_type="bpe", vocab_size=400, pad_id=0, bos_id=1,
        eos_id=2, unk_id=3, add_dummy_prefix=False, character_coverage=1.0, byte_fallback=True, num_threads=1,
        minloglevel=2)
    return str(out / "small.model")


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """The demo's data once per session: demo_512_bpe.model and fineweb_{train,val}_000000.bin."""
    d = tmp_path_factory.mktemp("demo_data")
    demo.make_demo_data(d)
    return d


def shard(path: Path, tokens) -> Path:
    demo.write_data_shard(path, np.asarray(tokens, dtype=np.uint16))
    return path
