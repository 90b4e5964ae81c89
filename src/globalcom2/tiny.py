"""Tiny, randomly initialised models built in code (no download), one per family.

Each keeps its family's real geometry and shrinks every width, so a forward pass takes
milliseconds on a CPU; their answers are noise. They exist for tests, the offline demo and
benchmarks of the compression step. Each family's builder lives with the family
(``globalcom2/models/<family>.py``); the LLaVA-NeXT names of 0.1 are re-exported here.
"""

from __future__ import annotations

from typing import Any

from .models.llava_next import (  # noqa: F401
    LLAVA_NEXT_PINPOINTS, build_config, build_processor, build_tiny_llava_next, build_tokenizer,
)


def build_tiny(model_type: str = "llava_next", seed: int = 0, dtype: Any = None, device: Any = "cpu") -> tuple[Any, Any]:
    """``(model, processor)`` of the tiny random model of the family registered for ``model_type``."""
    from .models import family_for_model_type

    return family_for_model_type(model_type).build_tiny(seed=seed, dtype=dtype, device=device)
