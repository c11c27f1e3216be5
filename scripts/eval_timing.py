"""Time train_gpt.py's evaluation passes on an artifact over documents as long as the official split's, and project
the competition's evaluation time per GPU from the measured throughput.

The per-document passes (doc_isolated, and TTT_MODE=lora's LoRA pass) cost more per target the longer a document
is: a chunk's window reaches back over the document up to EVAL_SEQ_LEN. Proxy data (Wikipedia articles, ~4,700
tokens a document here) therefore says little about their time on FineWeb, whose official split holds 50,000
documents in 40,540,160 targets at sp8192 (811 a document on average). This script re-cuts the validation tokens
at hand into documents whose lengths follow a log-normal law of that mean (a BOS token replaces the token at each
cut, and the most common token each BOS the tokens held), scores them with the artifact, and reports each pass's
targets per second and its time for one GPU's share of the official split (1/--world of its targets). The LoRA pass
is projected by its plan instead (train_gpt.plan_lora's cost on the busiest of --world GPUs over an official-size
split cut the same way, against its cost here): its steps do not grow with the targets. The projections assume the
re-cut documents' lengths; their scores mean nothing.

    python3 scripts/eval_timing.py --artifact final_model.ptz [--mean 811] [--sigma 1.0] [--targets N] [--profile]

Every knob comes from the environment as for train_gpt.py (DATA_PATH, TOKENIZER_PATH, TTT_*); the model's shape
from the artifact. The log goes to logs/<RUN_ID>.txt with this script's and train_gpt.py's source at its top.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import REPO, load_script  # noqa: E402


def cuts(n: int, mean: float, sigma: float, seed: int) -> np.ndarray:
    """Where documents start in a stream of n tokens: 0, and after every log-normal length (mean `mean`, at least 2)."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, size=n // 2 + 1))
    at = np.cumsum(np.concatenate(([0], lengths.astype(np.int64))))
    return at[at < n]


def cut_documents(tokens: np.ndarray, bos_id: int, mean: float, sigma: float, seed: int) -> np.ndarray:
    """The tokens with a BOS at every cut, and the most common token in place of every BOS they held."""
    out = np.where(tokens == bos_id, np.bincount(tokens).argmax(), tokens)
    out[cuts(len(out), mean, sigma, seed)] = bos_id
    return out


def split_documents(targets: int, mean: float, sigma: float, seed: int) -> np.ndarray:
    """train_gpt.find_documents of a stream of `targets` targets cut as cut_documents cuts, without the tokens."""
    starts = cuts(targets + 1, mean, sigma, seed)
    starts = starts[starts < targets]
    return np.stack((starts, np.append(starts[1:], targets)), axis=1)


def lora_cost(tg, documents: np.ndarray, args, world: int) -> float:
    """The LoRA pass's cost on the busiest of `world` GPUs, global phase included, in train_gpt's unit (plan_lora:
    the positions run forward, and LORA_STEP_POSITIONS a chunk step)."""
    def load(rank: int) -> float:
        *_, plans, phase = tg.plan_lora(documents, args, rank, world)
        return phase + sum(cost for plan in plans for _, cost in plan)
    return max(load(rank) for rank in range(world))


def lora_work(tg, docs: np.ndarray, args) -> tuple[int, int]:
    """(updates, positions run forward) of TTT_MODE=lora's pass over these documents (train_gpt.find_documents) on
    one GPU: train_gpt.plan_lora's batches, each counted by train_gpt.batch_work. The positions per target, not the
    number of targets, set the pass's time."""
    updates = positions = 0
    for plan in tg.plan_lora(docs, args, 0, 1)[2]:
        for batch, _ in plan:
            steps, work = tg.batch_work(docs[batch, 1] - docs[batch, 0], args)
            updates, positions = updates + steps - 1, positions + work  # a batch's last step updates nothing
    return updates, positions


