"""Triton kernels for the message-passing hot paths (installed as ``megagnn.kernels``).

Each module holds the ``@triton.jit`` kernels, their launchers, an autograd Function and its
plain-PyTorch reference (the specification the kernel is tested against); ``reference``
holds the ones ``megagnn.ops`` needs without triton. The package depends on nothing in
``megagnn``: ``megagnn.ops`` imports it and picks a kernel or its reference per call. On CPU
the kernels run only under ``TRITON_INTERPRET=1`` (tests), set before they are imported.
The names below load their module (and triton) on first use; no module shares a name with
a function, so a lazily loaded module never shadows one.
"""

import importlib

_MODULES = {
    "cfconv": "continuous_filter",
    "cfconv_reference": "continuous_filter",
    "painn_message": "equivariant_message",
    "painn_message_reference": "equivariant_message",
    "radial_basis": "radial",
    "radial_basis_reference": "radial",
    "segment_sum": "aggregate",
    "segment_sum_reference": "reference",
}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
