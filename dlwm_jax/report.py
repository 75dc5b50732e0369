"""Finished runs read back and summarised: results files (format dlwm-jax-results/1, written by
dlwm_jax.results) and run workdirs as per-game runs (`gather`, `merge_by_game`), the paper's Table 4 (and 5)
rows with human-normalised aggregates (`build_report`, statistics in dlwm_jax.stats), per-iteration world-model
diagnostics, and learning curves. experiments/report.py is its command line. Bad input raises ReportError.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import NamedTuple, Sequence

import numpy as np

from dlwm_jax.stats import human_normalised, mean_of_game_means, median_of_game_means, normalised_aggregates, seed_stats

RESULTS_FORMAT = "dlwm-jax-results/1"  # dlwm_jax.results.RESULTS_FORMAT, not imported: reading needs no jax
STD_NOTE = "sample std over seeds (ddof=1)"
IGNORED_CONFIG_FIELDS = ("seed", "compute")  # a run's own seed; device-specific formulations of the same maths


class ReportError(Exception):
    """Bad input; its message is the one line experiments/report.py prints after `error: `."""


class SeedRun(NamedTuple):
    seed: int
    final_return: float
    real_steps: np.ndarray    # [I] real interactions when each evaluation ran
    eval_returns: np.ndarray  # [I] mean evaluation return of each evaluation
    iterations: tuple = ()    # [I] the raw per-iteration records (evaluation scalars + "diagnostics" dict or None)


class GameRuns(NamedTuple):
    game: str
    sources: tuple[str, ...]   # the paths the runs were read from
    preset: str | None         # None where the input does not say (workdirs)
    config: dict | None        # the run's config without IGNORED_CONFIG_FIELDS; None where unknown
    seeds: tuple[SeedRun, ...]
    random_agent: dict | None  # the results file's "random_agent" (measured under our protocol), if any


# ------------------------------------------------------------------------------------------------ reading

def read_json(path: str):
    """The JSON in `path`; ReportError (one line) if it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None


def _malformed(path: str, e: Exception) -> ReportError:
    what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
    return ReportError(f"{path}: malformed ({what})".replace("\n", " "))


def _config_key(config: dict | None) -> dict | None:
    return None if config is None else {k: v for k, v in config.items() if k not in IGNORED_CONFIG_FIELDS}


def load_results_file(path: str, check_name: bool = True) -> GameRuns:
    """A `dlwm-jax-results/1` file; its name must be <game>.json unless check_name is False (workdir/results.json)."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ReportError(f"{path}: not a {RESULTS_FORMAT} results file (format {found!r})")
    try:
        game = str(data["game"])
        seeds = tuple(SeedRun(int(s["seed"]), float(s["final_eval_return"]),
                              np.array([float(i["real_steps"]) for i in s["iterations"]]),
                              np.array([float(i["eval_return_mean"]) for i in s["iterations"]]),
                              tuple(s["iterations"]))
                      for s in data["seeds"])
        random_agent = data.get("random_agent")
        if random_agent is not None:
            random_agent = {**random_agent, "return_mean": float(random_agent["return_mean"])}
    except (KeyError, TypeError, ValueError) as e:
        raise _malformed(path, e) from None
    stem = os.path.splitext(os.path.basename(path))[0]
    if check_name and stem != game:
        raise ReportError(f"{path}: the file name says {stem!r} but its game is {game!r}")
    if not seeds:
        raise ReportError(f"{path}: no seeds")
    return GameRuns(game, (path,), data.get("preset"), _config_key(data.get("config")), seeds, random_agent)


def _read_metrics(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ReportError(f"{path}:{lineno}: not valid JSON") from None
    return records


def _evaluations(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("phase") == "evaluate"]


def _checkpoint_config(workdir: str) -> dict | None:
    """The config stored in the newest checkpoint's JSON meta (orbax layout <step>/meta/metadata), if readable."""
    steps = [d for d in glob.glob(os.path.join(workdir, "checkpoints", "*", "meta", "metadata"))
             if os.path.basename(os.path.dirname(os.path.dirname(d))).isdigit()]
    if not steps:
        return None
    newest = max(steps, key=lambda d: int(os.path.basename(os.path.dirname(os.path.dirname(d)))))
    try:
        with open(newest) as f:
            config = json.load(f).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def _progress(records: list[dict], config: dict | None) -> str:
    """'last evaluated iteration k of N (steps real steps)' from a run's metrics records."""
    evaluations = _evaluations(records)
    planned = (config or {}).get("schedule", {}).get("num_iterations")
    of = f" of {planned}" if planned else ""
    if not evaluations:
        return f"no iteration evaluated yet{of}"
    last = evaluations[-1]
    return f"last evaluated iteration {last.get('iteration')}{of} ({int(last.get('real_steps', 0)):,} real steps)"


