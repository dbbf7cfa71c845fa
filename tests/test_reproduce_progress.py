"""The study's progress line: stage k of N, time so far, time left from the stages that ran (hand-worked)."""
from __future__ import annotations

from types import SimpleNamespace

from mimlab.reproduce.progress import StudyClock, format_duration, stage_kind, stage_work


def test_format_and_kinds():
    assert [format_duration(s) for s in (0.4, 45, 192, 3900)] == ["0 s", "45 s", "3m12s", "1h05m"]
    assert stage_kind("transfer/simmim-drop2/classify/s1") == "transfer" and stage_kind("pretrain/random") != \
        stage_kind("pretrain/simmim") == "pretrain"
    assert stage_work(SimpleNamespace(steps=100, batch_size=32)) == 3200 and stage_work({"kind": "data"}) == 1


def test_time_left_from_the_stages_that_ran():
    clock = StudyClock(total=5)
    todo = [("pretrain/simmim", 1000.0), ("pretrain/supervised", 1000.0), ("probe", 1.0),
            ("transfer/simmim/classify/s0", 200.0)]
    assert clock.left(todo) == (0.0, ["pretrain", "transfer"])
    assert clock.note(2, todo).endswith("ETA after the first pretrain stage")
    clock.ran("pretrain/simmim", 50.0, 1000.0)                   # 0.05 s per image
    # supervised at pretrain's rate: 50 s; the probe (untimed, no training) is not counted; the transfer stage at
    # the training stages' pooled rate: 200 x 0.05 = 10 s
    assert clock.left(todo[1:]) == (60.0, [])
    clock.ran("transfer/simmim/classify/s0", 4.0, 200.0)          # transfer's own rate now: 0.02 s per image
    assert clock.left([("transfer/supervised/classify/s0", 200.0)]) == (4.0, [])
    assert clock.note(5, [("transfer/supervised/classify/s0", 200.0)]).startswith("5/5, ")
    assert clock.note(5, [("transfer/supervised/classify/s0", 200.0)]).endswith(", about 4 s left")
