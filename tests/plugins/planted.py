"""Plugin targets with planted faults, used by the tests (the documented plugin contract)."""
import torch


def scale_layer1_mlp(model):
    """Scale the output of model.layers.1.mlp by 1.01: a bug in exactly one module."""
    mlp = model.model.layers[1].mlp
    mlp.register_forward_hook(lambda mod, args, out: out * 1.01)
    return model


def identity(model):
    return model


def scale_layer1_attention(model):
    """Attention output of layer 1 scaled by 1.01, inside the attention module's own forward."""
    attn = model.model.layers[1].self_attn
    inner = attn.forward

    def forward(*args, **kwargs):
        out, weights = inner(*args, **kwargs)
        return out * 1.01, weights

    attn.forward = forward
    return model


def layer1_attention_wrong_from_position_256(model):
    """Layer 1's attention is right for the first 256 positions and off by 5% from there on: a kernel
    whose scores live in a fixed 256-entry buffer."""
    attn = model.model.layers[1].self_attn
    inner = attn.forward

    def forward(*args, **kwargs):
        out, weights = inner(*args, **kwargs)
        scale = torch.ones(out.shape[1], 1, dtype=out.dtype)
        scale[256:] = 1.05
        return out * scale, weights

    attn.forward = forward
    return model


# A device-style copy that ignores strides: reads the storage in memory order, as a buggy device
# `_copy_from` does, registered as an op so the op probe sees it like a device kernel.
_lib = torch.library.Library("tdtest", "FRAGMENT")
if not hasattr(torch.ops.tdtest, "device_copy"):
    _lib.define("device_copy(Tensor x) -> Tensor")


def _device_copy(x):
    flat = torch.as_strided(x, (x.numel(),), (1,), x.storage_offset())
    return flat.clone().reshape(x.shape)


if not torch._C._dispatch_has_kernel_for_dispatch_key("tdtest::device_copy", "CPU"):
    _lib.impl("device_copy", _device_copy, "CPU")


def strided_copy_before_norm(model):
    """Layer 1 keeps its hidden state in a transposed layout and moves it with the stride-ignoring
    copy just before input_layernorm: the norm gets scrambled input but computes correctly."""
    layer = model.model.layers[1]
    inner = layer.forward

    def forward(hidden_states, *args, **kwargs):
        transposed = hidden_states.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided
        moved = torch.ops.tdtest.device_copy(transposed)
        return inner(moved, *args, **kwargs)

    layer.forward = forward
    return model


def corrupt_expert_17(model):
    """Qwen3-MoE: expert 17 of layer 0 has a wrong down projection (fused 3-D expert weights)."""
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.down_proj[17] *= 1.5
    return model


def cast_inv_freq_bf16(model):
    """An fp32 target whose only difference is the rotary buffer cast to bfloat16 (as model.to(bf16) does)."""
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16)
    return model


def other_weights_in_layer1_mlp(model):
    """A target that loaded other weights for one projection (a wrong checkpoint shard)."""
    with torch.no_grad():
        proj = model.model.layers[1].mlp.down_proj
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
    return model


if not hasattr(torch.ops.tdtest, "unsupported"):
    _lib.define("unsupported(Tensor x) -> Tensor")


def _unsupported(x):
    raise NotImplementedError('"unsupported_cpu" not implemented for this dtype')


if not torch._C._dispatch_has_kernel_for_dispatch_key("tdtest::unsupported", "CPU"):
    _lib.impl("unsupported", _unsupported, "CPU")


def unsupported_op_in_layer0_mlp(model):
    """A target whose down projection calls an op its runtime lacks (raises in the middle of a forward)."""
    proj = model.model.layers[0].mlp.down_proj
    inner = proj.forward

    def forward(x):
        return torch.ops.tdtest.unsupported(inner(x))

    proj.forward = forward
    return model


class _WrongSiluGrad(torch.autograd.Function):
    """SiLU with an exact forward and a backward that forgets the sigmoid's derivative term."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.silu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def wrong_backward_in_layer1_act(model):
    """Layer 1's MLP activation: forward exact, input gradient wrong (a hand-written backward)."""
    act = model.model.layers[1].mlp.act_fn
    act.forward = lambda x: _WrongSiluGrad.apply(x)
    return model


