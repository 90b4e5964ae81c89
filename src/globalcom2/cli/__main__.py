"""``python -m globalcom2.cli ...`` (the torchrun / accelerate launch lines): the command line."""

import sys

from globalcom2.cli import main

sys.exit(main())
