"""Specification of --time_budget: the duration's spelling, the schedule that moves its end without a
jump in the rate, and the plan's arithmetic on a clock we control. (A whole run with a budget, and
its resumption: test_train.py.)"""
import math
from types import SimpleNamespace

import pytest
import torch

import budget
import settings
import train_step
from errors import SettingsError


@pytest.mark.parametrize("text,seconds", [("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("45s", 45),
                                          ("3600", 3600), ("1.5h", 5400), ("2h0m30s", 7230), ("", 0)])
def test_a_duration_is_hours_minutes_and_seconds(text, seconds):
    assert settings.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "5x", "-1", "m", "1h 30m", "0", "0m"])
def test_a_time_budget_that_is_no_duration_is_refused_by_name(text):
    with pytest.raises(SettingsError, match="time_budget"):
        settings.parse_config(["--time_budget", text])


def test_a_time_budget_with_max_steps_is_refused_in_one_line():
    with pytest.raises(SettingsError, match="time_budget '1h' and max_steps 100: both decide"):
        settings.parse_config(["--time_budget", "1h", "--max_steps", "100"])


# ---- the schedule -------------------------------------------------------------------------------

def test_the_schedule_warms_up_linearly_then_decays_to_zero():
    factor = train_step.WarmupCosine(total_steps=110, warmup_steps=10)
    assert [factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(110) == pytest.approx(0.0)


@pytest.mark.parametrize("total,warmup", [(1, 0), (1, 1), (1, 100), (5, 5), (3, 0), (7, 1000)])
def test_no_combination_of_steps_and_warmup_divides_by_zero(total, warmup):
    factor = train_step.WarmupCosine(total, warmup)
    values = [factor(s) for s in range(total + 1)]
    assert all(0 <= v <= 1 for v in values)
    assert max(values) == pytest.approx(1.0)       # a capped warmup still reaches the peak


@pytest.mark.parametrize("new_total", [150, 400, 121])
def test_a_new_plan_keeps_the_rate_of_the_step_and_decays_to_zero_at_the_new_end(new_total):
    factor = train_step.WarmupCosine(total_steps=200, warmup_steps=20)
    before = factor(120)
    factor.replan(120, new_total)
    assert factor(120) == pytest.approx(before, abs=1e-12)
    assert factor(new_total) == 0.0
    rates = [factor(s) for s in range(120, new_total + 1)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))           # still only decreasing
    # the largest change of rate from one step to the next is that of a smooth decay
    assert max(a - b for a, b in zip(rates, rates[1:])) < 2 * math.pi / (new_total - 120)


def test_a_plan_shorter_than_twice_the_warmup_shortens_the_warmup_from_where_it_stands():
    factor = train_step.WarmupCosine(total_steps=10 ** 9, warmup_steps=100)
    factor.replan(6, 60)
    assert factor.warmup == 30 and factor(29) == 1.0 and factor(60) == 0.0
    factor = train_step.WarmupCosine(total_steps=10 ** 9, warmup_steps=100)
    factor.replan(6, 400)                          # room for the whole warmup: it stays
    assert factor.warmup == 100 and factor(6) == pytest.approx(0.07)


def test_the_plan_is_saved_with_the_scheduler_and_restored_by_it():
    def scheduler():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, train_step.WarmupCosine(10 ** 9, 5))
    trained = scheduler()
    for _ in range(30):
        trained.optimizer.step()
        trained.step()
    trained.lr_lambdas[0].replan(30, 90)
    resumed = scheduler()
    resumed.load_state_dict(trained.state_dict())
    assert [resumed.lr_lambdas[0](s) for s in range(30, 91)] == [trained.lr_lambdas[0](s) for s in range(30, 91)]


# ---- the plan -----------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def timing(validations=0, validation_s=0.0, checkpoints=0, checkpoint_s=0.0):
    return SimpleNamespace(validations=validations, validation_s=validation_s, checkpoints=checkpoints,
                           checkpoint_s=checkpoint_s)


def steps_at(clock, clock_budget, times, seconds_per_step, start=0):
    """Run `times` steps of seconds_per_step on the clock, measuring each; the last step's number."""
    for step in range(start + 1, start + times + 1):
        clock.now += seconds_per_step
        clock_budget.measure(step, timing())
    return start + times


def test_the_plan_fills_the_budget_with_steps_after_the_validations_checkpoints_and_end():
    clock = Clock()
    clock.now = 10.0                               # start-up
    plan_budget = budget.Budget(100.0, 0.0, val_items=0, batch_size=1, projector_items=0, clock=clock)
    step = steps_at(clock, plan_budget, 6, 0.5)    # the first step only sets the mark
    assert clock.now == 13.0 and plan_budget.step_s() == 0.5
    done = timing(validations=1, validation_s=4.0, checkpoints=1, checkpoint_s=1.0)
    plan = plan_budget.plan(step, done, lambda total: 3, lambda total: 2)
    # 100 - 13 used - 2 end - 3 x 4 validations - 2 x 1 checkpoints = 71 s: 142 steps of 0.5 s
    assert plan.total_steps == step + 142 and plan.end_s == budget.END_S
    assert f"{step + 142} steps planned at step {step}" in plan.describe(100.0)


def test_a_slower_machine_shortens_the_plan_and_a_faster_one_lengthens_it():
    clock = Clock()
    plan_budget = budget.Budget(60.0, 0.0, val_items=0, batch_size=1, projector_items=0, clock=clock)
    step = steps_at(clock, plan_budget, 6, 0.1)
    first = plan_budget.plan(step, timing(), lambda t: 0, lambda t: 0).total_steps
    step = steps_at(clock, plan_budget, budget.RECENT_STEPS, 0.2, start=step)   # another job takes a core
    slower = plan_budget.plan(step, timing(), lambda t: 0, lambda t: 0).total_steps
    step = steps_at(clock, plan_budget, budget.RECENT_STEPS, 0.1, start=step)   # and leaves
    faster = plan_budget.plan(step, timing(), lambda t: 0, lambda t: 0).total_steps
    assert slower < first and faster > slower
    # each plan ends where the steps left at the recent speed meet the budget
    assert faster == step + math.floor((60.0 - clock.now - budget.END_S) / 0.1 + 1e-9)


def test_a_resumed_run_counts_what_its_earlier_parts_used():
    clock = Clock()
    plan_budget = budget.Budget(100.0, 70.0, val_items=0, batch_size=1, projector_items=0, clock=clock)
    step = steps_at(clock, plan_budget, 6, 1.0, start=50)
    assert plan_budget.elapsed() == 76.0
    assert plan_budget.plan(step, timing(), lambda t: 0, lambda t: 0).total_steps == step + 22


@pytest.mark.parametrize("step,total,every,per_epoch,expected", [
    (0, 100, 0, 30, 4),        # epochs end at 30, 60, 90, and the last step validates
    (35, 100, 0, 30, 3),       # 60, 90, the end
    (0, 90, 0, 30, 3),         # 30, 60, and 90 is the end itself
    (0, 100, 25, 30, 4),       # 25, 50, 75, the end
    (99, 100, 25, 30, 1),
])
def test_validations_left_count_each_epoch_end_or_eval_every_and_the_end(step, total, every, per_epoch, expected):
    assert budget.validations_left(step, total, every, per_epoch) == expected
