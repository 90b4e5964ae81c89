"""Pure tensor code, shared by every model family and method; nothing here knows a model class.

* :mod:`~globalcom2.core.geometry`: crop grids, unpadded areas, token-grid reshapes.
* :mod:`~globalcom2.core.importance`: importance from captured q/k ([CLS] logits, similarity,
  attention received) and :data:`~globalcom2.core.importance.SCORE_DTYPE`.
* :mod:`~globalcom2.core.budgets`: crop retention ratios, the thumbnail's count, fixed budgets,
  each crop's best tokens.
* :mod:`~globalcom2.core.layouts`: the sequence layouts, :class:`~globalcom2.core.layouts.CompressionPlan`,
  its kept masks, gathering a plan's tokens.
* :mod:`~globalcom2.core.plans`: the per-image plans (GlobalCom2, joint budgets, single view, pooling).
* :mod:`~globalcom2.core.batch`: a whole batch's plans in one vectorised pass (host tables:
  :mod:`~globalcom2.core.batch_host`).
* :mod:`~globalcom2.core.resized`, :mod:`~globalcom2.core.tiles`: LLaVA-OneVision's resized crop
  map and InternVL's tile order.
* :mod:`~globalcom2.core.sequence`: shrinking a batch's image placeholders.
* :mod:`~globalcom2.core.config`: the validated-config base and field validators (no torch).
"""
