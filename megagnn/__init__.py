"""megagnn: Megatron-style training of large graph neural network interatomic potentials."""

__version__ = "0.1.0"
