"""Prototype, not yet in train_gpt.py: the Q/K convolution fused with the q/k RMSNorm, the partial rotary and the q
gain, forward and backward one Triton kernel each, so that the convolution adds no pass over Q or K of its own.
(train_gpt.py runs the convolution's backward as a kernel of its own: +7% step at S786 for QKV_CONV_SIZE=3, where
the budget is 2%.) scripts/bench_mixers.py times it against train_gpt.py's path on a GPU.

    TRITON_INTERPRET=1 python3 scripts/fused_qk_conv.py     # check against autograd on the CPU (Triton installed)
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


@triton.jit
def _conv_rows(x_ptr, m_ptr, w_ptr, rows, cols, N, HD, LAGS: tl.constexpr):
    """y at `rows` (any shift), the convolution of x over lags 0..LAGS, fp32; cols are absolute channels."""
    ok = rows < N
    y = tl.load(x_ptr + rows[:, None] * HD + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    for lag in tl.static_range(1, LAGS + 1):
        w = tl.load(w_ptr + (lag - 1) * HD + cols)
        m = tl.load(m_ptr + (lag - 1) * N + rows, mask=ok, other=0.0)
        src = rows - lag
        xs = tl.load(x_ptr + src[:, None] * HD + cols[None, :], mask=(ok & (src >= 0))[:, None], other=0.0)
        y += w[None, :] * m[:, None] * xs.to(tl.float32)
    return y


@triton.jit
def _rotary_at(cos_ptr, sin_ptr, rows, N, T, D: tl.constexpr, HALF: tl.constexpr):
    """For rows [BLOCK] and head dims d: each dim's rotation partner and sign (out[d] = r[d] c + sign r[partner] s)
    and the cos/sin at each row's position (1 and 0 past the rotated dims, as Rotary.forward leaves them)."""
    d = tl.arange(0, D)
    rot = d < 2 * HALF
    partner = tl.where(d < HALF, d + HALF, tl.where(rot, d - HALF, d))
    sign = tl.where(d < HALF, 1.0, -1.0)
    cs_off = (rows % T)[:, None] * HALF + tl.where(d < HALF, d, d - HALF)[None, :]
    in_range = (rows < N)[:, None] & rot[None, :]
    c = tl.load(cos_ptr + cs_off, mask=in_range, other=1.0)
    s = tl.load(sin_ptr + cs_off, mask=in_range, other=0.0)
    return partner, sign, c, s


