"""The stages of ``memloc reproduce``, one module each, in pipeline order (:data:`REGISTRY`).

Each module defines its result dataclass, ``compute`` (cached), ``render`` (figures, tables and
the finding) and ``STAGE``, the :class:`memloc.reproduce.runner.Stage` that declares them.
"""

from __future__ import annotations

from ..runner import Stage
from ..settings import STAGES
from . import contrastive, dele, finetune, gradients, head, inj, memorization, patching, perturbation, rare_tokens

#: Stage name -> its declaration, in pipeline order.
REGISTRY: dict[str, Stage] = {m.STAGE.name: m.STAGE for m in (memorization, perturbation, gradients, contrastive,
                                                            finetune, head, rare_tokens, inj, dele, patching)}
assert tuple(REGISTRY) == STAGES

__all__ = ["REGISTRY"]
