"""``safeport eval --plan``: the sweep's outputs per target × method × α and its GPU time, no model loaded.

The plan is :func:`safeport.flows.eval.build_plan`'s own (the same content keys the sweep then
makes), counted against what the store already holds. The time per output is the target's
``generation: seconds_per_output`` if set, else the median of the outputs already generated
with the same target and settings (each output's seconds are stored when it is committed; a
batched call's time is shared by its outputs), else unknown. Prompt texts are never read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from safeport.eval.generate import Scalar
from safeport.flows.common import catalog
from safeport.flows.eval import plan_for, plan_sweeps, run_options
from safeport.store.outputs import done_keys, measured_seconds
from safeport.store.store import Store


@dataclass(frozen=True)
class PlanRow:
    method: str
    alpha: float
    total: int
    done: int

    @property
    def todo(self) -> int:
        return self.total - self.done


@dataclass(frozen=True)
class TargetPlan:
    target: str
    rows: tuple[PlanRow, ...]
    seconds_per_output: float | None
    seconds_from: str  # "catalog", "measured on N outputs" or "unknown"

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    @property
    def done(self) -> int:
        return sum(r.done for r in self.rows)


def gpu_hours(outputs: int, seconds_per_output: float, gpus: int) -> float:
    """Hours for ``outputs`` at ``seconds_per_output`` each on ``gpus`` GPUs (one worker per GPU, even split)."""
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: give the number of GPUs, 1 or more")
    return outputs * seconds_per_output / gpus / 3600.0


def plan_eval(
    catalog_path: str | None = None,
    profile: str = "default",
    store: str | None = None,
    target: str | None = None,
    vectors: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    prompts: str | None = None,
    limit: int | None = None,
    seeds: Sequence[int] | None = None,
    utility: str | None = None,
    utility_limit: int = 300,
    categories: bool = True,
    settings: Mapping[str, Scalar] | None = None,
    strengths: Sequence[float] | None = None,
    holdout: str | None = None,
) -> list[TargetPlan]:
    """The eval flow's plan per target (SafeDIG methods included), counted against a read-only view of the store."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    out = []
    with Store(root, read_only=True) as st:
        args = (target, vectors, alphas, prompts, limit, seeds, utility, utility_limit, categories, settings)
        for sweep in plan_sweeps(st, resolved, *args, strengths, holdout):
            plan, gen_settings, _ = plan_for(st, resolved, sweep)
            done = done_keys(st, list(plan.specs))
            counts: dict[tuple[str, float], list[int]] = {}
            for key, spec in plan.specs.items():
                cell = counts.setdefault((spec.method, spec.alpha), [0, 0])
                cell[0] += 1
                cell[1] += key in done
            rows = tuple(PlanRow(m, a, t, d) for (m, a), (t, d) in counts.items())
            per = run_options(resolved, sweep).seconds_per_output
            source = "catalog"
            if per is None:
                per, n = measured_seconds(st, plan.target_key, gen_settings.key)
                source = f"measured on {n} outputs" if per is not None else "unknown"
            out.append(TargetPlan(sweep.target, rows, per, source))
    return out
