"""The run plan (raypack.train.plan) against a plain-Python oracle, the batch arithmetic and the LR schedule.

    .venv/bin/pytest tests/test_plan.py -q

Pure Python: no Ray, no DeepSpeed. That the training loop takes exactly the
plan's steps is checked on a real run in tests/test_train.py.
"""

import doctest
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from raypack.config import ConfigError, OptimConfig, TrainConfig
from raypack.train import plan as plan_module
from raypack.train.plan import (EVAL_POINTS, gradient_accumulation_steps, lr_at, rows_for_token_batch,
                                run_plan)


def oracle(num_rows, num_tokens, world, train, optim, eval_points=0):
    """The plan worked out by walking the run: whole steps cut from the rows, epoch after epoch, until the
    epochs or train.max_steps run out; then the steps that evaluate and checkpoint, listed one by one."""
    rows_per_pass = world * train.micro_batch_size
    rows = train.global_batch_size
    if train.global_batch_tokens:  # the whole passes whose rows hold the nearest to that many tokens
        mean, target = num_tokens / num_rows, train.global_batch_tokens
        rows = min((rows_per_pass * k for k in range(1, 10_000)), key=lambda r: abs(r * mean - target))
    per_epoch, used = 0, 0
    while used + rows <= num_rows:
        used, per_epoch = used + rows, per_epoch + 1
    walked = []
    for epoch, step in itertools.product(range(train.epochs), range(per_epoch)):
        if train.max_steps and len(walked) == train.max_steps:
            break
        walked.append((epoch, step))
    stop = len(walked)
    schedule = train.schedule_steps or train.epochs * per_epoch
    every = train.eval_every_steps
    if not every and eval_points:  # the smallest cadence whose eval_points points reach the last step
        every = next(k for k in itertools.count(1) if k * eval_points >= stop)
    return {
        "rows_per_step": rows, "grad_accum": rows // rows_per_pass, "steps_per_epoch": per_epoch,
        "total_steps": train.epochs * per_epoch, "stop_step": stop, "schedule_steps": schedule,
        "warmup_steps": next(w for w in itertools.count(0) if w >= optim.warmup_ratio * schedule),
        "eval_every_steps": every,
        "evaluations": [d for d in range(1, stop + 1) if (every and d % every == 0) or d == stop],
        "checkpoints": [d for d in range(1, stop + 1) if d == stop or d % per_epoch == 0
                        or (train.checkpoint_every_steps and d % train.checkpoint_every_steps == 0)],
    }


# (num_rows, num_tokens), world size, train overrides, optim overrides, eval_points
CASES = [
    ((359, 171163), 2, dict(num_workers=2, micro_batch_size=2, global_batch_size=8), {}, 0),  # quickstart padding
    ((168, 171163), 2, dict(num_workers=2, micro_batch_size=2, global_batch_size=8, epochs=3, max_steps=50),
     dict(warmup_ratio=0.2), EVAL_POINTS),  # a max_steps stop in the third epoch
    ((168, 171163), 2, dict(num_workers=2, micro_batch_size=2, global_batch_size=8, global_batch_tokens=20000,
                            epochs=2), {}, EVAL_POINTS),  # token-defined batch: 5 passes of 4 rows
    ((359, 171163), 2, dict(num_workers=2, micro_batch_size=2, global_batch_size=8, global_batch_tokens=4000),
     {}, 0),  # token-defined batch on padded rows: 8 rows
    ((1000, 500_000), 4, dict(num_workers=4, micro_batch_size=1, global_batch_size=32, epochs=2,
                              schedule_steps=100, eval_every_steps=7, checkpoint_every_steps=5),
     dict(warmup_ratio=0.33), EVAL_POINTS),  # given cadences win over eval_points
    ((97, 9700), 1, dict(num_workers=1, micro_batch_size=3, global_batch_size=12, epochs=5, max_steps=21),
     dict(warmup_ratio=0.0), 4),
]


