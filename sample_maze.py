"""
Load a trained maze checkpoint, solve fresh mazes, print them as ASCII and draw them.

    python sample_maze.py pretrained/maze12-hrm                             # 4 fresh 12x12 mazes
    python sample_maze.py pretrained/maze12-hrm --num-samples 8 --seed 3 --out out/samples.png
    python sample_maze.py pretrained/maze12-hrm --grid-n 16 --inner-steps 12  # larger than trained, more steps
    python sample_maze.py pretrained/maze12-hrm --show-steps --diag           # refinement strip, routing diagnostics
    python sample_maze.py runs/maze12-hrm-s0/best.pt --grid-n 24 --generator gen_dfs_percolation --gen-arg p=0.1
    python sample_maze.py pretrained/maze12-hrm --grid-n 32 --arrival --show-steps  # read by the front's arrival

The checkpoint is a file (best.pt, ckpt.pt) or a run folder (its best.pt). Fresh mazes come from a maze-dataset
generator (--generator, default DFS; --gen-arg for its arguments) with seed 1,000,000 + --seed, a stream apart
from the train/val/test pools (seeds 0, 1, 2, ...), and nothing is cached. The model runs as it was evaluated
in training: the checkpoint's segments (on another grid size: auto, until every maze's answer has held for 3
segments, and with --arrival every start is reached by the front, up to evaluate.py's cap; evaluate.py --segments
auto stops each maze on its own instead, so a maze drawn here can run a few segments longer than it was scored),
its inner steps, the temperature it trained at when saved, its top-k and hard/soft routing.

ASCII legend: walls are + - |, S start, G goal, * predicted path on the true path, x predicted path off the true
path (a wrong cell), o true path the prediction missed, blank: neither. The true path is a shortest path: the
predicted one where that reaches the goal as quickly (mazes with loops can have several), else the labels' own,
so a prediction that follows an equally short rival and stops short shows the rival's cells as x.

Outputs: --out (default <run folder>/samples.png) holds the first 16 solved mazes. --show-steps adds
<out>_steps.png: the first maze after --max-panels inner steps, evenly spaced over all segments, each labelled
"seg S t T" (segments from 1, as evaluate.py counts them; inner steps from 0). --diag prints per inner step the
routing entropy, the mean max head weight, the temperature, the most used heads and H-UPDATE where the slow module
f_H updated (t % T == 0), then which heads cells of each kind (start/goal neighbourhood, dead end, corridor,
junction) keep, and writes <out>_heads.png, the head usage per step. --arrival (a model trained with
--front-every) reads each answer as evaluate.py --arrival does; its read is made per segment, so --show-steps then
draws the first maze at the end of picked segments, and --diag is refused.
"""

import argparse
import os
import re

import numpy as np
import torch

import data
import evaluate
import plots
import train
from hrm_controller import routing_entropy

FRESH_SEED_BASE = 10**6  # far from the pool seeds 3 * data_seed + {0, 1, 2} that training uses


def render_ascii(open_sides, start, goal, true_path, pred_path):
    """One maze as text, 2n+1 lines of 4n+1 characters; the legend is in the module docstring."""
    o = np.asarray(open_sides, dtype=bool)
    n = o.shape[0]
    true, pred = set(map(tuple, true_path)), set(map(tuple, pred_path))

    def mark(cell):
        if cell == tuple(start):
            return "S"
        if cell == tuple(goal):
            return "G"
        if cell in pred:
            return "*" if cell in true else "x"
        return "o" if cell in true else " "

    lines = ["+" + "---+" * n]
    for r in range(n):
        # a cell row: the west border, then every cell followed by its east side (open or wall)
        row = "|" if not o[r, 0, 3] else " "
        for c in range(n):
            row += f" {mark((r, c))} " + (" " if o[r, c, 1] else "|")
        lines.append(row)
        # the walls below the row: its south sides
        lines.append("+" + "".join(("   " if o[r, c, 2] else "---") + "+" for c in range(n)))
    return "\n".join(lines)


def fresh_mazes(n, count, seed, target, generator=data.GENERATOR, gen_kwargs=None):
    """count new n x n mazes of a maze-dataset generator (perfect DFS mazes by default): inputs x (B, n*n),
    labels y (B, n*n) and the pool arrays (open, start, goal)."""
    pool = data.generate_mazes(n, count, FRESH_SEED_BASE + seed, generator=generator, gen_kwargs=gen_kwargs)
    x = data.encode(pool["open"], pool["start"], pool["goal"]).reshape(count, n * n)
    y = data.batch_labels(pool["open"], pool["start"], pool["dist"].astype(np.int64), target)
    return torch.from_numpy(x), torch.from_numpy(y), pool


