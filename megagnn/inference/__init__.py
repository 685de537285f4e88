"""Serving trained models."""

from megagnn.inference.calculator import MegaGNNCalculator, load_model
from megagnn.inference.package import Package, export_package, load_package

__all__ = ["MegaGNNCalculator", "Package", "export_package", "load_model", "load_package"]
