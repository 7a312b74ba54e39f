"""
A/B harness: train every (controller, seed), or every (swept value, controller, seed), with train.main in this
process, then tabulate the test metrics with mean, std and a 95% confidence interval per controller.

    python ab.py --smoke                  # seconds: a tiny sort6 run per controller, 1 seed
    python ab.py --quick                  # about a minute on CPU: sort12, none/hrm/poh, 1 seed, 100 steps
    python ab.py --task sort12 --controller none hrm poh --seeds 1 2 3            # the full A/B (recipe defaults)
    python ab.py --task maze12 --controller none hrm poh --seeds 1 2 3 -- --max-steps 3000
    python ab.py --task sort12 --sweep R 2 4 8 12 --seeds 1 2 3 -- --max-steps 500   # a sweep (issue 7)
    python ab.py --task sort12 --sweep task sort12 sort16 sort20 sort24 --seeds 1 2

Flags after `--` go to train.py unchanged; --task, --controller, --seed and --out-dir belong to this harness.
Every run trains into its own folder under --root ([<flag><value>-]<task>-<controller>-s<seed>). A folder
that already holds test.json is reused, one with ckpt.pt only is resumed, so an interrupted A/B continues where it
stopped; a folder made with other flags is refused. Results: <root>/results.csv (one row per run: task, controller,
seed, swept flag and value, parameters, steps, wall seconds, test metrics of the best-validation checkpoint),
a printed table per swept value, and with --sweep <root>/sweep_<flag>_<metric>.png.
"""

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict

import torch

import plots
import train
from data import save_atomic
from stats import fmt, summarize

OWNED = ("--task", "--controller", "--seed", "--out-dir")  # set per run by the harness
SMOKE = ["--n-val", "100", "--n-test", "1000", "--d-model", "16", "--n-heads", "2", "--n-layers", "1",
         "--d-ctrl", "8", "--R", "2", "--batch-size", "16", "--max-steps", "20", "--eval-interval", "10",
         "--warmup", "5", "--no-progress"]
QUICK = ["--max-steps", "100", "--batch-size", "64", "--eval-interval", "50", "--warmup", "20", "--n-val", "500",
         "--n-test", "2000", "--no-progress"]


def write_record(record, path):
    """ab.json, written as the checkpoints are (data.save_atomic): a kill while writing never leaves it cut short."""
    save_atomic(record, path, dump=lambda r, f: f.write(json.dumps(r).encode()))


def run_one(root, task, controller, seed, passthrough, sweep=None):
    """Train one run (or reuse / resume it) and return its CSV row."""
    flag, value = sweep or (None, None)
    # a swept task is already in the name and in --task (the caller passes it as `task`)
    extra = flag is not None and flag != "task"
    name = (f"{flag}{value}-" if extra else "") + f"{task}-{controller}-s{seed}"
    out_dir = os.path.join(root, name)
    argv = ["--task", task, "--controller", controller, "--seed", str(seed), "--out-dir", out_dir, *passthrough]
    if extra:
        argv += [f"--{flag}", str(value)]
    record_path = os.path.join(out_dir, "ab.json")
    record = json.load(open(record_path)) if os.path.isfile(record_path) else None
    if record is None or record["argv"] != argv:
        if os.path.isfile(os.path.join(out_dir, "config.json")):
            raise SystemExit(f"error: {out_dir} holds a run made with other flags; pick another --root")
        record = None  # only a start that failed before training: nothing of it to keep
    if os.path.isfile(os.path.join(out_dir, "test.json")):
        print(f"{name}: reusing the finished run in {out_dir}")
    else:
        resume = os.path.isfile(os.path.join(out_dir, "ckpt.pt"))
        if not resume and os.path.isfile(os.path.join(out_dir, "config.json")):
            # stopped before its first checkpoint: nothing to resume, so start it again
            for stale in ("config.json", "metrics.jsonl"):
                if os.path.isfile(os.path.join(out_dir, stale)):
                    os.remove(os.path.join(out_dir, stale))
        print(f"{name}: {'resuming' if resume else 'training'} into {out_dir}", flush=True)
        os.makedirs(out_dir, exist_ok=True)
        record = record or {"argv": argv, "wall_s": 0.0}
        write_record(record, record_path)  # written first, so even a killed run is recognised as ours
        t0 = time.time()
        try:
            train.main(argv + ["--resume"] if resume else argv)
        finally:  # an interrupted run keeps the time it spent, so the resumed total is right
            record["wall_s"] += time.time() - t0
            write_record(record, record_path)
    config = json.load(open(os.path.join(out_dir, "config.json")))
    test = json.load(open(os.path.join(out_dir, "test.json")))
    model, _ = train.load_checkpoint(os.path.join(out_dir, "best.pt"))
    # the steps really trained: a --time-budget can stop a run before --max-steps
    steps = plots.read_metrics(out_dir)["train"][-1]["step"]
    row = {"task": config["task"], "controller": controller, "seed": seed, "sweep_flag": flag or "",
           "sweep_value": "" if value is None else value, "params": model.num_params(), "steps": steps,
           "best_step": test["step"], "wall_s": round(record["wall_s"], 3)}
    row.update({k: v for k, v in test.items() if k not in ("step", "per_segment", "routing", "chance")})
    row["run_dir"] = out_dir
    return row


