"""Time one layer's forward + backward at the competition micro-batch (48 x 2048 tokens, bf16, compiled): the
attention layer without and with the Q/K/V convolution (train_gpt.py's fused kernels, at several block sizes, and
the earlier per-tensor path), and S4D mixer kernel lengths; check the kernels' gradients on the GPU; then list the
GPU kernels whose time the convolution adds. Writes logs/<NAME>.txt with this source.

    python3 scripts/bench_mixers.py [NAME]      (one GPU; a minute or two, mostly compilation)
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

B, T, DIM, ITERS = 48, 2048, 512, 30
FUSED = tg.conv_norm_rotary


def per_tensor_conv_norm_rotary(x, weight, masks, rotary, gain):
    """The earlier path: Q and K convolved on their own (tensor-op forward, Triton backward), then the compiled
    RMSNorm and rotary."""
    B_, T_, H, D = x.shape
    y = rotary(tg.rms_norm(tg.short_causal_conv(x.reshape(B_, T_, H * D), weight, masks).view(B_, T_, H, D)))
    return y if gain is None else y * gain.to(x.dtype)[:, None]


def make_step(env: dict, qk=FUSED, ssm: bool = False, block_t: int = 32):
    args = tg.Hyperparameters(env={"VOCAB_SIZE": "8192", **env})
    tg.conv_norm_rotary, tg.CONV_NORM_ROTARY_BLOCK_T = qk, block_t
    block = tg.Block(5, DIM, args, use_attention=not ssm, use_ssm=ssm, use_xsa=True, max_len=T).cuda()
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


def reference_q(x, w, masks, rot, gain):
    y = rot(tg.rms_norm(tg.short_causal_conv_ops(x, w, masks).view(*x.shape[:2], -1, 64)))
    return y * gain.to(x.dtype)[:, None]


def check_gradients(dtype: torch.dtype) -> str:
    """The kernels against autograd through the tensor ops, on the GPU, with documents: ConvNormRotary (Q: gain;
    K: none) and ShortConvFunction (V). Reports the largest difference relative to the largest reference value."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 300), device="cuda")
    ids[:, ::37] = 1
    masks = tg.same_document_masks(ids, 1, 2)
    rot = tg.Rotary(16, 10000.0, 300).cuda()
    x = torch.randn(4, 300, 512, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(2, 512, device="cuda")).requires_grad_()
    gain = (1 + 0.3 * torch.randn(8, device="cuda")).requires_grad_()
    g = torch.randn(4, 300, 8, 64, device="cuda", dtype=dtype)
    cases = {"ConvNormRotary": lambda: tg.ConvNormRotary.apply(x.view(4, 300, 8, 64), w, masks, rot.cos, rot.sin,
                                                               gain),
             "reference Q": lambda: reference_q(x, w, masks, rot, gain),
             "ShortConvFunction": lambda: tg.ShortConvFunction.apply(x, w, masks).view(4, 300, 8, 64),
             "reference V": lambda: tg.short_causal_conv_ops(x, w, masks).view(4, 300, 8, 64)}
    got = {}
    for name, fn in cases.items():
        x.grad = w.grad = gain.grad = None
        out = fn()
        out.backward(g)
        got[name] = [out.float(), x.grad.float(), w.grad.float()] + ([gain.grad.float()] if gain.grad is not None
                                                                     else [])
    rel = lambda a, b: max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a, b))  # noqa: E731
    return (f"gradient check ({dtype}), worst |kernel - autograd| / max |autograd| over output and gradients: "
            f"ConvNormRotary {rel(got['ConvNormRotary'], got['reference Q']):.2e}, "
            f"ShortConvFunction {rel(got['ShortConvFunction'], got['reference V']):.2e}")


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "bench_mixers"
    os.makedirs("logs", exist_ok=True)
    lines = [f"device:{torch.cuda.get_device_name()} torch:{torch.__version__} B:{B} T:{T} dim:{DIM}"]

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    say(check_gradients(torch.float32))
    say(check_gradients(torch.bfloat16))
    conv3 = {"QKV_CONV_SIZE": "3"}
    cases = [("attention, no conv", {"QKV_CONV_SIZE": "0"}, FUSED, False, 32)]
    cases += [(f"conv 3: fused Q/K (train_gpt.py), block {bt}", conv3, FUSED, False, bt) for bt in (32, 16, 64)]
    cases += [("conv 3: per-tensor Q/K/V (the v9 path)", conv3, per_tensor_conv_norm_rotary, False, 32)]
    cases += [("conv 2: fused Q/K (train_gpt.py), block 32", {"QKV_CONV_SIZE": "2"}, FUSED, False, 32)]
    cases += [(f"S4D fir {k} taps", {"SSM_KERNEL_SIZE": str(k)}, FUSED, True, 32) for k in (64, 32)]
    base, profiles = None, {}
    for label, env, impl, ssm, block_t in cases:
        torch._dynamo.reset()  # each case compiles its own graphs
        t0 = time.perf_counter()
        try:
            step = make_step(env, impl, ssm, block_t)
            ms = layer_ms(step)
            if label.startswith(("attention, no conv", "conv 3: fused Q/K (train_gpt.py), block 32", "conv 3: per")):
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
        f.write("\n".join(lines) + "\n\n" + "=" * 100 + "\n" + open(__file__).read())


if __name__ == "__main__":
    main()
