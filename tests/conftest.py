import pytest

from tensordiff.models import load_model


@pytest.fixture(scope="session")
def qwen():
    return load_model("qwen", size="tiny", seq_len=64, seed=0)


def make_job(tmp_path, **kw):
    from tensordiff.run import TraceJob

    kw.setdefault("seq_len", 64)
    kw.setdefault("time_plain", False)
    return TraceJob(out=str(tmp_path / kw.pop("name", "run")), **kw)
