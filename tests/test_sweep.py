"""Length sweep: the pair at several sequence lengths, the boundary bisected to one position."""
import json

import pytest

from tensordiff.errors import TensordiffError
from tensordiff.sweep import parse_lengths, sweep
from tests.conftest import make_job


def test_lengths_from_a_list_or_a_range():
    assert parse_lengths("256,4,64") == [4, 64, 256]
    assert parse_lengths("4..64") == [4, 8, 16, 32, 64]
    assert parse_lengths("4..100") == [4, 8, 16, 32, 64, 100]
    with pytest.raises(TensordiffError, match="--sweep-seq"):
        parse_lengths("4,x")


def test_seq_cap_kernel_passes_its_unit_test_size_and_fails_from_257(tmp_path):
    """flash_attn with scores in a 256-entry buffer: right at 4 and 128 positions, wrong at 320; the
    bisection lands on the exact boundary: passes at 256, fails from 257 on."""
    job = make_job(tmp_path, target="flash_attn", fault="seq-cap-256", isolate=False)
    result = sweep(job, [4, 128, 320], bisect=True)
    assert (result.largest_passing, result.first_failing) == (256, 257)
    assert result.runs[4]["verdict"] == result.runs[128]["verdict"] == "match"
    assert result.runs[320]["verdict"] == "diverged" and result.runs[257]["culprit"] == "model.layers.0.self_attn"
    assert "passes at 256, fails from 257 on" in result.text and "a unit test at 4 positions passes" in result.text
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["first_failing"] == 257


def test_clean_kernel_passes_every_length(tmp_path):
    result = sweep(make_job(tmp_path, target="flash_attn", isolate=False), [4, 300])
    assert result.first_failing is None and result.text.endswith("no length fails")
