"""Time one layer's forward + backward at the competition micro-batch (48 x 2048 tokens, bf16, compiled): the
attention layer without and with the Q/K/V convolution (train_gpt.py's fused kernels at several block sizes, and
the earlier per-tensor path), and an S4D mixer layer; check the kernels' gradients on the GPU; give each case's
hand-written kernels' times, then list the GPU kernels whose time the convolution adds. Writes logs/<NAME>.txt with
this source.

    python3 scripts/bench_mixers.py [NAME]      (one GPU; a minute or two, mostly compilation)
    python3 scripts/bench_mixers.py --check     (the gradient check alone: on the GPU, or in Triton's CPU
                                                 interpreter with TRITON_INTERPRET=1)
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


def per_tensor_conv_norm_rotary(x, weight, masks, rotary, gain, conv=tg.short_causal_conv):
    """The earlier path: Q and K convolved on their own (tensor-op forward, Triton backward), then the compiled
    RMSNorm and rotary. With conv=short_causal_conv_ops, the autograd reference of the gradient check."""
    B_, T_, H, D = x.shape
    y = rotary(tg.rms_norm(conv(x.reshape(B_, T_, H * D), weight, masks).view(B_, T_, H, D)))
    return y if gain is None else y * gain.to(x.dtype)[:, None]


def make_step(env: dict, qk=FUSED, ssm: bool = False, blocks: tuple[int, int] = (32, 64)):
    args = tg.Hyperparameters(env={"VOCAB_SIZE": "8192", **env})
    tg.conv_norm_rotary = qk
    tg.CONV_NORM_ROTARY_BLOCK_T, tg.CONV_NORM_ROTARY_BACKWARD_BLOCK_T = blocks
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


def check_gradients(dtype: torch.dtype, device: str = "cuda") -> str:
    """The kernels against autograd through the tensor ops in fp32 on the same (rounded) inputs, with documents:
    ConvNormRotary with a gain (Q) and without (K) at 32 and 64 tokens per backward block, and ShortConvFunction
    (V). Reports the largest difference relative to the largest reference value. On the GPU the size gives every
    program several blocks, so the backward's ring wraps round as in training with its threads racing (the
    interpreter runs one thread, so only the GPU tests the barriers)."""
    torch.manual_seed(0)
    b, t = (8, 2048) if device == "cuda" else (2, 100)  # the interpreter is slow; 100 still splits rows unevenly
    ids = torch.randint(0, 50, (b, t), device=device)
    ids[:, ::37] = 1
    masks = tg.same_document_masks(ids, 1, 2)
    rot = tg.Rotary(16, 10000.0, t).to(device)
    x = torch.randn(b, t, 512, device=device).to(dtype)
    w = 0.3 * torch.randn(2, 512, device=device)
    gain = 1 + 0.3 * torch.randn(8, device=device)
    g = torch.randn(b, t, 8, 64, device=device).to(dtype)

    def grads(fn, x_: torch.Tensor, g_: torch.Tensor, with_gain: bool) -> list[torch.Tensor]:
        x_, w_ = x_.clone().requires_grad_(), w.clone().requires_grad_()
        gain_ = gain.clone().requires_grad_() if with_gain else None
        out = fn(x_, w_, gain_)
        out.backward(g_.view_as(out))
        return [out.float(), x_.grad.float(), w_.grad] + ([gain_.grad] if with_gain else [])

    def rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
        return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(got, want))

    qk = lambda x_, w_, gain_: tg.ConvNormRotary.apply(x_.view(b, t, 8, 64), w_, masks, rot.cos, rot.sin,  # noqa: E731
                                                       gain_)
    qk_reference = lambda x_, w_, gain_: per_tensor_conv_norm_rotary(x_.view(b, t, 8, 64), w_, masks, rot,  # noqa: E731
                                                                     gain_, tg.short_causal_conv_ops)
    parts, shipped = [], tg.CONV_NORM_ROTARY_BACKWARD_BLOCK_T
    try:
        for name, with_gain in (("Q", True), ("K", False)):
            want = grads(qk_reference, x.float(), g.float(), with_gain)
            errors = []
            for block in (32, 64):
                tg.CONV_NORM_ROTARY_BACKWARD_BLOCK_T = block
                errors.append(rel(grads(qk, x, g, with_gain), want))
            parts.append(f"ConvNormRotary {name} (backward blocks 32 / 64) {errors[0]:.2e} / {errors[1]:.2e}")
    finally:
        tg.CONV_NORM_ROTARY_BACKWARD_BLOCK_T = shipped
    v_error = rel(grads(lambda x_, w_, _: tg.ShortConvFunction.apply(x_, w_, masks), x, g, False),
                  grads(lambda x_, w_, _: tg.short_causal_conv_ops(x_, w_, masks), x.float(), g.float(), False))
    return (f"gradient check (inputs in {dtype}, reference in fp32), worst |kernel - reference| / max |reference| "
            f"over output and gradients: {', '.join(parts)}, ShortConvFunction V {v_error:.2e}")


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
    cases = [("attention, no conv", {"QKV_CONV_SIZE": "0"}, FUSED, False, (32, 64))]
    cases += [(f"conv 3: fused Q/K, blocks {f}/{b} (forward/backward)", conv3, FUSED, False, (f, b))
              for f, b in ((32, 64), (32, 128), (32, 32))]
    cases += [("conv 3: per-tensor Q/K/V (the v9 path)", conv3, per_tensor_conv_norm_rotary, False, (32, 64))]
    cases += [("conv 2: fused Q/K, blocks 32/64", {"QKV_CONV_SIZE": "2"}, FUSED, False, (32, 64))]
    cases += [("S4D fir 32 taps", {"SSM_KERNEL_SIZE": "32"}, FUSED, True, (32, 64))]
    base, profiles = None, {}
    for label, env, impl, ssm, blocks in cases:
        torch._dynamo.reset()  # each case compiles its own graphs
        t0 = time.perf_counter()
        try:
            step = make_step(env, impl, ssm, blocks)
            ms = layer_ms(step)
            kernels = kernel_us(step) if label.startswith(("attention", "conv")) else {}
            if label.startswith(("attention, no conv", "conv 3: fused Q/K, blocks 32/64")):
                profiles[label] = kernels
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
        own = {k: v for k, v in kernels.items() if k.startswith("_")}  # the hand-written Triton kernels, one by one
        if own:
            say("    " + ", ".join(f"{k} {v:.0f} us" for k, v in sorted(own.items())))
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
    if sys.argv[1:] == ["--check"]:  # on the GPU (fp32 and bf16) where there is one, else in the interpreter
        for dtype in (torch.float32, torch.bfloat16) if torch.cuda.is_available() else (torch.float32,):
            print(check_gradients(dtype, "cuda" if torch.cuda.is_available() else "cpu"))
    else:
        main()
