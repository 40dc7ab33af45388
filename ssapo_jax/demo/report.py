"""Summaries of the demo's measurements: mean and spread over seeds, the table and the plot.

Per-round measurements (one dict per arm, seed and round) have the keys ``round``,
``win_rate`` (oracle win rate of greedy outputs against the SFT model's greedy outputs on the
held-out prompts, ties counting half), ``mean_score``, ``exact`` (fraction of exact answers),
``agreement`` (fraction of the round's self-annotated pairs whose chosen response the oracle
also prefers; None for rounds trained on given labels), ``oracle_ties`` (fraction of those
pairs the oracle scores equal) and ``num_pairs``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

METRICS = ("win_rate", "mean_score", "exact", "agreement")


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
  vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  if not vals:
    return None, None
  arr = np.asarray(vals, np.float64)
  return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(runs: Mapping[str, Sequence[Mapping]]) -> list[dict]:
  """Mean and sample standard deviation over seeds, per round.

  Args:
    runs: seed name -> list of per-round measurement dicts (see the module docstring).

  Returns:
    One dict per round index present in any seed: ``round``, ``num_seeds`` and
    ``<metric>_mean`` / ``<metric>_std`` for each of `METRICS`.
  """
  rounds = sorted({m["round"] for per_seed in runs.values() for m in per_seed})
  out = []
  for r in rounds:
    ms = [m for per_seed in runs.values() for m in per_seed if m["round"] == r]
    row = {"round": r, "num_seeds": len(ms)}
    for name in METRICS:
      row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([m.get(name) for m in ms])
    out.append(row)
  return out


def _cell(mean, std, pct: bool = False) -> str:
  if mean is None:
    return "–"
  if pct:
    return f"{mean:.1%}" if not std else f"{mean:.1%} ± {std:.1%}"
  return f"{mean:.3f}" if not std else f"{mean:.3f} ± {std:.3f}"


def _metric_cells(row: Mapping) -> tuple[str, str, str, str]:
  """Win rate, oracle score, exact share and self-label agreement of one summary row."""
  return (
    _cell(row["win_rate_mean"], row["win_rate_std"]),
    _cell(row["mean_score_mean"], row["mean_score_std"]),
    _cell(row["exact_mean"], row["exact_std"], pct=True),
    _cell(row["agreement_mean"], row["agreement_std"], pct=True),
  )


def format_table(arms: Mapping[str, Mapping]) -> str:
  """A text table: one line per arm and round with win rate, score, exact and agreement.

  ``arms`` maps an arm name to a dict with ``label`` and ``summary`` (from `summarise`).
  """
  header = (
    f"{'arm':<34}{'round':>6}{'win rate vs SFT':>20}{'oracle score':>18}"
    f"{'exact':>16}{'self-label agreement':>23}"
  )
  lines = [header, "-" * len(header)]
  for arm in arms.values():
    for row in arm["summary"]:
      win, score, exact, agreement = _metric_cells(row)
      lines.append(
        f"{arm['label']:<34}{row['round']:>6}{win:>20}{score:>18}{exact:>16}{agreement:>23}"
      )
  return "\n".join(lines)


def format_markdown(arms: Mapping[str, Mapping]) -> str:
  """The same table in Markdown (for the README and docs/demo.md)."""
  lines = [
    "| arm | round | win rate vs SFT | oracle score | exact | self-label agreement |",
    "|---|---|---|---|---|---|",
  ]
  for arm in arms.values():
    for row in arm["summary"]:
      lines.append("| " + " | ".join([arm["label"], str(row["round"]), *_metric_cells(row)]) + " |")
  return "\n".join(lines)


def plot_win_rates(arms: Mapping[str, Mapping], path: str, *, title: str) -> str:
  """Writes a PNG of win rate per round per arm (mean ± s.d. over seeds); returns ``path``."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  max_round = max(row["round"] for arm in arms.values() for row in arm["summary"])
  for arm in arms.values():
    rows = [r for r in arm["summary"] if r["win_rate_mean"] is not None]
    xs = [r["round"] for r in rows]
    ys = np.array([r["win_rate_mean"] for r in rows])
    es = np.array([r["win_rate_std"] or 0.0 for r in rows])
    if len(rows) == 1 and arm.get("flat"):
      line = ax.axhline(
        ys[0], linestyle="--", linewidth=1.2, label=arm["label"], color=arm.get("color")
      )
      ax.axhspan(ys[0] - es[0], ys[0] + es[0], alpha=0.12, color=line.get_color())
      continue
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=arm["label"], color=arm.get("color"))
  ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="SFT model (0.5)")
  ax.set_xticks(range(max_round + 1))
  ax.set_xlabel("round (0 = DPO on the labelled seed)")
  ax.set_ylabel("oracle win rate vs SFT (ties = ½)")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, loc="best")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
