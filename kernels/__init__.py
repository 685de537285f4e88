"""Triton kernels for the message-passing hot paths (installed as ``megagnn.kernels``).

Each module holds the ``@triton.jit`` kernels, their launchers, an autograd Function and a
plain-PyTorch reference (the specification the kernel is tested against). Select them
through ``megagnn.ops``, which uses them for CUDA tensors. On CPU they run only under
``TRITON_INTERPRET=1`` (tests), which must be set before this package is imported.
"""

from megagnn.kernels.cfconv import cfconv, cfconv_reference
from megagnn.kernels.painn_message import painn_message, painn_message_reference
from megagnn.kernels.radial import radial_basis, radial_basis_reference
from megagnn.kernels.segment_sum import segment_sum, segment_sum_reference

__all__ = [
    "cfconv",
    "cfconv_reference",
    "painn_message",
    "painn_message_reference",
    "radial_basis",
    "radial_basis_reference",
    "segment_sum",
    "segment_sum_reference",
]
