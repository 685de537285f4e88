#!/usr/bin/env python
"""Generate the built-in default dataset (EMT-labelled fcc alloys). See --help."""

import sys

from megagnn.data.emt import main

if __name__ == "__main__":
    sys.exit(main())
