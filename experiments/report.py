"""The paper's Table 4 (and 5) per game from results files and run workdirs, human-normalised aggregates with
95% stratified-bootstrap CIs (Agarwal et al. 2021, the rliable method), and a PNG of evaluation return vs real
interactions.

    python experiments/report.py results/short                                # a folder of results files (*.json)
    python experiments/report.py results/short/Seaquest.json runs/Pong-0x3     # files and workdirs mixed
    python experiments/report.py runs/BankHeist-0 --png=curves.png --json      # one JSON object instead of the table

Inputs: results files (`"format": "dlwm-jax-results/1"`, named <Game>.json), finished single-seed workdirs
(metrics.jsonl + summary.json), finished multi-seed workdirs (seed_<s>/ + aggregate.json) and workdirs holding a
results.json; a folder that is none of these is searched one level deep. Runs of one game from several inputs are
pooled when their presets and configs agree (seed and device-specific `compute` fields aside).
Reference scores (random, human, SimPLe, the paper's DLWM) come from experiments/reference_scores.json.
Bad input ends with one `error: ...` line on stderr and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from dlwm_jax.report import (ReportError, build_report, diagnostics_rows, format_diagnostics, format_table, gather,
                             merge_by_game, read_json, save_curves)

REFERENCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_scores.json")


def _json_safe(x):
    """x with NaN and inf as None (null): JSON has no NaN, and NaN here means 'not defined'."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="results files (<Game>.json), run workdirs, or folders of them")
    parser.add_argument("--png", help="learning-curve PNG (default: report.png in the first argument if it is a "
                                      "folder, else ./report.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's RNG")
    args = parser.parse_args(argv)
    try:
        if args.bootstrap < 1:
            raise ReportError(f"--bootstrap must be >= 1, got {args.bootstrap}")
        references = read_json(REFERENCE_PATH)
        games = merge_by_game(gather(args.paths))
        report = build_report(games, references, args.bootstrap, args.seed)
        report["diagnostics"] = {game: diagnostics_rows(runs) for game, runs in games.items()}
        png = args.png or os.path.join(args.paths[0] if os.path.isdir(args.paths[0]) else ".", "report.png")
        save_curves(png, games)
        report["png"] = png
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_json_safe(report), indent=1))
    else:
        print(format_table(report, references), end="")
        print("\n" + format_diagnostics(games), end="")
        print(f"learning curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
