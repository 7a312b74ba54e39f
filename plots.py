"""
Pictures of hrm-poh runs: training curves, solved mazes, the prediction refining over inner steps, head usage
per step, and sweep results. Everything writes a PNG with matplotlib's Agg backend (no display needed).

    python plots.py runs/maze12-hrm-s0                 # -> runs/maze12-hrm-s0/curves.png
    python plots.py runs/maze12-hrm-s0 --out docs/curves.png
    python plots.py --segments m12.json m24.json --out segments.png   # optimal against segments, per evaluation

sample_maze.py draws mazes and head heatmaps with these functions; ab.py draws its sweep plot with sweep_plot.
"""

import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from stats import summarize  # noqa: E402

DPI = 80  # small files: the docs/ PNGs stay well under 150 KB
COLORS = {"true": "#2ca02c", "pred": "#1f77b4", "wrong": "#d62728", "missed": "#ff7f0e",
          "start": "#9467bd", "goal": "#000000"}


def read_metrics(run_dir):
    """The records of <run_dir>/metrics.jsonl grouped by split: {"train": [...], "val": [...], "test": [...]}."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics log at {path}")
    out = {"train": [], "val": [], "test": []}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                out.setdefault(record["split"], []).append(record)
    return out


def score_keys(val, test):
    """The held-out metrics to plot: numeric entries of the validation records (and of the test record, when
    there is one), without bookkeeping such as steps, timings and the per-segment lists."""
    skip = {"step", "split", "steps_used", "n_test", "per_segment", "train_seconds", "temperature", "head_min",
            "modal_max", "unique"}  # unique: the share of mazes with one shortest path, a property of the data
    keys = [k for k, v in val[0].items() if k not in skip and isinstance(v, (int, float))] if val else []
    return [k for k in keys if k in test[-1]] if test else keys


def plot_run(run_dir, out_png=None):
    """Training loss, held-out metrics and routing entropy over optimizer steps, side by side, as one PNG."""
    out_png = out_png or os.path.join(run_dir, "curves.png")
    log = read_metrics(run_dir)
    train, val, test = log["train"], log["val"], log["test"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    steps = [r["step"] for r in train]

    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in train], label="loss", color="k")
    if train and "task" in train[0]:
        ax.plot(steps, [r["task"] for r in train], label="task part", color="C1", alpha=0.7)
    losses = [r["loss"] for r in train if r["loss"] > 0]
    if losses and max(losses) > 10 * min(losses):  # log scale only when the loss falls by orders of magnitude
        ax.set_yscale("log")
    ax.set(title="training loss", xlabel="optimizer step")
    ax.legend(fontsize=8)

    ax = axes[1]
    for i, key in enumerate(score_keys(val, test)):
        # line styles differ too: reach, optimal and exact coincide on perfect mazes
        ax.plot([r["step"] for r in val], [r[key] for r in val], marker=".", label=key, color=f"C{i}",
                ls=("-", "--", ":", "-.")[i % 4])
        if test:  # the single test measurement, drawn at the last step so it reads as the end point
            ax.plot([test[-1]["step"]], [test[-1][key]], marker="*", markersize=11, color=f"C{i}")
    ax.set(title="validation (stars: test, best checkpoint)", xlabel="optimizer step")
    ax.legend(fontsize=8)

    ax = axes[2]
    if train and any(r.get("entropy", 0.0) > 0 for r in train):
        ax.plot(steps, [r["entropy"] for r in train], label="routing entropy (nats)", color="C2")
    else:  # the `none` and `fixed` controllers route nothing: say so instead of drawing a flat zero line
        ax.text(0.5, 0.6, "nothing routed (controller none or fixed)", ha="center", transform=ax.transAxes)
    if train and "temperature" in train[0]:
        ax.plot(steps, [r["temperature"] for r in train], label="temperature", color="C3", linestyle="--")
    routed = [r for r in val if "modal_max" in r]
    if routed:  # diversity at each evaluation: collapse shows as modal -> 1 and head_min -> 0
        ax.plot([r["step"] for r in routed], [r["modal_max"] for r in routed], marker=".", color="C4",
                label="most common head set (share of tokens)")
        ax.plot([r["step"] for r in routed], [r["head_min"] for r in routed], marker=".", color="C5",
                label="least kept head (share of tokens)")
    ax.set(title="routing", xlabel="optimizer step")
    ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return out_png


def draw_maze(ax, maze, title=None):
    """One maze on an axis: walls, start, goal, true path, predicted path and its mistakes.

    maze: dict with open (n, n, 4) bool (N, E, S, W), start, goal, true_path and pred_path as lists of (r, c),
    optionally cell_errors, the cells whose predicted class (direction or on-path bit) is wrong.
    Wrong cells are predicted-path cells off the true path; missed cells are true-path cells the prediction lacks."""
    o, n = maze["open"], len(maze["open"])
    true, pred = list(map(tuple, maze["true_path"])), list(map(tuple, maze["pred_path"]))
    for r, c in set(pred) - set(true):
        ax.add_patch(Rectangle((c, r), 1, 1, color=COLORS["wrong"], alpha=0.35, lw=0))
    for r, c in set(true) - set(pred):
        ax.add_patch(Rectangle((c, r), 1, 1, color=COLORS["missed"], alpha=0.35, lw=0))
    # walls as line segments: a closed side of cell (r, c) in image coordinates (x = column, y = row, y down)
    sides = {0: ((0, 0), (1, 0)), 1: ((1, 0), (1, 1)), 2: ((0, 1), (1, 1)), 3: ((0, 0), (0, 1))}
    for r in range(n):
        for c in range(n):
            for d, ((x0, y0), (x1, y1)) in sides.items():
                if not o[r][c][d]:
                    ax.plot([c + x0, c + x1], [r + y0, r + y1], color="k", lw=1.2, solid_capstyle="round")
    errors = maze.get("cell_errors", [])
    if len(errors):  # cells whose own predicted class is wrong: shows refinement the greedy path may hide
        ax.plot([c + 0.5 for _, c in errors], [r + 0.5 for r, _ in errors], "x", color="0.45", markersize=4)
    if true:
        ax.plot([c + 0.5 for _, c in true], [r + 0.5 for r, _ in true], color=COLORS["true"], lw=4, alpha=0.5)
    if pred:
        ax.plot([c + 0.5 for _, c in pred], [r + 0.5 for r, _ in pred], color=COLORS["pred"], lw=1.6, ls="--")
    for key, marker in (("start", "o"), ("goal", "*")):
        r, c = maze[key]
        ax.plot(c + 0.5, r + 0.5, marker=marker, color=COLORS[key], markersize=9 if marker == "*" else 7)
    ax.set_xlim(-0.1, n + 0.1)
    ax.set_ylim(n + 0.1, -0.1)  # row 0 at the top, as in the ASCII print
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)


def maze_legend(fig):
    handles = [Line2D([], [], color=COLORS["true"], lw=4, alpha=0.5, label="true path"),
               Line2D([], [], color=COLORS["pred"], lw=1.6, ls="--", label="predicted path"),
               Patch(color=COLORS["wrong"], alpha=0.35, label="predicted, off the true path"),
               Patch(color=COLORS["missed"], alpha=0.35, label="true path, missed"),
               Line2D([], [], color="0.45", marker="x", ls="", markersize=4, label="cell class wrong"),
               Line2D([], [], color=COLORS["start"], marker="o", ls="", label="start"),
               Line2D([], [], color=COLORS["goal"], marker="*", ls="", markersize=9, label="goal")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8, frameon=False)


def draw_panels(mazes, out_png, titles=None, ncols=4, suptitle=None, panel=2.3):
    """A grid of maze panels with one shared legend; used for solved mazes and for the inner-step strip."""
    ncols = min(ncols, len(mazes))
    nrows = math.ceil(len(mazes) / ncols)
    height = (panel + 0.3) * nrows + 0.9  # 0.3 inch per row for the panel titles, 0.9 for legend and title
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, height), squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        if i < len(mazes):
            draw_maze(ax, mazes[i], titles[i] if titles else None)
        else:
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    maze_legend(fig)
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return out_png


def draw_mazes(mazes, out_png, titles=None, ncols=4):
    """Solved mazes in a grid: each panel shows walls, start, goal, true and predicted path and the mistakes."""
    return draw_panels(mazes, out_png, titles, ncols, "solved mazes")


def draw_refinement(panels, out_png, titles, ncols=6):
    """The 'refining over inner steps' strip: one maze drawn after each of several inner steps (one panel each,
    with that step's predicted path and wrong cells)."""
    return draw_panels(panels, out_png, titles, ncols, "prediction after each inner step", panel=2.0)


def head_heatmap(usage, out_png, h_update_steps, row_labels=None):
    """Head usage (steps x heads, the mean routing weight alpha) as a heatmap; rows where the slow module
    updated are labelled 'H'. usage: nested lists or an array; h_update_steps: row indices."""
    n_steps, n_heads = len(usage), len(usage[0])
    marked = set(h_update_steps)
    labels = [f"{lab}  H" if i in marked else str(lab) for i, lab in enumerate(row_labels or range(n_steps))]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n_heads, 1.2 + 0.22 * n_steps))
    im = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xticks(range(n_heads), [f"head {h}" for h in range(n_heads)], fontsize=8)
    ax.set_yticks(range(n_steps), labels, fontsize=7)
    ax.set(xlabel="head", ylabel="inner step (H: slow module updated)")
    ax.set_title("mean routing weight per step", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return out_png


def sweep_plot(rows, flag, metric, out_png):
    """Mean of `metric` against the swept value, one line per controller, error bars = 95% CI half-width
    (none where a point has a single run). rows: dicts with 'controller', 'sweep_value' and the metric."""
    values = list(dict.fromkeys(str(r["sweep_value"]) for r in rows))
    try:  # numeric values go on a numeric axis, anything else (e.g. task names) in the given order
        xs = {v: float(v) for v in values}
    except ValueError:
        xs = {v: i for i, v in enumerate(values)}
    controllers = list(dict.fromkeys(r["controller"] for r in rows))
    span = (max(xs.values()) - min(xs.values())) or 1.0
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, controller in enumerate(controllers):
        shift = (i - (len(controllers) - 1) / 2) * 0.015 * span  # side by side, so error bars do not hide each other
        points = []
        for v in values:
            got = [float(r[metric]) for r in rows if r["controller"] == controller and str(r["sweep_value"]) == v]
            if got:
                mean, _, ci = summarize(got)
                points.append((xs[v] + shift, mean, 0.0 if math.isnan(ci) else ci))
        ax.errorbar(*zip(*points), marker="o", capsize=3, label=controller)
    ax.set_xticks(list(xs.values()), values)
    ax.set(xlabel=flag, ylabel=f"test {metric}")
    ax.set_title(f"test {metric} against {flag} (mean, 95% CI)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return out_png


def segments_plot(per_segment, out_png, title=""):
    """Held-out reach and optimal rate against the number of segments run (evaluate.py --plot): a model whose
    iteration is stable keeps its accuracy when run for more segments than it needs (no overthinking)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs = range(1, len(per_segment) + 1)
    for i, key in enumerate(("reach", "optimal")):
        ax.plot(xs, [seg[key] for seg in per_segment], marker=".", color=f"C{i}", ls=("-", "--")[i], label=key)
    ax.set(xlabel="segments", ylabel="share of held-out mazes", ylim=(0, 1.02))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return out_png


def curve_label(result, name_model):
    """The legend entry of one evaluate.py result: task, maze kind and item count, after the folder of its model
    (the last two parts of its path) when name_model, i.e. when the plot compares several models."""
    folder = os.path.dirname(result.get("checkpoint") or "")
    who = "/".join(folder.split(os.sep)[-2:]) + ": " if name_model and folder else ""
    return f"{who}{result['task']} {result.get('generator') or ''} ({result['n_test']})"


def segments_curves(results, out_png):
    """Optimal rate against segments for several evaluate.py results (its --out JSON, run with a fixed number of
    segments), one line per result, labelled with its task and maze kind: how much depth each size needs, and
    whether a size's curve falls after its peak (overthinking)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    several = len({r.get("checkpoint") for r in results}) > 1
    for i, r in enumerate(results):
        ys = [seg["optimal"] for seg in r["per_segment"]]
        ax.plot(range(1, len(ys) + 1), ys, color=f"C{i}", label=curve_label(r, several))
    ax.set(xlabel="segments", ylabel="optimal (share of held-out mazes)", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return out_png


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot a run's training curves from its metrics.jsonl, or optimal "
                                "against segments from evaluate.py results.")
    p.add_argument("run_dir", nargs="?", help="a train.py output folder")
    p.add_argument("--out", default=None, help="PNG path (default <run_dir>/curves.png; with --segments: needed)")
    p.add_argument("--segments", nargs="+", default=None, metavar="JSON",
                   help="instead: draw optimal against segments, one line per evaluate.py --out file")
    args = p.parse_args(argv)
    if (args.run_dir is None) == (args.segments is None):
        p.error("give either a run folder or --segments")
    if args.segments and not args.out:
        p.error("--segments needs --out")
    if args.out and not args.out.endswith(".png"):
        p.error(f"--out must be a .png path, got {args.out}")
    try:
        if args.segments:
            results = []
            for path in args.segments:
                with open(path) as f:
                    try:
                        results.append(json.load(f))
                    except json.JSONDecodeError as exc:
                        raise SystemExit(f"error: {path} is not a JSON file ({exc})") from None
                per_segment = results[-1].get("per_segment") if isinstance(results[-1], dict) else None
                if (not isinstance(per_segment, list) or not per_segment or results[-1].get("segments") == "auto"
                        or "optimal" not in per_segment[0]):
                    raise SystemExit(f"error: {path} is not an evaluate.py result on mazes with a fixed number of "
                                     "segments")
            print(f"wrote {segments_curves(results, args.out)}")
        else:
            print(f"wrote {plot_run(args.run_dir, args.out)}")
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    except json.JSONDecodeError as exc:  # a bad line of the run's metrics.jsonl
        raise SystemExit(f"error: {args.run_dir}: a line of metrics.jsonl is not JSON ({exc})") from None
    except OSError as exc:  # a folder given as a file, no permission, a full disk
        raise SystemExit(f"error: cannot read or write {exc.filename} ({exc.strerror})") from None


if __name__ == "__main__":
    main()
