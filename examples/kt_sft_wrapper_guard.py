"""The buffer guard over kt-kernel's own Python SFT wrapper (``kt_kernel.sft.AMXSFTMoEWrapper``): two MoE
layers, a forward of each then a backward of each (as a training step runs them), once per
``output_device`` setting the wrapper offers (None: it returns a clone; a device: ``.to(device)``,
which on the CPU is the buffer itself).

    python examples/kt_sft_wrapper_guard.py [--method MXFP4_SFT] [--json]

Registered as live buffers: every field of each layer's forward buffer (``KExpertsSFTBuffer``, which
the wrapper caches per shape at class level), and every output / input gradient the wrapper returns
while the caller still holds it. Sealed: each returned tensor, checked after the next layer's call.
Printed: the guard's findings, and for each sealed result whether its values really changed (the
evidence that tells a true from a false positive).
"""
import argparse
import json

import torch

from tensordiff.backends.kt_sft import _random_weights, build_wrapper, sft_methods
from tensordiff.guard import Guard

FIELDS = ("input_cpu", "output_cpu", "expert_ids_cpu", "weights_cpu", "grad_output_cpu", "grad_input_cpu",
          "grad_weights", "bsz_tensor")


def run(method: str, output_device, layers: int = 2, tokens: int = 32, experts: int = 16, hidden: int = 256,
        inter: int = 128, top_k: int = 4) -> dict:
    from kt_kernel.sft.base import KExpertsSFTBuffer

    KExpertsSFTBuffer.clear_cache()
    guard = Guard()
    gen = torch.Generator().manual_seed(0)
    stack = [build_wrapper(_random_weights(experts, hidden, inter, 16, seed=layer), tokens, top_k, method, layer)
             for layer in range(layers)]
    held, changed = {}, {}
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    for layer, (wrapper, _) in enumerate(stack):  # forward, layer by layer; the caller keeps each output
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
        routing = torch.full((tokens, top_k), 1.0 / top_k)
        out = wrapper.forward(x, ids, routing, save_for_backward=True, output_device=output_device)
        buffer = wrapper._get_buffer(tokens)
        for name in FIELDS:
            tensor = getattr(buffer, name, None)
            if isinstance(tensor, torch.Tensor):
                guard.register(f"layer {layer} forward buffer .{name}", tensor, site="kt_kernel/sft/base.py")
        guard.register(f"layer {layer} output (output_device={output_device})", out, site="wrapper.forward")
        guard.seal(out, f"layer {layer} output")
        held[f"layer {layer} output"] = (out, out.clone())
        x = out.clone()
    for layer in reversed(range(layers)):  # backward, last layer first
        wrapper = stack[layer][0]
        grad_in, grad_routing = wrapper.backward(torch.ones(tokens, hidden, dtype=torch.bfloat16) * 0.01,
                                                 output_device=output_device)
        guard.register(f"layer {layer} grad_input (output_device={output_device})", grad_in, site="wrapper.backward")
        guard.seal(grad_in, f"layer {layer} grad_input")
        held[f"layer {layer} grad_input"] = (grad_in, grad_in.clone())
    guard.check_all("after both layers' forward and backward")
    for name, (tensor, copy) in held.items():
        changed[name] = not torch.equal(tensor, copy)
    return {"method": method, "output_device": str(output_device), "findings": [f.text for f in guard.findings],
            "values_changed_while_held": changed}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    method = args.method or sft_methods()[0]
    results = [run(method, device) for device in (None, torch.device("cpu"))]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(f"== {r['method']}, output_device={r['output_device']}: {len(r['findings'])} finding(s)")
        for text in r["findings"]:
            print("  ", text)
        print("   values changed while the caller held them:", r["values_changed_while_held"])


if __name__ == "__main__":
    main()
