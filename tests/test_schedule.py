"""Learning-rate schedules (train/schedule.py): pure functions of the step, so a resumed run
gets the rates of the straight run. Warmup-stable-decay's stable phase does not depend on the
run's length, so a run continued from a stable-phase checkpoint with more steps is the longer
run itself."""

import math

import pytest

from mamba_train.config import ConfigError, OptimConfig, load_config
from mamba_train.train.loop import train
from mamba_train.train.schedule import lr_at
from synthetic import tiny_config

LR, MIN_LR, WARMUP = 1e-3, 1e-4, 10


def rates(schedule, total, **extra):
    optim = OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, schedule=schedule, **extra)
    return [lr_at(step, optim, total) for step in range(total)]


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_every_schedule_warms_up_linearly_to_lr(schedule):
    assert rates(schedule, 100)[:WARMUP] == pytest.approx([LR * (i + 1) / WARMUP for i in range(WARMUP)])


def test_cosine_falls_from_lr_to_min_lr_at_the_last_step():
    after = rates("cosine", 110)[WARMUP:]
    assert after[0] == LR and all(a > b for a, b in zip(after, after[1:]))
    assert after[-1] == pytest.approx(MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * 99 / 100)))


def test_wsd_holds_lr_then_cools_down_along_one_minus_sqrt():
    total = 110
    lr = rates("wsd", total, decay_fraction=0.2)   # the last 22 steps decay
    assert lr[WARMUP:total - 22] == [LR] * (total - 22 - WARMUP)
    decay = lr[total - 22:]
    assert decay == pytest.approx([MIN_LR + (LR - MIN_LR) * (1 - math.sqrt(i / 22)) for i in range(22)])
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_wsd_stable_rates_do_not_depend_on_the_runs_length():
    short, long = rates("wsd", 100), rates("wsd", 400)
    assert short[:80] == long[:80]   # up to the short run's decay


def test_wsd_decay_of_a_short_run_stays_out_of_the_warmup():
    lr = rates("wsd", 12, decay_fraction=0.5)   # 6 decay steps asked, 2 after the warmup
    assert lr[:WARMUP] == pytest.approx([LR * (i + 1) / WARMUP for i in range(WARMUP)])
    assert lr[WARMUP] == LR and MIN_LR < lr[WARMUP + 1] < LR


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match=r"optim.schedule: expected 'cosine', 'constant' or 'wsd', found 'linear'"):
        load_config(None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match=r"optim.decay_fraction: expected a fraction of the steps in \(0, 1\]"):
        load_config(None, ["optim.schedule=wsd", "optim.decay_fraction=0"])


def test_a_wsd_run_continued_with_more_steps_is_the_longer_run(markov_data, tmp_path):
    wsd = ("optim.schedule=wsd", "optim.decay_fraction=0.25", "optim.warmup_steps=4")
    straight = train(tiny_config(markov_data, tmp_path / "straight", "train.steps=24", *wsd))
    # a 16-step run's checkpoint at step 8 is in its stable phase (its decay starts at step 12)
    train(tiny_config(markov_data, tmp_path / "short", "train.steps=16", "checkpoint.every=8", *wsd),
          stop_after_steps=8)
    longer = train(tiny_config(markov_data, tmp_path / "short", "train.steps=24", *wsd), resume="auto")
    assert {step: longer.losses[step] for step in range(9, 25)} == {step: straight.losses[step]
                                                                    for step in range(9, 25)}
