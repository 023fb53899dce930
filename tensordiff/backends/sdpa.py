"""Targets ``cuda-bf16+sdpa-flash`` (any built-in device/dtype, then ``+sdpa-flash``, ``-efficient``,
``-cudnn`` or ``-math``): the model's attention computed by torch's ``scaled_dot_product_attention``
with exactly one backend allowed. A default SDPA call picks a backend by itself, per shape and dtype,
and silently falls back; forcing one makes the trace say which kernel it judged, and a backend that
cannot take the call is an error naming it rather than a quiet fallback.

Each call goes through the same attention interface as the ``flash_attn`` target, so every call is
also judged by kernel authors' rule (error to float64 at most 2x that of plain attention in the
same dtype); ``+sdpa-math`` is that plain attention, the baseline the other three are held to.
"""
from __future__ import annotations

import torch

from tensordiff.errors import TensordiffError

SDPA_KINDS = ("flash", "efficient", "cudnn", "math")


def _backend(kind: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kind]


def describe(kind: str) -> dict:
    return {"kernel": f"torch SDPA {kind} backend (torch {torch.__version__})", "attention_kernel": True,
            "sdpa_backend": kind}


def sdpa_kernel_call(kind: str):
    """``kernel(q, k, v, allowed, scale)`` for ``flash_attn.attention_interface``: SDPA with only the
    ``kind`` backend enabled. A mask equal to the causal one is passed as ``is_causal`` (flash takes
    no explicit mask)."""
    from torch.nn.attention import sdpa_kernel

    backend = _backend(kind)

    def kernel(q, k, v, allowed, scale):
        causal = allowed is None
        if allowed is not None:
            lower = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
            causal = q.shape[2] == k.shape[2] and bool((allowed == lower).all())
        try:
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if causal else allowed, is_causal=causal, scale=scale)
        except RuntimeError as exc:  # "No available kernel. Aborting execution."
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TensordiffError(f"SDPA backend {kind!r} cannot run this call (q {tuple(q.shape)} {q.dtype} on "
                                  f"{q.device}, {'causal' if causal else 'explicit mask'}): {first}") from None

    return kernel


def use_sdpa_backend(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    from tensordiff.backends.flash_attn import attention_interface, route_attention

    if kind not in SDPA_KINDS:
        raise TensordiffError(f"unknown SDPA backend {kind!r}; choose one of {', '.join(SDPA_KINDS)}")
    return route_attention(model, f"tensordiff_sdpa_{kind}", attention_interface(sdpa_kernel_call(kind)),
                           f"+sdpa-{kind}")