@torch.no_grad()
def run_traced(model, x, grid, segments, n_steps, temperature, patience=None, trace=True, reads=False):
    """Run `segments` forwards carrying the state, as train.evaluate does, keeping every inner step's trace; with
    `patience`, stop early once every maze's decoded path has reached the goal and not changed for that many
    segments (segments is then the cap, as in evaluate.py --segments auto, which stops each maze on its own). Returns
    the final logits (B, N, C) and a list of per-step dicts with 'seg' (from 1) and 't' (from 0) added (the segments
    run: steps[-1]['seg']). trace=False keeps no tensors, only one {'seg', 't'} per segment (its last step): a
    large grid's hundreds of segments would otherwise hold every step's state; reads=True (with trace=False) adds
    the first maze's answer at that segment's end as the model reads it out, 'logits' (1, N, C) on the CPU (what
    --show-steps draws; a read-out such as evaluate.Arrival takes no trace).
    A model that says an item is "pending" (Arrival: its front has not reached the start) is not stable yet."""
    model.eval()
    state, steps, previous, calm = None, [], None, 0
    for s in range(segments):
        out = model(x, state=state, temperature=temperature, grid=grid, n_steps=n_steps, trace=trace)
        state = out["state"]
        steps += ([{"seg": s + 1, "t": t, **step} for t, step in enumerate(out["trace"])] if trace
                  else [{"seg": s + 1, "t": n_steps - 1, **({"logits": out["logits"][:1].cpu()} if reads else {})}])
        if patience is None:
            continue
        # as evaluate.py --segments auto watches each maze; a pending answer is not ready (as run_adaptive counts
        # it): the segments of calm start after it
        pending = out.get("pending") is not None and bool(out["pending"].any())
        answer = None if pending else data.decoded_paths(out["logits"], x)
        calm = calm + 1 if answer is not None and None not in answer and answer == previous else 0
        previous = answer
        if calm >= patience:
            break
    return out["logits"], steps


def step_diagnostics(steps, top=2):
    """Per inner step: routing entropy, mean max head weight, head usage (mean alpha per head), the `top` most
    used heads and the slow-module update (1.0 / 0.0, or the learned gate). Empty where nothing is routed: the `none`
    controller (no head weights) and `fixed` (the same heads for every token, no router probabilities)."""
    rows = []
    for s in steps:
        if s["alpha"] is None or s["p"] is None:
            return []
        usage = s["alpha"].float().mean((0, 1))  # (H,): mean weight over mazes and cells
        rows.append({"seg": s["seg"], "t": s["t"], "entropy": float(routing_entropy(s["p"])),
                     "max_weight": float(s["alpha"].max(-1).values.mean()), "usage": usage.tolist(),
                     "top": usage.argsort(descending=True)[:top].tolist(), "h_update": float(s["h_update"])})
    return rows


CELL_KINDS = ("start/goal", "dead end", "corridor", "junction")


def cell_kinds(pool):
    """(B, N) index into CELL_KINDS for every cell: the start, the goal and their open neighbours first, then by
    the number of open sides (1 dead end, 2 corridor, 3-4 junction)."""
    o = np.asarray(pool["open"], dtype=bool)  # (B, n, n, 4)
    B, n = o.shape[:2]
    kinds = np.clip(o.sum(-1), 1, 3).astype(np.int64)  # (B, n, n): 1, 2 or 3
    for key in ("start", "goal"):
        for b, (r, c) in enumerate(np.asarray(pool[key])):
            kinds[b, r, c] = 0
            for d, (dr, dc) in enumerate(data.MOVES):
                if o[b, r, c, d]:
                    kinds[b, r + dr, c + dc] = 0
    return kinds.reshape(B, n * n)


def usage_by_kind(steps, kinds):
    """Share of token-steps of each cell kind that keep each head: {kind: (count, [H floats])}, kinds present only."""
    keep = torch.stack([s["alpha"].detach().cpu() > 0 for s in steps]).float()  # (steps, B, N, H)
    kinds = torch.from_numpy(kinds)
    return {name: (int((kinds == i).sum()), keep[:, kinds == i].mean((0, 1)).tolist())
            for i, name in enumerate(CELL_KINDS) if (kinds == i).any()}


def format_diag(rows, temperature, learned_gate=False):
    """Text lines of step_diagnostics(); a fixed-period slow update is marked H-UPDATE, a learned gate printed."""
    lines = ["seg  t  entropy  max_w  temp  most used heads (mean weight)"]
    for r in rows:
        heads = ", ".join(f"h{h} {r['usage'][h]:.2f}" for h in r["top"])
        line = f"{r['seg']:3d} {r['t']:2d}  {r['entropy']:7.3f}  {r['max_weight']:5.3f}  {temperature:4.2f}  {heads}"
        if learned_gate:
            line += f"   H-gate {r['h_update']:.2f}"
        elif r["h_update"] == 1.0:
            line += "   H-UPDATE"
        lines.append(line)
    return lines


