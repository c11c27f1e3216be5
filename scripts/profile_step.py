"""Where one training step's GPU time goes, at the S786 shape (8 micro-steps of 48 x 2048 tokens, one GPU).

    python3 scripts/profile_step.py            # the default hybrid; any knob can be set in the environment,
    SSM_LAYERS= python3 scripts/profile_step.py  # e.g. attention only

The model is compiled with the training script's compiler settings (`configure_inductor`). Prints
(1) CUDA-event timings of the step's phases and (2) the profiler's kernels, grouped into attention, matmul,
fused elementwise (Triton), optimizer and other, with the top kernels by GPU time. Random tokens: the step's
cost does not depend on the text. KERNEL_NAMES=torch names each Triton kernel after the torch operations it
fuses (e.g. rms_normbackward, linearbackward), and TORCH_LOGS=output_code prints every kernel's source with
the graph nodes it computes, to find what a slow kernel does."""
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

kernel_names = os.environ.pop("KERNEL_NAMES", "")
if kernel_names:
    torch._inductor.config.triton.descriptive_names = kernel_names
env = {"TRAIN_BATCH_TOKENS": "786432", "TRAIN_SEQ_LEN": "2048", **os.environ}
args = tg.Hyperparameters(env=env)
grad_accum, micro_seqs = args.batch_layout(1)
device = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
torch.manual_seed(0)
model = tg.GPT(args).to(device)
print(tg.configure_inductor())
compiled = torch.compile(model, dynamic=False, fullgraph=True)
optimizers = tg.build_optimizers(model, args, torch.compile(tg.zeropower_via_newtonschulz5))
batches = [torch.randint(0, args.vocab_size, (micro_seqs, args.train_seq_len + 1), device=device)
           for _ in range(grad_accum)]


def step(events=None):
    mark = (lambda name: events[name].record()) if events else (lambda name: None)
    mark("start")
    for tokens in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(tokens[:, :-1], tokens[:, 1:])
        (loss / grad_accum).backward()
    mark("backward_done")
    torch.nn.utils.clip_grad_norm_(model.parameters(), tg.GRAD_CLIP_NORM)
    mark("clip_done")
    optimizers[0].step()
    mark("muon_done")
    for opt in optimizers[1:]:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    mark("end")


for _ in range(4):
    step()
torch.cuda.synchronize()
names = ("start", "backward_done", "clip_done", "muon_done", "end")
totals = defaultdict(float)
repeats = 5
for _ in range(repeats):
    events = {n: torch.cuda.Event(enable_timing=True) for n in names}
    step(events)
    torch.cuda.synchronize()
    for a, b in zip(names, names[1:]):
        totals[f"{a}->{b}"] += events[a].elapsed_time(events[b]) / repeats
print(f"config: ssm_layers={args.ssm_layers} ssm_kernel={args.ssm_kernel} xsa_last_n={args.xsa_last_n} "
      f"micro={grad_accum}x{micro_seqs}x{args.train_seq_len}")
step_ms = sum(totals.values())
print(f"step_ms:{step_ms:.1f} tokens_per_s:{args.train_batch_tokens / step_ms * 1000:.0f}")
for phase, ms in totals.items():
    print(f"  phase {phase:28s} {ms:8.2f} ms  {100 * ms / step_ms:5.1f}%")

with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
total_us = sum(e.self_device_time_total for e in kernels)


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa", "cudnn::fusion")):  # cuDNN's SDPA helpers too
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_", "matmul", "cublas")):
        return "matmul"
    if "triton" in n:
        return "triton_fused"
    if any(s in n for s in ("foreach", "multi_tensor", "adam")):
        return "optimizer_foreach"
    return "other"


by_cat = defaultdict(float)
for e in kernels:
    by_cat[category(e.key)] += e.self_device_time_total
print(f"profiled kernel time: {total_us / 1000:.1f} ms for one step")
for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
    print(f"  {cat:18s} {us / 1000:8.2f} ms  {100 * us / total_us:5.1f}%")
print("top kernels (self GPU time, one step):")
for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:45]:
    print(f"  {e.self_device_time_total / 1000:8.2f} ms  x{e.count:<5d} {category(e.key):14s} {e.key[:110]}")
print("full names of the ten slowest per call:")
for e in sorted(kernels, key=lambda e: -e.self_device_time_total / e.count)[:10]:
    print(f"  {e.self_device_time_total / e.count / 1000:8.3f} ms/call  {e.key}")