def _load_seed_dir(run_dir: str) -> tuple[str, SeedRun]:
    """A finished single-seed run directory (metrics.jsonl + summary.json) -> (game, SeedRun)."""
    metrics_path, summary_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "summary.json")
    summary = read_json(summary_path)
    records = _read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    evaluations = _evaluations(records)
    diagnostics = {r.get("iteration"): r for r in records if r.get("phase") == "diagnostics"}
    try:
        if summary["final_eval_return_mean"] is None:
            raise ValueError("final_eval_return_mean is null: no evaluation ran")
        run = SeedRun(int(summary["seed"]), float(summary["final_eval_return_mean"]),
                      np.array([float(r["real_steps"]) for r in evaluations]),
                      np.array([float(r["eval_return_mean"]) for r in evaluations]),
                      tuple({**r, "diagnostics": diagnostics.get(r.get("iteration"))} for r in evaluations))
        return str(summary["game"]), run
    except (KeyError, TypeError, ValueError) as e:
        raise _malformed(summary_path, e) from None


def is_workdir(path: str) -> bool:
    """Whether `path` holds a run (finished or not) rather than being a folder of runs."""
    names = ("results.json", "metrics.jsonl", "summary.json", "aggregate.json")
    return (any(os.path.exists(os.path.join(path, n)) for n in names)
            or bool(glob.glob(os.path.join(path, "seed_*", "metrics.jsonl"))))


def load_workdir(workdir: str) -> GameRuns:
    """A finished run workdir (results.json, multi-seed seed_<s>/ + aggregate.json, or metrics.jsonl + summary.json)."""
    if os.path.exists(os.path.join(workdir, "results.json")):
        return load_results_file(os.path.join(workdir, "results.json"), check_name=False)
    config = _checkpoint_config(workdir)
    seed_dirs = sorted(d for d in glob.glob(os.path.join(workdir, "seed_*")) if os.path.isdir(d))
    if seed_dirs:
        aggregate_path = os.path.join(workdir, "aggregate.json")
        if not os.path.exists(aggregate_path):
            metrics = [os.path.join(d, "metrics.jsonl") for d in seed_dirs]
            records = _read_metrics(metrics[0]) if os.path.exists(metrics[0]) else []
            raise ReportError(f"{workdir}: multi-seed run still in progress (no aggregate.json): "
                              f"{_progress(records, config)} in {os.path.basename(seed_dirs[0])}")
        aggregate = read_json(aggregate_path)
        try:
            game, seeds = str(aggregate["game"]), [int(s) for s in aggregate["seeds"]]
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed(aggregate_path, e) from None
        runs = []
        for s in seeds:
            seed_dir = os.path.join(workdir, f"seed_{s}")
            seed_game, run = _load_seed_dir(seed_dir)
            if seed_game != game:
                raise ReportError(f"{seed_dir}: game {seed_game!r} but aggregate.json says {game!r}")
            runs.append(run)
        return GameRuns(game, (workdir,), None, _config_key(config), tuple(runs), None)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(os.path.join(workdir, "summary.json")):
        records = _read_metrics(metrics_path) if os.path.exists(metrics_path) else []
        raise ReportError(f"{workdir}: run still in progress (no summary.json): {_progress(records, config)}")
    game, run = _load_seed_dir(workdir)
    return GameRuns(game, (workdir,), None, _config_key(config), (run,), None)


