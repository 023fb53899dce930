"""Target ``flash_attn`` (CPU): the attention of a transformers model computed by a tiled online-softmax
FlashAttention written here (blocks of queries against blocks of keys, a running max and sum per
query row, the accumulator rescaled when the max grows), exact up to float rounding, with faults
such kernels really had:

    seq-cap-256   the scores of a query block live in a fixed 256-entry buffer: keys past 256 are
                  dropped (right at short lengths, wrong from position 256 on)
    no-rescale    the running max is updated but the accumulator and sum are not rescaled
    layout-bshd   the kernel reads its inputs as [batch, seq, heads, dim] while it is given
                  [batch, heads, seq, dim]

    backend = get_backend("flash_attn", "seq-cap-256"); model = backend(bundle.model)

Registered with transformers' AttentionInterface (name "tensordiff_flash"); the model's config is
switched to it. Scores and the softmax statistics are float32 whatever the input dtype (as in
FlashAttention); the output has the query's dtype.
"""
from __future__ import annotations

import torch

from tensordiff.errors import TensordiffError

NAME = "tensordiff_flash"
FAULTS = {
    "none": "a correct tiled online-softmax FlashAttention",
    "seq-cap-256": "scores in a fixed 256-entry buffer: keys past position 256 are dropped",
    "no-rescale": "the running max grows without rescaling the accumulator and the sum",
    "layout-bshd": "inputs read as [batch, seq, heads, dim] while given [batch, heads, seq, dim]",
}
BLOCK_Q = 64
BLOCK_K = 64
SCORE_BUFFER = 256  # seq-cap-256's fixed buffer


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                    scale: float, fault: str = "none", block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> torch.Tensor:
    """softmax(q k^T * scale, masked by ``allowed``) v for q [b, h, s, d], k / v [b, h, sk, d] and a
    boolean ``allowed`` broadcastable to [b, h, s, sk] (None: causal, aligned at the end)."""
    if fault == "layout-bshd":  # the kernel's view of the memory it was handed
        q, k, v = (x.contiguous().view(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2)
                   for x in (q, k, v))
    b, h, s, d = q.shape
    sk = k.shape[2]
    out = torch.empty(b, h, s, v.shape[-1], dtype=q.dtype, device=q.device)
    for qs in range(0, s, block_q):
        qe = min(qs + block_q, s)
        qb = q[:, :, qs:qe].float()
        m = torch.full((b, h, qe - qs, 1), float("-inf"), device=q.device)
        total = torch.zeros(b, h, qe - qs, 1, device=q.device)
        acc = torch.zeros(b, h, qe - qs, v.shape[-1], device=q.device)
        for ks in range(0, sk, block_k):
            if fault == "seq-cap-256" and ks >= SCORE_BUFFER:
                break
            ke = min(ks + block_k, sk)
            scores = qb @ k[:, :, ks:ke].float().transpose(-1, -2) * scale
            if allowed is None:  # causal, the last query against the last key
                rows = torch.arange(qs, qe, device=q.device)[:, None] + (sk - s)
                mask = torch.arange(ks, ke, device=q.device)[None, :] <= rows
            else:
                mask = allowed[..., qs:qe, ks:ke]
            scores = scores.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # a row with nothing yet
            p = torch.exp(scores - safe)
            rescale = torch.exp(torch.where(torch.isinf(m), torch.full_like(m, float("-inf")), m - safe))
            if fault == "no-rescale":
                rescale = torch.ones_like(rescale)
            total = rescale * total + p.sum(dim=-1, keepdim=True)
            acc = rescale * acc + p @ v[:, :, ks:ke].float()
            m = m_new
        out[:, :, qs:qe] = torch.where(total > 0, acc / total.clamp(min=1e-30), torch.zeros_like(acc)).to(q.dtype)
    if fault == "layout-bshd":  # and writes its output in that layout too
        out = out.transpose(1, 2).contiguous().view(b, h, s, -1)
    return out


