"""Serving trained models."""

from megagnn.inference.calculator import MegaGNNCalculator, load_model

__all__ = ["MegaGNNCalculator", "load_model"]
