import pytest
import torch

from tensordiff.backends import registry
from tensordiff.errors import TensordiffError
from tensordiff.models import load_model


def test_local_checkpoint_directory_loads_same_weights(tmp_path, qwen):
    qwen.model.save_pretrained(tmp_path / "ckpt")
    bundle = load_model(str(tmp_path / "ckpt"), seq_len=16)
    assert bundle.inputs.kwargs["input_ids"].shape == (1, 16)
    for (name, p), (_, q) in zip(bundle.model.named_parameters(), qwen.model.named_parameters()):
        assert torch.equal(p, q), name


def test_missing_local_model_is_a_clear_error():
    with pytest.raises(TensordiffError, match="no downloads"):
        load_model("nobody/no-such-model-here", seq_len=8)


def test_moe_model_has_64_experts_top6():
    bundle = load_model("qwen-moe", seq_len=8)
    cfg = bundle.model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (64, 6) and cfg.num_hidden_layers >= 2
    experts = bundle.model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == 64  # fused 3-D expert weights [E, 2I, H]


def test_entry_point_backend(monkeypatch):
    class EP:
        name, value = "halfprec", "pkg.mod:halve"

        def load(self):
            return lambda model: model.half().float()

    monkeypatch.setattr(registry, "_entry_points", lambda: {"halfprec": EP()})
    backend = registry.get_backend("halfprec")
    model = backend(torch.nn.Linear(4, 4))
    assert isinstance(model, torch.nn.Linear) and backend.info["entry_point"] == "pkg.mod:halve"
    assert "halfprec" in registry.list_backends()