def summary_table(rows, metrics):
    """Text table of one group of runs: per controller the run count, parameters, seconds per step and
    mean ± std (95% CI half-width) of each metric, plus a WARNING line when parameter counts differ by > 5%."""
    by = defaultdict(list)
    for r in rows:
        by[r["controller"]].append(r)

    def line(name, runs, params, s_step, cells):
        return f"{name:10} {runs:>4} {params:>10} {s_step:>7}  " + "  ".join(f"{x:28}" for x in cells).rstrip()

    lines = [line("controller", "runs", "params", "s/step", metrics)]
    params = {}
    for c, rs in by.items():
        params[c] = rs[0]["params"]
        s_step = sum(r["wall_s"] / r["steps"] for r in rs) / len(rs)  # wall time includes data set-up and evaluation
        # a metric some arms lack (head_min and modal_max of an unrouted arm) shows as "-"
        cells = [fmt(*summarize([float(r[m]) for r in rs if r.get(m) not in (None, "")]))
                 if any(r.get(m) not in (None, "") for r in rs) else "-" for m in metrics]
        lines.append(line(c, len(rs), f"{params[c]:,}", f"{s_step:.3f}", cells))
    lo, hi = min(params.values()), max(params.values())
    if hi > 1.05 * lo:
        lines.append("WARNING: parameter counts differ by more than 5%: "
                     + ", ".join(f"{c} {p:,}" for c, p in params.items()))
    return "\n".join(lines)


def reference_line(rows):
    """Sorting: the simple reference (visible values in order, hidden ones at 0, the middle of the range: about
    the best possible tau with half hidden) on the runs' own test set."""
    if not rows[0]["task"].startswith("sort"):
        return None
    from data import make_task  # only sorting needs it, and building the sort test set takes a moment
    config = json.load(open(os.path.join(rows[0]["run_dir"], "config.json")))
    task = make_task(config["task"], seed=config["data_seed"], n_val=1, n_test=config["n_test"])
    ref = task.reference_metrics(*task.split("test"), fill="zero")
    return "reference (visible values in order, hidden at 0): " + " ".join(f"{k} {v:.4f}" for k, v in ref.items())


def metric_names(rows):
    """The test metrics present in the rows, in their first-seen order."""
    skip = {"task", "controller", "seed", "sweep_flag", "sweep_value", "params", "steps", "best_step", "wall_s",
            "n_test", "steps_used", "run_dir", "temperature"}
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip]


def write_csv(rows, path):
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


