"""The ``globalcom2`` lmms-eval model, where lmms-eval's plugin loader looks for it.

See :mod:`globalcom2.integrations.lmms_eval`.
"""

from ..lmms_eval import GlobalCom2Model

__all__ = ["GlobalCom2Model"]
