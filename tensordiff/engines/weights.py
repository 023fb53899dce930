"""``tensordiff weights CHECKPOINT --model CONFIG``: does a checkpoint hold what the model (or an
engine) expects? An engine's first bugs are in loading: it looks for 128 separate experts where the
checkpoint stores them fused, or its hard-coded dimensions contradict config.json.

    report = check_weights("ckpt/", "ckpt/config.json", batch=1, seq_len=4096)
    report.findings   # [{"kind": "config", "text": "hidden_size: config says 2048, the weights say 1024 ..."}]
    report.lines()    # the console's table

Checks: missing, unexpected, shape- and dtype-mismatched tensors (grouped over layers and experts);
expert layouts, fused ([E, 2I, H] gate_up_proj, [E, H, I] down_proj) against one tensor per expert,
recognised and the conversion named; config fields the weights contradict (hidden size, layers,
intermediate sizes, experts, heads, vocabulary) with the tensor that says so; a memory plan (weights
per dtype, KV cache and activations for a batch and sequence length) against an engine's arena.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tensordiff.analysis.cost import human_bytes as _gb
from tensordiff.engines.tensor_files import TensorInfo, checkpoint_tensors
from tensordiff.errors import TensordiffError

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(?P<block>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<block>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


@dataclass
class WeightsReport:
    checkpoint: str
    config: dict
    counts: dict
    findings: list = field(default_factory=list)   # {"kind", "text", ...}
    layouts: list = field(default_factory=list)    # recognised expert layout conversions
    plan: dict = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"schema": "tensordiff-weights/1", "checkpoint": self.checkpoint, "consistent": self.consistent,
                "counts": self.counts, "findings": self.findings, "layouts": self.layouts, "plan": self.plan}

    def lines(self) -> list[str]:
        c = self.counts
        out = [f"checkpoint {self.checkpoint}: {c['checkpoint']} tensors; expected {c['expected']} "
               f"({self.config.get('source')})"]
        out.append("CONSISTENT: every expected tensor is there with its shape and dtype, and the config agrees "
                   "with the weights" if self.consistent else f"INCONSISTENT: {len(self.findings)} finding(s)")
        for f in self.findings:
            out.append(f"  {f['kind']:<10} {f['text']}")
        for layout in self.layouts:
            out.append(f"  {'skipped' if layout.get('ignored') else 'layout':<10} {layout['text']}")
        p = self.plan
        if p:
            weights = ", ".join(f"{_gb(b)} {d}" for d, b in p["weights_by_dtype"].items())
            out.append(f"memory plan: weights {_gb(p['weights_bytes'])} ({weights}); at batch {p['batch']} x "
                       f"{p['seq_len']} tokens: KV cache {_gb(p['kv_cache_bytes'])} "
                       f"({_gb(p['kv_bytes_per_token'])} per token), activations ~{_gb(p['activation_bytes'])} "
                       f"(largest: {p['largest_activation']}); total ~{_gb(p['total_bytes'])}")
            if "arena_bytes" in p:
                out.append(f"  engine arena {_gb(p['arena_bytes'])}: "
                           + ("enough" if p["arena_bytes"] >= p["total_bytes"] else
                              f"SHORT by {_gb(p['total_bytes'] - p['arena_bytes'])}"))
        return out


def load_config(spec: str, size: str = "tiny"):
    """A transformers config from config.json, a folder holding one, or a built-in --model name."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # its deprecation chatter is not the user's finding

    if spec in ("qwen", "qwen-moe"):
        from tensordiff.models import qwen_config

        config, _ = qwen_config(spec == "qwen-moe", size)
        return config, f"built-in {spec} --size {size}"
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise TensordiffError(f"--model {spec}: no config.json there (give config.json, its folder, qwen or qwen-moe)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TensordiffError(f"{path}: not JSON ({exc})") from None
    if "model_type" not in data:
        raise TensordiffError(f"{path}: no model_type: not a transformers config")
    try:
        config = transformers.AutoConfig.for_model(**data)
    except (ValueError, KeyError) as exc:
        raise TensordiffError(f"{path}: {str(exc).splitlines()[0]}") from None
    return config, str(path)


def expected_tensors(config) -> dict[str, TensorInfo]:
    """What the model built from ``config`` holds (built on the meta device: no memory, no init)."""
    return _expected(config)[0]


def _expected(config) -> tuple[dict[str, TensorInfo], list]:
    """(expected tensors, what a checkpoint may hold beyond them: the model's non-persistent buffers
    (older saves hold BERT's position_ids) and the class's own ignore patterns)."""
    from tensordiff.models import _model_class

    cls = _model_class(config, None)
    with torch.device("meta"):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    persistent = set(model.state_dict())
    ignorable = [re.escape(n) + "$" for n, _ in model.named_buffers() if n not in persistent]
    ignorable += list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = str(dtype).replace("torch.", "") if dtype is not None else None
    out = {}
    for name, t in model.state_dict().items():
        out[name] = TensorInfo(tuple(t.shape), dtype if (dtype and t.is_floating_point()) else
                               str(t.dtype).replace("torch.", ""), "model")
    if getattr(config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # the embedding is the head
    return out, ignorable


def _group(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _grouped(names: list[str], infos: dict) -> list[str]:
    """'model.layers.*.mlp.experts.*.gate_proj.weight (x 192), e.g. (64, 128)'."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", n), []).append(n)
    return [f"{g} (x {len(ns)}, e.g. {tuple(infos[ns[0]].shape)} {infos[ns[0]].dtype})" if len(ns) > 1 else
            f"{ns[0]} {tuple(infos[ns[0]].shape)} {infos[ns[0]].dtype}" for g, ns in groups.items()]


def match_expert_layouts(expected: dict, found: dict) -> tuple[list[dict], set, set, list[dict]]:
    """Expert tensors one side holds fused and the other per expert: (layouts recognised, expected
    names they explain, found names they explain, shape findings inside them)."""
    layouts, used_exp, used_found, problems = [], set(), set(), []
    per_found, per_exp = _per_expert(found), _per_expert(expected)
    fused_found = {m["block"]: m for m in (_FUSED.match(n) for n in found) if m}
    for name in [n for n in expected if n not in found]:
        m = _FUSED.match(name)
        if m and m["block"] in per_found:  # model fused, checkpoint per expert (transformers' own Qwen3-MoE)
            block, experts = m["block"], per_found[m["block"]]
            shape = expected[name].shape
            if m["proj"] == "gate_up_proj":
                parts = [(e, p) for e in experts for p in ("gate_proj", "up_proj")]
                per = [found[f"{block}.{e}.{p}.weight"].shape for e, p in parts if f"{block}.{e}.{p}.weight" in found]
                want = (shape[1] // 2, shape[2])
            else:
                parts = [(e, "down_proj") for e in experts]
                per = [found[f"{block}.{e}.down_proj.weight"].shape for e, _ in parts
                       if f"{block}.{e}.down_proj.weight" in found]
                want = (shape[1], shape[2])
            names = {f"{block}.{e}.{p}.weight" for e, p in parts}
            used_exp.add(name)
            used_found |= names & set(found)
            n_experts = len(experts)
            if n_experts != shape[0] or any(tuple(s) != want for s in per):
                bad = sorted({tuple(s) for s in per if tuple(s) != want})
                problems.append({"kind": "shape", "text": f"{name} expected {tuple(shape)} (fused); the checkpoint "
                                 f"has {n_experts} experts of {m['proj'].replace('_proj', '')} "
                                 f"{bad[0] if bad else want} one by one (needs {shape[0]} of {want})",
                                 "tensor": name})
            layouts.append({"block": block, "tensor": m["proj"], "from": "per-expert", "to": "fused",
                            "experts": n_experts})
    for name in [n for n in expected if n not in found]:
        m = _EXPERT.match(name)
        if m and m["block"] in fused_found:  # engine / model per expert, checkpoint fused (the story)
            block = m["block"]
            fused = f"{block}.gate_up_proj" if m["proj"] in ("gate_proj", "up_proj") else f"{block}.down_proj"
            if fused not in found:
                continue
            used_exp.add(name)
            used_found.add(fused)
            if not any(l["block"] == block and l["tensor"] == fused.rsplit(".", 1)[1] for l in layouts):
                layouts.append({"block": block, "tensor": fused.rsplit(".", 1)[1], "from": "fused",
                                "to": "per-expert", "experts": len(per_exp.get(block, []))})
            shape, fshape = expected[name].shape, found[fused].shape
            rows = shape[0] * (2 if m["proj"] != "down_proj" else 1)
            if len(fshape) != 3 or (fshape[1], fshape[2]) not in ((rows, shape[1]), (shape[1], rows)):
                problems.append({"kind": "shape", "text": f"{name} expected {tuple(shape)}; the checkpoint's fused "
                                 f"{fused} {tuple(fshape)} does not slice into it", "tensor": name})
            elif int(m["e"]) >= fshape[0]:
                problems.append({"kind": "missing", "text": f"{name}: the checkpoint's fused {fused} holds "
                                 f"{fshape[0]} experts, expert {m['e']} is beyond", "tensor": name})
    return layouts, used_exp, used_found, problems


def _per_expert(infos: dict) -> dict[str, list[int]]:
    out: dict[str, set] = {}
    for n in infos:
        m = _EXPERT.match(n)
        if m:
            out.setdefault(m["block"], set()).add(int(m["e"]))
    return {k: sorted(v) for k, v in out.items()}


def _layout_text(layout: dict, found: dict) -> str:
    if layout.get("ignored"):
        names = layout["ignored"]
        return (f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}: in the checkpoint, not a parameter of "
                "the model (a non-persistent buffer it computes itself, or a key its class ignores): skipped on "
                "load, as transformers does")
    block = _group(layout["block"] + ".")[:-1]
    if layout["from"] == "per-expert":
        how = ("stack per expert, gate_proj rows then up_proj rows: gate_up_proj[e] = cat(gate_proj, up_proj)"
               if layout["tensor"] == "gate_up_proj" else "stack per expert: down_proj[e] = experts.e.down_proj")
        return (f"{block}.{layout['tensor']}: the checkpoint stores {layout['experts']} experts one by one, the "
                f"model holds them fused; conversion: {how}")
    how = ("gate = gate_up_proj[e, :I], up = gate_up_proj[e, I:] (transformers' order: gate first)"
           if layout["tensor"] == "gate_up_proj" else "down_proj[e]")
    return (f"{block}.{layout['tensor']}: the checkpoint stores the experts fused, the expectation is one "
            f"tensor per expert (an engine that looks for experts.N.* finds nothing: 'missing expert "
            f"weights'); conversion: {how}")


def _dims_from_weights(found: dict) -> dict[str, tuple[int, str]]:
    """config field -> (value, evidence) read off the tensors' shapes."""
    dims: dict[str, tuple[int, str]] = {}

    def ev(name):
        return f"{name} {tuple(found[name].shape)}"

    for n, info in found.items():
        s = info.shape
        if n.endswith("embed_tokens.weight") and len(s) == 2:
            dims.setdefault("vocab_size", (s[0], ev(n)))
            dims.setdefault("hidden_size", (s[1], ev(n)))
    layers = {int(m.group(1)) for m in (_LAYER.search(n) for n in found) if m}
    if layers:
        top = max(layers)
        name = next(n for n in found if f".layers.{top}." in n)
        dims["num_hidden_layers"] = (top + 1, f"layer indices 0..{top} ({name})")
    q = next((n for n in found if n.endswith("self_attn.q_norm.weight")), None)
    head_dim = found[q].shape[0] if q else None
    if q:
        dims["head_dim"] = (head_dim, ev(q))
    for n, info in found.items():
        s = info.shape
        if n.endswith("self_attn.q_proj.weight") and head_dim and len(s) == 2:
            dims.setdefault("num_attention_heads", (s[0] // head_dim, f"{ev(n)} / head_dim {head_dim}"))
        elif n.endswith("self_attn.k_proj.weight") and head_dim and len(s) == 2:
            dims.setdefault("num_key_value_heads", (s[0] // head_dim, f"{ev(n)} / head_dim {head_dim}"))
        elif n.endswith("mlp.gate_proj.weight") and ".experts." not in n and len(s) == 2:
            dims.setdefault("intermediate_size", (s[0], ev(n)))
        elif _EXPERT.match(n) and n.endswith("gate_proj.weight") and len(s) == 2:
            dims.setdefault("moe_intermediate_size", (s[0], ev(n)))
        elif n.endswith("experts.gate_up_proj") and len(s) == 3:
            dims.setdefault("num_experts", (s[0], ev(n)))
            hidden = dims.get("hidden_size", (None,))[0]
            inter = s[1] // 2 if s[2] == hidden else s[2] // 2
            dims.setdefault("moe_intermediate_size", (inter, ev(n)))
        elif n.endswith("mlp.gate.weight") and len(s) == 2:
            dims.setdefault("num_experts", (s[0], ev(n)))
    per = _per_expert(found)
    if per and "num_experts" not in dims:
        block, experts = next(iter(per.items()))
        dims["num_experts"] = (len(experts), f"{len(experts)} experts under {block}")
    return dims


def config_findings(config_dims: dict, weight_dims: dict, who: str) -> list[dict]:
    out = []
    for key, (value, evidence) in weight_dims.items():
        claimed = config_dims.get(key)
        if isinstance(claimed, int) and claimed != value:
            out.append({"kind": "config", "field": key, "claimed": claimed, "weights": value,
                        "text": f"{key}: {who} says {claimed}, the weights say {value} ({evidence})"})
    return out


def memory_plan(config, found: dict, batch: int, seq_len: int, kv_dtype_bytes: int = 2) -> dict:
    """Bytes the model needs: weights as stored, a KV cache of ``seq_len`` positions, and the largest
    activations of one forward over ``batch`` x ``seq_len`` tokens (computed, not measured: what an
    arena must hold)."""
    by_dtype: dict[str, int] = {}
    for info in found.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    g = lambda k, d=0: getattr(config, k, None) or d  # noqa: E731
    hidden, layers, vocab = g("hidden_size"), g("num_hidden_layers"), g("vocab_size")
    heads = g("num_attention_heads", 1)
    head_dim = g("head_dim") or hidden // heads
    kv_heads = g("num_key_value_heads", heads)
    inter = max(g("intermediate_size"), g("moe_intermediate_size") * g("num_experts_per_tok", 1))
    tokens = batch * seq_len
    kv_per_token = 2 * layers * kv_heads * head_dim * kv_dtype_bytes
    act_bytes = 4  # float32 activations, the conservative case
    candidates = {
        "attention scores (one layer, all heads, no flash)": batch * heads * seq_len * seq_len * act_bytes,
        "logits": tokens * vocab * act_bytes,
        "MLP intermediate (one layer, gate and up)": 2 * tokens * inter * act_bytes,
        "hidden states (residual + normed, one layer)": 2 * tokens * hidden * act_bytes,
    }
    largest = max(candidates, key=candidates.get)
    activations = sum(candidates.values())
    weights = sum(by_dtype.values())
    return {"batch": batch, "seq_len": seq_len, "weights_bytes": weights, "weights_by_dtype": by_dtype,
            "kv_cache_bytes": kv_per_token * tokens, "kv_bytes_per_token": kv_per_token,
            "activation_bytes": activations, "activations": candidates, "largest_activation": largest,
            "total_bytes": weights + kv_per_token * tokens + activations}


def _compare(expected: dict, found: dict, ignorable=()) -> tuple[list[dict], list[dict]]:
    layouts, used_exp, used_found, findings = match_expert_layouts(expected, found)
    missing = [n for n in expected if n not in found and n not in used_exp]
    unexpected = [n for n in found if n not in expected and n not in used_found]
    ignored = [n for n in unexpected if any(re.search(p, n) for p in ignorable)]
    if ignored:  # e.g. a buffer the model computes itself, saved by an older version: loaders skip it
        unexpected = [n for n in unexpected if n not in ignored]
        layouts.append({"block": "", "tensor": "", "from": "", "to": "", "experts": 0, "ignored": ignored})
    if missing:
        findings += [{"kind": "missing", "text": t} for t in _grouped(missing, expected)]
    if unexpected:
        findings += [{"kind": "unexpected", "text": t} for t in _grouped(unexpected, found)]
    shapes: dict[tuple, list[str]] = {}  # grouped over layers: one line per (tensor kind, expected, actual)
    for n in expected:
        if n in found and tuple(found[n].shape) != tuple(expected[n].shape):
            key = (re.sub(r"\.\d+(?=\.|$)", ".*", n), tuple(expected[n].shape), tuple(found[n].shape))
            shapes.setdefault(key, []).append(n)
    for (group, want, got), names in shapes.items():
        t = " (transposed)" if got == tuple(reversed(want)) else ""
        where = f"{group} (x {len(names)})" if len(names) > 1 else names[0]
        findings.append({"kind": "shape", "tensor": names[0], "count": len(names),
                         "text": f"{where} expected {want}, actual {got}{t}"})
    dtype_bad = [n for n in expected if n in found and expected[n].dtype != found[n].dtype
                 and expected[n].file == "engine"]
    findings += [{"kind": "dtype", "tensor": n, "text": f"{n} expected {expected[n].dtype}, actual {found[n].dtype}"}
                 for n in dtype_bad]
    return findings, layouts


def check_weights(checkpoint, model: str, size: str = "tiny", batch: int = 1, seq_len: int = 4096,
                  engine_manifest=None) -> WeightsReport:
    found = checkpoint_tensors(checkpoint)
    config, source = load_config(model, size)
    expected, ignorable = _expected(config)
    findings, layouts = _compare(expected, found, ignorable)
    findings += _dtype_findings(config, found)
    weight_dims = _dims_from_weights(found)
    config_dims = {k: getattr(config, k, None) for k in weight_dims}
    findings = config_findings(config_dims, weight_dims, "the config") + findings  # the cause first
    plan = memory_plan(config, found, batch, seq_len)
    report_layouts = _dedupe([{**l, "text": _layout_text(l, found)} for l in layouts])
    if engine_manifest is not None:
        eng = _engine(engine_manifest)
        if eng.get("tensors"):
            e_findings, e_layouts = _compare(eng["tensors"], found)
            ignored = [f for f in e_findings if f["kind"] == "unexpected"]
            findings += [{**f, "kind": f"engine {f['kind']}"} for f in e_findings if f["kind"] != "unexpected"]
            if ignored:  # a manifest may list only what one loader looks for: one line, not one per group
                findings.append({"kind": "engine ignores", "text": f"{len(ignored)} kinds of checkpoint tensors the "
                                 "engine does not look for: " + "; ".join(f["text"] for f in ignored[:4])
                                 + ("; ..." if len(ignored) > 4 else "")})
            e_layouts = _dedupe([{**l, "text": "engine: " + _layout_text(l, found)} for l in e_layouts])
            # the engine looks for a layout the checkpoint does not have: it must convert, or it finds nothing
            findings += [{"kind": "engine layout", "text": l["text"][len("engine: "):]} for l in e_layouts]
        if eng.get("config"):
            findings += [{**f, "kind": "engine config"}
                         for f in config_findings(eng["config"], weight_dims, "the engine")]
        if eng.get("arena_bytes") is not None:
            plan["arena_bytes"] = int(eng["arena_bytes"])
            if plan["arena_bytes"] < plan["total_bytes"]:
                findings.append({"kind": "memory", "text": f"the engine's arena ({_gb(plan['arena_bytes'])}) is "
                                 f"smaller than the plan ({_gb(plan['total_bytes'])} at batch {batch} x {seq_len})"})
    counts = {"checkpoint": len(found), "expected": len(expected)}
    return WeightsReport(str(checkpoint), {"source": source}, counts, findings, report_layouts, plan)


def _dtype_findings(config, found: dict) -> list[dict]:
    """The config's dtype against what most floating tensors are stored in (a few tensors kept in float32
    beside bf16 weights are normal; an engine that trusts config.json reads the bytes wrong otherwise)."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if declared is None:
        return []
    declared = str(declared).replace("torch.", "")
    floats = {n: i for n, i in found.items() if i.dtype.startswith(("float", "bfloat"))}
    other = [n for n, i in floats.items() if i.dtype != declared]
    if not floats or len(other) * 2 <= len(floats):
        return []
    stored = sorted({floats[n].dtype for n in other})
    return [{"kind": "dtype", "text": f"the config says {declared}, {len(other)} of {len(floats)} floating tensors are "
             f"stored as {', '.join(stored)} (e.g. {other[0]})"}]


def _dedupe(layouts: list[dict]) -> list[dict]:
    """One entry per layout over all layers (its text names the group), with the blocks it covers."""
    out: dict[str, dict] = {}
    for l in layouts:
        entry = out.setdefault(l["text"], {**l, "blocks": []})
        entry["blocks"].append(l["block"])
    for entry in out.values():
        if len(entry["blocks"]) > 1:
            entry["text"] += f" ({len(entry['blocks'])} layers)"
    return list(out.values())


def _engine(path) -> dict:
    """An engine's manifest: {"tensors": {name: {"shape", "dtype"}}, "config": {field: value},
    "arena_bytes": N}: what it says it looked for, its hard-coded dimensions, what it allocated."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TensordiffError(f"--engine-manifest {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise TensordiffError(f"--engine-manifest {path}: not JSON ({exc})") from None
    tensors = {}
    for name, entry in (data.get("tensors") or {}).items():
        try:
            tensors[name] = TensorInfo(tuple(int(d) for d in entry["shape"]), str(entry.get("dtype", "")), "engine")
        except (KeyError, TypeError, ValueError):
            raise TensordiffError(f"--engine-manifest {path}: tensor {name!r}: needs an integer shape") from None
    return {"tensors": tensors, "config": data.get("config") or {}, "arena_bytes": data.get("arena_bytes")}
