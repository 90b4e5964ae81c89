"""``globalcom2_llava_next``, the 0.1 name of the ``globalcom2`` lmms-eval model (an alias: the
same class, any registered family), where lmms-eval's plugin loader looks for it.

See :mod:`globalcom2.integrations.lmms_eval`.
"""

from ..lmms_eval import GlobalCom2Model

__all__ = ["GlobalCom2Model"]
