"""``--model`` names -> an nn.Module plus the exact inputs to run it on.

    qwen, qwen-moe         randomly initialised Qwen3 / Qwen3-MoE from a config, fixed seed
    ./local/dir, org/name  a checkpoint on disk or in the local HF cache (local files only)
    path/to/file.py:NAME   a user function returning an nn.Module, or (module, inputs)

    bundle = load_model("qwen", size="tiny", batch=1, seq_len=128, seed=0)
    bundle.model, bundle.inputs.kwargs["input_ids"].shape
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tensordiff.errors import TensordiffError

# Shapes per --size. "0.5b" is Qwen3-0.6B's shape (hidden 1024, 28 layers, GQA 16/8, head_dim 128).
QWEN_SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "0.5b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
}
QWEN_MOE_SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "0.5b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384,
                 num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    # kernel-sized experts (hidden 1024, 64 experts, top-6) in two layers: what an MoE kernel is judged
    # at, small enough for the test suite
    "wide": dict(vocab_size=2048, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=128),
}
SIZES = tuple(QWEN_SIZES)


@dataclass
class Inputs:
    """Positional and keyword arguments of one forward call."""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def clone(self) -> "Inputs":
        return Inputs(*copy.deepcopy((self.args, self.kwargs)))

    def describe(self) -> dict:
        from tensordiff.tensors import flatten_tensors

        return {slot: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                for slot, t in flatten_tensors((self.args, self.kwargs), "inputs")}


@dataclass
class ModelBundle:
    model: torch.nn.Module
    inputs: Inputs
    name: str
    info: dict = field(default_factory=dict)


def _token_inputs(vocab: int, batch: int, seq_len: int, seed: int, attention_mask: bool) -> Inputs:
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    kwargs = {"input_ids": ids}
    if attention_mask:
        # Left padding on all but the first row (and 1/8 of row 0 when batch is 1) so the mask matters.
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        pad = max(1, seq_len // 8)
        for row in range(batch):
            mask[row, : pad * (1 + row % 2)] = 0
        kwargs["attention_mask"] = mask
    return Inputs((), kwargs)


def qwen_config(moe: bool, size: str):
    """(config, model class) of the built-in Qwen3 / Qwen3-MoE at ``size``."""
    import transformers

    table = QWEN_MOE_SIZES if moe else QWEN_SIZES
    if size not in table:
        raise TensordiffError(f"unknown --size {size!r}; choose one of {', '.join(table)}")
    dims = dict(table[size], max_position_embeddings=4096, tie_word_embeddings=False)
    if moe:
        dims.update(num_experts=64, num_experts_per_tok=6, norm_topk_prob=True, decoder_sparse_step=1)
        return transformers.Qwen3MoeConfig(**dims), transformers.Qwen3MoeForCausalLM
    return transformers.Qwen3Config(**dims), transformers.Qwen3ForCausalLM


def _qwen(moe: bool, size: str, seed: int, attn: str, empty: bool = False, device: str = "cpu") -> torch.nn.Module:
    """A random Qwen3 / Qwen3-MoE, initialised on ``device`` (the same seed gives other numbers on a
    GPU than on the host; every side of a run copies this one model). ``empty``: allocated but not
    initialised (its state is about to be loaded, as in an isolated target's child): a 0.6B model's
    random init costs ~17 s of CPU."""
    config, cls = qwen_config(moe, size)
    config._attn_implementation = attn
    config.use_cache = False  # a KV cache would be mutated again by every replay of an attention call
    torch.manual_seed(seed)
    if empty:
        with torch.device("meta"):
            model = cls(config)
        return model.to_empty(device="cpu").eval()
    with _without_default_init(), torch.device(device):
        return cls(config).eval()


@contextlib.contextmanager
def _without_default_init():
    """Skip torch's default Linear / Embedding init while a transformers model is built: its post_init
    draws every weight again (normal, initializer_range), and the discarded kaiming draws were 8 of
    the 16 s a 0.6B model took to build."""
    saved = {cls: cls.reset_parameters for cls in (torch.nn.Linear, torch.nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


_LOADED_FILES: dict = {}


def _from_file(spec: str):
    """The function NAME of path/to/file.py:NAME (each file is imported once per process)."""
    path_s, _, fn_name = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise TensordiffError(f"model file not found: {path}")
    module = _LOADED_FILES.get(path.resolve())
    if module is None:
        module = _import_file(path)
        _LOADED_FILES[path.resolve()] = module
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise TensordiffError(f"{path} has no function {fn_name!r}")
    return fn


def _import_file(path: Path):
    mod_spec = importlib.util.spec_from_file_location(f"tensordiff_user_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        raise TensordiffError(f"cannot import {path}: {type(exc).__name__}: {exc}") from None
    return module


def _user_model(spec: str, seed: int) -> ModelBundle:
    fn = _from_file(spec)
    torch.manual_seed(seed)
    try:
        result = fn()
    except Exception as exc:
        raise TensordiffError(f"{spec}: the model function raised {type(exc).__name__}: {exc}") from None
    model, inputs = (result if isinstance(result, tuple) and len(result) == 2 else (result, None))
    if not isinstance(model, torch.nn.Module):
        raise TensordiffError(f"{spec} returned {type(model).__name__}, expected an nn.Module "
                              "(or a (module, inputs) pair)")
    if inputs is None:
        raise TensordiffError(f"{spec} returned no inputs: return (module, inputs) for a custom model")
    if isinstance(inputs, torch.Tensor):
        inputs = Inputs((inputs,), {})
    elif isinstance(inputs, dict):
        inputs = Inputs((), inputs)
    elif isinstance(inputs, (tuple, list)):
        inputs = Inputs(tuple(inputs), {})
    return ModelBundle(model.eval(), inputs, spec)


def _model_class(config, model_class: str | None):
    """The class the checkpoint declares (``config.architectures``), or ``--model-class``. A checkpoint
    of a bare encoder (``BertModel``) must not be loaded through AutoModelForCausalLM: that builds an
    LM head the checkpoint does not have and initialises it at random."""
    import transformers

    if model_class:
        cls = getattr(transformers, model_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise TensordiffError(f"--model-class {model_class!r} is not a transformers model class "
                                  "(e.g. AutoModel, AutoModelForCausalLM, BertModel)")
        return cls
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
        not archs and type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def _pretrained(spec: str, seed: int, attn: str, model_class: str | None = None):
    """(model, load report) of a local checkpoint; tensors the checkpoint lacks are listed, never hidden."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # its LOAD REPORT is ours to show (load_report)
    cls = _model_class(None, model_class) if model_class else None  # a bad --model-class first
    try:
        config = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
        cls = cls or _model_class(config, None)
        torch.manual_seed(seed)  # whatever the checkpoint lacks is initialised the same way every run
        kwargs = dict(local_files_only=True, dtype=torch.float32, output_loading_info=True)
        try:
            model, info = cls.from_pretrained(spec, attn_implementation=attn, **kwargs)
        except ValueError as exc:  # a model without that attention implementation
            if "attn" not in str(exc).lower() and "attention" not in str(exc).lower():
                raise
            model, info = cls.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TensordiffError(f"cannot load model {spec!r} from a local directory or the local HF cache "
                              f"(no downloads are made): {first}") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    report = {"class": type(model).__name__, "declared": list(getattr(config, "architectures", None) or []),
              "missing": sorted(info.get("missing_keys") or []),
              "unexpected": sorted(info.get("unexpected_keys") or []),
              "mismatched": sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m)
                                   for m in info.get("mismatched_keys") or [])}
    return model.eval(), report


