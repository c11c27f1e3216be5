"""Time one layer's forward + backward at the competition micro-batch (48 x 2048 tokens, bf16, compiled) for
implementations of the Q/K/V convolution (train_gpt.py's, and the fused prototype in fused_qk_conv.py) and for S4D
mixer kernel lengths, then list the GPU kernels whose time the convolution adds. Writes logs/<NAME>.txt with this
source and the prototype's.

    python3 scripts/bench_mixers.py [NAME]      (one GPU; about a minute, mostly compilation)
"""
import functools
import os
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpt as tg  # noqa: E402
from fused_qk_conv import check as check_fused, fused_attention_forward  # noqa: E402

B, T, DIM, ITERS = 48, 2048, 512, 30
TRITON_CONV = tg.short_causal_conv  # the script's own: tensor-op forward, Triton backward on the GPU


class TensorOpBackward(torch.autograd.Function):
    """The convolution with its backward written out in tensor ops (the compiler fuses what it can)."""

    @staticmethod
    def forward(ctx, x, w, m):
        ctx.save_for_backward(x, w, m)
        return tg.short_causal_conv_ops(x, w, m)

    @staticmethod
    def backward(ctx, g):
        x, w, m = ctx.saved_tensors
        gx, gw = g, []
        for lag in range(1, w.size(0) + 1):
            gm = g * m[lag - 1].to(g.dtype)
            gx = gx + F.pad((w[lag - 1].to(g.dtype) * gm)[:, lag:], (0, 0, 0, lag))
            gw.append((gm[:, lag:].float() * x[:, :-lag].float()).sum((0, 1)))
        return gx, torch.stack(gw), None


VARIANTS = {"Triton backward (train_gpt.py)": TRITON_CONV,
            "autograd through tensor ops": tg.short_causal_conv_ops,
            "tensor-op backward": TensorOpBackward.apply}


def make_step(env: dict, conv=TRITON_CONV, ssm: bool = False, fused_block_t: int = 0):
    args = tg.Hyperparameters(env={"VOCAB_SIZE": "8192", **env})
    tg.short_causal_conv = conv
    block = tg.Block(5, DIM, args, use_attention=not ssm, use_ssm=ssm, use_xsa=True, max_len=T).cuda()
    if fused_block_t:
        block.attn.forward = types.MethodType(functools.partial(fused_attention_forward, block_t=fused_block_t),
                                              block.attn)
    lags = args.qkv_conv_size - 1

    def forward(x, x0, ids):
        masks = tg.same_document_masks(ids, 1, lags) if lags > 0 else None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return block(x, x0, None, masks).float().square().mean()

    compiled = torch.compile(forward, dynamic=False, fullgraph=True)
    x = torch.randn(B, T, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x0 = torch.randn_like(x)
    ids = torch.randint(0, 8192, (B, T), device="cuda")
    ids[:, ::700] = 1
    step = lambda: compiled(x, x0, ids).backward()  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def layer_ms(step) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / ITERS


def kernel_us(step) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 5 for e in prof.key_averages()}


def check_gradients() -> str:
    """The Triton backward against autograd through the tensor ops, on the GPU, with documents and both lags."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 300), device="cuda")
    ids[:, ::37] = 1
    masks = tg.same_document_masks(ids, 1, 2)
    x = torch.randn(4, 300, 200, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.3 * torch.randn(2, 200, device="cuda")).requires_grad_()
    g = torch.randn(4, 300, 200, device="cuda", dtype=torch.bfloat16)
    grads = []
    for fn in (tg.short_causal_conv_ops, TRITON_CONV):
        x.grad = w.grad = None
        fn(x, w, masks).backward(g)
        grads.append((x.grad.float(), w.grad.float()))
    (xa, wa), (xb, wb) = grads
    return (f"gradient check (Triton vs autograd): max |dx| diff {(xa - xb).abs().max().item():.3e} "
            f"(scale {xa.abs().max().item():.2f}), max |dw| rel diff {((wa - wb).abs().max() / wa.abs().max()).item():.3e}")


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "bench_mixers"
    os.makedirs("logs", exist_ok=True)
    lines = [f"device:{torch.cuda.get_device_name()} torch:{torch.__version__} B:{B} T:{T} dim:{DIM}"]

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    say(check_gradients())
    say(check_fused("cuda", torch.float32))
    say(check_fused("cuda", torch.bfloat16))
    conv3 = {"QKV_CONV_SIZE": "3"}
    cases = [("attention, no conv", {"QKV_CONV_SIZE": "0"}, TRITON_CONV, False, 0)]
    cases += [(f"conv 3: {v}", conv3, impl, False, 0) for v, impl in VARIANTS.items()]
    cases += [(f"conv 3: FusedQK on Q and K, block {bt} (scripts/fused_qk_conv.py)", conv3, TRITON_CONV, False, bt)
              for bt in (16, 32, 64)]
    cases += [("conv 2: Triton backward", {"QKV_CONV_SIZE": "2"}, TRITON_CONV, False, 0)]
    cases += [(f"S4D fir {k} taps", {"SSM_KERNEL_SIZE": str(k)}, TRITON_CONV, True, 0) for k in (64, 32)]
    base, profiles = None, {}
    for label, env, impl, ssm, block_t in cases:
        torch._dynamo.reset()  # each case compiles its own graphs
        t0 = time.perf_counter()
        try:
            step = make_step(env, impl, ssm, block_t)
            ms = layer_ms(step)
            if label.startswith(("attention, no conv", "conv 3: Triton", "conv 3: FusedQK on Q and K, block 32")):
                profiles[label] = kernel_us(step)
        except Exception as e:  # one failing variant must not hide the others
            say(f"{label}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        if label == "attention, no conv":
            base = ms
        elif base is None:
            say(f"{label}: {ms:.3f} ms/layer/micro-step (no baseline)")
            continue
        # 8 micro-steps per 786,432-token step; 9 attention layers in the default hybrid
        say(f"{label}: {ms:.3f} ms/layer/micro-step, vs no conv {ms - base:+.3f} "
            f"(x 8 micro-steps x 9 layers = {(ms - base) * 72:+.1f} ms/step) [{time.perf_counter() - t0:.0f} s]")
    without = profiles.pop("attention, no conv", None)
    for label, with_conv in profiles.items() if without is not None else ():
        say(f"GPU kernels whose time changes, {label} (us per layer and micro-batch, with - without):")
        for key in sorted(set(without) | set(with_conv), key=lambda k: without.get(k, 0) - with_conv.get(k, 0)):
            diff = with_conv.get(key, 0.0) - without.get(key, 0.0)
            if abs(diff) >= 2.0:
                say(f"  {diff:+8.1f}  {key[:110]}")
    with open(f"logs/{name}.txt", "w") as f:
        f.write("\n".join(lines) + "\n\n" + "=" * 100 + "\n" + open(__file__).read() + "\n" + "=" * 100 + "\n"
                + open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_qk_conv.py")).read())


if __name__ == "__main__":
    main()