@pytest.mark.parametrize("rows, world, train_kw, optim_kw, eval_points", CASES)
def test_run_plan_matches_the_oracle(rows, world, train_kw, optim_kw, eval_points):
    train, optim = TrainConfig(**train_kw), OptimConfig(**optim_kw)
    manifest = SimpleNamespace(num_rows=rows[0], num_tokens=rows[1])
    plan = run_plan(train, optim, manifest, world, eval_points)
    expected = oracle(*rows, world, train, optim, eval_points)
    got = {key: getattr(plan, key) for key in expected if hasattr(plan, key)}
    got["evaluations"] = [d for d in range(1, plan.stop_step + 1) if plan.evaluates_at(d)]
    got["checkpoints"] = [d for d in range(1, plan.stop_step + 1) if plan.checkpoints_at(d)]
    assert got == expected
    assert plan.rows_per_step == plan.grad_accum * train.micro_batch_size * world


def test_the_token_defined_batch_and_a_max_steps_stop_by_hand():
    train = TrainConfig(num_workers=2, micro_batch_size=2, global_batch_size=8, global_batch_tokens=20000, epochs=2,
                        max_steps=10)
    plan = run_plan(train, OptimConfig(warmup_ratio=0.2), SimpleNamespace(num_rows=168, num_tokens=171163), 2,
                    EVAL_POINTS)
    # 1018.8 tokens a row: 20000 / (1018.8 x 4) = 4.9 passes -> 5 passes of 4 rows; 168 // 20 = 8 steps an epoch.
    assert (plan.rows_per_step, plan.grad_accum, plan.steps_per_epoch, plan.total_steps) == (20, 5, 8, 16)
    # The run stops at 10, the schedule spans all 16 steps; 10 points of 1 step.
    assert (plan.stop_step, plan.schedule_steps, plan.warmup_steps, plan.eval_every_steps) == (10, 16, 4, 1)


def test_rows_that_cannot_fill_a_step_are_refused():
    few = SimpleNamespace(num_rows=7, num_tokens=70)
    with pytest.raises(ValueError, match="7 rows cannot fill one optimizer step of 8 rows"):
        run_plan(TrainConfig(num_workers=2, global_batch_size=8), OptimConfig(), few, 2)


