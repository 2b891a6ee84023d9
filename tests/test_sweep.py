"""`raypack sweep` and `raypack analyze`: trials as overrides, a killed sweep resumed on a local Ray cluster,
and the analysis of a sweep recorded by hand in Tune's layout, its experiment state written by Tune's own Trial
(lr* ∝ batch^alpha recovered exactly).

    .venv/bin/pytest tests/test_sweep.py -q
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import free_port

from raypack.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- trials are overrides ------------------------------------------------------------------------------


def test_a_trial_is_the_base_config_plus_cli_overrides():
    from raypack.tune.sweep import search_space, trial_config, trial_overrides

    base = load_config("jobs/sweep-quick.yaml")
    params = {"arm": "bfd-isolated", "optim.lr": 1e-05, "train.global_batch_size": 16, "train.seed": 2}
    assert trial_overrides(params) == ["optim.lr=1.0e-05", "train.global_batch_size=16", "train.seed=2"]
    cfg = trial_config(base, params)
    assert (cfg.optim.lr, cfg.train.global_batch_size, cfg.train.seed) == (1e-05, 16, 2)
    assert cfg.data == base.data and cfg.pack == base.pack
    assert load_config("jobs/sweep-quick.yaml", trial_overrides(params)) == cfg  # the same as on the CLI

    space, num_samples = search_space(load_config("jobs/sweep-quick.yaml", [
        "sweep.lr={loguniform: [1.0e-5, 1.0e-3], samples: 4}", "sweep.seeds=2"]))
    assert num_samples == 4 and space["train.seed"] == {"grid_search": [0, 1]}
    assert space["arm"] == {"grid_search": ["padding", "bfd-isolated"]}


@pytest.mark.parametrize("override, key", [
    ("sweep.arms=[bfd-cross]", "sweep.arms"),
    ("sweep.global_batch_size=[6]", "sweep.global_batch_size"),
    ("sweep.lr={loguniform: [1.0e-3, 1.0e-5], samples: 2}", "sweep.lr"),
    ("sweep.lr=[1.0e-4, fast]", "sweep.lr[1]"),  # not a number: the message names the item
    ("sweep.trial_cpus=0", "sweep.trial_cpus"),
])
def test_bad_sweep_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config("jobs/sweep-quick.yaml", [override])


def test_the_best_trials_tasks_are_checked_before_anything_trains():
    """sweep.eval_best needs something to score: lm-eval tasks, or facts data's held-out questions alone; those
    without the chat template are refused, as a study refuses them (the sweep's run: the killed sweep below)."""
    from raypack.tune.sweep import _eval_specs

    facts = ["sweep.eval_best=true", "eval.preset=none", "synth.task=facts"]
    assert _eval_specs(load_config("jobs/sweep-quick.yaml", [*facts, "eval.apply_chat_template=true"])) == []
    with pytest.raises(ValueError, match="facts_heldout: .*set eval.apply_chat_template=true"):
        _eval_specs(load_config("jobs/sweep-quick.yaml", facts))
    with pytest.raises(ConfigError, match="sweep.eval_best needs lm-eval tasks: eval.preset is none .* no held-out"):
        _eval_specs(load_config("jobs/sweep-quick.yaml", facts[:2]))  # chain text: nothing to score
    assert _eval_specs(load_config("jobs/sweep-quick.yaml", ["sweep.eval_best=true", "eval.preset=offline"]))


def test_sweep_presets_load():
    quick, big = load_config("jobs/sweep-quick.yaml"), load_config("jobs/sweep-8b.yaml")
    assert len(quick.sweep.arms) * len(quick.sweep.lr) * len(quick.sweep.global_batch_size) == 2 * 4 * 2
    assert big.model.name_or_path == "meta-llama/Meta-Llama-3-8B" and big.train.use_gpu


# --- analysis of a sweep recorded by hand ---------------------------------------------------------------

LRS = [1e-4 * 2.0**k for k in range(-2, 7)]  # 2.5e-5 ... 6.4e-3, a factor 2 apart
BATCHES = [8, 16, 32]
LR_STAR = {"padding": lambda b: 1e-4 * (b / 8), "bfd-isolated": lambda b: 4e-4 * (b / 8) ** 0.5}


def constructed_loss(arm, batch, lr, seed):
    """A parabola in log lr with its minimum at LR_STAR[arm](batch); seeds shift it by a constant."""
    return 2.0 + math.log(lr / LR_STAR[arm](batch)) ** 2 + 0.01 * seed


def tune_trial_state(sweep, trial_id, config, status, last_result):
    """One trial's entry in Tune's experiment state, written by Tune's own Trial (stub: no trainable, no Ray)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    trial = Trial("run_trial", config=config, trial_id=trial_id, stub=True,
                  storage=StorageContext(str(sweep.parent), sweep.name, trial_dir_name=trial_id))
    trial.create_placement_group_factory()
    trial.set_status(status)
    trial.update_last_result(last_result)
    return trial.get_json_state()


def write_experiment_state(sweep, trial_states):
    (sweep / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trial_states}))


def write_trial(sweep, trial_id, params, losses, status="TERMINATED", stop_step=None):
    """One trial in Tune's layout (<id>/params.json, result.json) plus its raypack run logs; returns its entry
    in Tune's experiment state."""
    (sweep / trial_id).mkdir(parents=True)
    (sweep / trial_id / "params.json").write_text(json.dumps(params))
    run = sweep / "runs" / f"{trial_id}-{params['arm']}" / "raypack"
    run.mkdir(parents=True)
    metrics = [{"step": i + 1, "loss": v + 0.1, "val_loss": v, "num_tokens": 1000, "num_supervised_tokens": 600,
                "num_samples": 4, "step_time_s": 0.5} for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "events.jsonl").write_text(json.dumps({"event": "start", "step": 0,
                                                  "stop_step": stop_step or len(losses)}) + "\n")
    results = [{"step": m["step"], "val_loss": m["val_loss"], "trial_id": trial_id, "time_total_s": 10.0 + m["step"],
                "done": False} for m in metrics]
    results[-1]["done"] = status == "TERMINATED"
    (sweep / trial_id / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    return tune_trial_state(sweep, trial_id, params, status, results[-1])


@pytest.fixture(scope="module")
def recorded_sweep(tmp_path_factory):
    """2 arms x 9 LRs x 3 batch sizes, losses from constructed_loss; padding with seeds 0-2, bfd with seed 0
    only; plus an errored trial and an unfinished one (both with losses that would move lr* if counted) and
    one stopped early by ASHA (counted, with its last, poor loss); and a trial folder that Tune's experiment
    state does not list (not a trial)."""
    sweep = tmp_path_factory.mktemp("recorded") / "sweep-fixture"
    sweep.mkdir()
    (sweep / "config.yaml").write_text(yaml.safe_dump({"name": "fixture", "optim": {"lr": 1e-3},
                                                       "train": {"global_batch_size": 8, "seed": 0},
                                                       "sweep": {"metric": "val_loss"}}))
    states, n = [], 0
    for arm, seeds in (("padding", [0, 1, 2]), ("bfd-isolated", [0])):
        for seed in seeds:
            for batch in BATCHES:
                for lr in LRS:
                    params = {"arm": arm, "optim.lr": lr, "train.global_batch_size": batch, "train.seed": seed}
                    final = constructed_loss(arm, batch, lr, seed)
                    states.append(write_trial(sweep, f"t_{n:05d}", params, [final + 1.0, final + 0.5, final]))
                    n += 1
    bad = {"arm": "padding", "optim.lr": LRS[-1], "train.global_batch_size": 8, "train.seed": 0}
    states.append(write_trial(sweep, "t_error", bad, [0.1, 0.1], status="ERROR", stop_step=3))
    states.append(write_trial(sweep, "t_running", bad, [0.1], status="RUNNING", stop_step=3))
    states.append(write_trial(sweep, "t_stopped", {**bad, "optim.lr": LRS[0]}, [30.0], stop_step=3))
    write_trial(sweep, "t_stray", {**bad, "optim.lr": LRS[4]}, [0.1, 0.1, 0.1])
    write_experiment_state(sweep, states)
    from raypack.tune.analyze import analyze
    from raypack.tune.trials import load_trials

    return sweep, analyze(sweep, load_trials(sweep))


def test_analyze_writes_the_table_with_every_trial(recorded_sweep):
    import pandas as pd

    sweep, result = recorded_sweep
    table = pd.read_csv(sweep / "trials.csv")
    assert len(table) == 3 * 27 + 27 + 3 == result["num_trials"]
    assert pd.read_parquet(sweep / "trials.parquet").shape == table.shape
    status = dict(zip(table["trial_id"], table["status"]))
    assert (status["t_error"], status["t_running"], status["t_stopped"]) == ("error", "incomplete", "stopped early")
    assert (table["status"] == "finished").sum() == 108
    row = table[table["trial_id"] == "t_00000"].iloc[0]
    assert (row["arm"], row["lr"], row["global_batch_size"], row["seed"]) == ("padding", LRS[0], 8, 0)
    assert row["steps"] == row["planned_steps"] == 3 and row["tokens"] == 3000 and row["train_seconds"] == 1.5
    assert row["final_val_loss"] == pytest.approx(constructed_loss("padding", 8, LRS[0], 0))
    assert row["best_val_loss"] == row["final_val_loss"] == row["objective"] and row["wall_seconds"] == 13.0


def test_analyze_recovers_lr_star_and_alpha(recorded_sweep):
    _, result = recorded_sweep
    padding, bfd = result["alpha"]["padding"], result["alpha"]["bfd-isolated"]
    # lr* on the grid, exactly proportional to the batch size: alpha 1 from the grid and the parabola alike.
    assert padding["alpha"] == pytest.approx(1.0, abs=1e-9) and padding["alpha_grid"] == pytest.approx(1.0, abs=1e-9)
    assert [r["lr_star"] for r in result["lr_star"]["padding"]] == pytest.approx([1e-4, 2e-4, 4e-4])
    # Seeds shift the loss, not lr*: every seed-wise fit and every bootstrap resample gives 1.
    assert padding["seed_alphas"] == pytest.approx([1.0, 1.0, 1.0]) and padding["bootstrap_95"] == pytest.approx((1, 1))
    # lr* ∝ batch^0.5 falls between grid points at batch 16; the parabola in log lr finds it, the grid cannot.
    assert bfd["alpha"] == pytest.approx(0.5, abs=1e-9)
    assert [r["lr_star_interp"] for r in result["lr_star"]["bfd-isolated"]] == pytest.approx(
        [4e-4, 4e-4 * 2**0.5, 8e-4])
    assert bfd["seed_alphas"] == [] and bfd["bootstrap_95"] is None  # one seed: no uncertainty
    # Both arms' lr* lie on a power law: the fit's largest residual is a factor 1.
    assert padding["residual_factor"] == pytest.approx(1.0) and bfd["residual_factor"] == pytest.approx(1.0)


def test_the_power_laws_goodness_of_fit_needs_three_batch_sizes():
    from raypack.tune.analyze import fit_residual

    assert math.isnan(fit_residual([8, 16], [1e-3, 5e-3]))  # two points fit any line
    assert fit_residual([8, 16, 32, 64], [1e-3, 1e-3, 1e-3, 1e-3]) == 1.0  # flat: alpha 0, on the line
    # lr* up by 4x, then down by 2x: the least-squares line in log-log (slope ln 2 / 2 through the means) misses
    # the middle lr* by ln 4 - ln 2 and each end by (ln 2) / 2: the largest residual is a factor 2.
    assert fit_residual([8, 16, 32], [1e-3, 4e-3, 2e-3]) == pytest.approx(2.0, rel=1e-9)


def test_analyze_reports_best_configs_and_the_cost_of_the_other_arms_lr(recorded_sweep):
    sweep, result = recorded_sweep
    best = result["best"]
    assert (best["padding"]["lr"], best["padding"]["seed"]) == pytest.approx((1e-4, 0)) and \
        best["padding"]["global_batch_size"] == 8  # ties between batch sizes go to the first
    transfer = {(r["arm"], r["global_batch_size"]): r for r in result["transfer"]}
    # padding at bfd's lr* (4e-4 at batch 8: two grid steps away) loses (2 ln 2)^2.
    assert transfer[("padding", 8)]["worse_by"] == pytest.approx((2 * math.log(2)) ** 2)
    assert transfer[("padding", 32)]["worse_by"] == pytest.approx((math.log(2)) ** 2)
    text = (sweep / "analysis.md").read_text()
    assert "lr* ∝ batch^alpha" in text and "one seed: no uncertainty" in text
    for name in ("heatmaps.png", "loss_vs_lr.png", "best_curves.png", "lr_star_vs_batch.png"):
        assert (sweep / name).stat().st_size > 10_000, name


def test_the_objective_at_each_point_and_alpha_have_their_intervals(recorded_sweep):
    """padding: 3 seeds shifting the loss by 0, 0.01, 0.02, so each point's interval is scipy's t interval of
    those three values; its alpha is a measurement (lr* inside the grid, a bootstrap interval). bfd-isolated has
    one seed: no interval, so its alpha is not a measurement, and its points have no interval."""
    import scipy.stats

    sweep, result = recorded_sweep
    points = {(p["arm"], p["global_batch_size"], p["lr"]): p for p in result["points"]}
    at = points[("padding", 16, LRS[3])]  # not the lr of the early-stopped trial
    seeds = [constructed_loss("padding", 16, LRS[3], k) for k in range(3)]
    assert at["seeds"] == 3 and at["mean"] == pytest.approx(sum(seeds) / 3)
    assert (at["ci_lo"], at["ci_hi"]) == pytest.approx(scipy.stats.t.interval(
        0.95, 2, loc=sum(seeds) / 3, scale=scipy.stats.sem(seeds)))
    assert at["ci_hi"] - at["ci_lo"] == pytest.approx(2 * 4.3027 * 0.01 / math.sqrt(3), abs=1e-4)  # by hand
    assert points[("bfd-isolated", 16, LRS[3])]["seeds"] == 1 and math.isnan(points[("bfd-isolated", 16, LRS[3])]["ci_lo"])
    assert result["alpha"]["padding"]["not_a_measurement"] is None
    assert result["alpha"]["bfd-isolated"]["not_a_measurement"] == "no interval (one seed: set sweep.seeds >= 2)"
    text = (sweep / "analysis.md").read_text()
    assert "| padding | 1 | 1 | 1, 1, 1 | 0 | [1, 1] | 3 | 1 | yes |" in text
    assert "| bfd-isolated | 0.5 | 0.5 | - | - | - | 3 | 1 | not a measurement: no interval (one seed" in text
    lo, hi = at["ci_lo"], at["ci_hi"]
    assert f"| padding | 16 | 0.0002 | 3 | {at['mean']:.4g} [{lo:.4g}, {hi:.4g}] |" in text
    assert "## Objective at each point" in text


def test_the_bootstrap_interval_of_alpha_spans_the_seeds_alphas():
    """Two seeds with lr* ∝ batch^1 and ∝ batch^0.5 (parabolas of equal width in log lr): a resample of the seeds
    is {0, 0}, {1, 1} or {0, 1}, whose alphas are 1, 0.5 and 0.75 (the mean parabola's vertex is the mean log
    lr*), each extreme in about a quarter of the resamples, so the 95% percentile interval is exactly [0.5, 1]."""
    import pandas as pd

    from raypack.tune.analyze import COLUMNS, alpha_estimate

    star = {0: lambda b: 1e-4 * (b / 8), 1: lambda b: 1e-4 * (b / 8) ** 0.5}
    rows = [{"arm": "padding", "global_batch_size": b, "lr": lr, "seed": k, "status": "finished",
             "objective": 2.0 + math.log(lr / star[k](b)) ** 2} for k in (0, 1) for b in BATCHES for lr in LRS]
    est = alpha_estimate(pd.DataFrame(rows, columns=COLUMNS))
    assert est["seed_alphas"] == pytest.approx([1.0, 0.5]) and est["alpha"] == pytest.approx(0.75)
    assert est["bootstrap_95"] == pytest.approx((0.5, 1.0))
    # Negative control: seeds that agree (both lr* ∝ batch^1) give a zero-width interval.
    same = [{**r, "objective": 2.0 + math.log(r["lr"] / star[0](r["global_batch_size"])) ** 2} for r in rows]
    assert alpha_estimate(pd.DataFrame(same, columns=COLUMNS))["bootstrap_95"] == pytest.approx((1.0, 1.0))


def test_alpha_with_lr_star_at_the_grid_edge_is_not_a_measurement(tmp_path):
    """2 seeds x 2 batch sizes, lr* = 1e-4 x batch / 8 on grids whose lowest lr is lr* at batch 8: the
    bootstrap interval exists, yet alpha is not a measurement. Negative control: the same sweep with the grid
    widened by one lr below is one."""
    from raypack.tune.analyze import analyze
    from raypack.tune.trials import load_trials

    def sweep_of(name, lrs):
        sweep = tmp_path / name
        sweep.mkdir()
        write_experiment_state(sweep, [
            write_trial(sweep, f"t{k}{b}{i}", {"arm": "padding", "optim.lr": lr, "train.global_batch_size": b,
                                               "train.seed": k}, [constructed_loss("padding", b, lr, k)])
            for k in (0, 1) for b in (8, 16) for i, lr in enumerate(lrs)])
        return analyze(sweep, load_trials(sweep)), (sweep / "analysis.md").read_text()

    edge, text = sweep_of("edge", LRS[2:5])
    assert edge["alpha"]["padding"]["bootstrap_95"] is not None
    assert edge["alpha"]["padding"]["not_a_measurement"] == "lr* at the edge of the lr grid at batch size [8]"
    assert "| not a measurement: lr* at the edge of the lr grid at batch size [8] |" in text
    inside, text = sweep_of("inside", LRS[1:5])
    assert inside["alpha"]["padding"]["not_a_measurement"] is None and text.count("| yes |") == 1


def small_sweep(sweep):
    """3 LRs at one batch size, lr* = 1e-4 inside the grid."""
    sweep.mkdir()
    write_experiment_state(sweep, [
        write_trial(sweep, f"t{i}", {"arm": "padding", "optim.lr": lr, "train.global_batch_size": 8, "train.seed": 0},
                    [constructed_loss("padding", 8, lr, 0)]) for i, lr in enumerate(LRS[1:4])])
    return sweep


def test_analyze_says_when_there_are_too_few_points(tmp_path):
    from raypack.tune.analyze import analyze
    from raypack.tune.trials import load_trials

    sweep = small_sweep(tmp_path / "two")
    result = analyze(sweep, load_trials(sweep))
    assert math.isnan(result["alpha"]["padding"]["alpha"])
    text = (sweep / "analysis.md").read_text()
    assert "alpha needs at least 2 (too few points)" in text and "edge of the lr grid" not in text


def tune_state_by_json(sweep: Path) -> dict:
    """trial_id -> status, config and last result in the newest experiment_state-*.json (by name: one per
    session), read as plain JSON: an oracle apart from Tune's loader. {} while there is none, or it is being
    written."""
    states = sorted(sweep.glob("experiment_state-*.json")) if sweep.exists() else []
    try:
        entries = [(json.loads(state), json.loads(meta)) for state, meta in json.loads(states[-1].read_text())[
            "trial_data"]]
    except (IndexError, ValueError, KeyError):
        return {}
    return {s["trial_id"]: {"status": s["status"], "config": s["config"], "last_result": m["last_result"]}
            for s, m in entries}


def assert_records_match_tune_state(records, sweep):
    """Trials, their overrides, statuses and Tune's time_total_s are what Tune's experiment state says."""
    tune = tune_state_by_json(sweep)
    assert sorted(r["trial_id"] for r in records) == sorted(tune)
    status = {"TERMINATED": ("finished", "stopped early"), "ERROR": ("error",), "RUNNING": ("incomplete",),
              "PENDING": ("incomplete",)}
    for r in records:
        t = tune[r["trial_id"]]
        assert {k: t["config"][k] for k in ("arm", "optim.lr", "train.global_batch_size", "train.seed")} == {
            "arm": r["arm"], "optim.lr": r["lr"], "train.global_batch_size": r["global_batch_size"],
            "train.seed": r["seed"]}
        assert r["status"] in status[t["status"]] and r["wall_seconds"] == t["last_result"]["time_total_s"]


def test_the_trials_are_those_of_tunes_experiment_state(recorded_sweep):
    import pandas as pd

    sweep, _ = recorded_sweep
    assert_records_match_tune_state(pd.read_csv(sweep / "trials.csv").to_dict("records"), sweep)
    # Negative control: a trial folder with Tune's files and a run log, which the state does not list.
    assert (sweep / "t_stray" / "result.json").exists() and "t_stray" not in tune_state_by_json(sweep)


def test_analyze_neither_starts_nor_joins_ray(tmp_path):
    """`raypack analyze` in a fresh interpreter with no RAY_ADDRESS and a Ray temp folder of its own (so no
    running Ray instance can be found), given the folder as a relative path: it works, Ray is not initialized
    after it, and no Ray session folder was made."""
    sweep, ray_tmp = small_sweep(tmp_path / "two"), tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": str(ray_tmp)}
    code = ("import ray; from raypack.cli import main; rc = main(['analyze', 'two']); "
            "print('rc', rc, 'ray initialized', ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.stdout.splitlines()[-1] == "rc 0 ray initialized False", out.stderr[-3000:]
    assert (sweep / "trials.csv").exists() and not (ray_tmp / "ray").exists()


# --- a sweep on a local Ray cluster, killed and resumed -------------------------------------------------


def sweep_overrides(tmp):
    return [f"output_dir={tmp / 'out'}", f"prepare.output_dir={tmp / 'prepared'}", "synth.num_samples=80",
            "data.max_seq_len=256", "train.max_steps=2", "train.num_workers=1", "sweep.lr=[1.0e-3, 3.0e-3]", "sweep.global_batch_size=[8]",
            "sweep.seeds=1"]


# The killed sweep trains on facts (short questions about entities, with held-out phrasings) and scores each arm's
# best trial: no lm-eval benchmark, so the held-out questions alone are its tasks (capped at HELDOUT_LIMIT).
HELDOUT_LIMIT = 6
EVAL_BEST = ["synth.task=facts", "synth.num_entities=100", "synth.heldout_per_entity=1", "sweep.eval_best=true",
             "eval.preset=none", "eval.apply_chat_template=true", f"eval.limit={HELDOUT_LIMIT}"]


def trial_statuses(sweep: Path) -> dict:
    return {trial_id: t["status"] for trial_id, t in tune_state_by_json(sweep).items()}


def start_driver(args: list[str], tmp: Path, log_name: str) -> subprocess.Popen:
    """`raypack sweep ...` in its own process group, starting its own local Ray instance.

    Its state API points at a closed port. Ray 2.60's placement-group cleaner (one per Train run) finds the
    state API by auto-detection, which on a machine running several Ray instances can reach another one,
    not find the run's controller there and remove the live run's placement group (ray-project/ray#65447);
    a query that fails is taken as "unknown, keep watching" instead."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{free_port()}"
    with (tmp / log_name).open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "raypack.cli", "sweep", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory, mlflow_server):
    """2 arms x 2 LRs, 2 steps each, two trials at a time (jobs/sweep-quick.yaml), tracked on a real MLflow
    server. The driver is killed (with the Ray instance it started) once Tune's saved state has a finished
    trial; `raypack sweep --resume`, in a new process and Ray instance, finishes the rest."""
    tmp = tmp_path_factory.mktemp("sweep")
    args = ["jobs/sweep-quick.yaml", *sweep_overrides(tmp), *EVAL_BEST, "tracking.enabled=true",
            f"tracking.uri={mlflow_server}", "tracking.experiment=sweep-test"]
    sweep = tmp / "out" / "sweep" / "sweep-quick"
    driver = start_driver(args, tmp, "driver.log")
    try:
        deadline = time.monotonic() + 600
        while "TERMINATED" not in trial_statuses(sweep).values():
            assert driver.poll() is None, f"the sweep ended unkilled: {(tmp / 'driver.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(1.0)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and every trial process
        driver.wait()
    before = trial_statuses(sweep)
    done_before = {t for t, s in before.items() if s == "TERMINATED"}
    logs_before = {t: next((sweep / "runs").glob(f"{t}-*/raypack/metrics.jsonl")).read_text() for t in done_before}
    resumed = start_driver([*args, "--resume", str(sweep)], tmp, "resume.log")
    try:
        assert resumed.wait(timeout=600) == 0, (tmp / "resume.log").read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
            resumed.wait()
    return sweep, before, logs_before


def test_a_killed_sweep_resumes_only_its_missing_trials(resumed_sweep):
    from raypack.tune.trials import load_trials

    sweep, before, logs_before = resumed_sweep
    # Tune creates trials as it starts them (two at a time here): the killed driver had made 2 to 4 and
    # finished 1 to 3 of them.
    assert 1 <= len(logs_before) < 4 and len(before) <= 4
    trials = load_trials(sweep)
    assert len(trials) == 4 and set(before) <= {t["trial_id"] for t in trials}  # the same trials, none twice
    assert {(t["arm"], t["lr"]) for t in trials} == {(a, lr) for a in ("padding", "bfd-isolated")
                                                      for lr in (1e-3, 3e-3)}
    assert all(t["status"] == "finished" and t["steps"] == 2 and math.isfinite(t["final_val_loss"]) for t in trials)
    assert_records_match_tune_state(trials, sweep)  # the newest of the two sessions' experiment states
    assert len(list(sweep.glob("experiment_state-*.json"))) == 2
    for trial_id, text in logs_before.items():  # finished before the kill: not run again
        run = next((sweep / "runs").glob(f"{trial_id}-*")) / "raypack"
        assert (run / "metrics.jsonl").read_text() == text
        assert [e["event"] for e in read_jsonl(run / "events.jsonl")] == ["start", "checkpoint", "done"]


def test_validation_loss_reaches_tune_at_every_evaluation_step(resumed_sweep):
    """Step 1 of 2 has a validation loss and no checkpoint: its metrics-only report reaches Tune.

    A trial running when the driver was killed may have lost its buffered results (Tune's JSON logger
    writes them from the killed driver) and resumes from its step-2 checkpoint: it is held only to end
    with its summary. Every other trial (finished before the kill, or started after it) has both steps."""
    sweep, before, _ = resumed_sweep
    checked = 0
    for result_file in sweep.glob("*/result.json"):
        results = read_jsonl(result_file)
        assert results[-1]["fit_seconds"] > 0 and results[-1]["num_tokens"] > 0  # the trial's summary, last
        if before.get(result_file.parent.name) == "RUNNING":
            continue
        steps_with_val = [r["step"] for r in results if "val_loss" in r and "fit_seconds" not in r]
        assert 1 in steps_with_val and 2 in steps_with_val, result_file
        checked += 1
    assert checked >= 1


def test_each_arms_best_trial_is_scored_on_the_held_out_questions(resumed_sweep):
    """best_eval.json: per arm, the finished trial with the lowest final validation loss (found here from the trial
    records, not through raypack.tune.analyze), its exported model scored by lm-eval on the facts data's held-out
    questions, the only task (eval.preset=none), as a study scores them."""
    from raypack.eval.qa_task import HELDOUT_TASK
    from raypack.tune.trials import load_trials

    sweep, _, _ = resumed_sweep
    best = json.loads((sweep / "best_eval.json").read_text())
    trials = load_trials(sweep)
    assert set(best) == {"padding", "bfd-isolated"}
    for arm, entry in best.items():
        oracle = min((t for t in trials if t["arm"] == arm), key=lambda t: t["final_val_loss"])
        assert entry["trial_id"] == oracle["trial_id"] and entry["lr"] == oracle["lr"]
        (key,) = entry["scores"]  # one benchmark: the held-out questions, exact match
        assert key == f"{HELDOUT_TASK}/exact_match"
        assert round(entry["scores"][key] * HELDOUT_LIMIT, 9) in range(HELDOUT_LIMIT + 1)  # of eval.limit questions
    lines = (sweep / "tasks" / f"{HELDOUT_TASK}.jsonl").read_text().splitlines()
    assert len(lines) == 100 and all(json.loads(line)["answer"] for line in lines)  # one per entity


def test_analyze_on_the_resumed_sweep(resumed_sweep, capsys):
    import pandas as pd

    from raypack.cli import main

    sweep, _, _ = resumed_sweep
    assert main(["analyze", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "alpha padding:" in out and "1 batch size with usable trials" in out
    assert "a measurement? |" in out  # analysis.md's alpha table, with its verdict column
    table = pd.read_csv(sweep / "trials.csv")
    assert len(table) == 4 and set(table["status"]) == {"finished"} and (table["tokens"] > 0).all()


def test_the_resumed_sweep_is_tracked_in_mlflow(resumed_sweep, mlflow_server, capsys):
    """Read back with MlflowClient: one sweep run (the resume reused it), one child per trial (a trial killed
    mid-run and run again keeps its run), each child's params its overrides and its per-step metrics its
    metrics.jsonl; `raypack analyze` adds the analysis to the sweep's run."""
    from mlflow.tracking import MlflowClient

    from raypack.cli import main
    from raypack.tune.trials import load_trials

    sweep, _, _ = resumed_sweep
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("sweep-test").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`raypack.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = {t["trial_id"]: t for t in load_trials(sweep)}
    assert sorted(c.info.run_name for c in children) == sorted(trials)
    for child in children:
        trial = trials[child.info.run_name]
        assert child.info.status == "FINISHED" and child.data.tags["raypack.arm"] == trial["arm"]
        assert float(child.data.params["optim.lr"]) == trial["lr"]
        metrics = read_jsonl(Path(trial["run_dir"]) / "raypack" / "metrics.jsonl")
        for key in ("loss", "val_loss", "tokens_per_sec"):
            logged = sorted(client.get_metric_history(child.info.run_id, key), key=lambda m: m.timestamp)
            assert {m.step: m.value for m in logged} == {m["step"]: m[key] for m in metrics if key in m}, key
        assert child.data.metrics["final/val_loss"] == trial["final_val_loss"]
    assert main(["analyze", str(sweep)]) == 0
    assert "logged trials.csv" in capsys.readouterr().out
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "analysis")}
    assert {"analysis/trials.csv", "analysis/analysis.md", "analysis/heatmaps.png"} <= logged
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_analyze_imports_no_ray():
    """The analysis works on records; importing it loads no Ray (STYLE.md)."""
    code = "import sys, raypack.tune.analyze; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
