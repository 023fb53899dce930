"""tensordiff.testing: the pytest helper for kernel authors, on real kernels at real sizes."""
import pytest
import torch

from tensordiff.backends.flash_attn import flash_attention
from tensordiff.testing import KernelMismatch, assert_matches_reference, attention_inputs

pytest_plugins = ["pytester"]


def capped_attention(q, k, v, causal, scale):
    """The story's kernel: scores in a fixed 256-entry buffer (right at seq_len 4, wrong past 256)."""
    return flash_attention(q, k, v, None if causal else torch.ones(1, dtype=torch.bool), scale, "seq-cap-256")


def tiled_attention(q, k, v, causal, scale):
    return flash_attention(q, k, v, None, scale)


def test_capped_kernel_fails_past_256_with_the_boundary_the_map_and_the_model_culprit(tmp_path):
    # a seq_len-4 unit test passes
    assert assert_matches_reference(capped_attention, inputs_at=[4], in_model=None).passed
    with pytest.raises(KernelMismatch) as err:
        assert_matches_reference(capped_attention, inputs_at=[4, 64, 320], out=str(tmp_path / "model"))
    text = str(err.value)
    assert "capped_attention diverges from its reference" in text
    assert "passes at 4, 64; fails at 320" in text
    assert "passes at 256, fails from 257 on" in text          # bisected from 64..320 to one position
    assert "indices >= 256 of 320 (from 256 = 2^8)" in text     # the error map of dim 2 (positions)
    assert "culprit: model.layers.0.self_attn" in text          # the model run with the kernel
    assert (tmp_path / "model" / "summary.json").exists()


def test_clean_tiled_kernel_matches_at_2048_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        verdict = assert_matches_reference(tiled_attention, inputs_at=[4, 2048],
                                           make_inputs=attention_inputs(heads=8, head_dim=64, dtype=dtype))
        assert verdict.passed
        check = verdict.checks[2048]
        assert check.rel_l2 < check.budget
        assert check.authors_pass, check.authors_text    # kernel authors' rule agrees
        if dtype == torch.bfloat16:
            # the noise floor is real: plain bf16 attention is itself ~1e-3 off float64
            assert 1e-4 < check.floor_rel_l2 < check.budget


def test_no_rescale_fails_at_every_length_beyond_one_block():
    def no_rescale(q, k, v, causal, scale):
        return flash_attention(q, k, v, None, scale, "no-rescale")

    with pytest.raises(KernelMismatch) as err:
        assert_matches_reference(no_rescale, inputs_at=[32, 1024], in_model=None)
    text = str(err.value)
    assert "passes at 32; fails at 1024" in text       # one 64-key block: nothing to rescale
    # where it starts depends on the data: the first key block whose scores raise a row's max
    v = err.value.verdict
    assert 64 < v.first_failing <= 1024 and v.bisect_runs >= 5
    assert f"passes at {v.largest_passing}, fails from {v.first_failing} on" in text
    assert "kernel authors' rule" in text and "FAILS" in text


def test_generic_kernel_with_its_own_reference_and_inputs():
    def split_k_gemm(a, b):
        """Accumulates K in chunks of 512 and forgets the last partial chunk."""
        k = a.shape[1]
        out = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
        for s in range(0, k - k % 512 if k > 512 else k, 512):
            out += a[:, s:s + 512] @ b[s:s + 512]
        return out

    def make(n):
        g = torch.Generator().manual_seed(n)
        return torch.randn(64, n, generator=g), torch.randn(n, 32, generator=g)

    with pytest.raises(KernelMismatch) as err:
        assert_matches_reference(split_k_gemm, torch.matmul, inputs_at=[16, 512, 2000], make_inputs=make)
    text = str(err.value)
    assert "passes at 16, 512; fails at 2000" in text
    assert "passes at 512, fails from 513 on" in text
    # a correct fp16 GEMM is not blamed for fp16 rounding at K = 4096
    make16 = lambda n: tuple(x.half() for x in make(n))  # noqa: E731
    verdict = assert_matches_reference(lambda a, b: (a.float() @ b.float()).half(), torch.matmul,
                                       inputs_at=[4096], make_inputs=make16, name="fp16 gemm")
    assert verdict.passed and verdict.checks[4096].rel_l2 > 1e-4


def test_helper_refuses_a_kernel_without_reference_or_inputs():
    with pytest.raises(TypeError, match="give its reference"):
        assert_matches_reference(lambda a: a, inputs_at=[4])
    with pytest.raises(TypeError, match="make_inputs"):
        assert_matches_reference(lambda a: a, lambda a: a, inputs_at=[4])


def test_pytest_plugin_fixture_and_sizes_option(pytester):
    pytester.makepyfile(test_kernel="""
        from tensordiff.backends.flash_attn import flash_attention

        def capped(q, k, v, causal, scale):
            return flash_attention(q, k, v, None, scale, "seq-cap-256")

        def test_capped(tensordiff_check):
            tensordiff_check(capped, inputs_at=[4, 512], in_model=None)
    """)
    failed = pytester.runpytest_subprocess("-q")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*capped diverges from its reference*", "*fails from 257 on*",
                                 "*indices >= 256 of 512*"])
    # the unit test's size: the same test passes, which is the story's trap
    small = pytester.runpytest_subprocess("-q", "--tensordiff-sizes", "4,16")
    small.assert_outcomes(passed=1)
    bad = pytester.runpytest_subprocess("-q", "--tensordiff-sizes", "four")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*--tensordiff-sizes 'four': give sizes like*"])
