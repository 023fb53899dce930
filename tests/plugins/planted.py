"""Plugin targets with planted faults, used by the tests (the documented plugin contract)."""
import torch


def scale_layer1_mlp(model):
    """Scale the output of model.layers.1.mlp by 1.01: a bug in exactly one module."""
    mlp = model.model.layers[1].mlp
    mlp.register_forward_hook(lambda mod, args, out: out * 1.01)
    return model


def identity(model):
    return model
