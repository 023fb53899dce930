"""Third-party attention kernels as `trace` targets (`--target cuda-bf16+benchmarks/third_party_attention.py:NAME`),
each in the layout tensordiff hands a user kernel (q, k, v as [batch, heads, seq, dim], heads already
repeated for grouped-query attention):

    xformers_mea   xformers' memory_efficient_attention (its own CUTLASS / flash dispatch)
    sage           SageAttention 1 (Triton; q and k quantised to INT8 per block, k smoothed)

Neither package ships with tensordiff; on the lent H200 they travel as wheels (xformers 0.0.35,
3.3 MB; sageattention 1.0.6, pure Python + Triton).
"""
import torch


def xformers_mea(q, k, v, causal, scale):
    from xformers.ops import LowerTriangularMask, memory_efficient_attention

    bias = LowerTriangularMask() if causal else None
    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias,
                                     scale=scale)
    return out.transpose(1, 2)


def sage(q, k, v, causal, scale):
    from sageattention import sageattn

    return sageattn(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="HND", is_causal=causal,
                    sm_scale=scale)
