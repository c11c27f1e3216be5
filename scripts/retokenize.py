"""Re-encode shards made with one SentencePiece tokenizer with another: the same documents, other token ids.

    python3 scripts/retokenize.py SRC_DIR SRC.model DST_DIR DST.model [--split train|val] [--shard-tokens N]

Each split's shards are read in order as one stream, cut into documents at BOS, decoded to text and encoded again
(documents in parallel), and written as shards of the challenge format (BOS + tokens per document). Decoding is
exact only for a tokenizer without <unk> (the sp8192 tokenizer has byte fallback; sp1024 does not), so convert
sp8192 shards to sp1024, not the other way. Used for A/B runs of two vocabularies on exactly the same text."""

import argparse
import multiprocessing as mp
import os
import sys

import numpy as np
import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]
import train_gpt as tg  # noqa: E402
from demo import write_data_shard  # noqa: E402  (scripts/demo.py, first on the path)

_src = _dst = None


def _init(src_model: str, dst_model: str) -> None:
    global _src, _dst
    _src = spm.SentencePieceProcessor(model_file=src_model)
    _dst = spm.SentencePieceProcessor(model_file=dst_model)


def _encode(docs: list) -> list:
    return _dst.encode(_src.decode(docs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src_dir")
    ap.add_argument("src_model")
    ap.add_argument("dst_dir")
    ap.add_argument("dst_model")
    ap.add_argument("--split", default="train", choices=("train", "val"))
    ap.add_argument("--shard-tokens", type=int, default=20_000_000)
    a = ap.parse_args()
    files = tg.find_shards(a.src_dir, a.split)  # every header checked
    stream = np.concatenate([tg.load_data_shard(f).numpy() for f in files])
    src = spm.SentencePieceProcessor(model_file=a.src_model)
    bos = src.bos_id()
    cuts = np.flatnonzero(stream == bos)
    docs = [stream[s + 1:e].tolist() for s, e in zip(cuts, list(cuts[1:]) + [len(stream)])]
    with mp.Pool(os.cpu_count(), initializer=_init, initargs=(a.src_model, a.dst_model)) as pool:
        encoded = pool.map(_encode, [docs[i:i + 64] for i in range(0, len(docs), 64)])
    out = np.fromiter((t for batch in encoded for doc in batch for t in [bos] + doc), dtype=np.int64)
    os.makedirs(a.dst_dir, exist_ok=True)
    for i in range(0, len(out), a.shard_tokens):
        write_data_shard(os.path.join(a.dst_dir, f"fineweb_{a.split}_{i // a.shard_tokens:06d}.bin"),
                            out[i:i + a.shard_tokens])
    print(f"{a.split}: {len(files)} shards, {len(stream)} tokens, {len(docs)} documents -> {len(out)} tokens "
          f"in {tg.ceil_div(len(out), a.shard_tokens)} shards under {a.dst_dir}")


if __name__ == "__main__":
    main()