@triton.jit
def _qk_forward_kernel(x_ptr, m_ptr, w_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, rstd_ptr, N, T, H, eps,
                       LAGS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                       HAS_GAIN: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    HD = H * D
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < N
    d = tl.arange(0, D)
    partner, sign, c, s = _rotary_at(cos_ptr, sin_ptr, rows, N, T, D, HALF)
    y = _conv_rows(x_ptr, m_ptr, w_ptr, rows, h * D + d, N, HD, LAGS)
    yp = _conv_rows(x_ptr, m_ptr, w_ptr, rows, h * D + partner, N, HD, LAGS)
    rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / D + eps)
    out = (y * c + sign[None, :] * yp * s) * rstd[:, None]
    if HAS_GAIN:
        out = out * tl.load(gain_ptr + h)
    tl.store(out_ptr + rows[:, None] * HD + (h * D + d)[None, :], out.to(out_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(rstd_ptr + rows * H + h, rstd, mask=ok)


@triton.jit
def _qk_grad_y(x_ptr, m_ptr, w_ptr, go_ptr, cos_ptr, sin_ptr, rstd_ptr, rows, h, N, T, H, gain,
               LAGS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    """Gradient w.r.t. the convolution's output y at `rows`, and (Rᵀ g_out) · r per row for the gain's gradient."""
    HD = H * D
    ok = rows < N
    d = tl.arange(0, D)
    partner, sign, c, s = _rotary_at(cos_ptr, sin_ptr, rows, N, T, D, HALF)
    y = _conv_rows(x_ptr, m_ptr, w_ptr, rows, h * D + d, N, HD, LAGS)
    rstd = tl.load(rstd_ptr + rows * H + h, mask=ok, other=0.0)
    r = y * rstd[:, None]
    go = tl.load(go_ptr + rows[:, None] * HD + (h * D + d)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    gop = tl.load(go_ptr + rows[:, None] * HD + (h * D + partner)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    g_rot = go * c - sign[None, :] * gop * s  # Rᵀ g_out
    gain_dot = tl.sum(g_rot * r, axis=1)
    g_r = g_rot * gain
    g_y = rstd[:, None] * (g_r - r * (tl.sum(g_r * r, axis=1) / D)[:, None])
    return g_y, gain_dot


@triton.jit
def _qk_backward_kernel(x_ptr, m_ptr, w_ptr, go_ptr, cos_ptr, sin_ptr, gain_ptr, rstd_ptr, gx_ptr, gw_ptr, gg_ptr,
                        N, T, H, rows_per_program, LAGS: tl.constexpr, LAGS_POW2: tl.constexpr, D: tl.constexpr,
                        HALF: tl.constexpr, BLOCK_T: tl.constexpr, HAS_GAIN: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    HD = H * D
    d = tl.arange(0, D)
    cols = h * D + d
    gain = tl.load(gain_ptr + h) if HAS_GAIN else 1.0
    lag_idx = tl.arange(0, LAGS_POW2)
    acc_w = tl.zeros([LAGS_POW2, D], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_T], dtype=tl.float32)
    first = pid * rows_per_program
    for r0 in range(first, first + rows_per_program, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        ok = rows < N
        g_y, gain_dot = _qk_grad_y(x_ptr, m_ptr, w_ptr, go_ptr, cos_ptr, sin_ptr, rstd_ptr, rows, h, N, T, H, gain,
                                   LAGS, D, HALF)
        acc_g += gain_dot
        gx = g_y
        for lag in tl.static_range(1, LAGS + 1):
            w = tl.load(w_ptr + (lag - 1) * HD + cols)
            ahead = rows + lag
            g_ahead, _ = _qk_grad_y(x_ptr, m_ptr, w_ptr, go_ptr, cos_ptr, sin_ptr, rstd_ptr, ahead, h, N, T, H, gain,
                                    LAGS, D, HALF)
            m_ahead = tl.load(m_ptr + (lag - 1) * N + ahead, mask=ahead < N, other=0.0)
            gx += w[None, :] * m_ahead[:, None] * g_ahead
            m_here = tl.load(m_ptr + (lag - 1) * N + rows, mask=ok, other=0.0)
            behind = rows - lag
            x_behind = tl.load(x_ptr + behind[:, None] * HD + cols[None, :], mask=(ok & (behind >= 0))[:, None],
                               other=0.0).to(tl.float32)
            partial = tl.sum(g_y * m_here[:, None] * x_behind, axis=0)
            acc_w += tl.where(lag_idx[:, None] == lag - 1, partial[None, :], 0.0)
        tl.store(gx_ptr + rows[:, None] * HD + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(gw_ptr + pid * LAGS * HD + lag_idx[:, None] * HD + cols[None, :], acc_w, mask=(lag_idx < LAGS)[:, None])
    tl.store(gg_ptr + pid * H + h, tl.sum(acc_g, axis=0))


class FusedQK(torch.autograd.Function):
    """rotary(rms_norm(conv(x))) * gain for x [B, T, H, D] (gain None: no gain)."""

    @staticmethod
    def forward(ctx, x, weight, masks, cos, sin, gain, eps, block_t):
        B, T, H, D = x.shape
        N, lags = B * T, weight.size(0)
        x = x.contiguous()
        m = masks.reshape(lags, N).float().contiguous()
        w = weight.float().contiguous()
        g = gain.float().contiguous() if gain is not None else w  # a dummy pointer when there is no gain
        out = torch.empty_like(x)
        rstd = torch.empty(N, H, device=x.device, dtype=torch.float32)
        _qk_forward_kernel[(triton.cdiv(N, block_t), H)](x, m, w, cos, sin, g, out, rstd, N, T, H, eps, LAGS=lags,
                                                          D=D, HALF=cos.size(1), BLOCK_T=block_t,
                                                          HAS_GAIN=gain is not None)
        ctx.save_for_backward(x, m, w, cos, sin, g, rstd)
        ctx.has_gain, ctx.block_t = gain is not None, block_t
        return out

    @staticmethod
    def backward(ctx, go):
        x, m, w, cos, sin, g, rstd = ctx.saved_tensors
        B, T, H, D = x.shape
        N, lags = B * T, w.size(0)
        block_t = ctx.block_t
        programs = max(1, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count // H) if x.is_cuda else 3
        rows_per_program = triton.cdiv(triton.cdiv(N, programs), block_t) * block_t
        programs = triton.cdiv(N, rows_per_program)
        gx = torch.empty_like(x)
        gw = torch.empty(programs, lags, H * D, device=x.device, dtype=torch.float32)
        gg = torch.empty(programs, H, device=x.device, dtype=torch.float32)
        _qk_backward_kernel[(programs, H)](x, m, w, go.contiguous(), cos, sin, g, rstd, gx, gw, gg, N, T, H,
                                           rows_per_program, LAGS=lags, LAGS_POW2=triton.next_power_of_2(lags), D=D,
                                           HALF=cos.size(1), BLOCK_T=block_t, HAS_GAIN=ctx.has_gain)
        return gx, gw.sum(0), None, None, None, (gg.sum(0) if ctx.has_gain else None), None, None


def fused_attention_forward(self, x, value_embed=None, conv_masks=None, block_t: int = 32):
    """CausalSelfAttention.forward with FusedQK on Q and K (the V convolution stays train_gpt.py's)."""
    B, T, dim = x.shape
    q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
    kv_dim = k.size(-1)
    rot = self.rotary
    q = FusedQK.apply(q.view(B, T, self.num_heads, self.head_dim), self.qkv_conv[:, :dim], conv_masks, rot.cos,
                      rot.sin, self.q_gain, 1e-6, block_t)
    k = FusedQK.apply(k.view(B, T, self.num_kv_heads, self.head_dim), self.qkv_conv[:, dim:dim + kv_dim],
                      conv_masks, rot.cos, rot.sin, None, 1e-6, block_t)
    v = tg.short_causal_conv(v, self.qkv_conv[:, dim + kv_dim:], conv_masks)
    if value_embed is not None:
        v = v + value_embed
    v = v.view(B, T, self.num_kv_heads, self.head_dim)
    y = tg.causal_attention(q, k, v)
    if self.use_xsa:
        y = tg.exclusive_self_attention(y, v)
    return self.proj(y.reshape(B, T, -1))


def check(device: str = "cpu", dtype=torch.float32) -> str:
    """FusedQK against rotary(rms_norm(conv(x))) * gain through autograd: output and every gradient."""
    torch.manual_seed(0)
    B, T, H, D = 2, 150, 3, 64
    rot = tg.Rotary(16, 10000.0, T).to(device)
    worst = []
    for lags, with_gain in ((2, True), (1, False), (3, True)):
        ids = torch.randint(4, 50, (B, T), device=device)
        ids[:, ::23] = 1
        ids[1, 0] = 7  # a sequence that starts inside a document
        masks = tg.same_document_masks(ids, 1, lags)
        x = torch.randn(B, T, H * D, device=device, dtype=dtype, requires_grad=True)
        w = (0.4 * torch.randn(lags, H * D, device=device)).requires_grad_()
        gain = (1.0 + 0.3 * torch.randn(H, device=device)).requires_grad_() if with_gain else None
        go = torch.randn(B, T, H, D, device=device, dtype=dtype)
        ref = rot(tg.rms_norm(tg.short_causal_conv_ops(x.float(), w, masks).view(B, T, H, D)))
        ref = ref * gain[:, None] if with_gain else ref
        ref.backward(go.float())
        params = [x, w] + ([gain] if with_gain else [])
        want = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        out = FusedQK.apply(x.view(B, T, H, D), w, masks, rot.cos, rot.sin, gain, 1e-6, 16)
        out.backward(go)
        rel = [((out.float() - ref).abs().max() / ref.abs().max()).item()]
        rel += [((p.grad.float() - g).abs().max() / g.abs().max()).item() for p, g in zip(params, want)]
        worst.append(max(rel))
    return f"FusedQK vs autograd ({device}, {dtype}): worst relative error {max(worst):.2e}"


def check_attention() -> float:
    """fused_attention_forward against CausalSelfAttention.forward (fp32, CPU): output and every gradient."""
    torch.manual_seed(0)
    attn = tg.CausalSelfAttention(512, 8, 4, 16, 10000.0, 1.5, True, 96, 3)
    with torch.no_grad():
        attn.qkv_conv.normal_(0, 0.3)
        attn.proj.weight.normal_(0, 0.02)
        attn.q_gain.uniform_(1, 2)
    ids = torch.randint(4, 50, (2, 96))
    ids[:, ::17] = 1
    masks = tg.same_document_masks(ids, 1, 2)
    x = torch.randn(2, 96, 512)
    results = []
    for forward in (attn, lambda *a: fused_attention_forward(attn, *a, block_t=16)):
        attn.zero_grad()
        y = forward(x, None, masks)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in attn.parameters() if p.grad is not None])
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results))


if __name__ == "__main__":
    message = check()
    print(message)
    assert float(message.rsplit(" ", 1)[1]) < 1e-5
    error = check_attention()
    print(f"fused attention layer vs CausalSelfAttention: worst relative error {error:.2e}")
    assert error < 1e-5
