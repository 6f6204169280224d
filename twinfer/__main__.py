"""`python -m twinfer` runs the `twinfer` command."""

import sys

from twinfer.cli import main

sys.exit(main())
