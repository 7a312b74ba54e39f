"""Tasks for hrm-poh: mazes (maze-dataset generators: perfect DFS mazes by default, mixes with loops by --mazes)
and sorting under partial observability.

Every task maps a grid of input tokens to one class per token and scores logits with its own metrics:
  maze12   12x12 mazes, one token per cell = 4 open-side bits + 16 * role (0 plain, 1 start, 2 goal); label = a
           bitmask of every move (N,E,S,W; bit 4: the goal) along a shortest path, or the on-path bit; scored by a
           greedy rollout from the start (reach, optimal, exact, cell_acc, unique).
  sort12   12 distinct integers in [-100, 100), half hidden by a mask token; label = rank of each element;
           scored by Kendall tau-a of the expected ranks (tau_assign: of a greedy assignment). sort12-visible
           hides nothing.

    task = make_task("maze12")       # generates and caches 12,000 mazes in data_cache/ (3-4 minutes, once)
    x, y = task.train_batch(64, torch.Generator().manual_seed(0))
    x_val, y_val = task.split("val")
    logits = model(x_val, grid=task.grid)["logits"]  # a model.PoHModel; without grid a maze runs as one row
    print(task.metrics(logits, x_val, y_val))   # {"reach", "optimal", "exact", "cell_acc", "unique": floats}

Tests: python -m pytest -q test_all.py -k "maze or sort"
"""
import functools
import os
import random
import re
import warnings
from collections import deque
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from stats import nan_mean

TASK_NAMES = ("maze8", "maze12", "maze16", "maze24", "sort12", "sort12-visible", "sort16", "sort20", "sort24",
              "ud_ewt")
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # N, E, S, W as (dr, dc): row grows southward, column eastward
GOAL_CLASS = 4  # direction target: the goal cell has no move
IGNORE = -100  # label of cells the goal cannot reach: no class is right, the loss and metrics skip them
GENERATOR = "gen_dfs"  # maze-dataset's LatticeMazeGenerators method for perfect mazes, the default
CHUNK = 500  # mazes per maze-dataset call; part of the cached content, so bump CACHE_VERSION if it changes
CACHE_VERSION = 2
SORT_MASK = 200  # values -100..99 become tokens 0..199
N_TRAIN = 10000  # mazes in a training pool unless --n-train says otherwise
# named mixtures for --mazes: "loops" is a third perfect DFS mazes and two thirds DFS mazes with a few or many loops
MIXES = {"loops": "gen_dfs,gen_dfs_percolation:p=0.05,gen_dfs_percolation:p=0.2"}


# Mazes: encoding, solving and scoring, one maze at a time unless said otherwise.

def encode(open_sides, start, goal):
    """(..., n, n, 4) open sides + (..., 2) start and goal -> (..., n*n) int64 tokens (batched or single)."""
    o = np.asarray(open_sides, dtype=bool)
    n = o.shape[-2]
    bits = (o.astype(np.int64) << np.arange(4)).sum(-1)  # (..., n, n)
    flat = bits.reshape(*bits.shape[:-2], n * n)
    s, g = np.asarray(start), np.asarray(goal)
    si, gi = s[..., 0] * n + s[..., 1], g[..., 0] * n + g[..., 1]
    # one cell cannot carry both roles, and maze-dataset never draws start == goal
    if np.any(si == gi):
        raise ValueError("start and goal must differ")
    role = np.zeros_like(flat)
    np.put_along_axis(role, np.asarray(si)[..., None], 1, axis=-1)
    np.put_along_axis(role, np.asarray(gi)[..., None], 2, axis=-1)
    return flat + 16 * role


