"""A regression test for kernel authors: the kernel against its reference at real sizes, with the
verdict a debugging session would give as the failure message.

    from tensordiff.testing import assert_matches_reference

    def test_my_attention():
        assert_matches_reference(my_attention, inputs_at=[4, 1024, 4096])   # an attention kernel
        assert_matches_reference(my_gemm, torch.matmul, inputs_at=[64, 4096],
                                 make_inputs=lambda n: (torch.randn(n, n), torch.randn(n, n)))

At each size the target and the reference run on the same inputs; the reference also runs in float64
(floating inputs promoted), which is what both are judged against. A size fails when the target's
relative L2 to the float64 answer is over the dtype's budget *and* over twice what the reference
itself makes in the target's dtype (the noise floor; a bf16 kernel is not blamed for bf16). Beside it,
kernel authors' rule (FlashAttention's tests): the target's max error at most twice the reference's in
the same dtype, plus twice the dtype's rounding at the output's magnitude.

On failure (``KernelMismatch``, an AssertionError) the message says where it passes and fails, the
boundary bisected to one size, the error per size, where in the output the error sits (error map),
and for an attention kernel what a model run with it says (verdict and culprit module).

An attention kernel is recognised by its parameters ``(q, k, v, causal, scale[, mask])``: q, k, v are
[batch, heads, seq, dim]; its reference defaults to plain softmax attention and its inputs to
batch 1, 8 heads, head dim 64, causal, at each size.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from tensordiff.metrics import FLOOR_MULTIPLIER, tolerance_for


class KernelMismatch(AssertionError):
    """The target disagrees with the reference at some size; the message is the verdict, ``verdict``
    the figures."""

    def __init__(self, message: str, verdict=None):
        super().__init__(message)
        self.verdict = verdict


@dataclass
class SizeCheck:
    size: int
    passed: bool
    rel_l2: float
    max_abs: float
    floor_rel_l2: float | None     # the reference in the target's dtype, against float64
    authors_pass: bool | None      # kernel authors' rule (None: no same-dtype reference to compare)
    authors_text: str = ""
    budget: float = 0.0
    map_lines: list = field(default_factory=list)


def plain_attention(q, k, v, causal: bool = True, scale: float | None = None, mask=None):
    """softmax(q k^T * scale) v in q's dtype, masked causally (aligned at the end) and by ``mask``
    (bool, True where allowed)."""
    from tensordiff.backends.flash_attn import plain_attention as masked

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(k.shape[-2] - q.shape[-2])
    if mask is not None:
        allowed = allowed & mask
    return masked(q, k, v, allowed, scale)


def attention_inputs(heads: int = 8, head_dim: int = 64, batch: int = 1, dtype=torch.float32,
                     causal: bool = True, seed: int = 0, device: str = "cpu"):
    """``make_inputs`` for attention kernels: size -> keyword arguments q, k, v, causal, scale."""

    def make(size: int) -> dict:
        g = torch.Generator(device="cpu").manual_seed(seed + size)
        q, k, v = (torch.randn(batch, heads, size, head_dim, generator=g).to(device, dtype) for _ in range(3))
        return {"q": q, "k": k, "v": v, "causal": causal, "scale": head_dim ** -0.5}

    return make


def is_attention_kernel(fn) -> bool:
    from tensordiff.backends.flash_attn import is_attention_kernel as check

    return check(fn)


def _call(fn, inputs):
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _promoted(inputs):
    """Floating tensors to float64, everything else as is."""
    up = lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    return {k: up(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(up(x) for x in inputs)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"a kernel must return a tensor (or a tuple starting with one), got {type(out).__name__}")


def _rel_l2(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    from tensordiff.probes.local_error import local_error

    result = local_error(out, exact)
    return (math.inf, math.inf) if result is None else result


def check_size(target, reference, inputs, size: int) -> SizeCheck:
    """One size: target and reference (same dtype) against the reference in float64."""
    from tensordiff.analysis.error_map import error_map, map_lines

    out = _first_tensor(_call(target, inputs)).detach()
    try:
        exact = _first_tensor(_call(reference, _promoted(inputs))).detach()
    except Exception:  # a reference that cannot run in float64: itself, in the inputs' dtype, is the answer
        exact = None
    same = _first_tensor(_call(reference, inputs)).detach()
    if exact is None:
        exact, same = same, None
    if tuple(out.shape) != tuple(exact.shape):
        return SizeCheck(size, False, math.inf, math.inf, None, None,
                         f"output shape {tuple(out.shape)}, the reference's {tuple(exact.shape)}",
                         map_lines=[])
    budget = tolerance_for(str(out.dtype)).rel_l2
    rel, max_abs = _rel_l2(out, exact)
    floor = authors = None
    text = ""
    if same is not None:
        floor, same_max = _rel_l2(same, exact)
        # FlashAttention's tests: max error at most 2 x the same-dtype reference's, plus twice the
        # dtype's rounding at the output's magnitude ((x + 0.3 - 0.3) - x)
        e64 = exact.to(out.device)
        rounding = float(((e64.to(out.dtype) + 0.3 - 0.3).double() - e64).abs().max()) if exact.numel() else 0.0
        allowed = 2 * same_max + 2 * rounding
        authors = max_abs <= allowed
        text = (f"kernel authors' rule (max error <= 2 x the plain {str(out.dtype).replace('torch.', '')} "
                f"reference's + rounding): {'passes' if authors else 'FAILS'}, {max_abs:.3g} vs {allowed:.3g}")
    wrong = rel > budget and (floor is None or rel > FLOOR_MULTIPLIER * floor + budget / 10)
    lines = map_lines(error_map(exact.to(out.device), out, budget)) if wrong else []
    return SizeCheck(size, not wrong, rel, max_abs, floor, authors, text, budget, lines)


@dataclass
class Verdict:
    checks: dict                      # size -> SizeCheck
    first_failing: int | None = None   # after bisection, the smallest failing size
    first_failing_given: int | None = None  # the smallest failing size of those asked for
    largest_passing: int | None = None
    bisect_runs: int = 0
    in_model: list = field(default_factory=list)   # headline lines of a model run with the kernel

    @property
    def passed(self) -> bool:
        return self.first_failing is None

    def message(self, name: str) -> str:
        given = sorted(s for s in self.checks)
        ok = [s for s in given if self.checks[s].passed]
        bad = [s for s in given if not self.checks[s].passed]
        lines = [f"{name} diverges from its reference" if bad else f"{name} matches its reference"]
        boundary = "; ".join(p for p in (ok and f"passes at {', '.join(map(str, ok))}",
                                         bad and f"fails at {', '.join(map(str, bad))}") if p)
        if self.bisect_runs:
            boundary += (f"; bisected in {self.bisect_runs} runs: passes at {self.largest_passing}, "
                         f"fails from {self.first_failing} on")
        lines.append(f"sizes: {boundary}")
        for s in given:
            c = self.checks[s]
            if c.authors_text.startswith("output shape"):
                lines.append(f"  at {s}: {c.authors_text}")
                continue
            floor = f"; the plain reference in its dtype: {c.floor_rel_l2:.3g}" if c.floor_rel_l2 is not None else ""
            lines.append(f"  at {s}: {'ok  ' if c.passed else 'FAIL'} rel L2 {c.rel_l2:.3g} (budget {c.budget:.3g}{floor}), "
                         f"max |diff| {c.max_abs:.3g}" + (f"; {c.authors_text}" if c.authors_text else ""))
        if bad:
            lines += [f"  where in the output at {bad[0]}: {w}" for w in self.checks[bad[0]].map_lines]
        if self.in_model:
            lines.append(f"in a model at {self.first_failing_given} tokens:")
            lines += [f"  {l}" for l in self.in_model]
        return "\n".join(lines)


def _bisect(target, reference, make_inputs, lo: int, hi: int, verdict: Verdict) -> None:
    while hi - lo > 1:
        mid = (lo + hi) // 2
        check = check_size(target, reference, make_inputs(mid), mid)
        verdict.bisect_runs += 1
        lo, hi = (mid, hi) if check.passed else (lo, mid)
    verdict.largest_passing, verdict.first_failing = lo, hi


def _in_model(kernel, name: str, length: int, model: str, out) -> list[str]:
    """The kernel as the attention of a small random ``model`` at ``length`` tokens: the trace's
    verdict and culprit lines."""
    import tempfile

    from tensordiff.backends.registry import register
    from tensordiff.render.text import headline
    from tensordiff.run import TraceJob, trace_job

    key = f"pytest:{name}"
    register(key, kernel)
    with tempfile.TemporaryDirectory() as tmp:
        job = TraceJob(model=model, target=key, seq_len=length, out=str(out or tmp), time_plain=False,
                       isolate=False)
        result = trace_job(job).result
    return [l for l in headline(result) if not l.startswith("note:")]


def assert_matches_reference(target, reference=None, inputs_at=(4, 256, 1024), *, make_inputs=None,
                             bisect: bool = True, in_model: str | None = "qwen", out=None,
                             name: str | None = None) -> Verdict:
    """Raise ``KernelMismatch`` when ``target`` disagrees with ``reference`` at any size of
    ``inputs_at`` (see the module's docstring); return the verdict otherwise.

    ``make_inputs(size)`` gives the call's arguments (a tuple, or a dict of keyword arguments); for an
    attention kernel it defaults to ``attention_inputs()`` and ``reference`` to ``plain_attention``.
    ``in_model``: for an attention kernel that fails, also run a small random model of this name
    (``tensordiff trace --model``) with it at the first failing length (None: skip); ``out`` keeps
    that run's traces and reports."""
    name = name or getattr(target, "__name__", type(target).__name__)
    attention = is_attention_kernel(target)
    if reference is None:
        if not attention:
            raise TypeError(f"{name} is not an attention kernel (q, k, v, causal, scale): give its reference")
        reference = plain_attention
    if make_inputs is None:
        if not attention:
            raise TypeError(f"give make_inputs(size) -> the arguments of {name} at that size")
        make_inputs = attention_inputs()
    sizes = sorted(set(int(s) for s in inputs_at))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"inputs_at {inputs_at!r}: give positive sizes")
    with torch.no_grad():
        verdict = Verdict({s: check_size(target, reference, make_inputs(s), s) for s in sizes})
        bad = [s for s in sizes if not verdict.checks[s].passed]
        if not bad:
            return verdict
        verdict.first_failing = verdict.first_failing_given = bad[0]
        below = [s for s in sizes if s < bad[0]]
        verdict.largest_passing = below[-1] if below else None
        if bisect and below:
            _bisect(target, reference, make_inputs, below[-1], bad[0], verdict)
    if attention and in_model:
        verdict.in_model = _in_model(target, name, verdict.first_failing_given, in_model, out)
    raise KernelMismatch(verdict.message(name), verdict)
