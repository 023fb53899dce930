"""The golden MoE+LoRA reference: routed experts with LoRA on gate, up and down, written step by step
in PyTorch (float32 or float64, autograd for the backward), for judging kt-kernel's SFT MoE where it
runs and as the reference where it cannot.

Per expert e and the tokens routed to it (PEFT's LoRA, ``scaling = alpha / rank``):

    x_lora_a    = x @ A_gate[e].T                          (the input times LoRA A, per projection)
    gate        = x @ W_gate[e].T + scaling * x_lora_a @ B_gate[e].T      ("gate+LoRA")
    up          = x @ W_up[e].T   + scaling * (x @ A_up[e].T) @ B_up[e].T ("up+LoRA")
    act         = silu(gate) * up          (with a SwiGLU limit: gate <= limit, |up| <= limit)
    down        = act @ W_down[e].T + scaling * (act @ A_down[e].T) @ B_down[e].T
    output     += routing weight * down

Every step can be kept per expert (``steps``), so a target that exposes its intermediates (a debug
dump of a kernel) is compared step by step. kt-kernel's kernels take a LoRA rank that is a multiple of
32: ``pad_rank`` pads A with zero rows and B with zero columns, which leaves every product unchanged
(the scaling stays alpha / the user's rank).

``mxfp4_quantize`` / ``mxfp4_dequantize``: OCP MX FP4 (E2M1 values, one power-of-two scale per 32
along the input dimension), the format of kt-kernel's MXFP4_SFT; a quantised kernel is judged against
this reference run on the dequantised weights (the same quantisation), never against the float weights
alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LORA_PROJECTIONS = ("gate", "up", "down")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass
class MoELoRAWeights:
    """Fused expert weights (transformers' layout split into gate and up) and LoRA per projection:
    gate / up [E, I, H], down [E, H, I]; lora[p] = (A [E, r, in], B [E, out, r])."""
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    lora: dict
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora["gate"][0].shape[1]

    def to(self, dtype: torch.dtype) -> "MoELoRAWeights":
        return MoELoRAWeights(self.gate.to(dtype), self.up.to(dtype), self.down.to(dtype),
                              {p: (a.to(dtype), b.to(dtype)) for p, (a, b) in self.lora.items()}, self.scaling)


def random_moe_lora(experts: int, hidden: int, inter: int, rank: int, alpha: float = 32.0,
                    seed: int = 0, scale: float = 0.02) -> MoELoRAWeights:
    """Random weights; LoRA B is not zero (PEFT's initial zero B would make A's gradient zero and leave
    half of the backward untested)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * scale  # noqa: E731
    lora = {"gate": (rnd(experts, rank, hidden), rnd(experts, inter, rank)),
            "up": (rnd(experts, rank, hidden), rnd(experts, inter, rank)),
            "down": (rnd(experts, rank, inter), rnd(experts, hidden, rank))}
    return MoELoRAWeights(rnd(experts, inter, hidden), rnd(experts, inter, hidden), rnd(experts, hidden, inter),
                          lora, alpha / rank)


def pad_rank(weights: MoELoRAWeights, multiple: int = 32) -> MoELoRAWeights:
    """LoRA rank padded up to ``multiple`` with zeros: the same function, the kernel's rank."""
    rank = weights.rank
    padded = -(-rank // multiple) * multiple
    if padded == rank:
        return weights
    lora = {}
    for p, (a, b) in weights.lora.items():
        a2 = torch.zeros(a.shape[0], padded, a.shape[2], dtype=a.dtype)
        b2 = torch.zeros(b.shape[0], b.shape[1], padded, dtype=b.dtype)
        a2[:, :rank], b2[:, :, :rank] = a, b
        lora[p] = (a2, b2)
    return MoELoRAWeights(weights.gate, weights.up, weights.down, lora, weights.scaling)


def moe_lora_forward(x: torch.Tensor, expert_ids: torch.Tensor, routing: torch.Tensor, w: MoELoRAWeights,
                     swiglu_limit: float | None = None, steps: dict | None = None) -> torch.Tensor:
    """x [T, H], expert_ids [T, k], routing [T, k] -> [T, H], in x's dtype (differentiable in x,
    routing and every weight). ``steps``: filled with {expert: {step name: tensor}}."""
    out = torch.zeros_like(x)
    for e in torch.unique(expert_ids).tolist():
        rows, slot = (expert_ids == e).nonzero(as_tuple=True)
        xe = x[rows]
        named = {}

        def project(inp, weight, p):
            a, b = w.lora[p]
            low = inp @ a[e].T
            named[f"{p}_x_lora_a"] = low
            named[f"{p}_lora_b"] = low @ b[e].T
            return inp @ weight[e].T + w.scaling * named[f"{p}_lora_b"]

        gate = project(xe, w.gate, "gate")
        up = project(xe, w.up, "up")
        if swiglu_limit:
            gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        named["gate+lora"], named["up+lora"] = gate, up
        act = torch.nn.functional.silu(gate) * up
        named["act"] = act
        down = project(act, w.down, "down")
        named["down"] = down
        out = out.index_add(0, rows, down * routing[rows, slot, None].to(down.dtype))
        if steps is not None:
            steps[e] = named
    return out


def reference_sft_step(x, expert_ids, routing, w: MoELoRAWeights, grad_output, dtype=torch.float32,
                       swiglu_limit: float | None = None) -> dict:
    """Forward and backward of the reference in ``dtype``: output, grad of the input and of the routing
    weights, and the LoRA gradients (frozen base weights, as in LoRA fine-tuning)."""
    wr = w.to(dtype)
    wr.lora = {p: (a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
               for p, (a, b) in wr.lora.items()}  # own leaves: the caller's tensors stay as they are
    xr = x.detach().to(dtype).requires_grad_(True)
    rr = routing.detach().to(dtype).requires_grad_(True)
    out = moe_lora_forward(xr, expert_ids, rr, wr, swiglu_limit)
    out.backward(grad_output.to(dtype))
    result = {"output": out.detach(), "grad_input": xr.grad, "grad_routing": rr.grad}
    for p, (a, b) in wr.lora.items():
        result[f"grad_{p}_lora_a"], result[f"grad_{p}_lora_b"] = a.grad, b.grad
    return result


def mxfp4_quantize(weight: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] float -> (codes packed two per byte [..., N/2] uint8, element i in the low nibble when
    i is even; scales [..., N/group] as powers of two). The OCP rule: scale = 2^(floor(log2(amax)) - 2)
    (2 = E2M1's largest exponent), each value / scale rounded to the nearest E2M1 value, saturating at 6."""
    shape = weight.shape
    groups = weight.float().reshape(*shape[:-1], shape[-1] // group, group)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0 ** -126))) - 2, torch.zeros_like(amax))
    scale = torch.exp2(exponent)
    scaled = (groups / scale).clamp(-6.0, 6.0)
    # nearest E2M1 magnitude: the midpoints between neighbours are the bucket boundaries (ties: lower)
    midpoints = torch.tensor([(a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:])])
    code = torch.bucketize(scaled.abs(), midpoints)
    code = (code | ((scaled < 0) & (code > 0)).to(code.dtype) << 3).to(torch.uint8).reshape(*shape)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.contiguous(), scale.squeeze(-1).contiguous()


def mxfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, group: int = 32) -> torch.Tensor:
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    values = torch.tensor(E2M1_VALUES)[(codes & 7).long()] * torch.where(codes >= 8, -1.0, 1.0)
    groups = values.reshape(*codes.shape[:-1], codes.shape[-1] // group, group) * scale.float()[..., None]
    return groups.reshape(codes.shape)


class MoELoRAExperts(torch.nn.Module):
    """A fused experts module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], forward(hidden
    [T, H], top_k_index [T, k], top_k_weights [T, k])) with LoRA adapters on gate, up and down: the
    golden reference of a LoRA fine-tuning step. The base weights are the original module's parameters
    (frozen, as in LoRA training); the adapters are parameters ``lora_{gate,up,down}_{a,b}``."""

    def __init__(self, experts: torch.nn.Module, rank: int, alpha: float, seed: int = 0):
        super().__init__()
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
        for p in (self.gate_up_proj, self.down_proj):
            p.requires_grad_(False)
        e, two_i, h = self.gate_up_proj.shape
        i = two_i // 2
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        gen = torch.Generator().manual_seed(seed)
        dtype = self.gate_up_proj.dtype
        # A ~ kaiming-uniform-like 1/sqrt(fan-in); B small but not zero (an adapter mid-training: PEFT's
        # zero B would make every A gradient zero)
        for p, (fan_in, fan_out) in {"gate": (h, i), "up": (h, i), "down": (i, h)}.items():
            a = torch.randn(e, rank, fan_in, generator=gen) * fan_in ** -0.5
            b = torch.randn(e, fan_out, rank, generator=gen) * (0.1 * rank ** -0.5)
            self.register_parameter(f"lora_{p}_a", torch.nn.Parameter(a.to(dtype)))
            self.register_parameter(f"lora_{p}_b", torch.nn.Parameter(b.to(dtype)))

    def weights(self) -> MoELoRAWeights:
        i = self.gate_up_proj.shape[1] // 2
        return MoELoRAWeights(self.gate_up_proj[:, :i], self.gate_up_proj[:, i:], self.down_proj,
                              {p: (getattr(self, f"lora_{p}_a"), getattr(self, f"lora_{p}_b")) for p in LORA_PROJECTIONS},
                              self.scaling)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return moe_lora_forward(hidden_states, top_k_index, top_k_weights, self.weights())


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> torch.nn.Module:
    """Every fused-experts MoE block gets LoRA on its experts (``MoELoRAExperts``), seeded per layer."""
    from tensordiff.backends.moe_blocks import fused_experts_blocks
    from tensordiff.errors import TensordiffError

    if rank < 1:
        raise TensordiffError(f"--lora-rank must be positive (got {rank})")
    blocks = fused_experts_blocks(model)
    if not blocks:
        raise TensordiffError("--lora-rank: the model has no fused-experts MoE block (experts.gate_up_proj "
                              "[E, 2I, H] beside a top-k router); try --model qwen-moe")
    for layer, (_, block, experts) in enumerate(blocks):
        if not isinstance(experts, MoELoRAExperts):
            block.experts = MoELoRAExperts(experts, rank, alpha if alpha is not None else 2.0 * rank, seed + 1000 + layer)
    return model