def _checkpoint_inputs(model, batch: int, seq_len: int, seed: int, attention_mask: bool) -> Inputs:
    """Token inputs for what the model's forward takes: token_type_ids and attention_mask too."""
    import inspect

    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < seq_len:
        raise TensordiffError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit})")
    inputs = _token_inputs(config.vocab_size, batch, seq_len, seed, attention_mask)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    ids = inputs.kwargs["input_ids"]
    if "attention_mask" in params and "attention_mask" not in inputs.kwargs:
        inputs.kwargs["attention_mask"] = torch.ones_like(ids)
    if "token_type_ids" in params:
        inputs.kwargs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def load_model(spec: str = "qwen", size: str = "tiny", batch: int = 1, seq_len: int = 128,
               seed: int = 0, attention_mask: bool = False, attn: str = "sdpa",
               model_class: str | None = None, empty: bool = False, device: str = "cpu") -> ModelBundle:
    """``empty``: built-in models come allocated but uninitialised (the caller loads a saved state).
    ``device``: where a built-in model is built and initialised (checkpoints load on the host)."""
    if batch < 1 or seq_len < 1:
        raise TensordiffError(f"--batch and --seq-len must be positive (got {batch} x {seq_len})")
    if spec in ("qwen", "qwen-moe"):
        model = _qwen(spec == "qwen-moe", size, seed, attn, empty, device)
        inputs = _token_inputs(model.config.vocab_size, batch, seq_len, seed, attention_mask)
        return ModelBundle(model, inputs, spec, {"size": size, "config": model.config.to_diff_dict()})
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        return _user_model(spec, seed)
    model, report = _pretrained(spec, seed, attn, model_class)
    inputs = _checkpoint_inputs(model, batch, seq_len, seed, attention_mask)
    return ModelBundle(model, inputs, spec, {"config": model.config.to_diff_dict(), "load": report})
