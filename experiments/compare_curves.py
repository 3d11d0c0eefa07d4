"""Accuracy per machine minute of several Navier-Stokes runs on one plot, beside the paper's numbers.

    python experiments/compare_curves.py navier_stokes_cpu_long navier_stokes_cpu_3h \
        navier_stokes_cpu_3h_latents144 navier_stokes_cpu_3h_heun --name navier_stokes_cpu_runs

Reads the test curves that ``experiments/test_curve.py`` wrote (experiments/results/<run>_test_curve.json: the
standard protocol of the test split at checkpoints, with the machine minutes spent to reach each) and draws
test t_in and t_out against machine minutes for every run, with the paper's ENF numbers (Table 2, periodic)
and persistence as horizontal lines. The table beside it gives, for each run, its last two points and how
fast its error was still falling between them (the factor per 10 machine minutes): measured slopes, which say
how far each curve is from the paper's line.

Writes experiments/results/<name>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from enfpde.plotting import _new_figure

RESULTS = Path(__file__).parent / "results"
PAPER = {"t_in": 1.57e-3, "t_out": 1.16e-2}  # ENF-PDE Table 2, ENF periodic, test split (enfpde.paper)


def load_curve(run: str) -> list[dict]:
    path = RESULTS / f"{run}_test_curve.json"
    if not path.exists():
        raise SystemExit(f"no test curve for '{run}': expected {path} (write it with experiments/test_curve.py).")
    rows = json.loads(path.read_text())
    if not rows:
        raise SystemExit(f"{path} holds no checkpoints.")
    return sorted(rows, key=lambda r: r["machine_min"])


def tail_summary(rows: list[dict]) -> dict:
    """Best and last points of one curve and the rate its t_in fell over its last stretch.

    The rate is the ratio of t_in at the last checkpoint to t_in at the checkpoint closest to 10 machine minutes
    before it, scaled to 10 minutes (geometric): 0.5 means it halved per 10 minutes there; >= 1 means flat.
    """
    last = rows[-1]
    earlier = [r for r in rows[:-1] if r["machine_min"] <= last["machine_min"] - 5.0]
    summary = {
        "last_minutes": last["machine_min"],
        "last_t_in": last["model"]["t_in"],
        "last_t_out": last["model"]["t_out"],
        "best_t_in": min(r["model"]["t_in"] for r in rows),
        "best_t_out": min(r["model"]["t_out"] for r in rows),
        "rate_per_10_min": None,
        "rate_from_minutes": None,
    }
    if earlier:
        ref = min(earlier, key=lambda r: abs(r["machine_min"] - (last["machine_min"] - 10.0)))
        span = last["machine_min"] - ref["machine_min"]
        ratio = last["model"]["t_in"] / ref["model"]["t_in"]
        summary["rate_per_10_min"] = float(ratio ** (10.0 / span))
        summary["rate_from_minutes"] = ref["machine_min"]
    return summary


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    fig = _new_figure(11.0, 4.2, 100)
    axes = fig.subplots(1, 2)
    for ax, part in zip(axes, ("t_in", "t_out")):
        for run, rows in curves.items():
            ax.plot([r["machine_min"] for r in rows], [r["model"][part] for r in rows], marker="o", markersize=3,
                    label=run)
        persistence = next(iter(curves.values()))[-1]["persistence"][part]
        ax.axhline(persistence, linestyle=":", color="grey", label="persistence")
        ax.axhline(PAPER[part], linestyle="--", color="black", label="paper (ENF, periodic)")
        ax.axvline(180.0, linestyle="-.", color="tab:red", alpha=0.5, label="3 hours")
        ax.set_yscale("log")
        ax.set_xlim(0, 190)
        ax.set_xlabel("training cost (machine minutes: CPU time / 2 cores)")
        ax.set_ylabel(f"test {part} (MSE, data units)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("Navier-Stokes on the torus: test error against training cost on a 2-core CPU")
    fig.savefig(path)


def markdown(curves: dict[str, list[dict]], summaries: dict[str, dict], command: str, name: str) -> str:
    lines = [
        "# Navier-Stokes: test error against machine minutes, every measured run",
        "",
        f"Command: `{command}`. Each curve is a run's test curve (experiments/results/<run>_test_curve.md: the",
        "standard protocol of the test split, 16 trajectories, at kept checkpoints); machine minutes are CPU seconds",
        f"of training divided by 2 cores. Paper (ENF, periodic): t_in {PAPER['t_in']:.2e}, t_out {PAPER['t_out']:.2e}.",
        "",
        "| run | last checkpoint (machine min) | t_in there | t_out there | best t_in | t_in / paper | "
        "t_in factor per 10 min over the last stretch |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, s in summaries.items():
        rate = ("-" if s["rate_per_10_min"] is None
                else f"{s['rate_per_10_min']:.2f} (from {s['rate_from_minutes']:.1f} min)")
        lines.append(f"| {run} | {s['last_minutes']:.1f} | {s['last_t_in']:.2e} | {s['last_t_out']:.2e} | "
                     f"{s['best_t_in']:.2e} | {s['last_t_in'] / PAPER['t_in']:.1f}x | {rate} |")
    lines += ["", f"![curves]({name}.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="names of test curves in experiments/results (<run>_test_curve.json)")
    parser.add_argument("--name", required=True, help="results are written as experiments/results/<name>.*")
    args = parser.parse_args()

    curves = {run: load_curve(run) for run in args.runs}
    summaries = {run: tail_summary(rows) for run, rows in curves.items()}
    command = "python experiments/compare_curves.py " + " ".join(args.runs) + f" --name {args.name}"
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summaries, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(curves, summaries, command, args.name))
    plot(curves, RESULTS / f"{args.name}.png")
    for run, s in summaries.items():
        print(f"{run}: t_in {s['last_t_in']:.2e} at {s['last_minutes']:.1f} machine min; "
              f"factor per 10 min {s['rate_per_10_min']}")


if __name__ == "__main__":
    main()
