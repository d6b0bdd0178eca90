"""Test-time budgets: settings of the halting rule applied to a loaded run at evaluation.

A budget is ``tau`` (pruning threshold on the reach) and ``l_max`` (the most latent steps).
Evaluating one checkpoint at several budgets gives the test-time compute curve: quality against
the inference FLOPs per token actually spent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alcot.common.typed import ConfigError

if TYPE_CHECKING:  # the run type only for annotations: loading imports this module
    from alcot.orchestrator.evaluation.loading import LoadedRun


@dataclass(frozen=True)
class TestTimeBudget:
    tau: float
    l_max: int

    @property
    def label(self) -> str:
        return f"tau={self.tau:g},l_max={self.l_max}"

    @property
    def key(self) -> str:
        """A form MLflow metric names accept."""
        return f"tau_{self.tau:g}_lmax_{self.l_max}"


def budgets(loaded: LoadedRun, taus: Sequence[float] = (), l_maxes: Sequence[int] = ()):
    """Every combination of the given test-time values (the trained ones where none given),
    checked against what the method can change after training."""
    cfg = loaded.cfg.model
    taus = list(taus) or [cfg.halting.tau]
    l_maxes = list(l_maxes) or [cfg.l_max]
    for t in taus:
        if not 0.0 < float(t) < 1.0:
            raise ConfigError("--tau", f"must be in (0, 1), got {t}")
    for lm in l_maxes:
        if int(lm) != lm or lm < 0:
            raise ConfigError("--l-max", f"must be an integer >= 0, got {lm}")
        lm = int(lm)
        if lm == cfg.l_max:
            continue
        if cfg.method == "vanilla":
            raise ConfigError("--l-max", "a vanilla model has no latent steps (l_max is 0)")
        if cfg.method == "pause":
            raise ConfigError(
                "--l-max", f"a pause model has exactly {cfg.l_max} trained pause tokens"
            )
        if cfg.method == "mor" and lm > cfg.l_max:
            raise ConfigError(
                "--l-max", f"Mixture-of-Recursions has {cfg.l_max} trained recursion routers"
            )
        if cfg.method in ("looped", "ponder", "fixed", "mor") and lm < 1:
            raise ConfigError("--l-max", f"method {cfg.method!r} needs l_max >= 1")
        if cfg.uses_router and cfg.halting.router == "per_step" and lm > cfg.l_max:
            raise ConfigError(
                "--l-max",
                f"the per-step router has {cfg.l_max} trained steps; l_max {lm} needs more",
            )
    if not cfg.uses_router:  # tau only steers a router: one budget per l_max elsewhere
        taus = [cfg.halting.tau]
    out = []
    for lm in l_maxes:
        for t in taus:
            b = TestTimeBudget(float(t), int(lm))
            if b not in out:
                out.append(b)
    return out


def apply_budget(loaded: LoadedRun, budget: TestTimeBudget) -> None:
    """Set the model's halting to ``budget`` (only ``adaptive`` has a tau to change)."""
    base = loaded.cfg.model
    halting = dataclasses.replace(base.halting, tau=budget.tau)
    loaded.model.cfg = dataclasses.replace(base, l_max=budget.l_max, halting=halting)
