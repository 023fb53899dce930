"""A small inference engine for Qwen3-MoE written in NumPy: no torch anywhere in its forward. It loads
a safetensors checkpoint (experts fused, [E, 2I, H] gate_up_proj and [E, H, I] down_proj, or one
tensor per expert), runs a forward pass and dumps its tensors under its own names, llama.cpp style
(``blk.N.attn_norm``, ``blk.N.ffn_moe_out`` ...), as .npy files. It plays the engine outside PyTorch
that tensordiff imports.

Planted bugs, as real engines had them:
    swap_gate_up_layers   layers whose fused gate_up_proj is read up-first (the split-vs-fused mix-up)
    dims                  hard-coded dimensions overriding config.json (the engine's own idea of the model)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _rms(x, w, eps):
    x = x.astype(np.float32)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


class NumpyQwen3Moe:
    def __init__(self, checkpoint, swap_gate_up_layers=(), dims: dict | None = None, expert_layout: str = "auto"):
        from safetensors.numpy import load_file

        checkpoint = Path(checkpoint)
        self.config = json.loads((checkpoint / "config.json").read_text())
        self.config.setdefault("num_experts", self.config.get("num_local_experts"))  # transformers 5 saves this name
        self.config.update(dims or {})
        self.w = {}
        for f in sorted(checkpoint.glob("*.safetensors")):
            self.w.update(load_file(str(f)))
        self.swap = set(swap_gate_up_layers)
        self.expert_layout = expert_layout  # "per-expert": look for experts.N.* whatever the checkpoint holds
        c = self.config
        self.layers = c["num_hidden_layers"]
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        rope = c.get("rope_parameters") or {}
        self.theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        self.looked_for: dict[str, dict] = {}  # what the loader asked for: the engine's manifest
        self.missing: list[str] = []

    def _get(self, name, shape=None):
        """A weight; a missing one is warned about and zero-filled, as C++ engines do."""
        if name not in self.w:
            self.missing.append(name)  # "Missing expert weights"
            if shape is None:
                raise KeyError(name)
            self.looked_for[name] = {"shape": list(shape), "dtype": "float32"}
            return np.zeros(shape, dtype=np.float32)
        self.looked_for[name] = {"shape": list(self.w[name].shape), "dtype": "float32"}
        return self.w[name].astype(np.float32)

    def _experts(self, i):
        """(gate_up [E, 2I, H], down [E, H, I]) from either layout."""
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.gate_up_proj" in self.w and self.expert_layout != "per-expert":
            gate_up, down = self._get(f"{p}.gate_up_proj"), self._get(f"{p}.down_proj")
        else:
            n, hid, inter = (self.config[k] for k in ("num_experts", "hidden_size", "moe_intermediate_size"))
            gate_up = np.stack([np.concatenate([self._get(f"{p}.{e}.gate_proj.weight", (inter, hid)),
                                                self._get(f"{p}.{e}.up_proj.weight", (inter, hid))]) for e in range(n)])
            down = np.stack([self._get(f"{p}.{e}.down_proj.weight", (hid, inter)) for e in range(n)])
        if i in self.swap:  # reads the fused tensor as [up; gate]
            inter = gate_up.shape[1] // 2
            gate_up = np.concatenate([gate_up[:, inter:], gate_up[:, :inter]], axis=1)
        return gate_up, down

    def _rope(self, x, positions):
        d = self.head_dim
        inv = 1.0 / (self.theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
        freqs = positions[:, None].astype(np.float32) * inv[None]
        emb = np.concatenate([freqs, freqs], -1)
        cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]
        rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos + rot * sin

    def forward(self, ids: np.ndarray, dump: dict | None = None) -> np.ndarray:
        """Logits [S, vocab] for one sequence of token ids; the named intermediates go into ``dump``."""
        dump = {} if dump is None else dump
        s, hd = len(ids), self.head_dim
        x = self._get("model.embed_tokens.weight")[ids]
        dump["tok_embd"] = x
        pos = np.arange(s)
        k_top = self.config["num_experts_per_tok"]
        for i in range(self.layers):
            p = f"model.layers.{i}"
            h = _rms(x, self._get(f"{p}.input_layernorm.weight"), self.eps)
            dump[f"blk.{i}.attn_norm"] = h
            q = (h @ self._get(f"{p}.self_attn.q_proj.weight").T).reshape(s, self.heads, hd)
            k = (h @ self._get(f"{p}.self_attn.k_proj.weight").T).reshape(s, self.kv_heads, hd)
            v = (h @ self._get(f"{p}.self_attn.v_proj.weight").T).reshape(s, self.kv_heads, hd)
            q = self._rope(_rms(q, self._get(f"{p}.self_attn.q_norm.weight"), self.eps), pos)
            k = self._rope(_rms(k, self._get(f"{p}.self_attn.k_norm.weight"), self.eps), pos)
            rep = self.heads // self.kv_heads
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) * hd ** -0.5
            scores = np.where(np.tril(np.ones((s, s), dtype=bool))[None], scores, -np.inf)
            attn = np.einsum("hqk,khd->qhd", _softmax(scores), v).reshape(s, self.heads * hd)
            attn = attn @ self._get(f"{p}.self_attn.o_proj.weight").T
            dump[f"blk.{i}.attn_out"] = attn
            x = x + attn
            h = _rms(x, self._get(f"{p}.post_attention_layernorm.weight"), self.eps)
            dump[f"blk.{i}.ffn_norm"] = h
            probs = _softmax(h @ self._get(f"{p}.mlp.gate.weight").T)
            top = np.argsort(-probs, axis=-1, kind="stable")[:, :k_top]
            weights = np.take_along_axis(probs, top, -1)
            if self.config.get("norm_topk_prob", True):
                weights = weights / weights.sum(-1, keepdims=True)
            dump[f"blk.{i}.ffn_moe_in"] = h
            dump[f"blk.{i}.ffn_moe_topk"] = top.astype(np.int64)
            dump[f"blk.{i}.ffn_moe_weights"] = weights.astype(np.float32)
            gate_up, down = self._experts(i)
            inter = gate_up.shape[1] // 2
            out = np.zeros_like(h)
            for t in range(s):
                for j in range(k_top):
                    e = top[t, j]
                    gu = gate_up[e] @ h[t]
                    out[t] += weights[t, j] * (down[e] @ (_silu(gu[:inter]) * gu[inter:]))
            dump[f"blk.{i}.ffn_moe_out"] = out
            x = x + out
            dump[f"blk.{i}.l_out"] = x
        x = _rms(x, self._get("model.norm.weight"), self.eps)
        dump["result_norm"] = x
        head = "lm_head.weight" if "lm_head.weight" in self.w else "model.embed_tokens.weight"
        logits = x @ self._get(head).T
        dump["result_output"] = logits
        return logits

    def write_dump(self, ids, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dump = {}
        self.forward(np.asarray(ids), dump)
        for name, arr in dump.items():
            np.save(folder / f"{name}.npy", np.ascontiguousarray(arr))
        return folder

    def manifest(self, arena_bytes: int) -> dict:
        """What the engine says: the tensors it looked for, its dimensions, its arena."""
        keys = ("hidden_size", "num_hidden_layers", "moe_intermediate_size", "num_experts", "num_attention_heads")
        return {"tensors": self.looked_for, "config": {k: self.config[k] for k in keys if k in self.config},
                "arena_bytes": arena_bytes}


MAP = r"""
# the NumPy engine's names -> the transformers Qwen3-MoE's module records
[[rule]]
name = 'tok_embd'
record = 'model.embed_tokens'
transform = ["unsqueeze(0)"]

