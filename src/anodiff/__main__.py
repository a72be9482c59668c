"""`python -m anodiff ...`: the same command line as the `anodiff` console script."""

import sys

from anodiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
