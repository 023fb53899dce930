"""The attention path of the echo_npu port, as NPU ports write theirs: scores with the device's bmm,
the mask applied in place with the device's ``masked_fill_`` on a bool mask, softmax, bmm.

Registered with transformers' AttentionInterface under the name "echo_npu"; the backend switches a
transformers model to it. Models without ``config._attn_implementation`` are left unchanged.
"""
from __future__ import annotations

import torch

NAME = "echo_npu"


def echo_npu_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       **kwargs):
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, k_len = scores.shape[-2], scores.shape[-1]
    if attention_mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :k_len]
    else:  # additive float mask: 0 where allowed
        allowed = attention_mask[..., :k_len] == 0
    # A finite minimum rather than -inf: a fully padded row becomes uniform, not NaN.
    scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    # Like torch's SDPA: a query that may attend to nothing (a padded position) gets zeros.
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, None


def use_echo_npu_attention(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, echo_npu_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config._attn_implementation = NAME