def maze_record(pool, b, scores, y, target):
    """Everything the renderers need about maze b: walls, start, goal, true path, predicted (rolled-out) path
    and the cells whose predicted class is wrong; scores (N, C) and labels y (N,) are maze b's."""
    o, s, g = pool["open"][b], tuple(int(v) for v in pool["start"][b]), tuple(int(v) for v in pool["goal"][b])
    n = o.shape[0]
    right = (np.where(y >= 0, y, 0) >> scores.argmax(-1)) & 1  # the best-scored class is one of the right ones
    wrong = np.flatnonzero((right == 0) & (y != data.IGNORE))
    true, pred = data.solve(o, s, g)[1], data.rollout(scores, o, s, g, target)
    if pred[-1] == g and len(pred) == len(true):
        true = pred  # a maze with loops can have several shortest paths: show the one taken, not a rival as wrong
    return {"open": o, "start": s, "goal": g, "true_path": true, "pred_path": pred,
            "cell_errors": [(i // n, i % n) for i in wrong]}


def load_maze_model(path, device="cpu"):
    """train.load_checkpoint plus the checks that it is a maze model; SystemExit with one line otherwise."""
    path = train.checkpoint_file(path)
    try:
        model, ckpt = train.load_checkpoint(path, device)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    task = (ckpt.get("config") or {}).get("task", "")
    if not re.fullmatch(r"maze\d+", task):
        raise SystemExit(f"error: {path} was trained on {task or 'an unknown task'!r}, not a maze task")
    return model, ckpt, path


def get_parser():
    p = argparse.ArgumentParser(description="Solve and draw fresh mazes with a trained checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="checkpoint file, or a run folder (uses its best.pt)")
    p.add_argument("--num-samples", type=int, default=4, help="fresh mazes to solve (the picture: the first 16)")
    p.add_argument("--seed", type=int, default=0, help="which fresh mazes (generator seed 1,000,000 + seed)")
    p.add_argument("--grid-n", type=int, default=None, help="maze side (default: the trained size)")
    p.add_argument("--generator", default=data.GENERATOR, help="maze-dataset generator of the fresh mazes, e.g. "
                   "gen_dfs_percolation (mazes with loops) or gen_wilson")
    p.add_argument("--gen-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of --generator, e.g. p=0.1 (loop density of gen_dfs_percolation); repeatable")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps per segment (default: as trained)")
    p.add_argument("--segments", default=None, help="segments, or auto: until every maze's answer is stable (as "
                   "evaluate.py; with --arrival, also every start reached; default: the checkpoint's on its own "
                   "grid size, auto on another)")
    p.add_argument("--out", default=None, help="PNG of the solved mazes (default <run folder>/samples.png)")
    p.add_argument("--show-steps", action="store_true", help="also draw the first maze at up to --max-panels "
                   "inner steps, evenly spaced over all segments (with --arrival: segment ends)")
    p.add_argument("--max-panels", type=int, default=12, help="--show-steps: at most this many steps, evenly spaced")
    p.add_argument("--diag", action="store_true", help="print routing per inner step and draw a head-usage heatmap")
    p.add_argument("--arrival", action="store_true", help="a model trained with --front-every: each cell moves toward "
                   "the open neighbour its front head read as reached first (as evaluate.py --arrival); --show-steps "
                   "then draws that read at each segment's end")
    p.add_argument("--no-ascii", action="store_true", help="print only the metrics, not the mazes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    return p


def main(argv=None):
    train.keep_freed_memory()
    args = get_parser().parse_args(argv)
    train.check_at_least(("--num-samples", args.num_samples, 1), ("--grid-n", args.grid_n, 3),
                         ("--inner-steps", args.inner_steps, 1), ("--max-panels", args.max_panels, 1))
    if args.grid_n and args.grid_n > data.MAX_MAZE:  # as data.make_task
        raise SystemExit(f"error: --grid-n must be <= {data.MAX_MAZE}, got {args.grid_n}")
    try:
        gen_kwargs = data.parse_gen_args(args.gen_arg)
    except ValueError as exc:
        raise SystemExit(f"error: --gen-arg: {exc}") from None
    try:
        device = train.pick_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.arrival and args.diag:
        raise SystemExit("error: --diag reads the router at every inner step; --arrival reads segments")
    model, ckpt, path = load_maze_model(args.ckpt, device)
    cfg, config = model.cfg, ckpt["config"]
    if args.arrival:
        try:
            model = evaluate.read_by_arrival(model, config, path)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    trained_n = int(config["task"][4:])
    n = args.grid_n or trained_n
    n_steps = args.inner_steps or train.checkpoint_inner_steps(ckpt, model)
    segments = evaluate.parse_segments(args.segments) or (config["segments"] if n == trained_n else "auto")
    # auto: up to evaluate.py's cap for this grid, stopping once every decoded path has held for PATIENCE segments
    cap = evaluate.segment_cap((n, n), cfg.n_layers, n_steps) if segments == "auto" else segments
    temperature = train.checkpoint_temperature(ckpt)
    target = "direction" if cfg.n_classes == 5 else "path"  # as data.maze_metrics reads it
    out = args.out or os.path.join(os.path.dirname(path), "samples.png")
    stem = os.path.splitext(out)[0]
    train.ready_to_write("--out", out)
    print(f"{path}: {config['task']} {cfg.controller} model (step {ckpt.get('step')}), solving "
          f"{args.num_samples} fresh {n}x{n} mazes ({data.generator_name(args.generator, gen_kwargs)}) with "
          f"{segments if segments != 'auto' else f'auto (at most {cap})'} segments x {n_steps} inner steps, "
          f"temperature {temperature:.2f}" + (", read by the front's arrival" if args.arrival else ""))

    try:
        x, y, pool = fresh_mazes(n, args.num_samples, args.seed, target, args.generator, gen_kwargs)
    except ValueError as exc:  # no such generator, an argument it does not take, mazes it cannot make
        raise SystemExit(f"error: {exc}") from None
    logits, steps = run_traced(model, x.to(device), (n, n), cap, n_steps, temperature,
                               patience=evaluate.PATIENCE if segments == "auto" else None,
                               trace=(args.show_steps or args.diag) and not args.arrival,
                               reads=args.show_steps and args.arrival)
    if segments == "auto":
        print(f"ran {steps[-1]['seg']} segments (every path at the goal and unchanged for {evaluate.PATIENCE} "
              f"segments{', every start reached by the front' if args.arrival else ''}, or the cap)")
    scores = logits.float().cpu().numpy()
    mazes, titles = [], []
    for b in range(args.num_samples):
        m = maze_record(pool, b, scores[b], y[b].numpy(), target)
        one = data.maze_metrics(logits[b:b + 1], x[b:b + 1], y[b:b + 1])
        reached = m["pred_path"][-1] == m["goal"]
        verdict = f"reached G in {len(m['pred_path']) - 1} moves" if reached else "did not reach G"
        head = (f"maze {b + 1}: shortest path {len(m['true_path']) - 1} moves, {verdict}; "
                + " ".join(f"{k} {v:.2f}" for k, v in one.items()))
        print(head if args.no_ascii else "\n" + head + "\n" + render_ascii(
            m["open"], m["start"], m["goal"], m["true_path"], m["pred_path"]))
        mazes.append(m)
        titles.append(f"{b + 1}: {'reached' if reached else 'failed'}, cell acc {one['cell_acc']:.2f}")
    total = data.maze_metrics(logits, x, y)
    print(f"\nall {args.num_samples} mazes: " + " ".join(f"{k} {v:.3f}" for k, v in total.items()))
    print(f"wrote {plots.draw_mazes(mazes[:16], out, titles[:16])}")

    labels = [f"seg {s['seg']} t {s['t']}" for s in steps]
    if args.show_steps:
        # evenly spaced steps, always the first and the last, so long runs still fit in one strip
        picks = sorted(set(np.linspace(0, len(steps) - 1, min(args.max_panels, len(steps))).round().astype(int)))
        panels = [maze_record(pool, 0, steps[i]["logits"][0].float().cpu().numpy(), y[0].numpy(), target)
                  for i in picks]
        titles = [f"{labels[i]}: {len(p['cell_errors'])} cells wrong" for i, p in zip(picks, panels)]
        print(f"wrote {plots.draw_refinement(panels, stem + '_steps.png', titles)}")
    if args.diag:
        rows = step_diagnostics(steps, top=cfg.top_k)
        if not rows:
            print(f"diag: controller {cfg.controller}: nothing is routed (none: every head at 1/H; fixed: the same "
                  "heads for every token)")
        else:
            print("\n" + "\n".join(format_diag(rows, temperature, learned_gate=cfg.h_gate == "learned")))
            updated = [i for i, r in enumerate(rows) if r["h_update"] == 1.0 and cfg.h_gate == "fixed"]
            print(f"wrote {plots.head_heatmap([r['usage'] for r in rows], stem + '_heads.png', updated, labels)}")
            # do heads specialise? the same shares for every kind means the routing ignores what a cell is
            print("\nheads kept, by cell kind (share of the kind's token-steps keeping each head):")
            for name, (count, shares) in usage_by_kind(steps, cell_kinds(pool)).items():
                print(f"  {name:10} {count:5d} cells: " + " ".join(f"h{h} {v:.2f}" for h, v in enumerate(shares)))
    return total


if __name__ == "__main__":
    main()