def _allowed(attention_mask, q_len: int, k_len: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    return attention_mask[..., :k_len] == 0  # additive float mask: 0 where allowed


# Kernel authors' rule (FlashAttention's tests), applied per call while a capture runs: the kernel's
# max error to a float64 attention on the same q, k, v at most twice that of plain attention in the
# kernel's dtype, plus twice the dtype's rounding at the output's magnitude. None: not judging.
_JUDGED: list | None = None


class judging:
    """``with judging() as calls:`` every call of an attention kernel routed here is judged."""

    def __enter__(self) -> list:
        global _JUDGED
        _JUDGED = []
        return _JUDGED

    def __exit__(self, *exc):
        global _JUDGED
        _JUDGED = None


def plain_attention(q, k, v, allowed, scale):
    """softmax(q k^T * scale) v in q's dtype; ``allowed`` (bool) or None for causal, aligned at the end."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if allowed is None:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def judge_call(layer, q, k, v, allowed, scale, out) -> dict:
    """One call by kernel authors' rule, one head at a time (bounded memory at long lengths)."""
    err = plain_err = rounding = 0.0
    for h in range(q.shape[1]):
        sl = lambda x: x[:, h:h + 1] if x is not None and x.dim() == 4 and x.shape[1] > 1 else x  # noqa: E731
        exact = plain_attention(*(sl(x).double() for x in (q, k, v)), sl(allowed), scale)
        plain = plain_attention(sl(q), sl(k), sl(v), sl(allowed), scale)
        ok = torch.isfinite(exact)
        err = max(err, float(torch.where(ok, (sl(out).double() - exact).abs(), 0.0).max()))
        plain_err = max(plain_err, float(torch.where(ok, (plain.double() - exact).abs(), 0.0).max()))
        rounding = max(rounding, float(torch.where(ok, (exact.to(q.dtype) + 0.3 - 0.3).double() - exact, 0.0).abs().max()))
    allowed_err = 2 * plain_err + 2 * rounding
    return {"layer": layer, "max_err": err, "plain_max_err": plain_err, "allowed": allowed_err,
            "passes": err <= allowed_err, "dtype": str(q.dtype).replace("torch.", "")}


def judge_lines(calls: list, kernel: str) -> list[str]:
    """The report's line: how many calls pass kernel authors' rule, and the worst."""
    if not calls:
        return []
    failing = [c for c in calls if not c["passes"]]
    worst = max(calls, key=lambda c: c["max_err"] / max(c["allowed"], 1e-300))
    rule = (f"kernel authors' rule for {kernel} (FlashAttention's tests: max error to float64 at most 2x plain "
            f"{worst['dtype']} attention's + rounding)")
    where = f"layer {worst['layer']}" if worst["layer"] is not None else "a call"
    if failing:
        return [f"{rule}: FAILS in {len(failing)} of {len(calls)} calls (first: layer {failing[0]['layer']}, "
                f"{failing[0]['max_err']:.3g} vs {failing[0]['allowed']:.3g} allowed)"]
    return [f"{rule}: passes in all {len(calls)} calls (closest: {where}, {worst['max_err']:.3g} vs "
            f"{worst['allowed']:.3g} allowed)"]


def attention_interface(kernel):
    """An AttentionInterface function around ``kernel(q, k, v, allowed, scale) -> [b, h, s, d]``:
    transformers hands q [b, h, s, d] and k / v [b, h_kv, sk, d] (key / value heads are repeated here
    for grouped-query attention) and takes [b, s, h, d] back."""

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        allowed = _allowed(attention_mask, query.shape[2], key.shape[2])
        out = kernel(query, key, value, allowed, scale)
        if _JUDGED is not None:
            with torch.no_grad():
                _JUDGED.append(judge_call(getattr(module, "layer_idx", None), query.detach(), key.detach(),
                                          value.detach(), allowed, scale, out.detach()))
        return out.transpose(1, 2).contiguous(), None

    return attention


def route_attention(model: torch.nn.Module, name: str, attention, who: str) -> torch.nn.Module:
    """Register ``attention`` under ``name`` and switch the model's config to it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TensordiffError(f"{who} swaps a transformers model's attention implementation; this model has "
                              "no config._attn_implementation")
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config._attn_implementation = name
    return model


def use_flash_attention(model: torch.nn.Module, fault: str = "none") -> torch.nn.Module:
    if fault not in FAULTS:
        raise TensordiffError(f"unknown --fault {fault!r} for flash_attn; choose one of {', '.join(FAULTS)}")
    kernel = lambda q, k, v, allowed, scale: flash_attention(q, k, v, allowed, scale, fault)  # noqa: E731
    return route_attention(model, f"{NAME}_{fault}", attention_interface(kernel), "--target flash_attn")


def is_attention_kernel(fn) -> bool:
    """A user's attention kernel, by its signature: ``fn(q, k, v, causal, scale[, mask])`` (a model plugin
    takes one argument, the model)."""
    import inspect

    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return names[:5] == ["q", "k", "v", "causal", "scale"]


def use_attention_kernel(model: torch.nn.Module, kernel, name: str) -> torch.nn.Module:
    """``--target file.py:NAME`` where NAME is an attention kernel: the model's attention calls
    ``kernel(q, k, v, causal=..., scale=...)`` with q [batch, heads, seq, dim] and k / v
    [batch, heads, seq_k, dim] (key / value heads already repeated for grouped-query attention); it
    returns [batch, heads, seq, dim]. A padding mask is passed as ``mask`` (bool, True where allowed,
    broadcastable to [batch, heads, seq, seq_k]) when the kernel takes one."""
    import inspect

    takes_mask = "mask" in inspect.signature(kernel).parameters

    def call(q, k, v, allowed, scale):
        extra = {}
        if allowed is not None:
            causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
            if not bool((allowed == causal).all()):
                if not takes_mask:
                    raise TensordiffError(f"{name}: the model passes a padding mask and the kernel takes no "
                                          "`mask` parameter")
                extra["mask"] = allowed
        return kernel(q, k, v, causal=True, scale=scale, **extra)

    return route_attention(model, f"{NAME}_user_{abs(hash(name))}", attention_interface(call),
                           f"{name} (an attention kernel)")
