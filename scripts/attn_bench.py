"""Times causal GQA attention (B=48, T=2048, 8 query / 4 KV heads, head dim 64, bf16, fwd+bwd) per SDPA backend."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, T, H, HKV, D = 48, 2048, 8, 4, 64
q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)


def run(backend, expand):
    kk, vv = (k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)) if expand else (k, v)
    with sdpa_kernel([backend]):
        y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand)
    y.sum().backward()


for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    for expand in (False, True):
        try:
            for _ in range(3):
                run(backend, expand)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                run(backend, expand)
            end.record()
            torch.cuda.synchronize()
            print(f"{backend.name:22s} expand_kv={expand!s:5s} {start.elapsed_time(end) / 10:.2f} ms fwd+bwd")
        except RuntimeError as e:
            print(f"{backend.name:22s} expand_kv={expand!s:5s} unavailable: {str(e).splitlines()[0][:80]}")

