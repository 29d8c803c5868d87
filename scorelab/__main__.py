"""``python -m scorelab ...`` (and ``torchrun -m scorelab ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
