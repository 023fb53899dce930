"""A correct but slow attention kernel for `trace --timing` (issue 13's story: right, and 17x slower
than the plain attention it replaced): it walks the queries 16 rows at a time, as a kernel with a
fixed small tile and no parallelism across tiles would, accumulating in float32.

    tensordiff trace --model qwen --size 0.5b --seq-len 2048 --reference cuda \
        --target cuda-bf16+benchmarks/slow_attention_kernel.py:attention --timing
"""
import torch

ROWS = 16


def attention(q, k, v, causal, scale):
    out = torch.empty_like(q)
    n, m = q.shape[2], k.shape[2]
    for start in range(0, n, ROWS):
        rows = q[:, :, start:start + ROWS].float()
        scores = rows @ k.float().transpose(-1, -2) * scale
        if causal:
            pos = torch.arange(start, min(start + ROWS, n), device=q.device)[:, None] + (m - n)
            scores = scores.masked_fill(torch.arange(m, device=q.device)[None, :] > pos, float("-inf"))
        out[:, :, start:start + ROWS] = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
    return out
