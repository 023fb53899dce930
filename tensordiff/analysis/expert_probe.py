"""Error per expert of a fused experts call, black box or not: each expert alone, on the call's own
tokens, target against the reference.

A fused experts module (``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``, as
transformers' Qwen3-MoE experts and kt_moe's kernel module) computes, for token t, the weighted sum of
its k experts. Routing every token to expert e with weight 1 (and to k-1 other experts with weight 0)
makes the call compute expert e alone on every token: run that on both sides and the error of each
expert is measured directly, in E calls per side, without looking inside the kernel.

    rows = probe_experts(target_experts, reference_experts, hidden, top_k=6)
    [(0, 0.0049), (1, 0.0051), ..., (17, 0.41), ...]
"""
from __future__ import annotations

import torch

from tensordiff.probes.local_error import local_error


def _only(expert: int, tokens: int, top_k: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = (torch.arange(top_k) + expert) % experts  # expert first, then k-1 distinct others
    weights = torch.zeros(top_k)
    weights[0] = 1.0
    return ids.expand(tokens, top_k).contiguous(), weights.expand(tokens, top_k).contiguous()


def probe_experts(target: torch.nn.Module, reference: torch.nn.Module, hidden: torch.Tensor, top_k: int,
                  experts: int, weights_dtype: torch.dtype | None = None) -> list[tuple[int, float]]:
    """(expert, rel L2 of the target's output against the reference's) for every expert, each run
    alone on ``hidden`` (the call's recorded input), each side in its own dtype and device."""
    rows = []
    t_param = next(iter(target.parameters()), None)
    r_param = next(iter(reference.parameters()), None)
    t_dtype = t_param.dtype if t_param is not None else hidden.dtype
    r_dtype = r_param.dtype if r_param is not None else torch.float32
    t_dev = t_param.device if t_param is not None else hidden.device
    r_dev = r_param.device if r_param is not None else hidden.device
    with torch.no_grad():
        for expert in range(experts):
            ids, weights = _only(expert, hidden.shape[0], top_k, experts)
            out_t = target(hidden.to(t_dev, t_dtype), ids.to(t_dev), weights.to(t_dev, weights_dtype or t_dtype))
            out_r = reference(hidden.to(r_dev, r_dtype), ids.to(r_dev), weights.to(r_dev, r_dtype))
            err = local_error(out_t, out_r)
            rows.append((expert, float("nan") if err is None else err[0]))
    return rows


def describe_probe(rows: list[tuple[int, float]], budget: float, experts: int) -> dict:
    """Which experts are beyond ``budget``, as ranges, and how far the others stay from it."""
    from tensordiff.analysis.boundary import describe_indices

    beyond = [e for e, err in rows if not err <= budget]  # NaN counts as beyond
    within = [err for e, err in rows if err <= budget]
    text = (f"{describe_indices(beyond, experts, 'experts')} beyond tolerance "
            f"(rel L2 up to {max(err for e, err in rows if e in beyond):.3g})" if beyond else "every expert within tolerance")
    if within:
        text += f"; the other {len(within)} within (at most {max(within):.3g})"
    return {"beyond": beyond, "errors": [round(err, 6) for _, err in rows], "budget": budget, "text": text}
