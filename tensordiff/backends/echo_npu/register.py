"""Importing this module registers echo_npu, the way importing torch_npu registers an NPU: it is the
example of a third-party PrivateUse1 extension for ``--target device:MODULE``.

    tensordiff trace --target device:tensordiff.backends.echo_npu.register
"""
from tensordiff.backends.echo_npu import load_extension

load_extension()
