"""Where a model's mixture-of-experts blocks are: the fused-experts layout the kt-kernel targets and
the LoRA reference work on."""
from __future__ import annotations

import torch


def fused_experts_blocks(model: torch.nn.Module):
    """(block name, block, experts) for every MoE block whose experts are fused 3-D parameters with
    a top-k router beside them (transformers' Qwen3-MoE / Qwen2-MoE / Mixtral layout)."""
    found = []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        router = getattr(block, "gate", None)
        gate_up = getattr(experts, "gate_up_proj", None)
        down = getattr(experts, "down_proj", None)
        if (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
                and down.dim() == 3 and router is not None and hasattr(router, "top_k")):
            found.append((name, block, experts))
    return found
