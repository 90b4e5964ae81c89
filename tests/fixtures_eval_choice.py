"""The tests' name for :mod:`globalcom2.eval.samples.choice` (the benchmark makers moved into the
package so that ``globalcom2 eval --write-sample-data`` can use them too): the same module
object, private names included."""

import sys

from globalcom2.eval.samples import choice as _module

sys.modules[__name__] = _module
