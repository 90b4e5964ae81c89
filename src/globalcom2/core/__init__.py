"""Pure tensor code, shared by every model family and method; nothing here knows a model class.

* :mod:`~globalcom2.core.geometry`: crop grids, unpadded areas, token-grid reshapes.
* :mod:`~globalcom2.core.plans`: importance from captured q/k, crop budgets, selection, the
  sequence layouts, :class:`~globalcom2.core.plans.CompressionPlan` and its kept masks.
* :mod:`~globalcom2.core.sequence`: shrinking a batch's image placeholders.
* :mod:`~globalcom2.core.config`: the validated-config base and field validators (no torch).
"""
