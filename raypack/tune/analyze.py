"""`raypack analyze SWEEP_DIR`: a sweep's trials as one table, plots, and the learning rate that suits each
arm at each batch size (pure: works on the trials' records, imports no ray).

    raypack analyze out/sweep/sweep-quick

The records come from raypack.tune.trials.load_trials: one per trial that Ray Tune's experiment state lists (read
through Tune's result API, no Ray running), with its figures from the trial's own log under
runs/<trial_id>-<arm>/raypack/. Writes into the sweep folder (raypack.tune.sweep):

    trials.csv, trials.parquet  one row per trial: trial_id, arm, lr, global_batch_size, seed, status
                                (finished, stopped early (ASHA), error, incomplete), steps, planned_steps,
                                tokens, supervised_tokens, train_seconds (sum of step times), wall_seconds
                                (Tune's time_total_s), final_train_loss, best_val_loss, best_val_step,
                                final_val_loss, objective (the final val_loss, or train loss: sweep.metric)
    analysis.md                 best config per arm; lr* per batch size; the exponent alpha in
                                lr* ∝ batch^alpha with its interval, or why it is not a measurement;
                                the objective at each point with its interval over seeds; what each
                                arm loses with the other arm's lr*
    heatmaps.png, loss_vs_lr.png, best_curves.png, lr_star_vs_batch.png

How lr* and alpha are found, per arm: the objective of finished and early-stopped trials is averaged over
seeds at each (batch size, lr); lr*(B) is the lr with the lowest mean ("grid lr*"), and the vertex of a
parabola in log lr through it and its two neighbours ("interpolated lr*"; the grid point itself when it is
at the edge of the grid, which the notes flag). alpha is the least-squares slope of log lr* against log B
(interpolated lr*; the grid-lr* slope is shown beside it). With several seeds the same fit is made per
seed (spread of alpha over seeds) and on 1000 bootstrap resamples of the seeds (95% percentile interval).
With 3 batch sizes or more, the fit's largest residual (as a factor on lr*) says whether a power law fits at all.
alpha is reported as "not a measurement" (and why) when an arm's lr* sits at the edge of its lr grid at some
batch size, when it has fewer than 2 batch sizes, or when it has no interval (one seed). The objective at every
point is shown as its mean with a 95% Student-t interval over seeds (raypack.stats), and loss_vs_lr.png draws each
seed's trial beside the means.

    >>> round(fit_alpha([8, 16, 32], [1e-3, 2e-3, 4e-3]), 6)
    1.0
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from raypack.stats import estimate
from raypack.train.metrics import read_metrics

DONE = ("finished", "stopped early")
BOOTSTRAP_RESAMPLES = 1000
COLUMNS = ["trial_id", "arm", "lr", "global_batch_size", "seed", "status", "steps", "planned_steps", "tokens",
           "supervised_tokens", "samples", "train_seconds", "wall_seconds", "final_train_loss", "best_val_loss",
           "best_val_step", "final_val_loss", "objective", "run_dir"]


def _log_points(batches, lrs) -> tuple[np.ndarray, np.ndarray]:
    """log batch and log lr of the (batch, lr) pairs where both are finite."""
    x, y = np.log(np.asarray(batches, float)), np.log(np.asarray(lrs, float))
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def fit_alpha(batches, lrs) -> float:
    """Least-squares slope of log lr against log batch (lr ∝ batch^alpha); nan with < 2 batch sizes."""
    x, y = _log_points(batches, lrs)
    if len(np.unique(x)) < 2:
        return math.nan
    return float(np.round(np.polyfit(x, y, 1)[0], 9)) + 0.0  # no -1e-16 for a flat lr*


def fit_residual(batches, lrs) -> float:
    """How far lr* strays from the fitted power law: exp of the largest |residual| of log lr against its
    least-squares line in log batch (1.0: on the line); nan with < 3 batch sizes (2 points fit any line).

    >>> fit_residual([8, 16, 32], [1e-3, 2e-3, 4e-3]), round(fit_residual([8, 16, 32], [1e-3, 4e-3, 2e-3]), 3)
    (1.0, 2.0)
    """
    x, y = _log_points(batches, lrs)
    if len(np.unique(x)) < 3:
        return math.nan
    slope, intercept = np.polyfit(x, y, 1)
    return float(np.round(np.exp(np.abs(y - (slope * x + intercept)).max()), 9))


def lr_star(lrs, losses) -> tuple[float, float, bool]:
    """(grid lr*, interpolated lr*, at the grid's edge) at one batch size, lrs ascending."""
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    i = int(np.nanargmin(losses))
    if i == 0 or i == len(lrs) - 1 or not np.isfinite(losses[i - 1:i + 2]).all():
        return float(lrs[i]), float(lrs[i]), len(lrs) < 3 or i in (0, len(lrs) - 1)
    x = np.log(lrs[i - 1:i + 2])
    a, b, _ = np.polyfit(x, losses[i - 1:i + 2], 2)
    vertex = -b / (2 * a) if a > 0 else x[1]
    return float(lrs[i]), float(np.exp(np.clip(vertex, x[0], x[2]))), False


def _usable(df: pd.DataFrame) -> pd.DataFrame:
    """Finished and early-stopped trials with a finite objective."""
    return df[df["status"].isin(DONE) & np.isfinite(df["objective"].astype(float))]


POINT_COLUMNS = ["arm", "global_batch_size", "lr", "mean", "std", "seeds", "ci_lo", "ci_hi"]


def _points(df: pd.DataFrame) -> pd.DataFrame:
    """The objective over seeds at each (arm, batch size, lr) of usable trials: mean, sample sd, number of seeds
    and 95% Student-t interval (raypack.stats.estimate; sd and interval NaN with one seed)."""
    rows = []
    for (arm, batch, lr), group in _usable(df).groupby(["arm", "global_batch_size", "lr"]):
        e = estimate(group["objective"].astype(float))
        rows.append([arm, batch, lr, e.mean, math.nan if e.sd is None else e.sd, e.n,
                     *(e.ci if e.ci else (math.nan, math.nan))])
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


def _lr_star_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per batch size of one arm: lr* (grid and interpolated), its objective, lrs tried, edge flag."""
    rows = []
    for batch, group in points.sort_values("lr").groupby("global_batch_size"):
        grid, interp, edge = lr_star(group["lr"], group["mean"])
        best = group.loc[group["mean"].idxmin()]
        rows.append({"global_batch_size": batch, "lr_star": grid, "lr_star_interp": interp, "at_edge": edge,
                     "objective": float(best["mean"]), "objective_ci_lo": float(best["ci_lo"]),
                     "objective_ci_hi": float(best["ci_hi"]), "seeds": int(best["seeds"]), "num_lrs": len(group)})
    return pd.DataFrame(rows, columns=["global_batch_size", "lr_star", "lr_star_interp", "at_edge", "objective",
                                       "objective_ci_lo", "objective_ci_hi", "seeds", "num_lrs"])


def alpha_estimate(arm_trials: pd.DataFrame, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """alpha for one arm's trials: from the seed means, per seed, and bootstrapped over seeds."""
    table = _lr_star_table(_points(arm_trials))
    out = {"alpha": fit_alpha(table["global_batch_size"], table["lr_star_interp"]),
           "alpha_grid": fit_alpha(table["global_batch_size"], table["lr_star"]),
           "residual_factor": fit_residual(table["global_batch_size"], table["lr_star_interp"]),
           "num_batch_sizes": len(table), "table": table, "seed_alphas": [], "bootstrap_95": None}
    seeds = sorted(_usable(arm_trials)["seed"].unique())
    if len(seeds) < 2 or table.empty:
        return out
    # (batch size, lr) x seed matrix of the objective; a resample of seeds averages some of its columns.
    matrix = _usable(arm_trials).pivot_table(index=["global_batch_size", "lr"], columns="seed",
                                             values="objective", aggfunc="mean")
    keys = matrix.index.to_frame(index=False).sort_values(["global_batch_size", "lr"])
    groups = [(batch, rows.index.to_numpy(), rows["lr"].to_numpy())
              for batch, rows in keys.groupby("global_batch_size")]
    values = matrix.to_numpy()
    out["seed_alphas"] = [_alpha_of(groups, values[:, j]) for j in range(values.shape[1])]
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a (batch, lr) that no resampled seed ran
        boots = np.array([_alpha_of(groups, np.nanmean(values[:, rng.integers(0, len(seeds), len(seeds))], axis=1))
                          for _ in range(resamples)])
    if np.isfinite(boots).any():
        out["bootstrap_95"] = tuple(float(v) for v in np.nanpercentile(boots, [2.5, 97.5]))
    return out


def not_a_measurement(est: dict) -> str | None:
    """Why an arm's alpha is not a measurement, or None when it is: it needs 2 batch sizes or more, every lr*
    inside its lr grid (at an edge the optimum may lie outside it) and an interval (2 seeds or more)."""
    if est["num_batch_sizes"] < 2 or not math.isfinite(est["alpha"]):
        return "fewer than 2 batch sizes with usable trials"
    edges = [int(b) for b, e in zip(est["table"]["global_batch_size"], est["table"]["at_edge"]) if e]
    if edges:
        return f"lr* at the edge of the lr grid at batch size {edges}"
    if est["bootstrap_95"] is None:
        return "no interval (one seed: set sweep.seeds >= 2)"
    return None


def _alpha_of(groups: list, means: np.ndarray) -> float:
    """alpha (interpolated lr*) from mean objectives; groups: (batch size, its rows, their lrs ascending)."""
    batches, stars = [], []
    for batch, rows, lrs in groups:
        ok = np.isfinite(means[rows])
        if ok.any():
            batches.append(batch)
            stars.append(lr_star(lrs[ok], means[rows][ok])[1])
    return fit_alpha(batches, stars)


def _alpha_notes(arm: str, est: dict) -> list[str]:
    notes, n = [], est["num_batch_sizes"]
    if n < 2:
        notes.append(f"{arm}: {n} batch size with usable trials: alpha needs at least 2 (too few points).")
    elif n == 2:
        notes.append(f"{arm}: 2 batch sizes: the line passes through both points exactly, so alpha has no "
                     "goodness of fit; add batch sizes to test the power law.")
    elif math.isfinite(est["residual_factor"]):
        notes.append(f"{arm}: {n} batch sizes: the interpolated lr* lies within a factor "
                     f"{_g(est['residual_factor'], 3)} of the fitted power law (its largest residual; compare the lr "
                     "grid's spacing).")
    edges = [int(b) for b, e in zip(est["table"]["global_batch_size"], est["table"]["at_edge"]) if e]
    if edges:
        notes.append(f"{arm}: lr* is at the edge of the lr grid at batch size {edges}: the optimum may lie "
                     "outside the grid; widen sweep.lr.")
    if not est["seed_alphas"]:
        notes.append(f"{arm}: one seed: no uncertainty for alpha (set sweep.seeds >= 2).")
    elif len(est["seed_alphas"]) < 5:
        notes.append(f"{arm}: {len(est['seed_alphas'])} seeds: the spread and bootstrap interval are rough.")
    return notes


def best_trials(records: list[dict]) -> dict[str, dict]:
    """Per arm, the trial with the lowest objective at the arm's best (batch size, lr) point."""
    df = pd.DataFrame(records, columns=COLUMNS)
    points = _points(df)
    best = {}
    for arm in dict.fromkeys(df["arm"]):
        group = points[points["arm"] == arm]
        if group.empty:
            continue
        top = group.loc[group["mean"].idxmin()]
        trials = df[(df["arm"] == arm) & (df["global_batch_size"] == top["global_batch_size"])
                    & np.isclose(df["lr"], top["lr"], rtol=1e-9) & df["status"].isin(DONE)]
        row = trials.loc[trials["objective"].astype(float).idxmin()].to_dict()
        best[arm] = {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
    return best


def transfer(points: pd.DataFrame, stars: dict[str, pd.DataFrame]) -> list[dict]:
    """How much worse each arm is at another arm's grid lr* (same batch size), when that lr was run."""
    rows = []
    for arm, own in stars.items():
        for other, theirs in stars.items():
            if other == arm:
                continue
            for _, mine in own.iterrows():
                batch = mine["global_batch_size"]
                match = theirs[theirs["global_batch_size"] == batch]
                if match.empty:
                    continue
                their_lr = float(match["lr_star"].iloc[0])
                at = points[(points["arm"] == arm) & (points["global_batch_size"] == batch)
                            & np.isclose(points["lr"], their_lr, rtol=1e-9)]
                value = float(at["mean"].iloc[0]) if len(at) else math.nan
                rows.append({"arm": arm, "global_batch_size": int(batch), "lr_star": mine["lr_star"],
                             "other_arm": other, "other_lr_star": their_lr, "objective": mine["objective"],
                             "objective_at_other": value, "worse_by": value - mine["objective"]})
    return rows


def analyze(sweep_dir: str | Path, records: list[dict]) -> dict:
    """trials.csv/.parquet, analysis.md and the plots of the sweep's trial records (raypack.tune.trials) into
    the sweep folder; returns the key numbers."""
    sweep = Path(sweep_dir)
    if not records:
        raise ValueError(f"{sweep}: no trials found: Tune's experiment state lists none yet")
    df = pd.DataFrame(records, columns=COLUMNS)
    df.to_csv(sweep / "trials.csv", index=False)
    df.to_parquet(sweep / "trials.parquet", index=False)
    points = _points(df)
    arms = list(dict.fromkeys(df["arm"]))
    estimates = {arm: alpha_estimate(df[df["arm"] == arm]) for arm in arms}
    stars = {arm: est["table"] for arm, est in estimates.items()}
    result = {"num_trials": len(df), "status": df["status"].value_counts().to_dict(),
              "best": best_trials(records), "transfer": transfer(points, stars),
              "alpha": {arm: {**{k: v for k, v in est.items() if k != "table"},
                              "not_a_measurement": not_a_measurement(est)} for arm, est in estimates.items()},
              "lr_star": {arm: t.to_dict("records") for arm, t in stars.items()},
              "points": points.to_dict("records")}
    result["plots"] = plot(df, points, estimates, result["best"], sweep)
    best_eval = json.loads((sweep / "best_eval.json").read_text()) if (sweep / "best_eval.json").exists() else {}
    (sweep / "analysis.md").write_text(markdown(sweep, df, result, estimates, best_eval))
    return result


def _g(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _mean_ci(mean: float, lo: float, hi: float) -> str:
    """'mean [lo, hi]' (4 significant digits), the mean alone where there is no interval (one seed)."""
    return _g(float(mean)) + (f" [{_g(float(lo))}, {_g(float(hi))}]" if math.isfinite(lo) else "")


def _objective(table: pd.DataFrame, trial: dict) -> str:
    """The objective at an arm's best (batch size, lr*) with its interval over seeds."""
    row = table[table["global_batch_size"] == trial["global_batch_size"]].iloc[0]
    return _mean_ci(row["objective"], row["objective_ci_lo"], row["objective_ci_hi"])


def markdown(sweep: Path, df: pd.DataFrame, result: dict, estimates: dict, best_eval: dict) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in result["status"].items())
    base = yaml.safe_load((sweep / "config.yaml").read_text()) if (sweep / "config.yaml").exists() else {}
    metric = base.get("sweep", {}).get("metric", "val_loss")
    what = "final training loss" if metric == "loss" else "final validation loss (per token, shared held-out split)"
    lines = [f"# Sweep analysis: {sweep.name}", "", (f"{len(df)} trials: {counts}. Objective: {what}; mean over "
                                                      "seeds of finished and early-stopped trials [its 95% "
                                                      "Student-t interval over seeds, where a point has 2 or more]."),
             "", "## Best config per arm", "",
             "| arm | lr | global batch | objective | seeds | best trial | steps | tokens | train s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, t in result["best"].items():
        point = estimates[arm]["table"]
        seeds = int(((df["arm"] == arm) & (df["global_batch_size"] == t["global_batch_size"])
                     & np.isclose(df["lr"], t["lr"]) & df["status"].isin(DONE)).sum())
        lines.append(f"| {arm} | {_g(t['lr'], 3)} | {t['global_batch_size']} | {_objective(point, t)} | {seeds} "
                     f"| {t['trial_id']} | {t['steps']} | {t['tokens']:,} | {_g(t['train_seconds'], 3)} | "
                     f"{_g(t['wall_seconds'], 3)} |")
    lines += ["", "## Best learning rate per batch size", "",
              "| arm | global batch | lr* (grid) | lr* (interpolated) | objective at lr* | lrs tried | edge |",
              "|---|---|---|---|---|---|---|"]
    for arm, est in estimates.items():
        for _, r in est["table"].iterrows():
            lines.append(f"| {arm} | {int(r['global_batch_size'])} | {_g(r['lr_star'], 3)} | "
                         f"{_g(r['lr_star_interp'], 3)} | {_mean_ci(r['objective'], r['objective_ci_lo'], r['objective_ci_hi'])} | "
                         f"{int(r['num_lrs'])} | "
                         f"{'yes' if r['at_edge'] else ''} |")
    lines += ["", "## lr* ∝ batch^alpha", "",
              "alpha is a measurement when every lr* is inside its lr grid and alpha has an interval (the 95% "
              "bootstrap over seeds: 2 seeds or more); otherwise the table says it is not a measurement and why.", "",
              "| arm | alpha | alpha (grid lr*) | alpha per seed | sd over seeds | bootstrap 95% | batch sizes | "
              "fit: largest residual (factor) | a measurement? |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for arm, est in estimates.items():
        seed_alphas = [a for a in est["seed_alphas"] if math.isfinite(a)]
        spread = _g(float(np.std(seed_alphas, ddof=1)), 3) if len(seed_alphas) > 1 else "-"
        boot = "[{}, {}]".format(*(_g(v, 3) for v in est["bootstrap_95"])) if est["bootstrap_95"] else "-"
        per_seed = ", ".join(_g(a, 3) for a in est["seed_alphas"]) or "-"
        why = not_a_measurement(est)
        lines.append(f"| {arm} | {_g(est['alpha'], 3)} | {_g(est['alpha_grid'], 3)} | {per_seed} | {spread} | "
                     f"{boot} | {est['num_batch_sizes']} | {_g(est['residual_factor'], 3)} | "
                     f"{f'not a measurement: {why}' if why else 'yes'} |")
        notes += _alpha_notes(arm, est)
    lines += [""] + [f"- {n}" for n in notes]
    lines += ["", "## Objective at each point", "", "Mean over seeds [95% Student-t interval over seeds; a point with one "
              "seed has none].", "",
              "| arm | global batch | lr | seeds | objective |", "|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['arm']} | {int(p['global_batch_size'])} | {_g(p['lr'], 3)} | {int(p['seeds'])} | "
                     f"{_mean_ci(p['mean'], p['ci_lo'], p['ci_hi'])} |")
    if result["transfer"]:
        lines += ["", "## With the other arm's lr* (same batch size)", "",
                  "| arm | global batch | own lr* | objective | other arm | its lr* | objective there | worse by |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["transfer"]:
            lines.append(f"| {r['arm']} | {r['global_batch_size']} | {_g(r['lr_star'], 3)} | {_g(r['objective'])} "
                         f"| {r['other_arm']} | {_g(r['other_lr_star'], 3)} | {_g(r['objective_at_other'])} | "
                         f"{_g(r['worse_by'], 3)} |")
        lines.append("\n'-': that lr was not run for this arm at this batch size.")
    if best_eval:
        tasks = sorted({t for e in best_eval.values() for t in e["scores"]})
        lines += ["", "## lm-eval of each arm's best trial", "", "| arm | trial | " + " | ".join(tasks) + " |",
                  "|---" * (len(tasks) + 2) + "|"]
        for arm, e in best_eval.items():
            lines.append(f"| {arm} | {e['trial_id']} | " + " | ".join(_g(e["scores"].get(t)) for t in tasks) + " |")
    lines += ["", "Table: trials.csv / trials.parquet. Plots: " + ", ".join(result["plots"]) + ".", ""]
    return "\n".join(lines)


def plot(df: pd.DataFrame, points: pd.DataFrame, estimates: dict, best: dict, out: Path) -> list[str]:
    """The analysis PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(estimates)
    written = []
    if not points.empty:
        _heatmaps(plt, points, arms, out / "heatmaps.png")
        _loss_vs_lr(plt, points, _usable(df), arms, out / "loss_vs_lr.png")
        _lr_star_vs_batch(plt, estimates, out / "lr_star_vs_batch.png")
        written += ["heatmaps.png", "loss_vs_lr.png", "lr_star_vs_batch.png"]
    if best:
        _best_curves(plt, best, out / "best_curves.png")
        written.append("best_curves.png")
    return written


def _heatmaps(plt, points: pd.DataFrame, arms: list[str], path: Path) -> None:
    vmin, vmax = points["mean"].min(), points["mean"].max()
    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms) + 1, 4), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        grid = points[points["arm"] == arm].pivot_table(index="lr", columns="global_batch_size", values="mean")
        image = ax.imshow(np.ma.masked_invalid(grid.to_numpy()), origin="lower", aspect="auto", vmin=vmin,
                          vmax=vmax, cmap="viridis_r")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8, color="w")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{lr:.2g}" for lr in grid.index])
        ax.set_xlabel("global batch size (rows)")
        ax.set_title(arm)
    axes[0][0].set_ylabel("learning rate")
    fig.colorbar(image, ax=axes[0].tolist(), label="objective (mean over seeds)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_vs_lr(plt, points: pd.DataFrame, trials: pd.DataFrame, arms: list[str], path: Path) -> None:
    """Per arm, the objective vs lr at each batch size: the mean with its 95% interval over seeds, and each
    seed's trial as a small dot."""
    fig, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 4), squeeze=False, sharey=True)
    for ax, arm in zip(axes[0], arms):
        for i, (batch, group) in enumerate(points[points["arm"] == arm].sort_values("lr").groupby("global_batch_size")):
            colour = plt.cm.tab10(i % 10)
            yerr = [(group["mean"] - group["ci_lo"]).fillna(0.0), (group["ci_hi"] - group["mean"]).fillna(0.0)]
            ax.errorbar(group["lr"], group["mean"], yerr=yerr, marker="o", capsize=3, color=colour,
                        label=f"batch {batch}")
            seeds = trials[(trials["arm"] == arm) & (trials["global_batch_size"] == batch)]
            ax.plot(seeds["lr"], seeds["objective"].astype(float), ".", color=colour, alpha=0.5, ms=4)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("learning rate")
        ax.set_title(arm)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("objective (mean, 95% interval; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lr_star_vs_batch(plt, estimates: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (arm, est) in enumerate(estimates.items()):
        t, colour = est["table"], plt.cm.tab10(i % 10)
        if t.empty:
            continue
        ax.plot(t["global_batch_size"], t["lr_star_interp"], "o", color=colour,
                label=f"{arm}: alpha {_g(est['alpha'], 3)}")
        ax.plot(t["global_batch_size"], t["lr_star"], "x", color=colour, alpha=0.5)
        if math.isfinite(est["alpha"]):
            b = np.asarray(t["global_batch_size"], float)
            c = np.mean(np.log(t["lr_star_interp"]) - est["alpha"] * np.log(b))
            ax.plot(b, np.exp(c) * b ** est["alpha"], "-", color=colour)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size (rows)")
    ax.set_ylabel("best learning rate (o interpolated, x grid)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best_curves(plt, best: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (arm, trial) in enumerate(best.items()):
        metrics, colour = read_metrics(Path(trial["run_dir"]) / "raypack"), plt.cm.tab10(i % 10)
        tag = f"{arm} (lr {trial['lr']:.2g}, batch {trial['global_batch_size']})"
        tokens = np.cumsum([m["num_tokens"] for m in metrics])
        val = [(m["step"], t, m["val_loss"]) for m, t in zip(metrics, tokens) if m.get("val_loss") is not None]
        axes[0].plot([m["step"] for m in metrics], [m["loss"] for m in metrics], color=colour, lw=1, alpha=0.5)
        axes[0].plot([v[0] for v in val], [v[2] for v in val], "o-", color=colour, label=tag)
        axes[1].plot([v[1] for v in val], [v[2] for v in val], "o-", color=colour, label=tag)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("loss per token (line: train, o: validation)")
    axes[1].set_xlabel("real tokens trained")
    axes[1].set_ylabel("validation loss per token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
