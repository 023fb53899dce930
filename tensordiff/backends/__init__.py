"""Backends: how a model runs. A backend is a small callable: ``backend(model) -> model to run``,
plus ``backend.inputs(inputs) -> inputs on its device``.

    cpu, cpu-bf16, cpu-fp16            the host, in fp32 / bf16 / fp16
    cuda, cuda-bf16, cuda-fp16         an NVIDIA GPU (refused with a clear message where none is)
    path/to/file.py:NAME               plugin: NAME(model) gets a deep copy of the fp32 CPU reference
                                       model and returns the nn.Module to run as the target
    <entry point>                      installed packages register backends in the entry-point group
                                       ``tensordiff.backends`` (the object loaded is called like a plugin)

    backend = get_backend("cpu-bf16"); run_model = backend(copy.deepcopy(model))
"""
from tensordiff.backends.registry import Backend, get_backend, list_backends  # noqa: F401
