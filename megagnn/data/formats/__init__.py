"""Readers of the field's dataset formats, each turning its files into ASE ``Atoms`` with
labels in eV, Å, eV/Å and eV/Å³ (ASE's sign) under ``info["energy"]``,
``arrays["forces"]`` and ``info["stress"]``, a group under ``info["group"]`` and the
record's id in its source under ``info["id"]``."""