def gather(paths: Sequence[str]) -> list[GameRuns]:
    """Every results file and workdir named by `paths` (a plain folder is searched one level deep)."""
    found = []
    for path in paths:
        if not os.path.exists(path):
            raise ReportError(f"{path}: no such file or directory")
        if os.path.isfile(path):
            found.append(load_results_file(path))
        elif is_workdir(path):
            found.append(load_workdir(path))
        else:
            files = sorted(glob.glob(os.path.join(path, "*.json")))
            workdirs = sorted(d for d in glob.glob(os.path.join(path, "*")) if os.path.isdir(d) and is_workdir(d))
            if not files and not workdirs:
                raise ReportError(f"{path}: no runs found (no results files *.json and no run workdirs)")
            found += [load_results_file(f) for f in files] + [load_workdir(d) for d in workdirs]
    return found


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _config_diff(a: dict, b: dict) -> str:
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    shown = ", ".join(f"{k} {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def merge_by_game(found: Sequence[GameRuns]) -> dict[str, GameRuns]:
    """One GameRuns per game (sorted by name), pooling the seeds of inputs whose preset and config agree."""
    games: dict[str, GameRuns] = {}
    for runs in found:
        if runs.game not in games:
            games[runs.game] = runs
            continue
        first = games[runs.game]
        a, b = first.sources[0], runs.sources[0]
        if first.preset is not None and runs.preset is not None and first.preset != runs.preset:
            raise ReportError(f"{runs.game} given twice with different presets: {a} ({first.preset}) vs {b} ({runs.preset})")
        if first.config is not None and runs.config is not None and first.config != runs.config:
            raise ReportError(f"{runs.game} given twice with different configs: {a} vs {b} "
                              f"({_config_diff(first.config, runs.config)})")
        taken = {s.seed for s in first.seeds}
        for s in runs.seeds:
            if s.seed in taken:
                raise ReportError(f"{runs.game} seed {s.seed} given twice: {', '.join(first.sources)} and {b}")
        games[runs.game] = GameRuns(runs.game, first.sources + runs.sources, first.preset or runs.preset,
                                    first.config or runs.config, tuple(sorted(first.seeds + runs.seeds, key=lambda s: s.seed)),
                                    first.random_agent or runs.random_agent)
    return dict(sorted(games.items()))


# ------------------------------------------------------------------------------------------------ report

def build_report(games: dict[str, GameRuns], references: dict, num_resamples: int, seed: int) -> dict:
    """Everything the table and the JSON output show; NaN stands for 'not defined' (std of one seed)."""
    rows, notes, normalised = [], [], {}
    for game, runs in games.items():
        finals = [s.final_return for s in runs.seeds]
        reference = references["games"].get(game)
        row = {"game": game, "sources": list(runs.sources), "preset": runs.preset,
               "seeds": [s.seed for s in runs.seeds], "final_returns": finals, "ours": seed_stats(finals),
               "random_agent_ours": runs.random_agent, "reference": reference}
        if reference is None:
            notes.append(f"{game} has no reference scores; it is left out of the normalised aggregates")
        else:
            normalised[game] = human_normalised(finals, reference["random"], reference["human"])
            row["ours_human_normalised"] = seed_stats(normalised[game])
        rows.append(row)
    if len(games) == 1:
        notes.append(f"only one game ({next(iter(games))}): the aggregates are that game's scores alone")
    aggregates = None
    if normalised:
        per_game = list(normalised.values())
        aggregates = {"games": list(normalised), "num_games": len(per_game),
                      "num_runs": int(sum(len(s) for s in per_game)),
                      "bootstrap": {"method": "stratified (runs resampled within each game), percentile interval",
                                    "num_resamples": num_resamples, "seed": seed},
                      "ours": normalised_aggregates(per_game, num_resamples, seed)}
        for column in ("dlwm_paper", "simple"):  # the published per-game means, for comparison (no CI: no runs)
            means = [human_normalised(references["games"][g][column]["mean"], references["games"][g]["random"],
                                      references["games"][g]["human"]).reshape(1) for g in normalised]
            aggregates[column] = {"mean": float(mean_of_game_means(means)), "median": float(median_of_game_means(means))}
    return {"format": "dlwm-jax-report/1", "std": STD_NOTE, "games": rows, "aggregates": aggregates, "notes": notes}


def _number(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def format_table(report: dict, references: dict) -> str:
    """The report as text: per game the Table 4/5 rows, then notes, then the normalised aggregates."""
    lines = [f"Final evaluation return (Tables 4 and 5 of the paper). ours: mean, std = {STD_NOTE}, median, "
             f"best = max over seeds; human-norm. = (mean - random) / (human - random).", ""]
    header = f"  {'':<26}{'mean':>12}{'std':>11}{'median':>12}{'best':>12}{'runs':>6}{'human-norm.':>13}"
    for row in report["games"]:
        ref, game = row["reference"], row["game"]
        preset = f"preset {row['preset']}, " if row["preset"] else ""
        lines += [f"{game}  ({preset}seeds {' '.join(map(str, row['seeds']))}; {', '.join(row['sources'])})", header]

        def line(label, mean, std=None, median=None, best=None, n=None, digits=1):
            norm = None if ref is None or mean is None else float(human_normalised(mean, ref["random"], ref["human"]))
            lines.append(f"  {label:<26}{_number(mean, digits):>12}{_number(std, digits):>11}{_number(median, digits):>12}"
                         f"{_number(best, digits):>12}{'-' if n is None else n:>6}{_number(norm, 3):>13}")

        ours = row["ours"]
        line("ours", ours["mean"], ours["std"], ours["median"], ours["best"], ours["n"], digits=2)
        measured = row["random_agent_ours"]
        if measured is not None:
            line("random agent, our protocol", measured["return_mean"], measured.get("return_std"),
                 n=len(measured.get("per_seed", [])) or None, digits=2)
        if ref is not None:
            line("random (reference)", ref["random"])
            line("human (reference)", ref["human"])
            for label, column in (("SimPLe", "simple"), ("DLWM paper", "dlwm_paper")):
                c = ref[column]
                line(label, c["mean"], c["std"], c["median"], c["best"], references["num_runs"][column])
        lines.append("")
    lines += [f"note: {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    aggregates = report["aggregates"]
    if aggregates is not None:
        b = aggregates["bootstrap"]
        lines += [f"Human-normalised score over {aggregates['num_games']} game(s) ({', '.join(aggregates['games'])}), "
                  f"{aggregates['num_runs']} runs; 95% CI: stratified bootstrap, {b['num_resamples']} resamples, seed {b['seed']}",
                  f"  {'':<8}{'ours':>10}  {'95% CI':<20}{'DLWM paper':>12}{'SimPLe':>10}   (paper columns: Table 4 means)"]
        for name, label in (("mean", "mean"), ("median", "median"), ("iqm", "IQM")):
            o = aggregates["ours"][name]
            ci = f"[{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}]"
            paper, simple = aggregates["dlwm_paper"].get(name), aggregates["simple"].get(name)
            lines.append(f"  {label:<8}{o['value']:>10.3f}  {ci:<20}{_number(paper, 3):>12}{_number(simple, 3):>10}")
    return "\n".join(lines).rstrip() + "\n"


def diagnostics_rows(runs: GameRuns) -> list[dict]:
    """Per iteration, means over the seeds that logged them: evaluation return, the world-model diagnostics
    (open-loop latent accuracy and its copy baseline at 1/5/10 steps; recall of +rewards, +predictions on zero
    steps) and the imagined vs real clipped return per 50 steps. Missing values are NaN."""
    num = max((len(s.iterations) for s in runs.seeds), default=0)
    rows = []
    for i in range(num):
        records = [s.iterations[i] for s in runs.seeds if i < len(s.iterations)]
        diags = [r["diagnostics"] for r in records if r.get("diagnostics")]
        mean = lambda values: float(np.mean(values)) if values else float("nan")
        pos = sum(sum(d.get(f"reward_pos_as_{p}", 0) for p in ("neg", "zero", "pos")) for d in diags)
        zero = sum(sum(d.get(f"reward_zero_as_{p}", 0) for p in ("neg", "zero", "pos")) for d in diags)
        row = {"iteration": records[0].get("iteration", i + 1), "real_steps": records[0].get("real_steps"),
               "eval_return": mean([r["eval_return_mean"] for r in records]),
               "model_iteration": diags[0].get("model_iteration") if diags else None,
               "pos_recall": sum(d.get("reward_pos_as_pos", 0) for d in diags) / pos if pos else float("nan"),
               "pos_count": pos,
               "zero_as_pos": sum(d.get("reward_zero_as_pos", 0) for d in diags) / zero if zero else float("nan"),
               "imagined_return": mean([r["imagined_return_mean"] for r in records if "imagined_return_mean" in r]),
               "real_return": mean([r["real_return_per_horizon"] for r in records if "real_return_per_horizon" in r])}
        for k in (1, 5, 10):
            row[f"latent_acc_{k}"] = mean([d[f"latent_acc_{k}"] for d in diags if f"latent_acc_{k}" in d])
            row[f"copy_acc_{k}"] = mean([d[f"copy_acc_{k}"] for d in diags if f"copy_acc_{k}" in d])
        rows.append(row)
    return rows


def format_diagnostics(games: dict[str, GameRuns]) -> str:
    """The per-iteration diagnostics of every game as text (see diagnostics_rows)."""
    lines = ["World-model diagnostics per iteration, means over seeds (model of iteration m on real data it has not "
             "trained on);", "latent acc = open-loop code accuracy 1/5/10 steps after 4 context frames (copy = "
             "'nothing moves'); +recall = +reward steps predicted +; 0->+ = zero steps predicted +;",
             "imag./real = clipped return per 50 steps in the policy's dreams / in the real evaluation.", ""]
    for game, runs in games.items():
        rows = diagnostics_rows(runs)
        if not rows:
            continue
        lines += [f"{game}", f"  {'iter':>4} {'steps':>7} {'return':>10}  {'m':>2} {'latent acc 1/5/10':>18} "
                             f"{'copy 1/5/10':>16} {'+recall':>12} {'0->+':>6} {'imag.':>6} {'real':>6}"]
        for r in rows:
            triple = lambda name: "/".join(_number(r[f"{name}_{k}"], 2) for k in (1, 5, 10))
            recall = f"{_number(r['pos_recall'], 2)} ({r['pos_count']:.0f})"
            lines.append(f"  {r['iteration']:>4} {r['real_steps'] or 0:>7,.0f} {_number(r['eval_return'], 1):>10}  "
                         f"{r['model_iteration'] or '-':>2} {triple('latent_acc'):>18} {triple('copy_acc'):>16} "
                         f"{recall:>12} {_number(r['zero_as_pos'], 3):>6} {_number(r['imagined_return'], 2):>6} "
                         f"{_number(r['real_return'], 2):>6}")
        lines.append("")
    return "\n".join(lines)


def save_curves(path: str, games: dict[str, GameRuns]) -> None:
    """One subplot per game: evaluation return vs real interactions; mean over seeds with a min..max band, each
    seed as a thin line, the random agent measured under our protocol as a dashed line when known."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(games))
    rows = math.ceil(len(games) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (game, runs) in zip(axes.flat, games.items()):
        length = min(len(s.eval_returns) for s in runs.seeds)  # evaluations every seed has
        steps = runs.seeds[0].real_steps[:length]
        returns = np.stack([s.eval_returns[:length] for s in runs.seeds])  # [S, I]
        for s in runs.seeds:
            ax.plot(s.real_steps, s.eval_returns, lw=0.7, alpha=0.5, color="tab:blue")
        ax.plot(steps, returns.mean(0), lw=2, color="tab:blue", marker="o", ms=3,
                label=f"mean over {len(runs.seeds)} seed(s); thin: each seed")
        ax.fill_between(steps, returns.min(0), returns.max(0), color="tab:blue", alpha=0.2, label="min..max over seeds")
        if runs.random_agent is not None:
            ax.axhline(runs.random_agent["return_mean"], ls="--", color="gray", label="random agent, our protocol")
        ax.set(title=game, xlabel="real interactions", ylabel="evaluation return")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(games):]:
        ax.set_visible(False)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise ReportError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
