"""Readers of the field's dataset formats, each turning its files into ASE ``Atoms`` with
labels in eV, Å, eV/Å and eV/Å³ (ASE's sign) under ``info["energy"]``,
``arrays["forces"]`` and ``info["stress"]``, and a group under ``info["group"]``."""
