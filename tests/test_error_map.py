"""Error maps: where along each axis of a record the error sits, in the words of a kernel author."""
from pathlib import Path

import pytest

import torch

from tensordiff.analysis.error_map import error_map, map_lines
from tensordiff.run import trace_job
from tests.conftest import make_job

PLUGINS = Path(__file__).parent / "plugins"


def _pair(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(*shape, generator=gen)
    return ref, ref + 1e-6 * torch.randn(*shape, generator=gen)


def test_heads_every_kth_and_a_boundary_are_named_per_axis():
    ref, tgt = _pair((2, 8, 512, 16))          # [batch, heads, positions, head dim]
    tgt[:, 2:6] += 0.1 * ref[:, 2:6]           # heads 2-5 only
    axes = {a["axis"]: a for a in error_map(ref, tgt, budget=1e-3)}
    assert axes[1]["text"].startswith("indices 2-5 of 8") and axes[1]["beyond"] == 4
    assert axes[2]["beyond"] == 512 and axes[0]["beyond"] == 2  # spread over every position and batch row
    ref, tgt = _pair((1024, 64))
    tgt[::64] *= 1.5                            # every 64th row
    rows = error_map(ref, tgt, budget=1e-3)[0]
    assert rows["text"].startswith("rows 0, 64, 128, ... (every 64th; 16 of 1024)")
    ref, tgt = _pair((1, 2048, 32))
    tgt[:, 256:] = float("nan")                 # NaN from position 256 on: infinite error there
    axes = error_map(ref, tgt, budget=0.06)
    assert axes[0]["text"] == "indices >= 256 of 2048 (from 256 = 2^8)"
    assert map_lines(axes)[0] == "dim 1 (size 2048): indices >= 256 of 2048 (from 256 = 2^8) beyond tolerance"


def test_clean_pair_has_nothing_beyond():
    ref, tgt = _pair((4, 128, 64))
    assert all(a["beyond"] == 0 for a in error_map(ref, tgt, budget=1e-4))
    assert map_lines(error_map(ref, tgt, budget=1e-4)) == []


def test_culprit_error_starts_at_position_256_in_the_report(tmp_path):
    """A layer whose attention is right for 256 positions and wrong after, at 512 tokens: the culprit
    and the console say where the error begins; the HTML has a chart per axis."""
    res = trace_job(make_job(tmp_path, seq_len=512, target=f"{PLUGINS}/planted.py:layer1_attention_wrong_from_position_256")).result
    assert res.verdict == "diverged" and res.culprit["module"] == "model.layers.1.self_attn"
    lines = res.culprit["error_map_lines"]
    assert "dim 1 (size 512): indices >= 256 of 512 (from 256 = 2^8) beyond tolerance" in lines
    html = (tmp_path / "run" / "report.html").read_text()
    assert "error along each axis of model.layers.1.self_attn/forward#0/output.0" in html
    assert "indices &gt;= 256 of 512" in html


def test_slices_give_the_same_map_as_one_pass(monkeypatch):
    """Large records are mapped in slices along their longest axis (bounded memory): the answer does not
    depend on the slice size."""
    import tensordiff.analysis.error_map as em

    ref, tgt = _pair((3, 300, 40))
    tgt[:, 100:130] *= 1.2
    tgt[1, 7, 3] = float("inf")
    whole = em.error_map(ref, tgt, budget=1e-3)
    monkeypatch.setattr(em, "CHUNK_ELEMENTS", 7 * 40 * 3)  # slices of 7 positions
    sliced = em.error_map(ref, tgt, budget=1e-3)
    assert [a["text"] for a in sliced] == [a["text"] for a in whole]
    assert whole[1]["text"].startswith("indices 7, 100-129 of 300")
    for a, b in zip(whole, sliced):
        assert a["rel_l2"] == pytest.approx(b["rel_l2"], rel=1e-12) and a["max_abs"] == pytest.approx(b["max_abs"])
