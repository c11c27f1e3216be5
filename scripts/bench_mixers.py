"""Time one layer's forward + backward at the competition micro-batch (48 x 2048 tokens, bf16, compiled): the
attention layer without and with the Q/K/V convolution (train_gpt.py's fused kernels, at several block sizes, and
the earlier per-tensor path, and a candidate backward defined here), and S4D mixer kernel lengths; check the
kernels' gradients on the GPU; give each case's hand-written kernels' times, then list the GPU kernels whose time
the convolution adds. Writes logs/<NAME>.txt with this source.

    python3 scripts/bench_mixers.py [NAME]      (one GPU; a minute or two, mostly compilation)
    TRITON_INTERPRET=1 python3 scripts/bench_mixers.py --check     (the gradient check in Triton's CPU interpreter)

The candidate: train_gpt.py's backward for Q and K recomputes the output gradient of the rows ahead once per lag,
which makes it ~4x slower than its memory traffic (logs/README.md, v10). Here each block's output gradient is
computed once and parked in a two-block ring in global memory (L2-resident, a program's own); after a barrier the
block before reads its rows ahead from there. If it wins, it replaces train_gpt.py's backward kernel.
"""
import os
import sys
import time

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402
from train_gpt import _conv_norm_rotary_grad_y  # noqa: E402

B, T, DIM, ITERS = 48, 2048, 512, 30
FUSED = tg.conv_norm_rotary


def per_tensor_conv_norm_rotary(x, weight, masks, rotary, gain, conv=tg.short_causal_conv):
    """The earlier path: Q and K convolved on their own (tensor-op forward, Triton backward), then the compiled
    RMSNorm and rotary. With conv=short_causal_conv_ops, the autograd reference of the gradient check."""
    B_, T_, H, D = x.shape
    y = rotary(tg.rms_norm(conv(x.reshape(B_, T_, H * D), weight, masks).view(B_, T_, H, D)))
    return y if gain is None else y * gain.to(x.dtype)[:, None]


@triton.jit
def _ring_backward_kernel(x_ptr, m_ptr, w_ptr, go_ptr, cos_ptr, sin_ptr, gain_ptr, rstd_ptr, gx_ptr, gw_ptr, gg_ptr,
                          ring_ptr, N, T, H, rows_per_program, LAGS: tl.constexpr, LAGS_POW2: tl.constexpr,
                          D: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, HAS_GAIN: tl.constexpr):
    """As train_gpt.py's _conv_norm_rotary_backward_kernel, one block behind: step j computes block j's output
    gradient, writes it to the ring, and finishes block j - 1's input gradient from the ring (one extra step
    reaches into the next program's rows)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D)
    cols = h * D + d
    gain = tl.load(gain_ptr + h) if HAS_GAIN else 1.0
    ring = ring_ptr + (pid * tl.num_programs(1) + h) * 2 * BLOCK_T * D
    lag_idx = tl.arange(0, LAGS_POW2)
    acc_w = tl.zeros([LAGS_POW2, D], dtype=tl.float32)
    acc_gain = tl.zeros([BLOCK_T], dtype=tl.float32)
    g_prev = tl.zeros([BLOCK_T, D], dtype=tl.float32)
    first = pid * rows_per_program
    last = first + rows_per_program
    for r0 in range(first, last + BLOCK_T, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        mine = (rows < N) & (rows < last)
        g_y, gain_dot = _conv_norm_rotary_grad_y(x_ptr, m_ptr, w_ptr, go_ptr, cos_ptr, sin_ptr, rstd_ptr, rows, h, N,
                                                 T, H, gain, LAGS, D, HALF)
        acc_gain += tl.where(mine, gain_dot, 0.0)
        for lag in tl.static_range(1, LAGS + 1):  # the taps: y[n] read x[n - lag]
            ok = mine & (rows % T >= lag)
            m = tl.load(m_ptr + (lag - 1) * N + rows, mask=ok, other=0.0)
            x_behind = tl.load(x_ptr + (rows - lag)[:, None] * H * D + cols[None, :], mask=ok[:, None], other=0.0)
            partial = tl.sum(g_y * m[:, None] * x_behind.to(tl.float32), axis=0)
            acc_w += tl.where(lag_idx[:, None] == lag - 1, partial[None, :], 0.0)
        tl.store(ring + (rows % (2 * BLOCK_T))[:, None] * D + d[None, :], g_y)
        tl.debug_barrier()  # every thread's rows are in the ring before any thread reads its neighbours'
        prev_rows = rows - BLOCK_T
        gx = g_prev
        for lag in tl.static_range(1, LAGS + 1):  # y[n + lag] read x[n]
            src = prev_rows + lag
            ok = (src >= 0) & (src < N) & (src % T >= lag)
            m = tl.load(m_ptr + (lag - 1) * N + src, mask=ok, other=0.0)
            g_src = tl.load(ring + (src % (2 * BLOCK_T))[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            gx += tl.load(w_ptr + (lag - 1) * H * D + cols)[None, :] * m[:, None] * g_src
        tl.store(gx_ptr + prev_rows[:, None] * H * D + cols[None, :], gx.to(gx_ptr.dtype.element_ty),
                 mask=((prev_rows >= first) & (prev_rows < N))[:, None])
        tl.debug_barrier()  # all reads of the ring are done before the next step overwrites the older block
        g_prev = g_y
    tl.store(gw_ptr + pid * LAGS * H * D + lag_idx[:, None] * H * D + cols[None, :], acc_w,
             mask=(lag_idx < LAGS)[:, None])
    tl.store(gg_ptr + pid * H + h, tl.sum(acc_gain, axis=0))


class RingConvNormRotary(tg.ConvNormRotary):
    """train_gpt.py's ConvNormRotary (the same forward kernel) with the ring backward."""

    @staticmethod
    def backward(ctx, go):
        x, m, w, cos, sin, g, rstd = ctx.saved_tensors
        B_, T_, H, D = x.shape
        N, lags, block_t = B_ * T_, w.size(0), ctx.block_t
        programs, rows_per_program = tg.backward_programs(N, H, block_t, x.device)
        gx = torch.empty_like(x)
        gw = torch.empty(programs, lags, H * D, device=x.device, dtype=torch.float32)
        gg = torch.empty(programs, H, device=x.device, dtype=torch.float32)
        ring = torch.empty(programs * H * 2 * block_t * D, device=x.device, dtype=torch.float32)
        _ring_backward_kernel[(programs, H)](
            x, m, w, go.contiguous(), cos, sin, g, rstd, gx, gw, gg, ring, N, T_, H, rows_per_program, LAGS=lags,
            LAGS_POW2=triton.next_power_of_2(lags), D=D, HALF=cos.size(1), BLOCK_T=block_t, HAS_GAIN=ctx.has_gain)
        return gx, gw.sum(0), None, None, None, gg.sum(0) if ctx.has_gain else None