def hide_goal(tokens):
    """Tokens (torch, any shape) with the goal shown as a plain cell (its open sides kept): a maze without a goal."""
    return torch.where(tokens // 16 == 2, tokens - 32, tokens)


def decode(tokens, n):
    """(n*n,) tokens -> (open_sides (n, n, 4) bool, start (r, c), goal (r, c))."""
    t = np.asarray(tokens, dtype=np.int64).reshape(n, n)
    open_sides = ((t % 16)[..., None] >> np.arange(4)) & 1 == 1
    start = tuple(int(v) for v in np.argwhere(t // 16 == 1)[0])
    goal = tuple(int(v) for v in np.argwhere(t // 16 == 2)[0])
    return open_sides, start, goal


def bfs_distances(open_sides, source, blocked=None):
    """Moves from `source` to every cell through open sides, (n, n) int64, -1 where it cannot be reached; a
    `blocked` cell (r, c) is treated as a wall on every side (probes.py's rival routes that avoid a cell)."""
    n = open_sides.shape[0]
    opened = np.asarray(open_sides, dtype=bool).tolist()  # nested lists: much faster to index in a Python loop
    dist = [[-1] * n for _ in range(n)]
    dist[source[0]][source[1]] = 0
    if blocked is not None:
        dist[blocked[0]][blocked[1]] = -2  # "seen": never entered; reported as -1 below
    queue = deque([tuple(source)])
    while queue:
        r, c = queue.popleft()
        for d, (dr, dc) in enumerate(MOVES):
            nr, nc = r + dr, c + dc
            if opened[r][c][d] and 0 <= nr < n and 0 <= nc < n and dist[nr][nc] == -1:
                dist[nr][nc] = dist[r][c] + 1
                queue.append((nr, nc))
    return np.maximum(np.array(dist, dtype=np.int64), -1)


def solve(open_sides, start, goal):
    """BFS from the goal: dist (n, n) in moves (-1 if unreachable) and the shortest path start..goal as cells.

    The path follows direction_field(), so among equally short moves it takes the lowest direction index, like
    the labels; DFS mazes are trees and have one shortest path, but BFS keeps mazes with loops right too."""
    dist = bfs_distances(open_sides, goal)
    field, path, cur = direction_field(np.asarray(open_sides, dtype=bool), dist), [], tuple(start)
    while dist[cur] >= 0:  # an unreachable start gives an empty path
        path.append(cur)
        if dist[cur] == 0:
            break
        cur = (cur[0] + MOVES[field[cur]][0], cur[1] + MOVES[field[cur]][1])
    return dist, path


def shortest_moves(open_sides, dist):
    """Every right move per cell as a bitmask, batched: (..., n, n, 4), (..., n, n) -> (..., n, n) int64. Bit d
    (N, E, S, W) is set for each open side whose neighbour is one step closer to the goal, so a cell where several
    moves are equally short (mazes with loops) has several bits; the goal has bit GOAL_CLASS; unreachable cells are
    IGNORE."""
    n = dist.shape[-1]
    pad = [(0, 0)] * (dist.ndim - 2) + [(1, 1), (1, 1)]
    padded = np.pad(dist, pad, constant_values=-2)  # -2: off-grid neighbours never count as one step closer
    bits = np.zeros(dist.shape, dtype=np.int64)
    for d, (dr, dc) in enumerate(MOVES):
        nb = padded[..., 1 + dr:1 + dr + n, 1 + dc:1 + dc + n]
        bits |= (open_sides[..., d] & (dist > 0) & (nb == dist - 1)).astype(np.int64) << d
    bits[dist == 0] = 1 << GOAL_CLASS
    return np.where(dist >= 0, bits, IGNORE)


def goal_distance(x, grid):
    """BFS distance in moves from every cell to the goal, batched in torch from the tokens alone: x (B, N) ->
    (B, N) float, -1 where the goal cannot be reached (solve()'s dist for each maze). Bellman-Ford sweeps over the
    whole batch: each sweep every cell takes 1 + the least distance among its open neighbours, until none changes.
    The target of --dist-weight; no maze pool needed, so it works on the carried training batch as it is."""
    (h, w), B = grid, x.shape[0]
    t = x.view(B, h, w)
    sides = ((t % 16)[..., None] >> torch.arange(4, device=x.device)) & 1 == 1  # (B, h, w, 4): N, E, S, W open
    far = float(h * w)  # longer than any path: "not reached yet"
    d = torch.where(t // 16 == 2, 0.0, far)
    for _ in range(h * w):
        padded = torch.nn.functional.pad(d, (1, 1, 1, 1), value=far)
        nb = torch.stack([padded[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for dr, dc in MOVES], -1)
        new = torch.minimum(d, (nb + 1).masked_fill(~sides, far).amin(-1))
        if torch.equal(new, d):
            break
        d = new
    return torch.where(d >= far, -1.0, d).view(B, h * w)


def first_class(y):
    """The lowest class in each bitmask label (IGNORE stays IGNORE): for a maze without loops, the one right class."""
    y = np.asarray(y)
    lowest = np.where(y > 0, y & -y, 1)  # the lowest set bit
    return np.where(y > 0, np.log2(lowest).astype(np.int64), IGNORE)


def direction_field(open_sides, dist):
    """One move toward the goal per cell from BFS distances, batched: (..., n, n, 4), (..., n, n) -> (..., n, n):
    the lowest of the equally short moves of shortest_moves (GOAL_CLASS at the goal, IGNORE where unreachable)."""
    return first_class(shortest_moves(open_sides, dist))


def batch_labels(open_sides, start, dist, target="direction"):
    """(B, n*n) labels of B mazes from their BFS distances (labels() for one maze), as bitmasks of the right
    classes: direction, every move toward the goal along a shortest path (shortest_moves); path, the on-path bit,
    1 << 1 on every cell of every shortest path from the start (a maze with loops can have several) and 1 << 0
    elsewhere."""
    moves, (B, n) = shortest_moves(open_sides, dist), dist.shape[:2]
    if target == "direction":
        return moves.reshape(B, n * n)
    if target != "path":
        raise ValueError(f"unknown target {target!r}; use 'direction' or 'path'")
    # spread from each start along every shortest move at once, until no cell is added: the cells a shortest path
    # passes through (a move one step closer to the goal never leaves the set of shortest paths)
    on_path = np.zeros(dist.shape, dtype=bool)
    on_path[np.arange(B), start[:, 0], start[:, 1]] = dist[np.arange(B), start[:, 0], start[:, 1]] >= 0
    bits = np.where(moves >= 0, moves, 0)
    for _ in range(n * n):
        grown = on_path.copy()
        for d, (dr, dc) in enumerate(MOVES):
            src = on_path & ((bits >> d) & 1).astype(bool)  # on a shortest path, with a shortest move d
            grown[:, max(dr, 0):n + min(dr, 0), max(dc, 0):n + min(dc, 0)] |= \
                src[:, max(-dr, 0):n - max(dr, 0), max(-dc, 0):n - max(dc, 0)]
        if (grown == on_path).all():
            break
        on_path = grown
    return np.where(dist >= 0, 1 << on_path.astype(np.int64), IGNORE).reshape(B, n * n)


def labels(open_sides, start, goal, target="direction"):
    """Per-cell labels (n*n,) int64, bitmasks of the right classes: every shortest move toward the goal
    (direction) or the on-path bit (path); see batch_labels."""
    dist, _ = solve(open_sides, start, goal)
    return batch_labels(np.asarray(open_sides)[None], np.asarray(start)[None], dist[None], target)[0]


def rollout(scores, open_sides, start, goal, target="direction"):
    """Greedy decoded path from the start: best-scored unvisited open neighbour, ties in N,E,S,W order.

    direction: the score at the current cell of the move toward the neighbour; path: the neighbour's
    on-path log-odds scores[nb, 1] - scores[nb, 0]. Stops at the goal, at a dead end, or after n*n moves."""
    n = open_sides.shape[0]
    opened = np.asarray(open_sides, dtype=bool).tolist()
    cur, goal = tuple(start), tuple(goal)
    path, seen = [cur], {cur}
    for _ in range(n * n):
        if cur == goal:
            break
        best, best_score = None, None
        for d, (dr, dc) in enumerate(MOVES):
            nxt = (cur[0] + dr, cur[1] + dc)
            if not opened[cur[0]][cur[1]][d] or nxt in seen or not (0 <= nxt[0] < n and 0 <= nxt[1] < n):
                continue
            i = nxt[0] * n + nxt[1]
            s = scores[cur[0] * n + cur[1], d] if target == "direction" else scores[i, 1] - scores[i, 0]
            if best is None or s > best_score:  # strict: an equal later score keeps the earlier direction
                best, best_score = nxt, s
        if best is None:  # dead end: the caller sees that the path stops short of the goal
            break
        cur = best
        path.append(cur)
        seen.add(cur)
    return path


def symmetry(open_sides, start, goal, k):
    """Square symmetry k in 0..7: k % 4 clockwise quarter turns, then a transpose when k >= 4.

    Moves the grid and permutes the direction axis with it; works on one maze or a batch (..., n, n, 4)."""
    o = np.asarray(open_sides)
    n = o.shape[-2]
    s, g = np.asarray(start), np.asarray(goal)
    for _ in range(k % 4):
        # cell (r, c) goes to (c, n-1-r) and direction d to d+1 (N->E, E->S, S->W, W->N)
        o = np.roll(np.rot90(o, -1, axes=(-3, -2)), 1, axis=-1)
        s, g = (np.stack([p[..., 1], n - 1 - p[..., 0]], -1) for p in (s, g))
    if k >= 4:
        # transpose: (r, c) -> (c, r), which swaps N<->W and E<->S, i.e. d -> 3 - d
        o = np.swapaxes(o, -3, -2)[..., ::-1]
        s, g = s[..., ::-1], g[..., ::-1]
    o = np.ascontiguousarray(o)
    if s.ndim == 1:
        return o, (int(s[0]), int(s[1])), (int(g[0]), int(g[1]))
    return o, np.ascontiguousarray(s), np.ascontiguousarray(g)


@functools.lru_cache(maxsize=64)
def symmetry_maps(n, k):
    """Symmetry k of an n x n maze as index maps: cells (N,) and moves (4,), where view cell j is original cell
    cells[j] and view move d is original move moves[d] (the same for every cell)."""
    codes = np.arange(n * n * 4).reshape(n, n, 4)  # cell * 4 + move, moved around by symmetry() itself
    moved = symmetry(codes, (0, 0), (0, 1), k)[0].reshape(n * n, 4)
    return torch.from_numpy(moved[:, 0] // 4), torch.from_numpy(moved[0] % 4)


def symmetric_tokens(x, n, k):
    """Tokens x (B, n*n) of mazes -> the tokens of their image under symmetry k (torch, on x's device)."""
    cells, moves = symmetry_maps(n, k)  # (cached: do not change them in place)
    t = x[:, cells.to(x.device)]
    bits = sum(((t >> m) & 1) << d for d, m in enumerate(moves.tolist()))
    return bits + 16 * (t // 16)


def from_symmetric(logits, n, k):
    """Logits (B, n*n, C) of mazes seen under symmetry k -> the same scores on the original mazes: each cell's row
    goes back to its cell and, for direction scores (C = 5), each move's column back to its move (the goal class
    stays); on-path scores (C = 2) only move with their cells."""
    cells, moves = (t.to(logits.device) for t in symmetry_maps(n, k))
    out = torch.empty_like(logits)
    out[:, cells] = logits
    if logits.shape[-1] == 5:
        out[..., moves] = out[..., :4].clone()  # view move d is original move moves[d]
    return out


def canonical_keys(open_sides, start, goal):
    """One bytes key per maze of a batch, equal for mazes that are symmetric images of each other."""
    forms = [encode(*symmetry(open_sides, start, goal, k)).astype(np.uint8) for k in range(8)]
    return [min(f[i].tobytes() for f in forms) for i in range(len(forms[0]))]


def labelled_path(y, start, n):
    """(path, unique): the shortest path start..goal that direction labels y (n*n,) encode, following the lowest
    right move from the start (solve()'s tie-breaking), and whether it is the only shortest path (one right move at
    every cell on it). Empty if the goal cannot be reached."""
    path, cur, unique = [], tuple(start), True
    for _ in range(n * n):
        bits = int(y[cur[0] * n + cur[1]])
        if bits == IGNORE:
            return [], True
        path.append(cur)
        if bits == 1 << GOAL_CLASS:
            return path, unique
        unique = unique and bits & (bits - 1) == 0  # exactly one bit set
        d = (bits & -bits).bit_length() - 1
        cur = (cur[0] + MOVES[d][0], cur[1] + MOVES[d][1])
    raise ValueError("direction labels loop without reaching the goal")


def greedy_paths(scores, x):
    """The greedy rollout of every maze of a batch: scores (B, N, C) and tokens x (B, N) as numpy arrays -> per
    maze (open_sides, start, goal, path). The target is read from the class count (5: direction, 2: path)."""
    B, N, C = scores.shape
    if C not in (5, 2):
        raise ValueError(f"maze logits need 5 (direction) or 2 (path) classes, got {C}")
    n, target = int(round(N ** 0.5)), "direction" if C == 5 else "path"
    mazes = [decode(x[b], n) for b in range(B)]
    return [(*maze, rollout(scores[b], *maze, target)) for b, maze in enumerate(mazes)]


def decoded_paths(logits, x):
    """Per maze, the greedy rollout's path from the start as a tuple of cells if it reaches the goal, else None:
    what --segments auto waits to hold still (the answer a user reads; cells off the path may still change)."""
    rolled = greedy_paths(logits.detach().float().cpu().numpy(), x.cpu().numpy())
    return [tuple(path) if path[-1] == goal else None for _, _, goal, path in rolled]


def maze_metrics(logits, x, y, per_item=False):
    """reach / optimal / exact of the greedy rollout and per-cell accuracy, means over the batch (per_item=True:
    a list per metric, one value per maze). A cell is right when its best-scored class is any right one (every
    shortest move counts); exact is scored only for mazes with a unique shortest path (NaN per item otherwise,
    left out of the mean), and unique is the share of such mazes.

    Needs nothing but its arguments, so it scores mazes of any size; the target is read from the class count."""
    scores = logits.detach().float().cpu().numpy()
    x, y = x.cpu().numpy(), y.cpu().numpy()
    n = int(round(scores.shape[1] ** 0.5))
    out = {"reach": [], "optimal": [], "exact": [], "cell_acc": [], "unique": []}
    for b, (open_sides, start, goal, path) in enumerate(greedy_paths(scores, x)):
        if scores.shape[-1] == 5:  # direction: the labelled path, read off the labels (no BFS per maze and segment)
            best, unique = labelled_path(y[b], start, n)
        else:
            dist, best = solve(open_sides, start, goal)
            unique = labelled_path(shortest_moves(open_sides, dist).reshape(-1), start, n)[1]
        reached = path[-1] == goal
        out["reach"].append(float(reached))
        out["optimal"].append(float(reached and len(path) == len(best)))
        out["exact"].append(float(path == best) if unique else float("nan"))
        out["unique"].append(float(unique))
        known = y[b] != IGNORE
        out["cell_acc"].append(float(((y[b][known] >> scores[b].argmax(-1)[known]) & 1).mean()))
    return out if per_item else {k: nan_mean(v) for k, v in out.items()}


def right_answers(y, logits):
    """(..., N) bool tensor: the best-scored class of each cell is a right one (any shortest move); y (..., N) the
    direction labels (bitmasks), logits (..., N, C). Meaningless where y is IGNORE: mask those cells out."""
    return (y.clamp(min=0) >> logits.argmax(-1)) & 1 == 1


def distance_bands(dist, known, width, min_cells=1):
    """[(lo, lo + width, cells), ...]: the bands of `width` moves of distance to the goal (dist, a tensor) that hold
    at least min_cells of the known cells, with cells = known & (lo <= dist < lo + width)."""
    bands = []
    for lo in range(0, int(dist.max()) + 1, width):
        cells = known & (dist >= lo) & (dist < lo + width)
        if cells.sum() >= min_cells:
            bands.append((lo, lo + width, cells))
    return bands


def accuracy_by_distance(logits, x, y, width):
    """Per-cell accuracy in bands of `width` moves of distance to the goal (goal_distance), over the whole batch:
    [{"from": d, "to": d + width, "cells": n, "cell_acc": a}, ...] for the bands with cells. Where a model trained
    on small mazes goes wrong on large ones: near the goal, or beyond the distances it has seen."""
    n = int(round(x.shape[1] ** 0.5))
    x, y = x.cpu(), y.cpu()
    dist = goal_distance(x, (n, n))
    right = right_answers(y, logits.detach().float().cpu())
    known = (y != IGNORE) & (dist >= 0)
    return [{"from": lo, "to": hi, "cells": int(cells.sum()), "cell_acc": right[cells].double().mean().item()}
            for lo, hi, cells in distance_bands(dist, known, width)]


# Mazes: generation, caching and the task.

@contextmanager
def preserved_global_rngs():
    """MazeDatasetConfig reseeds Python's and NumPy's global RNGs; give the caller theirs (and torch's) back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def generator_name(generator=GENERATOR, gen_kwargs=None):
    """A generator and its arguments as one name for cache files and logs: gen_dfs, gen_dfs_percolation-p0.1."""
    return generator + "".join(f"-{k}{v}" for k, v in sorted((gen_kwargs or {}).items()))


def parse_kinds(spec):
    """A mixture of maze kinds from text: comma-separated generator[:key=value...] ->
    [(generator, gen_kwargs), ...]; "gen_dfs,gen_dfs_percolation:p=0.1" is perfect mazes and mazes with loops.
    Values are read as numbers where they are numbers. A name of MIXES stands for its mixture."""
    kinds = []
    for part in MIXES.get(spec.strip(), spec).split(","):
        name, *args = part.strip().split(":")
        if not name:
            raise ValueError(f"empty maze kind in {spec!r}")
        kinds.append((name, parse_gen_args(args)))
    return kinds


def parse_gen_args(items):
    """Generator arguments from KEY=VALUE texts -> dict, each value read as a number where it is one, true and
    false as booleans."""
    kwargs = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"generator arguments are KEY=VALUE, got {item!r}")
        if value.lower() in ("true", "false"):
            kwargs[key] = value.lower() == "true"
            continue
        try:
            kwargs[key] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            kwargs[key] = value
    return kwargs


def mix_parts(count, seed, kinds):
    """How a pool of `count` mazes is split across kinds: [(count, seed, generator, gen_kwargs), ...], evenly (the
    first kinds take the remainder); one kind keeps the pool's own seed, so a perfect-maze pool is what it always
    was. Otherwise part j has seed * 100 + j, a stream of its own (a percolation maze starts as a DFS maze)."""
    if len(kinds) == 1:
        return [(count, seed, *kinds[0])]
    return [(count // len(kinds) + (j < count % len(kinds)), seed * 100 + j, g, kw) for j, (g, kw) in enumerate(kinds)]


def load_mix(n, count, seed, cache_dir="data_cache", progress=True, kinds=((GENERATOR, None),)):
    """load_mazes for a mixture of kinds [(generator, gen_kwargs), ...]: each part cached on its own, then joined."""
    parts = [load_mazes(n, c, s, cache_dir, progress, g, kw) for c, s, g, kw in mix_parts(count, seed, kinds)]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def maze_dataset_chunk(n, count, seed, generator=GENERATOR, gen_kwargs=None):
    """`count` SolvedMazes from maze-dataset, serial (the parallel path is not reproducible), nothing saved.
    generator: a LatticeMazeGenerators method name (gen_dfs, gen_dfs_percolation, gen_wilson, ...), gen_kwargs its
    keyword arguments (e.g. {"p": 0.1} for gen_dfs_percolation)."""
    with preserved_global_rngs(), warnings.catch_warnings():
        # imported here: it takes about 2 s and the sorting tasks never need it; inside the guard, since its first
        # import draws from Python's global random state
        from maze_dataset import LatticeMazeGenerators, MazeDataset, MazeDatasetConfig
        warnings.simplefilter("ignore")  # it warns whenever the seed differs from its global default
        if not generator.startswith("gen_") or not hasattr(LatticeMazeGenerators, generator):
            raise ValueError(f"maze-dataset has no generator {generator!r}")
        try:
            cfg = MazeDatasetConfig(name="hrm-poh", grid_n=n, n_mazes=count, seed=seed,
                                    maze_ctor=getattr(LatticeMazeGenerators, generator),
                                    maze_ctor_kwargs=gen_kwargs or {})
            ds = MazeDataset.from_config(cfg, do_generate=True, load_local=False, save_local=False,
                                         do_download=False, gen_parallel=False, verbose=False)
        except Exception as exc:  # an argument it does not take, or mazes it cannot make (gen_percolation's
            # disconnected ones): one error the tools can print as a line
            raise ValueError(f"maze-dataset could not make {generator_name(generator, gen_kwargs)} mazes: "
                             f"{type(exc).__name__}: {exc}") from exc
    return list(ds.mazes)


def from_solved(maze):
    """SolvedMaze -> (open_sides, start, goal).

    connection_list[0][r, c] joins (r, c) to (r+1, c) and [1][r, c] joins (r, c) to (r, c+1)."""
    down, right = np.asarray(maze.connection_list, dtype=bool)
    o = np.zeros((*down.shape, 4), dtype=bool)
    o[:-1, :, 2] = o[1:, :, 0] = down[:-1]  # S of the upper cell, N of the lower one
    o[:, :-1, 1] = o[:, 1:, 3] = right[:, :-1]  # E of the left cell, W of the right one
    return o, tuple(int(v) for v in maze.start_pos), tuple(int(v) for v in maze.end_pos)


def pool_shapes(n, count):
    return {"open": (count, n, n, 4), "start": (count, 2), "goal": (count, 2), "plen": (count,),
            "dist": (count, n, n)}


def generate_mazes(n, count, seed, progress=False, generator=GENERATOR, gen_kwargs=None):
    """A pool of `count` n x n mazes as arrays; identical for the same (n, count, seed), prefixes shared.

    Chunk i uses a seed derived from (seed, i), so a bar can show progress and a pool of 2,000 is the first
    2,000 of a pool of 10,000 with the same seed."""
    pool = {"open": [], "start": [], "goal": [], "plen": [], "dist": []}
    with tqdm(total=count, desc=f"maze{n} seed {seed}", unit="maze", disable=not progress) as bar:
        for i, lo in enumerate(range(0, count, CHUNK)):
            chunk_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            for m in maze_dataset_chunk(n, min(CHUNK, count - lo), chunk_seed, generator, gen_kwargs):
                o, s, g = from_solved(m)
                dist, path = solve(o, s, g)
                for key, v in zip(pool, (o, s, g, len(path), dist)):
                    pool[key].append(v)
                bar.update(1)
    # dist (int16 holds any n <= 64) lets a batch be labelled without a BFS per maze
    types = {"open": bool, "start": np.int64, "goal": np.int64, "plen": np.int64, "dist": np.int16}
    return {k: np.array(v, dtype=types[k]).reshape(-1, *pool_shapes(n, 0)[k][1:]) for k, v in pool.items()}


def pool_file(n, count, seed, generator=GENERATOR, gen_kwargs=None):
    """The cache file name of a pool: every setting that changes its content is in the name."""
    return f"maze_g{n}_n{count}_seed{seed}_{generator_name(generator, gen_kwargs)}_v{CACHE_VERSION}.npz"


def save_atomic(obj, path, dump=None):
    """Write to a temporary file in the same folder, then rename: a kill, Ctrl-C or a full disk mid-write never
    leaves a damaged file under `path` (checkpoints, metrics.jsonl, ab.json, maze caches). The temporary name holds
    the process id, so two runs filling one maze cache never write into each other's file. dump(obj, binary file)
    writes it: torch.save (looked up at the call, so tests can patch it) unless given."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        # through a Python file, so a full disk raises OSError(ENOSPC) rather than torch's opaque RuntimeError
        with open(tmp, "wb") as f:
            (dump or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException as exc:  # the previous file stays intact and no temporary file is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = path  # so a one-line error can name the file
        raise


def load_mazes(n, count, seed, cache_dir="data_cache", progress=True, generator=GENERATOR, gen_kwargs=None):
    """generate_mazes() through an .npz cache named by the full config; a bad file is reported and rebuilt.
    An empty pool (count 0) is neither generated nor cached."""
    shapes = pool_shapes(n, count)
    if count == 0:
        types = {"open": bool, "dist": np.int16}
        return {k: np.zeros(shape, dtype=types.get(k, np.int64)) for k, shape in shapes.items()}
    path = os.path.join(cache_dir, pool_file(n, count, seed, generator, gen_kwargs))
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                pool = {k: f[k] for k in shapes}
            if any(pool[k].shape != shapes[k] for k in shapes):
                raise ValueError("arrays have the wrong shapes")
            return pool
        except Exception as e:  # any unreadable file: regenerate rather than train on garbage
            print(f"cache file {path} is unusable ({type(e).__name__}: {e}); regenerating")
    pool = generate_mazes(n, count, seed, progress, generator, gen_kwargs)
    os.makedirs(cache_dir, exist_ok=True)
    save_atomic(pool, path, dump=lambda p, f: np.savez(f, **p))
    return pool


def drop_overlap(pool, seen_keys, what="held-out"):
    """Remove the mazes of `pool` whose canonical form is in `seen_keys`; returns (pool, dropped count)."""
    keep = np.array([k not in seen_keys for k in canonical_keys(pool["open"], pool["start"], pool["goal"])],
                    dtype=bool).reshape(-1)
    dropped = int((~keep).sum())
    if dropped:
        print(f"{what}: dropped {dropped} of {len(keep)} mazes that are symmetric copies of earlier sets")
    return {k: v[keep] for k, v in pool.items()}, dropped


class MazeTask:
    """Mazes of one size: a cached training pool sampled with symmetries, and fixed val / test sets.
    generator / gen_kwargs pick maze-dataset's generator for every pool (default: perfect DFS mazes); kinds, a
    list of (generator, gen_kwargs) as parse_kinds gives, makes every pool an even mixture of them instead."""

    def __init__(self, name, n, *, seed=0, n_train=N_TRAIN, n_val=1000, n_test=1000, cache_dir="data_cache",
                 target="direction", augment=True, progress=True, generator=GENERATOR, gen_kwargs=None, kinds=None):
        if target not in ("direction", "path"):
            raise ValueError(f"unknown target {target!r}; use 'direction' or 'path'")
        self.name, self.n, self.target, self.augment = name, n, target, augment
        self.vocab_size, self.n_classes = 48, 5 if target == "direction" else 2
        self.grid, self.seq_len = (n, n), n * n
        # three seeds per task seed: the sets come from disjoint random streams
        kinds = kinds or [(generator, gen_kwargs)]
        self.pools = {s: load_mix(n, count, 3 * seed + i, cache_dir, progress, kinds)
                      for i, (s, count) in enumerate((("train", n_train), ("val", n_val), ("test", n_test)))}
        # and are made disjoint for real, symmetries included (only tiny grids ever repeat a maze)
        seen = set(canonical_keys(*(self.pools["train"][k] for k in ("open", "start", "goal"))))
        for s in ("val", "test"):
            self.pools[s], _ = drop_overlap(self.pools[s], seen, f"{name} {s}")
            keys = canonical_keys(*(self.pools[s][k] for k in ("open", "start", "goal")))
            assert seen.isdisjoint(keys)
            seen.update(keys)
        self.splits = {s: self.encode_pool(self.pools[s]) for s in ("val", "test")}

    def encode_pool(self, pool, ks=None):
        """Inputs x (B, n*n) and labels y (B, n*n) of a pool of mazes (a dict of arrays as generate_mazes returns:
        open, start, goal, dist; from this task's pools or from anywhere else), after applying symmetry ks[i] to
        maze i (none by default)."""
        o, s, g, dist = (np.array(pool[k]) for k in ("open", "start", "goal", "dist"))
        ks = np.zeros(len(o), dtype=int) if ks is None else np.asarray(ks)
        for k in range(1, 8):
            sel = ks == k
            if sel.any():
                # distances move with their cells; a size-1 direction axis makes symmetry() do just that
                dist[sel] = symmetry(dist[sel][..., None], s[sel], g[sel], k)[0][..., 0]
                o[sel], s[sel], g[sel] = symmetry(o[sel], s[sel], g[sel], k)
        x = encode(o, s, g).reshape(-1, self.seq_len)
        # labels are derived from the transformed maze, so inputs and targets always agree
        return torch.from_numpy(x), torch.from_numpy(batch_labels(o, s, dist, self.target))

    def train_batch(self, batch_size, gen, min_path_len=0, max_path_len=None):
        """B training mazes drawn with replacement (randomness only from gen), with min_path_len <= path length
        <= max_path_len, lengths in cells, the start and goal included (one more than the moves; the curriculum
        filters the cached pool instead of generating on the fly)."""
        plen = self.pools["train"]["plen"]
        upper = plen.max() if max_path_len is None else max_path_len
        allowed = np.flatnonzero((plen >= min_path_len) & (plen <= upper))
        if len(allowed) == 0:  # curriculum asked for what the pool lacks: use the mazes closest to the bounds
            allowed = np.flatnonzero(plen == (plen.max() if min_path_len > plen.max() else plen.min()))
        idx = allowed[torch.randint(len(allowed), (batch_size,), generator=gen).numpy()]
        ks = torch.randint(8, (batch_size,), generator=gen).numpy() if self.augment else np.zeros(batch_size, int)
        return self.encode_pool({k: v[idx] for k, v in self.pools["train"].items()}, ks)

    def split(self, name):
        if name not in self.splits:
            raise ValueError(f"unknown split {name!r}; use 'val' or 'test'")
        return self.splits[name]

    def metrics(self, logits, x, y, per_item=False):
        return maze_metrics(logits, x, y, per_item)

    def chance(self, x, y, seed=0):
        """The metrics of the same greedy rollout on random scores: the level a model must clear. DFS mazes have
        long corridors with no choice in them, so chance solves about 0.12 of 12x12 DFS mazes, not zero."""
        g = torch.Generator().manual_seed(seed)
        return maze_metrics(torch.randn(*x.shape, self.n_classes, generator=g), x, y)


# Sorting under partial observability.

def greedy_ranks(logits):
    """(B, L, L) position x rank logits -> (B, L) ranks: take the best pair whose row and column are free, repeat."""
    B, L, _ = logits.shape
    s = torch.nan_to_num(logits.detach().float().cpu(), nan=-1e30, posinf=1e30, neginf=-1e30)
    ranks = torch.empty(B, L, dtype=torch.long)
    rows = torch.arange(B)
    for _ in range(L):
        flat = s.reshape(B, L * L).argmax(1)  # first maximum: ties go to the lower position, then lower rank
        pos, rank = flat // L, flat % L
        ranks[rows, pos] = rank
        s[rows, pos, :] = float("-inf")  # free pairs stay finite, so a used row or column is never picked
        s[rows, :, rank] = float("-inf")
    return ranks


def expected_ranks(logits):
    """(B, L, L) position x rank logits -> (B, L) ranks: positions sorted by their expected rank under the
    softmax, ties by position. Kendall tau scores the order of pairs, and this is the order the model's rank
    distributions imply: an unsure (hidden) element lands in the middle, where its expected pair errors are
    smallest, instead of in whatever rank the confident elements left free."""
    p = torch.nan_to_num(logits.detach().float().cpu()).softmax(-1)
    key = (p * torch.arange(p.shape[-1], dtype=p.dtype)).sum(-1)  # (B, L) expected rank per position
    return key.argsort(dim=1, stable=True).argsort(dim=1)


def rank_metrics(pred, true, per_item=False):
    """Kendall tau-a, per-element accuracy and perfect-sort rate of (B, L) ranks, means over the batch
    (per_item=True: a list per metric, one value per array)."""
    L = true.shape[1]
    agree = torch.sign(pred[:, :, None] - pred[:, None, :]) * torch.sign(true[:, :, None] - true[:, None, :])
    tau = agree.float().sum((1, 2)) / (L * (L - 1))  # the full matrix counts every pair twice
    right = (pred == true).float()
    items = {"tau": tau, "elem_acc": right.mean(1), "perfect": right.min(1).values}
    return {k: v.tolist() if per_item else v.mean().item() for k, v in items.items()}


def reference_ranks(x, fill="mean"):
    """The simple reference: visible values in order, hidden ones at the mean visible value, ties by position.

    Hidden values can go at the mean (the default) or at 0 (fill="zero"). They score about the same: on 10,000 sort12
    test arrays tau-a is 0.484 with the mean and 0.501 with 0 (fill="zero"), as the noisy mean of six values
    is a worse guess of a hidden value than the middle of the range."""
    x = x.cpu()
    hidden = x == SORT_MASK
    vals = (x - 100).float().masked_fill(hidden, 0.0)
    if fill == "mean":
        centre = vals.sum(1) / (~hidden).sum(1).clamp(min=1)
    elif fill == "zero":
        centre = torch.zeros(x.shape[0])
    else:
        raise ValueError(f"unknown fill {fill!r}; use 'mean' or 'zero'")
    key = torch.where(hidden, centre[:, None], vals)
    order = torch.argsort(key, dim=1, stable=True)  # stable: equal keys keep position order
    return torch.argsort(order, dim=1)


class SortTask:
    """Rank L distinct integers with half of them hidden; training arrays are fresh from the caller's generator."""

    def __init__(self, name, L, *, hidden=True, seed=0, n_val=2000, n_test=10000):
        self.name, self.L, self.n_hidden = name, L, L // 2 if hidden else 0
        self.vocab_size, self.n_classes = SORT_MASK + 1, L
        self.grid, self.seq_len = (1, L), L
        # fixed seeds far from small run seeds, so a training generator seeded 0, 1, ... never replays them
        self.splits = {s: self.train_batch(count, torch.Generator().manual_seed(10**9 + 2 * seed + i))
                       for i, (s, count) in enumerate((("val", n_val), ("test", n_test)))}

    def train_batch(self, batch_size, gen, min_path_len=0):
        """Fresh arrays drawn from gen; min_path_len is the maze curriculum, accepted for one interface."""
        B, L = batch_size, self.L
        # the first L of a random permutation of the 200 values: distinct, uniform without replacement
        values = torch.rand(B, 2 * 100, generator=gen).argsort(1)[:, :L] - 100
        hide = torch.rand(B, L, generator=gen).argsort(1)[:, :self.n_hidden]
        x = (values + 100).scatter(1, hide, SORT_MASK)
        y = values.argsort(1).argsort(1)  # rank among all L values, 0 = smallest
        return x, y

    def split(self, name):
        if name not in self.splits:
            raise ValueError(f"unknown split {name!r}; use 'val' or 'test'")
        return self.splits[name]

    def metrics(self, logits, x, y, per_item=False):
        """tau, elem_acc, perfect from expected-rank decoding (the primary); the same with the suffix
        _assign from greedy one-to-one assignment, which wins on element accuracy and loses on tau."""
        scores = rank_metrics(expected_ranks(logits), y.cpu(), per_item)
        assigned = rank_metrics(greedy_ranks(logits), y.cpu(), per_item)
        scores.update({f"{k}_assign": v for k, v in assigned.items()})
        return scores

    def reference_metrics(self, x, y, fill="mean"):
        return rank_metrics(reference_ranks(x, fill), y.cpu())


MAX_MAZE = 64  # the largest mazeN: a pool's distances are int16, which holds any n <= 64


def make_task(name, *, seed=0, n_train=None, n_val=None, n_test=None, cache_dir="data_cache",
              target="direction", augment=True, progress=True, upos=False, word_dropout=0.0, generator=GENERATOR,
              gen_kwargs=None, kinds=None):
    """Build a task by name: mazeN (3 <= N <= 64), sortN or sortN-visible (2 <= N <= 64), or ud_ewt (dependency
    parsing, parsing.ParseTask; cache_dir is the folder with the treebank's files)."""
    if name == "ud_ewt":
        import parsing  # here, so the maze and sorting tasks never load it
        return parsing.ParseTask(name, cache_dir, upos=upos, word_dropout=word_dropout, n_val=n_val, n_test=n_test,
                                 progress=progress)
    maze, sort = re.fullmatch(r"maze(\d+)", name), re.fullmatch(r"sort(\d+)(-visible)?", name)
    if maze and 3 <= int(maze[1]) <= MAX_MAZE:
        sizes = {k: v for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)) if v is not None}
        return MazeTask(name, int(maze[1]), seed=seed, cache_dir=cache_dir, target=target, augment=augment,
                        progress=progress, generator=generator, gen_kwargs=gen_kwargs, kinds=kinds, **sizes)
    if sort and 2 <= int(sort[1]) <= 64:
        sizes = {k: v for k, v in (("n_val", n_val), ("n_test", n_test)) if v is not None}
        return SortTask(name, int(sort[1]), hidden=sort[2] is None, seed=seed, **sizes)
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)} "
                     f"(or any mazeN with 3 <= N <= {MAX_MAZE}, sortN / sortN-visible with 2 <= N <= 64)")
