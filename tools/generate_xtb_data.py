#!/usr/bin/env python
"""Generate the harder dataset (GFN1-xTB molecules, clusters and crystals). See --help."""

import sys

from megagnn.data.xtb import main

if __name__ == "__main__":
    sys.exit(main())
