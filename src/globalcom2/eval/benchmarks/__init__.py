"""The built-in benchmarks; importing this package registers them all."""

from . import gqa, mmbench, mme, mmvet, pope, scienceqa, vqa  # noqa: F401
