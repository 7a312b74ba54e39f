"""
Probes of how a maze model carries the answer from the goal across a maze: the measurements behind the notes in
docs/experiments.md on why some seeds stop at about 150 moves on large mazes (issue 20), made re-runnable.

    python probes.py settle RUN --task maze32 --segments 48 --n-test 100   # when each distance band settles
    python probes.py hide RUN --task maze12 --hide 0,8,16 --segments 16    # the goal hidden for K segments first
    python probes.py read RUN --task maze32 --segments 48 --n-test 20      # a linear read of the distance off h
    python probes.py front RUN --task maze32 --segments 32 --n-test 20     # the front head (--front-weight)
    python probes.py race RUN --task maze32 --generator gen_dfs_percolation --gen-arg p=0.1 --segments 16 --band 30

settle: a cell wrong after the first segment needs the answer from the goal (a dead end cannot tell it which way
        to go). Per band of distance from the goal: such cells' share right at the end and the median segment from
        which they stay right (a moving front shows as a median growing with distance), and the share of the cells
        right after one segment that are wrong at the end (answers that drift while they wait).
hide:   K segments with the goal shown as a plain cell, then --segments with it; optimal after each of those.
        A model whose far cells drift while they wait for the goal's answer fails after a long K.
read:   ridge regression of the distance to the goal from the carried state h, fitted on --fit-task mazes after
        --fit-segments, read on the --task mazes at several segments: the mean read per band (and the answers'
        accuracy there). Whether the state holds a distance that grows past the training sizes, or saturates.
race:   mazes with loops: where the greedy path after --segments first leaves the shortest moves. Every rival
        route it passes (a neighbour one move farther from the goal), counted by how many moves longer it is and by
        the distance from the goal where it branches off, taken or not; and whether the first wrong cell's answer
        had been right for 2+ segments in a row and was lost by the end, or never was (which answer replaced it,
        the probe does not see).
front:  a model trained with --front-weight: per band, the mean probability its front head gives that the goal's
        answer has reached a cell, and the answers' accuracy there, at several segments. How fast its front moves.

Every probe runs validation pools by default (--data-seed 3, never the test mazes reported), perfect mazes
(gen_dfs) unless --generator says otherwise, with the checkpoint's inner steps and temperature, on the CPU in one
batch: keep --n-test small on large mazes. The model never trains here.
"""

import argparse
import json
import statistics

import torch

import data
import sample_maze
import train

BAND_MIN = 20  # cells a distance band needs to be printed


def load(run):
    """(model, inner steps, temperature) of a run folder or checkpoint, as evaluate.py scores it. Only a maze model
    that answers with moves (the direction target) can be probed; SystemExit with one line otherwise."""
    model, ckpt, _ = sample_maze.load_maze_model(run)
    if model.cfg.n_classes != data.GOAL_CLASS + 1:
        raise SystemExit(f"error: {run} is not a maze model that answers with moves (direction target); it has "
                         f"{model.cfg.n_classes} classes")
    model.eval()
    return model, train.checkpoint_inner_steps(ckpt, model), train.checkpoint_temperature(ckpt)


def maze_pool(task, n, seed, generator, gen_kwargs, data_dir):
    """(grid, x, y): the n test mazes of a pool, as evaluate.py --data-seed S --generator G draws them (one
    generator, not the run's training mix)."""
    t = data.make_task(task, seed=seed, n_train=100, n_val=0, n_test=n, cache_dir=data_dir, progress=False,
                       kinds=[(generator, gen_kwargs)])
    return (t.grid, *t.split("test"))


@torch.no_grad()
def rollout(probe, grid, x, segments, hidden_for=0):
    """Yields (state, logits) after each of `segments` segments, which follow `hidden_for` segments that see the
    mazes with the goal shown as a plain cell (data.hide_goal)."""
    model, steps, temperature = probe
    state = None
    for s in range(hidden_for + segments):
        out = model(data.hide_goal(x) if s < hidden_for else x, state=state, temperature=temperature, grid=grid,
                    n_steps=steps)
        state = out["state"]
        if s >= hidden_for:
            yield state, out["logits"].float()


