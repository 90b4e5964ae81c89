"""lmms-eval task directory of the ``LMMS_EVAL_PLUGINS=globalcom2.integrations`` plugin.

lmms-eval's command line adds ``<plugin>.tasks``'s folder to its task search path for every
plugin named in ``LMMS_EVAL_PLUGINS`` and fails when the package is missing. globalcom2 ships
no tasks of its own: run lmms-eval's (``--tasks textvqa_val,...``).
"""
