"""The CPU demo: no GPU and no FineWeb needed. It writes a small corpus in a toy English and a 512-piece tokenizer,
then runs train_gpt.py on them with a 4-layer model for 60 steps: the whole pipeline (training, calibration,
export under the size rule, the four scoring passes and the verdict) in about a minute on two cores.

    python3 scripts/demo.py

Everything it writes stays under ./demo/ (ignored by git): the data in demo/data/, and train_gpt.py's own
outputs (logs/, checkpoints/, final_model.ptz) with demo/ as the working directory; an earlier run's files are
kept, as train_gpt.py keeps them. Bounded by steps, not the clock, a seed gives the same numbers on a busy
machine. Any knob set in the environment wins over the demo's (SEED=7 python3 scripts/demo.py). It ends
valid:False, naming the rules a demo breaks (no wall-clock cap, not the official data or hardware).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

DEMO_DIR = REPO / "demo"
# A model small enough to train, export and evaluate on two CPU cores in about a minute: the default architecture
# (S4D mixers in layers 0-1, XSA on the attention layers), scaled down.
DEMO_KNOBS = {
    "VOCAB_SIZE": "512", "NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "MLP_MULT": "2", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "32", "TRAIN_BATCH_TOKENS": "4096",
    "ITERATIONS": "60", "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "0", "TRAIN_LOG_EVERY": "20",
    "MATRIX_LR": "0.02", "TIED_EMBED_LR": "0.03", "TTT_CHUNK_TOKENS": "4096",
}


def write_data_shard(path: str | Path, tokens: np.ndarray) -> None:
    """A shard in the official format (train_gpt.read_shard_header reads it)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"token ids must fit in uint16 to be written to {path}")
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


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


def make_demo_data(directory: str | Path, vocab_size: int = 512) -> None:
    """Writes the demo tokenizer and shards (official format) into `directory` once (a few seconds)."""
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


def demo_environment(data_dir: Path, environ: dict[str, str]) -> dict[str, str]:
    """The demo's knobs and data under whatever the user set (the user's settings win)."""
    data = {"DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(data_dir / "demo_512_bpe.model")}
    return {**DEMO_KNOBS, **data, **environ}


def main(argv: list[str]) -> None:
    """Write the data, then become train_gpt.py in demo/ (exec: a signal stops the run itself, not a parent)."""
    if argv:
        sys.exit(f"scripts/demo.py takes no arguments, only environment variables (SEED=7 python3 scripts/demo.py): "
                 f"got {' '.join(argv)}")
    data_dir = DEMO_DIR / "data"
    print(f"demo: a small self-made corpus and tokenizer in {data_dir}, a 4-layer model, "
          f"{DEMO_KNOBS['ITERATIONS']} steps on the CPU; outputs under {DEMO_DIR}", flush=True)
    make_demo_data(data_dir)
    os.chdir(DEMO_DIR)
    env = demo_environment(data_dir, dict(os.environ))
    os.execve(sys.executable, [sys.executable, str(REPO / "train_gpt.py")], env)


if __name__ == "__main__":
    main(sys.argv[1:])