def ring_conv_norm_rotary(x, weight, masks, rotary, gain):
    return RingConvNormRotary.apply(x, weight, masks, rotary.cos, rotary.sin, gain)


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


def check_gradients(dtype: torch.dtype, device: str = "cuda") -> str:
    """The kernels against autograd through the tensor ops, with documents: ConvNormRotary (Q: gain; K: none), the
    ring candidate and ShortConvFunction (V). Reports the largest difference relative to the largest reference
    value."""
    torch.manual_seed(0)
    b, t = (4, 300) if device == "cuda" else (2, 100)  # the interpreter is slow; 100 still splits rows unevenly
    ids = torch.randint(0, 50, (b, t), device=device)
    ids[:, ::37] = 1
    masks = tg.same_document_masks(ids, 1, 2)
    rot = tg.Rotary(16, 10000.0, t).to(device)
    x = torch.randn(b, t, 512, device=device, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(2, 512, device=device)).requires_grad_()
    gain = (1 + 0.3 * torch.randn(8, device=device)).requires_grad_()
    g = torch.randn(b, t, 8, 64, device=device, dtype=dtype)
    cases = {"ConvNormRotary": lambda: tg.ConvNormRotary.apply(x.view(b, t, 8, 64), w, masks, rot.cos, rot.sin,
                                                               gain),
             "ring": lambda: RingConvNormRotary.apply(x.view(b, t, 8, 64), w, masks, rot.cos, rot.sin, gain),
             "reference Q": lambda: per_tensor_conv_norm_rotary(x.view(b, t, 8, 64), w, masks, rot, gain,
                                                               tg.short_causal_conv_ops),
             "ShortConvFunction": lambda: tg.ShortConvFunction.apply(x, w, masks).view(b, t, 8, 64),
             "reference V": lambda: tg.short_causal_conv_ops(x, w, masks).view(b, t, 8, 64)}
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
            f"ring candidate {rel(got['ring'], got['reference Q']):.2e}, "
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
    cases += [(f"conv 3: fused Q/K, ring backward (candidate), block {bt}", conv3, ring_conv_norm_rotary, False, bt)
              for bt in (32, 64)]
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
            kernels = kernel_us(step) if label.startswith(("attention", "conv")) else {}
            if label.startswith(("attention, no conv", "conv 3: fused Q/K (train_gpt.py), block 32",
                                 "conv 3: fused Q/K, ring backward (candidate), block 32")):
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
    if sys.argv[1:] == ["--check"]:
        print(check_gradients(torch.float32, "cpu"))
    else:
        main()