[[rule]]
name = 'blk\.(\d+)\.attn_norm'
record = 'model.layers.\1.input_layernorm'
transform = ["unsqueeze(0)"]

[[rule]]
name = 'blk\.(\d+)\.attn_out'
record = 'model.layers.\1.self_attn'
transform = ["unsqueeze(0)"]

[[rule]]
name = 'blk\.(\d+)\.ffn_norm'
record = 'model.layers.\1.post_attention_layernorm'
transform = ["unsqueeze(0)"]

[[rule]]
name = 'blk\.(\d+)\.ffn_moe_in'
record = 'model.layers.\1.mlp.experts/forward#0/input.0'

[[rule]]
name = 'blk\.(\d+)\.ffn_moe_topk'
record = 'model.layers.\1.mlp.experts/forward#0/input.1'

[[rule]]
name = 'blk\.(\d+)\.ffn_moe_weights'
record = 'model.layers.\1.mlp.experts/forward#0/input.2'

[[rule]]
name = 'blk\.(\d+)\.ffn_moe_out'
record = 'model.layers.\1.mlp.experts'

[[rule]]
name = 'blk\.(\d+)\.l_out'
record = 'model.layers.\1'
transform = ["unsqueeze(0)"]

[[rule]]
name = 'result_norm'
record = 'model.norm'
transform = ["unsqueeze(0)"]

[[rule]]
name = 'result_output'
record = 'lm_head'
transform = ["unsqueeze(0)"]
"""
