"""Where a study is: stage k of N, time so far, and an estimate of the time left from the stages already run."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def stage_kind(name: str) -> str:
    """The verb a stage runs ("transfer/simmim/classify/s0" -> "transfer"; "pretrain/random" is its own kind:
    it only initialises a model)."""
    return "pretrain/random" if name == "pretrain/random" else name.split("/")[0]


def stage_work(config: Any) -> float:
    """Images a stage trains on (steps x batch) where it trains, else 1: time left = work x seconds per unit of
    its kind."""
    steps, batch = getattr(config, "steps", None), getattr(config, "batch_size", None)
    return float(steps * batch) if isinstance(steps, int) and isinstance(batch, int) else 1.0


def format_duration(seconds: float) -> str:
    """45 s, 3m12s, 1h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class StudyClock:
    """`note(k, remaining)` before stage k runs; `ran(name, seconds, work)` after a stage that ran (cached stages
    teach nothing about speed)."""
    total: int
    t0: float = field(default_factory=time.perf_counter)
    rate: dict[str, tuple[float, float]] = field(default_factory=dict)    # kind -> (seconds, work) so far
    training: tuple[float, float] = (0.0, 0.0)                           # (seconds, work) of all training stages

    def ran(self, name: str, seconds: float, work: float) -> None:
        s, w = self.rate.get(stage_kind(name), (0.0, 0.0))
        self.rate[stage_kind(name)] = (s + seconds, w + work)
        if work > 1:
            self.training = (self.training[0] + seconds, self.training[1] + work)

    def left(self, remaining: list[tuple[str, float]]) -> tuple[float, list[str]]:
        """(seconds estimated for the remaining (name, work) stages, the training kinds that cannot be estimated
        yet, in the order they come). A training stage (work > 1) of a kind not timed yet is estimated at the rate
        of the training stages that ran (a fine-tuning step costs about what a pretraining step does); stages
        without training (data, probe, the random model) are not counted while untimed: they are short."""
        pooled_s, pooled_w = self.training
        est, untimed = 0.0, []
        for name, work in remaining:
            kind = stage_kind(name)
            if kind in self.rate and self.rate[kind][1] > 0:
                est += work * self.rate[kind][0] / self.rate[kind][1]
            elif work > 1 and pooled_w > 0:
                est += work * pooled_s / pooled_w
            elif work > 1 and kind not in untimed:
                untimed.append(kind)
        return est, untimed

    def note(self, k: int, remaining: list[tuple[str, float]]) -> str:
        """'7/19, 3m12s in, about 25m left' (remaining includes stage k), or '..., ETA after the first pretrain
        stage' while no training stage has been timed."""
        elapsed = time.perf_counter() - self.t0
        est, untimed = self.left(remaining)
        when = f"ETA after the first {untimed[0]} stage" if untimed else f"about {format_duration(est)} left"
        return f"{k}/{self.total}, {format_duration(elapsed)} in, {when}"
