"""Canonical keys of a batched atomistic graph, with shapes, dtypes and units.

N atoms, E directed edges (j -> i, each pair in both directions), B structures.
"""

ATOMIC_NUMBERS = "atomic_numbers"  # [N] int64
POSITIONS = "positions"  # [N, 3] float Å
CELL = "cell"  # [B, 3, 3] float Å, rows are lattice vectors (zeros if non-periodic)
PBC = "pbc"  # [B, 3] bool
BATCH = "batch"  # [N] int64, structure index of each atom
N_ATOMS = "n_atoms"  # [B] int64
EDGE_INDEX = "edge_index"  # [2, E] int64, (sender j, receiver i), sorted by receiver
CELL_SHIFTS = "cell_shifts"  # [E, 3] float, integer lattice shifts: r_ij = x_j - x_i + S_ij @ cell
HEAD = "head"  # [B] int64, index of the energy head (dataset family) of each structure
ENERGY = "energy"  # [B] float eV
ENERGIES = "energies"  # [N] float eV, each atom's share of ENERGY (scaled output + reference)
FORCES = "forces"  # [N, 3] float eV/Å
STRESS = "stress"  # [B, 3, 3] float eV/Å^3, ASE sign convention (1/V dE/dstrain)
HAS_ENERGY = "has_energy"  # [B] bool, target energy present
HAS_STRESS = "has_stress"  # [B] bool, target stress present
HAS_FORCES = "has_forces"  # [B] bool, target forces present