@pytest.mark.parametrize("train_kw, stop", [
    (dict(epochs=2), 42),  # every epoch: 2 x 21 steps
    (dict(epochs=2, max_steps=30), 30),  # a max_steps stop inside the epochs
])
def test_a_schedule_shorter_than_the_run_is_refused_and_one_that_spans_it_is_not(train_kw, stop):
    """train.schedule_steps below the stop step would leave the loop's steps past the schedule without an LR
    (lr_at raises there, on every rank): run_plan refuses it, naming the key and the stop step. The accepted
    plans (the schedule = the stop step, longer, or 0) give every step the loop takes an LR."""
    manifest, optim = SimpleNamespace(num_rows=170, num_tokens=170_000), OptimConfig(warmup_ratio=0.2)
    base = dict(num_workers=2, micro_batch_size=2, global_batch_size=8, **train_kw)
    for short in (stop - 1, stop // 2):
        with pytest.raises(ConfigError, match=rf"train.schedule_steps={short} is shorter than the {stop} optimizer "
                                              rf"steps.*train.max_steps={short} "):
            run_plan(TrainConfig(**base, schedule_steps=short), optim, manifest, 2)
    # Negative control, what the refusal prevents: the loop's steps past such a schedule have no LR.
    with pytest.raises(ValueError, match="step"):
        [lr_at(step, stop // 2, optim) for step in range(stop)]
    for schedule in (stop, stop + 5, 0):
        plan = run_plan(TrainConfig(**base, schedule_steps=schedule), optim, manifest, 2)
        assert plan.stop_step == stop and plan.schedule_steps == (schedule or 42)
        lrs = [lr_at(step, plan.schedule_steps, optim) for step in range(plan.stop_step)]
        assert max(lrs) == pytest.approx(optim.lr) and all(lr >= 0 for lr in lrs)
    assert lrs[-1] > 0  # the full schedule still decays on past step 42 (it ends at 0 at step 42 itself)


def test_module_examples():
    assert doctest.testmod(plan_module).failed == 0


# ------------------------------------------------------------ batch arithmetic


@pytest.mark.parametrize("global_batch, micro, world, expected", [(128, 2, 32, 2), (128, 2, 1, 64), (4, 2, 2, 1)])
def test_gradient_accumulation_steps(global_batch, micro, world, expected):
    assert gradient_accumulation_steps(global_batch, micro, world) == expected


@pytest.mark.parametrize("global_batch, micro, world", [(128, 3, 2), (2, 2, 2), (128, 2, 0)])
def test_gradient_accumulation_steps_must_divide(global_batch, micro, world):
    with pytest.raises(ValueError, match="train.global_batch_size.*train.micro_batch_size or train.num_workers"):
        gradient_accumulation_steps(global_batch, micro, world)


def test_token_defined_batch_gives_each_arm_rows_holding_about_the_same_tokens():
    # 4 rows per pass (2 workers x micro-batch 2). Packed rows hold ~4000 tokens, padded rows ~600.
    packed = rows_for_token_batch(65536, num_tokens=4000 * 100, num_rows=100, rows_per_pass=4)
    padded = rows_for_token_batch(65536, num_tokens=600 * 700, num_rows=700, rows_per_pass=4)
    assert (packed, padded) == (16, 108)
    assert packed * 4000 == pytest.approx(65536, rel=0.05) and padded * 600 == pytest.approx(65536, rel=0.05)
    assert rows_for_token_batch(10, num_tokens=4000, num_rows=1, rows_per_pass=4) == 4  # at least one pass
    with pytest.raises(ValueError):
        rows_for_token_batch(0, 10, 1, 4)




def test_cosine_schedule_values():
    optim = OptimConfig(lr=1e-5, warmup_ratio=0.2, min_lr_ratio=0.0)
    assert lr_at(0, 10, optim) == 0.0  # warmup starts at 0, as in transformers
    assert lr_at(1, 10, optim) == pytest.approx(5e-6)
    assert lr_at(2, 10, optim) == pytest.approx(1e-5)  # end of warmup: the peak
    assert lr_at(6, 10, optim) == pytest.approx(5e-6)  # half way through the decay
    assert lr_at(9, 10, optim) == pytest.approx(1e-5 * 0.5 * (1 + np.cos(np.pi * 7 / 8)))  # the last step
    assert lr_at(10, 10, optim) == pytest.approx(0.0, abs=1e-20)
    assert lr_at(10, 10, OptimConfig(lr=1e-5, min_lr_ratio=0.1)) == pytest.approx(1e-6)


def test_schedule_follows_the_arms_own_step_count():
    """Pitfall 5: a packed arm with fewer steps still warms up and decays fully."""
    optim = OptimConfig(lr=1e-5, warmup_ratio=0.2)
    for total in (7, 1000):
        lrs = [lr_at(s, total, optim) for s in range(total + 1)]
        assert max(lrs) == pytest.approx(1e-5) and lrs[-1] == pytest.approx(0.0, abs=1e-20)


def test_constant_schedule_values():
    optim = OptimConfig(lr=2e-5, schedule="constant", warmup_ratio=0.25)
    assert [lr_at(s, 8, optim) for s in range(9)] == pytest.approx([0, 1e-5] + [2e-5] * 7)
    assert lr_at(0, 8, OptimConfig(schedule="constant", warmup_ratio=0.0)) == 1e-5


@pytest.mark.parametrize("total, warmup_ratio", [(10, 0.2), (37, 0.2), (5, 0.0), (3, 1.0)])
def test_schedules_match_transformers(total, warmup_ratio):
    lr = 1e-5
    warmup = int(np.ceil(warmup_ratio * total))
    for schedule, make in [
        ("cosine", lambda opt: get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1)),
        ("constant", lambda opt: get_constant_schedule_with_warmup(opt, warmup)),
    ]:
        scheduler = make(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr))
        optim = OptimConfig(lr=lr, schedule=schedule, warmup_ratio=warmup_ratio, min_lr_ratio=0.1)
        expected = [lr * scheduler.lr_lambdas[0](s) for s in range(total + 1)]
        assert [lr_at(s, total, optim) for s in range(total + 1)] == pytest.approx(expected, rel=1e-12, abs=1e-20)


def test_lr_at_refuses_steps_out_of_range():
    for step, total in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(ValueError, match="step"):
            lr_at(step, total, OptimConfig())
