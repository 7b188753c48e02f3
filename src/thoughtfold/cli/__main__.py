"""`python -m thoughtfold.cli` (as `torchrun -m thoughtfold.cli` launches it): the `thoughtfold` command."""

import sys

from . import main

sys.exit(main())