def settle(probe, grid, x, y, segments, width):
    """One row per distance band: cells (known), needs (wrong after segment 1), right_end (all cells, the last
    segment), needs_right_end, needs_settled_at (median segment, from 1, from which they stay right; None if none
    do), drifted (the share of cells right after segment 1 that are wrong at the end)."""
    right = torch.stack([data.right_answers(y, logits) for _, logits in rollout(probe, grid, x, segments)])  # (S, B, N)
    stays = right.flip(0).cumprod(0).flip(0).bool()  # right from this segment to the last one
    settled_at = stays.float().argmax(0) + 1  # the first such segment (meaningful where the last one is right)
    known, dist = y != data.IGNORE, data.goal_distance(x, grid)
    rows = []
    for lo, hi, cells in data.distance_bands(dist, known, width, BAND_MIN):
        needs, keeps = cells & ~right[0], cells & right[0]
        done = needs & right[-1]
        rows.append({"from": lo, "to": hi, "cells": int(cells.sum()), "needs": int(needs.sum()),
                     "right_end": right[-1][cells].float().mean().item(),
                     "needs_right_end": right[-1][needs].float().mean().item() if needs.any() else None,
                     "needs_settled_at": statistics.median(settled_at[done].tolist()) if done.any() else None,
                     "drifted": (~right[-1][keeps]).float().mean().item() if keeps.any() else None})
    return rows


def hide(probe, grid, x, y, segments, hidden):
    """{K: optimal after each of the segments that follow K segments with the goal hidden} for each K in hidden."""
    return {k: [data.maze_metrics(logits, x, y)["optimal"] for _, logits in rollout(probe, grid, x, segments, k)]
            for k in hidden}


def ridge(features, target, lam=1e-2):
    """Least squares with an L2 penalty lam (on the intercept too, which at lam = 1e-2 changes nothing visible) and an
    intercept: features (M, D), target (M,) -> weights (D + 1,) in float64 (the last one the intercept)."""
    X = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=torch.float64), X.T @ target.double())


def linear_read(h, w):
    return h.double() @ w[:-1] + w[-1]


def read(probe, fit, grid, x, y, segments, width, at):
    """Fit the distance read on the fit pool (grid, x, y, segments) at its last segment, then read the mazes at
    the segments `at`. Returns {"r2": on the fit pool, "bands": [{"from", "to", "cells", "read": {s: mean read},
    "right": {s: accuracy}}]}."""
    fgrid, fx, fy, fsegments = fit
    for state, _ in rollout(probe, fgrid, fx, fsegments):  # keep the last segment's state only
        pass
    known, dist = fy != data.IGNORE, data.goal_distance(fx, fgrid)
    w = ridge(state["h"][known], dist[known])
    r2 = 1 - (linear_read(state["h"][known], w) - dist[known]).pow(2).mean() / dist[known].double().var(unbiased=False)
    reads, rights = {}, {}
    for s, (state, logits) in enumerate(rollout(probe, grid, x, segments), start=1):
        if s in at:
            reads[s], rights[s] = linear_read(state["h"], w), data.right_answers(y, logits)
    return {"r2": r2.item(), "bands": by_band(x, y, grid, width, read=reads, right=rights)}


def front(probe, grid, x, y, segments, width, at):
    """The front head's read after the segments `at`: [{"from", "to", "cells", "reached": {s: mean probability},
    "right": {s: accuracy}}] per band. SystemExit with one line for a model without the head."""
    model = probe[0]
    if model.front_head is None:
        raise SystemExit("error: the model has no front head (one trained with train.py --front-weight has)")
    reached, rights = {}, {}
    for s, (state, logits) in enumerate(rollout(probe, grid, x, segments), start=1):
        if s in at:
            reached[s] = model.reached(state["h"])
            rights[s] = data.right_answers(y, logits)
    return by_band(x, y, grid, width, reached=reached, right=rights)


def rivals(open_sides, dist, goal, path, i):
    """The rival routes at path[i] (a cell with a right move): each open neighbour c one move farther from the goal,
    other than the cell the path came from, as (c, extra): the moves the shortest route path[i] -> c -> goal that does
    not come back through path[i] takes beyond the shortest one, or None where c leads only into a dead end."""
    a, n, around, out = path[i], dist.shape[0], None, []
    for d, (dr, dc) in enumerate(data.MOVES):
        c = (a[0] + dr, a[1] + dc)
        if open_sides[a][d] and 0 <= c[0] < n and 0 <= c[1] < n and dist[c] == dist[a] + 1 and \
                (i == 0 or c != path[i - 1]):
            if around is None:  # distances to the goal with path[i] walled off
                around = data.bfs_distances(open_sides, goal, blocked=a)
            out.append((c, None if around[c] < 0 else int(1 + around[c] - dist[a])))
    return out


EXTRA = ("+2", "+4 to +8", "+10 or more", "dead end")  # the rival classes race prints


def extra_class(extra):
    return EXTRA[3] if extra is None else EXTRA[0] if extra == 2 else EXTRA[1] if extra <= 8 else EXTRA[2]


