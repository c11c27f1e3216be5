"""Score a saved artifact again, or export a saved checkpoint again and score it, with train_gpt.py's own code: the
way to compare export and evaluation settings on the same trained weights, with no training noise.

    python3 scripts/evaluate.py --artifact final_model.ptz                      # re-score, any evaluation knobs
    QUANT_UNIFORM_BITS=5 python3 scripts/evaluate.py --checkpoint checkpoints/RUN_ID.pt   # re-export, then score
    torchrun --standalone --nproc_per_node=8 scripts/evaluate.py --artifact final_model.ptz

The model's shape comes from the artifact or checkpoint, whatever the environment says; every other knob comes from
the environment, as for train_gpt.py, and the log and facts are written the same way (logs/<RUN_ID>.txt, .json).
The same settings export the same checkpoint to the same artifact, byte for byte. --script names the train_gpt.py
whose code runs and whose bytes count toward the size (default: the one in this repository; a packed one works).
A run that trained nothing has its training rules "not assessed" in the verdict, unless a checkpoint carries them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_script(path: Path):
    """train_gpt.py (or a packed copy of it) as a module, without running its main()."""
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = module
    spec.loader.exec_module(module)
    return module


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source_kind = parser.add_mutually_exclusive_group(required=True)
    source_kind.add_argument("--artifact", type=Path, help="an artifact (final_model.ptz) to score")
    source_kind.add_argument("--checkpoint", type=Path, help="a checkpoint (checkpoints/RUN_ID.pt) to export and score")
    parser.add_argument("--script", type=Path, default=REPO / "train_gpt.py", help="the train_gpt.py to run")
    return parser.parse_args(argv)


def load_checkpoint(tg, path: Path) -> dict:
    """A checkpoint that tg (train_gpt.py) wrote to CHECKPOINT_PATH, or an error that names the file."""
    try:
        checkpoint = tg.torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path}: no such file") from None
    except Exception as e:  # torch's advice to load untrusted pickles is no way out here: it is not passed on
        first = (str(e).strip().splitlines() or [""])[0]
        why = type(e).__name__ if not first or "eights only" in first else f"{type(e).__name__}: {first}"
        raise ValueError(f"checkpoint {path} is not a checkpoint of this script (torch.load: {why})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != tg.CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a {tg.CHECKPOINT_FORMAT} checkpoint")
    return checkpoint


def main(tg, options: argparse.Namespace) -> int:
    """train_gpt.main() from the model on, with the saved weights in place of training."""
    code = options.script.read_bytes()
    signal.signal(signal.SIGTERM, tg.stop_on_signal)
    distributed, rank, world_size, local_rank = tg.process_place()
    log = tg.RunLog(os.environ.get("RUN_ID") or str(uuid.uuid4()), rank == 0, code)
    try:
        path = options.artifact or options.checkpoint
        if not path.is_file():
            raise FileNotFoundError(f"--{'artifact' if options.artifact else 'checkpoint'} {path}: no such file")
        blob = path.read_bytes() if options.artifact else b""
        source = tg.deserialize_artifact(blob, f"--artifact {path}") if options.artifact else load_checkpoint(tg, path)
        env = dict(os.environ, RUN_ID=log.run_id)
        overridden = [f"{k}={v} (not {env[k]})" for k, v in source["config"].items() if k in env and env[k] != v]
        args = tg.Hyperparameters(env={**env, **source["config"]})
        place = tg.set_up(args, distributed, rank, world_size, local_rank)
        tg.log_run_header(log, args, place)
        log(f"scripts/evaluate.py: model shape from {path}"
            + (f"; not from the environment: {', '.join(overridden)}" if overridden else ""))
        sp, val, _ = tg.load_validation(args, place, log)
        model, token_losses = tg.build_model(args, sp.bos_id(), place, log, training=False)
        training, pre_export_s = {}, 0.0
        if options.checkpoint:
            model.load_state_dict(source["state"])
            training = source["facts"]
            log(f"export_only: checkpoint {path}: steps:{training['steps']} train_plus_calibration:"
                f"{1000 * training['train_plus_calibration_s']:.0f}ms calibration_within_wallclock:"
                f"{training['calibration_within_wallclock']} (that run's calibration, on its training shards)")
            log.update(**training, checkpoint=str(path))
            pre_export_s = tg.score_pre_export(token_losses, val, args, place, log)
            blob = tg.export_artifact(model, source["stats"], args, code, place, log)
            source = tg.deserialize_artifact(blob, args.artifact_path)
        results = tg.final_evaluation(model, source, token_losses, val, args, place, log, pre_export_s)
        status = tg.record_verdict(training, results, args, code, blob, place, val, log, pre_export_s)
    except BaseException as error:
        log.fail(error)
        raise
    if distributed:
        tg.leave_process_group()
    return status


if __name__ == "__main__":
    arguments = parse_arguments(sys.argv[1:])
    train_gpt = load_script(arguments.script)
    train_gpt.exit_with(lambda: main(train_gpt, arguments))