def get_parser():
    p = argparse.ArgumentParser(description="A/B and sweeps over controllers and seeds (see the docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="sort12", help="train.py --task for every run")
    p.add_argument("--controller", nargs="+", default=["none", "hrm", "poh"], choices=train.CONTROLLERS,
                   help="controllers to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="train.py --seed values")
    p.add_argument("--sweep", nargs="+", default=None, metavar="FLAG VALUE",
                   help="a train.py flag name (no dashes, e.g. R) and the values to sweep")
    p.add_argument("--metric", default=None, help="metric for the sweep plot (default tau for sort, las for "
                   "ud_ewt, optimal for maze)")
    p.add_argument("--root", default=None, help="folder of the runs (default runs/ab-<task>[-<flag>])")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is much "
                   "faster for tiny models on a busy machine, where threads of several processes fight for cores")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sort6 runs, 1 seed, 1 thread, its own --root")
    p.add_argument("--quick", action="store_true", help="about a minute: sort12, 100 steps, 1 seed, 1 thread")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # flags after `--` belong to train.py
    cut = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = get_parser().parse_args(argv[:cut]), argv[cut + 1:]
    if args.smoke or args.quick:
        args.task, args.seeds = ("sort6" if args.smoke else "sort12"), args.seeds[:1]
        args.threads = args.threads or 1  # small models: one thread is as fast, and far faster on a busy machine
        passthrough = (SMOKE if args.smoke else QUICK) + passthrough
        args.root = args.root or os.path.join("runs", "ab-smoke" if args.smoke else "ab-quick")
    for given, what in ((args.controller, "--controller"), (args.seeds, "--seeds"), (args.sweep or [], "--sweep")):
        if len(set(map(str, given))) < len(given):  # the same run twice would count as two seeds
            raise SystemExit(f"error: {what} repeats a value: {' '.join(map(str, given))}")
    if args.threads < 0:
        raise SystemExit(f"error: --threads must be >= 0, got {args.threads}")
    # train.py's parser takes abbreviations, so --see would set --seed: refuse any prefix of an owned flag
    owned = [f for f in passthrough if f.startswith("--") and len(f.split("=")[0]) > 2
             and any(o.startswith(f.split("=")[0]) for o in OWNED)]
    if owned:
        raise SystemExit(f"error: {', '.join(owned)} after -- is set by ab.py; use its own flags instead")
    sweep_values = [None]
    if args.sweep:
        flag, sweep_values = args.sweep[0].lstrip("-").replace("_", "-"), args.sweep[1:]
        actions = {s: a for a in train.get_parser()._actions for s in a.option_strings}
        if f"--{flag}" not in actions or actions[f"--{flag}"].nargs == 0:
            raise SystemExit(f"error: --sweep {flag}: not a train.py flag that takes a value")
        if not sweep_values:
            raise SystemExit(f"error: --sweep {flag} needs at least one value")
        if f"--{flag}" in OWNED and flag != "task":  # a second --seed would override the run's own
            raise SystemExit(f"error: --sweep {flag}: ab.py sets --{flag} for every run; use its own flags instead")
    root = args.root or os.path.join("runs", f"ab-{args.task}" + (f"-{flag}" if args.sweep else ""))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(root, exist_ok=True)

    rows = []
    for value in sweep_values:
        for controller in args.controller:
            for seed in args.seeds:
                task = value if args.sweep and flag == "task" else args.task
                rows.append(run_one(root, task, controller, seed, passthrough,
                                    None if value is None else (flag, value)))
                write_csv(rows, os.path.join(root, "results.csv"))  # after every run: partial results survive
    metrics = metric_names(rows)
    print(f"\n{len(rows)} runs, test metrics of each run's best-validation checkpoint: mean ± sample std "
          f"(95% CI half-width, Student t); results in {os.path.join(root, 'results.csv')}")
    for value in sweep_values:
        group = [r for r in rows if value is None or str(r["sweep_value"]) == str(value)]
        heading = f"{group[0]['task']}" + ("" if value is None else f", {flag} = {value}")
        counts = sorted({r["steps"] for r in group})  # a --time-budget stops arms at different steps
        steps = f"{counts[0]} steps" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} steps (per run: results.csv)"
        print(f"\n{heading}, seeds {' '.join(map(str, args.seeds))}, {steps}\n"
              + summary_table(group, metrics))
        ref = reference_line(group)
        if ref:
            print(ref)
    if args.sweep:
        metric = args.metric or train.SELECT[train.task_kind(rows[0]["task"])][0]  # what runs select best.pt by
        if metric not in rows[0]:  # results.csv is already written: only the plot is missing
            raise SystemExit(f"error: --metric {metric}: the runs report {', '.join(metric_names(rows))}")
        print(f"\nwrote {plots.sweep_plot(rows, flag, metric, os.path.join(root, f'sweep_{flag}_{metric}.png'))}")
    return rows


if __name__ == "__main__":
    main()
