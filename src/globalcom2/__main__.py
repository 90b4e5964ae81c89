"""``python -m globalcom2 ...``: the command line (also under ``torchrun`` / ``accelerate launch``)."""

import sys

from globalcom2.cli import main

sys.exit(main())
