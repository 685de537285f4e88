#!/usr/bin/env python
"""Generate GFN1-xTB energies and forces on QM9 geometries. See --help."""

import sys

from megagnn.data.qm9_xtb import main

if __name__ == "__main__":
    sys.exit(main())