def race(probe, grid, x, y, segments, width):
    """Where the greedy path after the last segment first leaves the shortest moves, and why. Walking each maze's
    path up to its first wrong move, every rival route passed or taken is counted by its class (extra_class) and by
    the band of distance from the goal of the cell where it branches off: {"bands": [{"from", "to", class: [taken,
    met]}]}. Per maze not solved optimally, {"maze": its index, "cell": its first wrong cell, "distance": that cell's
    moves to the goal, "extra": the class value of the rival taken there, "held": whether that cell's answer was
    right for at least 2 segments in a row at some point (it is wrong at the end: an answer lost), "last_right": the
    last segment, from 1, it was right (None if never)} in "failures". Also optimal and reach after the last
    segment. A maze whose start cannot reach the goal has no wrong move and is skipped."""
    right = []
    for _, logits in rollout(probe, grid, x, segments):  # logits: the last segment's, after the loop
        right.append(data.right_answers(y, logits))
    right = torch.stack(right)  # (S, B, N)
    held2 = right[1:] & right[:-1]  # right in two segments in a row
    counts, failures = {}, []
    for b, (open_sides, start, goal, path) in enumerate(data.greedy_paths(logits.numpy(), x.numpy())):
        dist = data.bfs_distances(open_sides, goal)
        if dist[start] < 0:
            continue
        for i, a in enumerate(path[:-1]):
            met = rivals(open_sides, dist, goal, path, i)
            for c, extra in met:
                cell = counts.setdefault(int(dist[a]) // width, {k: [0, 0] for k in EXTRA})[extra_class(extra)]
                cell[0] += c == path[i + 1]
                cell[1] += 1
            if dist[path[i + 1]] != dist[a] - 1:  # the first wrong move: onto one of the rivals
                k = a[0] * grid[1] + a[1]
                ever = right[:, b, k].nonzero()
                failures.append({"maze": b, "cell": list(a), "distance": int(dist[a]),
                                 "extra": next(e for c, e in met if c == path[i + 1]),
                                 "held": bool(held2[:, b, k].any()),
                                 "last_right": int(ever[-1]) + 1 if len(ever) else None})
                break
    scores = data.maze_metrics(logits, x, y)
    return {"optimal": scores["optimal"], "reach": scores["reach"], "failures": failures,
            "bands": [{"from": w * width, "to": (w + 1) * width, **counts[w]} for w in sorted(counts)]}


def by_band(x, y, grid, width, **per_segment):
    """One row per band of distance from the goal: from, to, cells, and for each name=({segment: (B, N) values}) the
    mean over the band's cells at each segment."""
    known, dist = y != data.IGNORE, data.goal_distance(x, grid)
    return [{"from": lo, "to": hi, "cells": int(cells.sum()),
             **{name: {s: v[cells].double().mean().item() for s, v in values.items()}
                for name, values in per_segment.items()}}
            for lo, hi, cells in data.distance_bands(dist, known, width, BAND_MIN)]


def int_list(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = [-1]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected counts >= 0 separated by commas, got {text}")
    return values


def get_parser():
    p = argparse.ArgumentParser(description="Probe how a maze model carries the goal's answer (docs/experiments.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("probe", choices=["settle", "hide", "read", "front", "race"])
    p.add_argument("checkpoint", help="a checkpoint file, or a run folder (its best.pt)")
    p.add_argument("--task", default="maze32", help="mazes to probe (mazeN)")
    p.add_argument("--segments", type=int, default=48, help="segments run (hide: after the hidden ones)")
    p.add_argument("--n-test", type=int, default=100, help="mazes, in one batch")
    p.add_argument("--band", type=int, default=40, help="settle, read, front, race: moves from the goal "
                   "per band")
    p.add_argument("--hide", type=int_list, default=[0, 8, 16], help="hide: segments with the goal hidden, "
                   "one run each")
    p.add_argument("--at", type=int_list, default=None, help="read, front: the segments read, --segments always "
                   "among them (default: 1, 2, 4, 8, 16, 32, 48, those up to --segments)")
    p.add_argument("--fit-task", default="maze12", help="read: the mazes the read is fitted on")
    p.add_argument("--fit-segments", type=int, default=16, help="read: segments run before the fit")
    p.add_argument("--fit-n", type=int, default=300, help="read: mazes fitted on")
    p.add_argument("--generator", default=data.GENERATOR, help="a maze-dataset generator for every pool "
                   "(not the run's training mix)")
    p.add_argument("--gen-arg", action="append", default=[], metavar="KEY=VALUE", help="as in evaluate.py")
    p.add_argument("--data-seed", type=int, default=3, help="the pools' data seed (3: validation mazes)")
    p.add_argument("--data-dir", default="data_cache", help="where generated maze sets are cached")
    p.add_argument("--out", default=None, help="write the result here as JSON")
    return p


@torch.no_grad()
def main(argv=None):
    args = get_parser().parse_args(argv)
    train.check_at_least(*((f"--{flag.replace('_', '-')}", getattr(args, flag), 1)
                           for flag in ("segments", "n_test", "band", "fit_segments", "fit_n")))
    for task in (args.task, args.fit_task):
        if not (task.startswith("maze") and task[4:].isdigit()):
            raise SystemExit(f"error: the probes are for mazes (mazeN), got {task}")
    if args.at is None:
        args.at = [s for s in (1, 2, 4, 8, 16, 32, 48) if s <= args.segments]
    elif args.probe in ("read", "front") and max(args.at) > args.segments:
        raise SystemExit(f"error: --at {max(args.at)} is beyond --segments {args.segments}")
    train.ready_to_write("--out", args.out)  # now, not after the probe has run
    try:
        gen_kwargs = data.parse_gen_args(args.gen_arg) or None
        probe = load(args.checkpoint)
        pool = lambda task, n: maze_pool(task, n, args.data_seed, args.generator, gen_kwargs, args.data_dir)
        grid, x, y = pool(args.task, args.n_test)
        fit = (*pool(args.fit_task, args.fit_n), args.fit_segments) if args.probe == "read" else None
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.probe} {args.checkpoint} on {args.n_test} {args.task} mazes "
          f"({data.generator_name(args.generator, gen_kwargs)}, data seed {args.data_seed})")
    if args.probe == "settle":
        result = settle(probe, grid, x, y, args.segments, args.band)
        print(f"after {args.segments} segments; needs: cells wrong after the first")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # a band with no such cells
        for r in result:
            print(f"  {r['from']:4d}-{r['to'] - 1:<4d} cells {r['cells']:6d}  right {r['right_end']:.3f}  needs "
                  f"{r['needs']:5d}: right {fmt(r['needs_right_end'], '.3f')}, settled at "
                  f"{fmt(r['needs_settled_at'], 'g')}  drifted {fmt(r['drifted'], '.3f')}")
    elif args.probe == "race":
        result = race(probe, grid, x, y, args.segments, args.band)
        fails = result["failures"]
        print(f"after {args.segments} segments: optimal {result['optimal']:.3f}, reach {result['reach']:.3f}. Rival "
              f"routes met on each path up to its first wrong move, taken / met, by moves from the goal:")
        print(f"  {'':9s}" + "".join(f"{k:>14s}" for k in EXTRA))
        for r in result["bands"]:
            print(f"  {r['from']:4d}-{r['to'] - 1:<4d}" + "".join(f"{f'{r[k][0]} / {r[k][1]}':>14s}" for k in EXTRA))
        held = [f["last_right"] for f in fails if f["held"]]
        print(f"{len(fails)} mazes not optimal. Their first wrong cell's answer had held right for 2+ segments and was "
              f"lost in {len(held)}" + (f" (median last right: segment {statistics.median(held):g})" if held else "")
              + f"; never held in {len(fails) - len(held)}")
    elif args.probe == "hide":
        result = hide(probe, grid, x, y, args.segments, args.hide)
        shown = sorted({s for s in (1, 2, 4, 8) if s < args.segments} | {args.segments})
        for k, curve in result.items():
            print(f"  goal hidden for {k:3d} segments; optimal after " + " / ".join(map(str, shown)) + " with it: "
                  + " / ".join(f"{curve[s - 1]:.3f}" for s in shown))
    else:
        at = sorted(s for s in set(args.at) | {args.segments} if s >= 1)
        if args.probe == "read":
            result = read(probe, fit, grid, x, y, args.segments, args.band, at)
            bands, what, fmt = result["bands"], "read", "6.1f"
            print(f"fitted on {args.fit_n} {args.fit_task} mazes after {args.fit_segments} segments: R^2 "
                  f"{result['r2']:.3f}; per band, mean read / accuracy after " + ", ".join(map(str, at)) + " segments")
        else:
            result = bands = front(probe, grid, x, y, args.segments, args.band, at)
            what, fmt = "reached", "6.2f"
            print("per band, the front head's mean P(reached) / accuracy after " + ", ".join(map(str, at)) + " segments")
        for b in bands:
            print(f"  {b['from']:4d}-{b['to'] - 1:<4d} cells {b['cells']:6d}  "
                  + "  ".join(f"{b[what][s]:{fmt}}/{b['right'][s]:.2f}" for s in at))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"probe": args.probe, "args": vars(args), "result": result}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
