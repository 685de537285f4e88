#!/usr/bin/env python
"""ASE-readable files -> validated HDF5 shards + dataset.json. See --help."""

import sys

from megagnn.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
