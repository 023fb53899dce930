"""Target flash_attn: the CPU tiled online-softmax FlashAttention, exact at thousands of positions,
and each of its planted faults localized (and, with error maps, placed along the sequence)."""
from pathlib import Path

import pytest
import torch

from tensordiff.analysis.error_map import error_map
from tensordiff.backends.flash_attn import flash_attention
from tensordiff.run import trace_job
from tests.conftest import make_job


def _qkv(seq=2048, heads=8, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, seq, dim, generator=gen) for _ in range(3)]


def _sdpa(q, k, v, causal=True):
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)


@pytest.mark.parametrize("causal,dim", [(True, 64), (False, 128)])
def test_clean_kernel_is_exact_at_2048_positions(causal, dim):
    """8 heads, 2048 positions, head dim 64 causal and 128 not: exact up to float rounding."""
    q, k, v = _qkv(dim=dim)
    allowed = None if causal else torch.ones(1, 1, 2048, 2048, dtype=torch.bool)
    out = flash_attention(q, k, v, allowed, dim ** -0.5)
    exact = _sdpa(q, k, v, causal)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # same dtype, not tiled
    err, err_plain = (out.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()
    assert err < 1e-5
    assert err <= 2 * err_plain + 1e-6  # FlashAttention's own test rule: at most 2x the plain kernel's error


def test_seq_cap_without_causal_mask_is_wrong_in_every_row():
    """Not causal, every query reads every key: a 256-entry buffer is wrong in every row."""
    q, k, v = _qkv(seq=1024)
    allowed = torch.ones(1, 1, 1024, 1024, dtype=torch.bool)
    out = flash_attention(q, k, v, allowed, 64 ** -0.5, fault="seq-cap-256")
    axes = {a["axis"]: a for a in error_map(_sdpa(q, k, v, causal=False).float(), out, budget=1e-4)}
    assert axes[2]["beyond"] == 1024 and axes[1]["beyond"] == 8


@pytest.mark.parametrize("fault", ["seq-cap-256", "no-rescale", "layout-bshd"])
def test_each_fault_is_wrong_where_it_should_be(fault):
    q, k, v = _qkv()
    exact = _sdpa(q, k, v).float()
    out = flash_attention(q, k, v, None, q.shape[-1] ** -0.5, fault=fault)
    axes = {a["axis"]: a for a in error_map(exact, out, budget=1e-4)}
    if fault == "seq-cap-256":  # right while every key fits the buffer, wrong from position 256 on
        assert axes[2]["text"] == "indices >= 256 of 2048 (from 256 = 2^8)"
        assert (out[:, :, :256] - exact[:, :, :256]).abs().max() < 1e-5
    else:
        assert axes[2]["beyond"] > 1500  # wrong almost everywhere along the sequence
    short = _qkv(seq=4, heads=2, dim=8)  # the unit test such kernels passed (seq_len 4, 2 heads, dim 8)
    small = flash_attention(*short, None, 8 ** -0.5, fault=fault)
    assert ((small - _sdpa(*short).float()).abs().max() < 1e-5) == (fault in ("seq-cap-256", "no-rescale"))


def test_seq_cap_fault_localized_in_a_model_and_clean_run_matches(tmp_path):
    """Through `trace` at 384 tokens: the culprit is layer 0's attention (its own code: no single op is
    wrong on its inputs, the kernel drops blocks), the error begins at position 256; the clean kernel
    matches the SDPA reference."""
    res = trace_job(make_job(tmp_path, name="bug", seq_len=384, target="flash_attn", fault="seq-cap-256",
                             isolate=False)).result
    assert res.verdict == "diverged" and res.culprit["module"] == "model.layers.0.self_attn"
    assert "dim 1 (size 384): indices >= 256 of 384 (from 256 = 2^8) beyond tolerance" in res.culprit["error_map_lines"]
    clean = trace_job(make_job(tmp_path, name="clean", seq_len=384, target="flash_attn", isolate=False)).result
    assert clean.verdict == "match", clean.notes
    assert clean.meta["target"]["backend"]["kernel"].startswith("tensordiff tiled online-softmax")
    # kernel authors' rule beside our verdict: every call of the clean kernel passes it, layer 0 of the
    # capped one fails it
    rule = [n for n in clean.notes if n.startswith("kernel authors' rule")]
    layers = sum(k.endswith("self_attn/forward#0/output.0") for k in clean.table["key"])
    assert layers == 4 and len(rule) == 1 and "passes in all 4 calls" in rule[0], clean.notes
    bad_rule = [n for n in res.notes if n.startswith("kernel authors' rule")]
    assert len(bad_rule) == 1 and "FAILS in 4 of 4 calls (first: layer 0," in bad_rule[0], res.notes


KERNELS = '''
import torch


def good(q, k, v, causal, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(m - n), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def unscaled(q, k, v, causal, scale):
    return good(q, k, v, causal, 1.0)  # forgets the 1/sqrt(d) scale


def a_model_plugin(model):
    return model
'''


def test_user_attention_kernel_from_a_file(tmp_path):
    """--target file.py:NAME where NAME(q, k, v, causal, scale) is an attention kernel: it computes the
    model's attention; a correct one matches, one that forgets the scale is the attention's fault."""
    from tensordiff.backends.flash_attn import is_attention_kernel
    from tensordiff.models import _from_file

    path = tmp_path / "kernels.py"
    path.write_text(KERNELS)
    assert is_attention_kernel(_from_file(f"{path}:good"))
    assert not is_attention_kernel(_from_file(f"{path}:a_model_plugin"))
    good = trace_job(make_job(tmp_path, name="good", seq_len=256, target=f"{path}:good", isolate=False)).result
    assert good.verdict == "match", good.notes
    assert good.meta["target"]["backend"]["kernel"] == f"attention kernel {path}:good"
    bad = trace_job(make_job(tmp_path, name="bad", seq_len=256, target=f"{path}:unscaled", isolate=False)).result
    assert bad.verdict == "diverged" and bad.culprit["module"] == "model.layers.0.self_attn"


def test_user_attention_kernel_in_a_device_and_dtype(tmp_path):
    """``cpu-bf16+file.py:NAME``: the model converted as the cpu-bf16 target is, then its attention
    computed by the user's kernel, which receives bf16 tensors (on CUDA: ``cuda-bf16+file.py:NAME``)."""
    from tensordiff.backends.registry import get_backend
    from tensordiff.errors import TensordiffError

    path = tmp_path / "kernels.py"
    path.write_text(KERNELS + '''

SEEN = []


def recording(q, k, v, causal, scale):
    SEEN.append(q.dtype)
    return good(q, k, v, causal, scale)
''')
    backend = get_backend(f"cpu-bf16+{path}:recording")
    assert backend.dtype == torch.bfloat16 and backend.info["attention_kernel"]
    res = trace_job(make_job(tmp_path, name="bf16", seq_len=256, target=f"cpu-bf16+{path}:recording",
                             isolate=False)).result
    assert res.verdict == "match", res.notes
    assert [n for n in res.notes if n.startswith("kernel authors' rule") and "passes in all 4 calls" in n], res.notes
    from tensordiff.models import _from_file

    assert set(_from_file(f"{path}:recording").__globals__["SEEN"]) == {torch.bfloat16}
    with pytest.raises(TensordiffError, match="is not an attention kernel"):
        get_backend(f"cpu+{path}:a_model_plugin")