class _WrongWeightGradLinear(torch.autograd.Function):
    """y = x W^T with exact forward and input gradient, and a weight gradient 10% too large (a LoRA
    kernel whose weight-gradient GEMM is wrong)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad @ weight, grad_w * 1.1


def wrong_weight_grad_in_layer2_up_proj(model):
    proj = model.model.layers[2].mlp.up_proj
    proj.forward = lambda x: _WrongWeightGradLinear.apply(x, proj.weight)
    return model


def bf16_with_scaled_layer1_attention(model):
    """A bf16 deployment whose layer-1 attention output is 3% too large."""
    from tensordiff.backends.registry import cast_like_deployment

    model = scale_layer1_attention(cast_like_deployment(model, torch.bfloat16))
    attn = model.model.layers[1].self_attn
    inner = attn.forward

    def forward(*args, **kwargs):
        out, weights = inner(*args, **kwargs)
        return out * (1.03 / 1.01), weights

    attn.forward = forward
    return model


# -- nan-hunt targets ------------------------------------------------------------------------------
STALE_EXPERTS = range(17, 25)   # experts whose kernel output buffer still holds an earlier NaN
STALE_COLUMNS_WRITTEN = 64      # the buggy kernel writes only the first 64 columns of each row


def _stale_experts_forward(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn):
    """transformers' fused-experts loop, except that experts 17-24 get their output buffer from a pool
    that still holds NaN from an earlier use, and write only its first 64 columns (the story of #11)."""
    final = torch.zeros_like(hidden_states)
    for e in range(gate_up_proj.shape[0]):
        token_idx, pos = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        x = hidden_states[token_idx]
        gate, up = torch.nn.functional.linear(x, gate_up_proj[e]).chunk(2, dim=-1)
        h = torch.nn.functional.linear(act_fn(gate) * up, down_proj[e])
        if e in STALE_EXPERTS:  # columns past the written ones keep the pool's old NaN
            written = torch.arange(h.shape[1], device=h.device) < STALE_COLUMNS_WRITTEN
            h = torch.where(written, h, float("nan"))
        final.index_add_(0, token_idx, h * top_k_weights[token_idx, pos, None])
    return final


def stale_buffer_experts_17_24(model):
    """Layer 1's fused experts run a kernel whose experts 17-24 leave stale NaN rows in their output."""
    experts = model.model.layers[1].mlp.experts

    def forward(hidden_states, top_k_index, top_k_weights):
        return _stale_experts_forward(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj,
                                      experts.down_proj, experts.act_fn)

    experts.forward = forward
    return model


if not hasattr(torch.ops.tdtest, "stale_experts"):
    _lib.define("stale_experts(Tensor h, Tensor idx, Tensor w, Tensor gate_up, Tensor down) -> Tensor")
if not torch._C._dispatch_has_kernel_for_dispatch_key("tdtest::stale_experts", "CPU"):
    _lib.impl("stale_experts", lambda h, idx, w, gu, d: _stale_experts_forward(h, idx, w, gu, d, torch.nn.functional.silu),
              "CPU")


def opaque_stale_experts_17_24(model):
    """The same kernel as one opaque custom op (an external MoE kernel): no op inside it is visible."""
    experts = model.model.layers[1].mlp.experts

    def forward(hidden_states, top_k_index, top_k_weights):
        return torch.ops.tdtest.stale_experts(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj,
                                              experts.down_proj)

    experts.forward = forward
    return model


class _ZeroDivBackward(torch.autograd.Function):
    """Identity forward; its backward divides by a gradient-derived zero (a backward-only NaN)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / (grad - grad)


def zero_div_backward_in_layer1_mlp(model):
    mlp = model.model.layers[1].mlp
    inner = mlp.forward
    mlp.forward = lambda x: _ZeroDivBackward.apply(inner(x))
    return model


def fp16_overflow_in_layer2_mlp(model):
    """fp16 like a deployment, with layer 2's gate and up projections 500x too large: their product
    overflows fp16."""
    from tensordiff.backends.registry import cast_like_deployment

    cast_like_deployment(model, torch.float16)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.mul_(500.0)
        model.model.layers[2].mlp.gate_proj.weight.mul_(500.0)
    return model


def other_weights_in_layer1_expert_5(model):
    """One expert's slice of layer 1's fused down_proj is 5% off (a bad conversion of one expert)."""
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[5].mul_(1.05)
    return model
