"""What the S4D mixers learned: per S4D layer of a checkpoint, how many channels kept a monotone decay, grew one
negative lobe, or oscillate, and the lag holding 90% of each channel's kernel mass (its effective memory).

    python3 scripts/kernel_report.py checkpoints/RUN_ID.pt [--length 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import train_gpt as tg  # noqa: E402
from evaluate import load_checkpoint  # noqa: E402  (scripts/evaluate.py, first on the path)


def kernel_report(model: tg.GPT, length: int) -> list[str]:
    lines = []
    for i, block in enumerate(model.blocks):
        if block.ssm is None:
            continue
        with torch.no_grad():
            k = block.ssm.kernel(length).float().cpu()
        mag = k.abs()
        peak = mag.max(dim=1, keepdim=True).values.clamp_min(1e-12)
        signs = torch.where(mag > 0.01 * peak, torch.sign(k), torch.zeros_like(k))
        flips = torch.zeros(k.size(0), dtype=torch.long)
        for c in range(k.size(0)):
            s = signs[c][signs[c] != 0]
            flips[c] = int((s[1:] != s[:-1]).sum()) if s.numel() > 1 else 0
        non_increasing = (mag[:, 1:] <= mag[:, :-1] + 1e-3 * peak).all(dim=1)
        monotone = (flips == 0) & non_increasing
        one_lobe, oscillating = flips == 1, flips >= 2
        other = ~(monotone | one_lobe | oscillating)
        cum = mag.cumsum(dim=1) / mag.sum(dim=1, keepdim=True).clamp_min(1e-12)
        memory = (cum < 0.9).sum(dim=1).float() + 1
        q = torch.quantile(memory, torch.tensor([0.1, 0.5, 0.9]))
        lines.append(
            f"kernel_report layer:{i} kind:{block.ssm.kernel_kind} channels:{k.size(0)} monotone:{int(monotone.sum())} "
            f"negative_lobe:{int(one_lobe.sum())} oscillating:{int(oscillating.sum())} other:{int(other.sum())} "
            f"memory90_p10:{q[0]:.0f} memory90_p50:{q[1]:.0f} memory90_p90:{q[2]:.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--length", type=int, default=2048, help="lags to report (the training sequence length)")
    options = parser.parse_args()
    checkpoint = load_checkpoint(tg, options.checkpoint)
    model = tg.GPT(tg.Hyperparameters(env=checkpoint["config"]))
    model.load_state_dict(checkpoint["state"])
    print("\n".join(kernel_report(model, options.length)) or "no S4D layer in this checkpoint")


if __name__ == "__main__":
    main()
