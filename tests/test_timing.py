"""time_interleaved: rounds alternate between the callables; each keeps its best round."""

import pytest
import torch

import kse.timing as timing


def test_rounds_alternate_and_the_best_round_is_kept(monkeypatch):
    calls = []
    # a fake clock: round 2 is a burst of outside load that slows "a" 3x and "b" 2x
    clock = {("a", 0): 6.0, ("b", 0): 4.0, ("a", 1): 18.0, ("b", 1): 8.0, ("a", 2): 6.5, ("b", 2): 3.5}

    def fake_time_call(fn, x, warmup, repeats):
        calls.append(fn.__name__)
        return {"median_ms": clock[(fn.__name__, sum(c == fn.__name__ for c in calls) - 1)]}

    def a(x):
        return x

    def b(x):
        return x

    monkeypatch.setattr(timing, "time_call", fake_time_call)
    ta, tb = timing.time_interleaved((a, b), torch.zeros(1), rounds=3, repeats=2)
    assert calls == ["a", "b"] * 3
    assert (ta["median_ms"], tb["median_ms"]) == (6.0, 3.5)
    assert ta["rounds_ms"] == [6.0, 18.0, 6.5] and ta["repeats"] == 6
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timing.time_interleaved((a,), torch.zeros(1), rounds=0)
