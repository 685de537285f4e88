#!/usr/bin/env python
"""Generate the molecular dataset (GFN2-xTB-labelled G2 molecules). See --help."""

import sys

from megagnn.data.molecules import main

if __name__ == "__main__":
    sys.exit(main())