def main(tg, options: argparse.Namespace) -> int:
    code = options.script.read_bytes()
    source = Path(__file__).read_bytes() + b"\n" + tg.SEPARATOR.encode() + b"\n" + code
    log = tg.RunLog(os.environ.get("RUN_ID") or "eval_timing", True, source)
    try:
        artifact = tg.deserialize_artifact(options.artifact.read_bytes(), f"--artifact {options.artifact}")
        args = tg.Hyperparameters(env={**os.environ, "RUN_ID": log.run_id, **artifact["config"]})
        place = tg.set_up(args, False, 0, 1, 0)
        tg.log_run_header(log, args, place)
        sp = tg.load_tokenizer(args.tokenizer_path, args.vocab_size)
        tokens = tg.load_validation_tokens(args.data_path)[:options.targets + 1 if options.targets else None]
        # the official split of this vocabulary (sp8192's for a vocabulary without one): its targets and documents
        official = tg.OFFICIAL_VAL_TARGETS.get(args.vocab_size, tg.OFFICIAL_VAL_TARGETS[8192])
        mean = options.mean or official / tg.OFFICIAL_VAL_DOCUMENTS
        tokens = cut_documents(tokens, sp.bos_id(), mean, options.sigma, args.seed)
        byte_counts = tg.target_byte_counts(tokens, tg.build_sentencepiece_luts(sp))
        documents = int((tokens == sp.bos_id()).sum())
        val = {"tokens": torch.from_numpy(tokens.astype(np.int64)).to(place.device),
               "target_bytes": torch.from_numpy(byte_counts).to(place.device), "documents": documents}
        targets = len(tokens) - 1
        log(f"eval_timing: {targets} targets re-cut into {documents} documents (log-normal, mean {mean:.0f}, "
            f"sigma {options.sigma:g}; measured mean {targets / documents:.0f})")
        model, token_losses = tg.build_model(args, sp.bos_id(), place, log, training=False)
        model.load_state_dict(tg.dequantize_state(artifact), strict=True)
        share = official / options.world

        def timed(label: str, run, scale: float = 0.0) -> None:
            """Time one pass and project it: by `scale`, or else by its share of the official split's targets."""
            result, seconds = tg.timed(place, run)
            loss, bpb, count = result[:3]
            log(f"eval_timing {label}: {count} targets in {seconds:.1f}s ({count / seconds:.0f} targets/s; "
                f"val_bpb {bpb:.4f} on re-cut documents) -> {(scale or share / count) * seconds:.0f}s for "
                + (f"the busiest of {options.world} GPUs on" if scale else f"1/{options.world} of")
                + " the official split")

        timed("compile_and_roundtrip", lambda: tg.evaluate(token_losses, val, args.eval_seq_len, args.eval_seq_len,
                                                            tg.EVAL_BATCH_SEQS, 0, 1, place.device, place.cuda))
        timed("roundtrip", lambda: tg.evaluate(token_losses, val, args.eval_seq_len, args.eval_seq_len,
                                               tg.EVAL_BATCH_SEQS, 0, 1, place.device, place.cuda))
        if args.eval_stride:
            timed("sliding_window", lambda: tg.evaluate(token_losses, val, args.eval_seq_len, args.eval_stride,
                                                        tg.EVAL_BATCH_SEQS, 0, 1, place.device, place.cuda))
        timed("doc_isolated", lambda: tg.evaluate_documents(token_losses, val, args, sp.bos_id(), 0, 1, place.device,
                                                            place.cuda))
        if args.ttt_mode == "lora":  # last: it changes the weights
            docs = tg.find_documents(val["tokens"], sp.bos_id())
            updates, positions = lora_work(tg, docs, args)
            log(f"eval_timing ttt_lora plan: {updates} updates, {positions} positions forward "
                f"({positions / targets:.1f} a target)")
            # Its steps do not grow with the targets: a batch runs as many steps as its longest document has chunks,
            # and a larger split batches documents of closer lengths. So its time scales by the plan's cost on an
            # official-size split cut the same way, against the plan's cost here.
            here = lora_cost(tg, docs, args, 1)
            there = lora_cost(tg, split_documents(official, mean, options.sigma, args.seed), args, options.world)
            log(f"eval_timing ttt_lora cost: {here:.4g} here, {there:.4g} on the busiest of {options.world} GPUs on "
                f"an official-size split cut the same way (x{there / here:.2f}; by targets: x{share / targets:.2f})")
            if not options.profile:
                timed("ttt_lora", lambda: tg.evaluate_lora(model, val, args, 0, 1, place.cuda), there / here)
                return 0
            kinds = [torch.profiler.ProfilerActivity.CPU]
            kinds += [torch.profiler.ProfilerActivity.CUDA] if place.cuda else []
            with torch.profiler.profile(activities=kinds) as profile:
                timed("ttt_lora (profiled)", lambda: tg.evaluate_lora(model, val, args, 0, 1, place.cuda), there / here)
            order = "self_cuda_time_total" if place.cuda else "self_cpu_time_total"
            log(profile.key_averages().table(sort_by=order, row_limit=30))
    except BaseException as error:
        log.fail(error)
        raise
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True, help="an artifact (final_model.ptz) to score")
    parser.add_argument("--script", type=Path, default=REPO / "train_gpt.py", help="the train_gpt.py to run")
    parser.add_argument("--mean", type=float, default=0.0,
                        help="mean document length (default: the official split's, 811 targets at sp8192)")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the document lengths")
    parser.add_argument("--targets", type=int, default=0, help="score the first N targets (0: all)")
    parser.add_argument("--world", type=int, default=8, help="GPUs the official split is shared among")
    parser.add_argument("--profile", action="store_true", help="profile the LoRA pass (torch.profiler): a table of "
                        "its operators by their own time, in the log; keep --targets small")
    arguments = parser.parse_args()
    train_gpt = load_script(arguments.script)
    train_gpt.exit_with(lambda: main(train_gpt, arguments))
