"""alignment.guards.TimeBudget: the one clock of the time budget, for trl's loop and ours."""

import time

from alignment.guards import TimeBudget, time_budget


def test_budget_is_exhausted_exactly_at_its_limit(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    budget = TimeBudget(90.0)
    now[0] = 1089.9
    assert not budget.exhausted()
    now[0] = 1090.0
    assert budget.exhausted()
    budget.start()  # a resumed loop counts from its own start
    assert not budget.exhausted()
    assert not TimeBudget(None).exhausted()


def test_the_trl_callback_stops_on_the_same_clock(monkeypatch):
    from types import SimpleNamespace

    now = [0.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    callback, control = time_budget(10.0), SimpleNamespace(should_training_stop=False)
    callback.on_train_begin(None, None, control)
    now[0] = 9.0
    callback.on_step_end(None, None, control)
    assert control.should_training_stop is False
    now[0] = 10.0
    callback.on_step_end(None, None, control)
    assert control.should_training_stop is True
