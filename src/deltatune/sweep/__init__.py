"""`deltatune sweep`: search a config's space with Optuna, each trial the real trainer in its own process, and
keep the smallest adapter that does the job.

Optuna is the `sweep` extra: `pip install 'deltatune[sweep]'`.
"""

from __future__ import annotations

from .report import BestRule, choose_best, pareto_front
from .space import SearchSpace, SpaceError, check_space, load_space, parse_space
from .study import Sweep, SweepError, SweepSettings, load_base_config


def require_optuna() -> None:
    from ..core.errors import require_extra

    require_extra("sweep", ("optuna",), "deltatune sweep")


__all__ = [
    "BestRule", "SearchSpace", "SpaceError", "Sweep", "SweepError", "SweepSettings", "check_space", "choose_best",
    "load_base_config", "load_space", "pareto_front", "parse_space", "require_optuna",
]  # fmt: skip
