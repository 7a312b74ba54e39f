"""
Score a trained checkpoint on the test split of a task, its own or another one: a maze12 model on larger mazes
with more inner steps and segments (size generalisation), or an old run under new metric code.

    python evaluate.py runs/maze12-hrm-s0                                   # its own test set, as trained
    python evaluate.py runs/maze12-hrm-s0 --task maze16 --segments 12       # larger mazes, more refinement
    python evaluate.py runs/maze12-hrm-s0 --task maze24 --inner-steps 16 --segments 12 --out gen24.json
    python evaluate.py runs/maze12-hrm-s0 --ablate-routing shuffle          # does the per-token routing matter?
    python evaluate.py runs/maze12-hrm-s0 --task maze24 --segments auto     # as many segments as each maze needs
    python evaluate.py runs/maze12-hrm-s0 --generator gen_dfs_percolation --gen-arg p=0.1   # mazes with loops
    python evaluate.py runs/maze12-hrm-s0 --segments 32 --plot segments.png   # accuracy against segments
    python evaluate.py runs/maze12-hrm-s0 --task maze24 --segments auto --by-distance 30   # where it goes wrong
    python evaluate.py runs/maze12-hrm-s0 --task maze24 --segments auto --symmetries 8     # mean of 8 views
    python evaluate.py runs/maze12-hrm-s0 --task maze24 --segments auto --latch    # a cell keeps an answer that held

Defaults: the checkpoint's task, inner steps, segments and training temperature, and the test split of its data
seed (the same items train.py's test.json was measured on; other maze sizes get their own cached pools from the
same seeds). Prints the metrics of every segment (with fixed --segments; with auto, of the answers where each
item stopped) and writes them as JSON with --out. The model never trains here.

--segments auto: each item runs segments until its answer has come out the same in PATIENCE more segments, up to a cap
that grows with the grid (segment_cap): for a maze the decoded path from the start, once it reaches the goal (cells
off the path may go on changing), for other tasks the argmax class of every token (answer_keys). The answer is
taken where the item stopped, and the segments used are reported (mean, max, per item in the JSON).

--latch (Latch): a maze cell keeps its answer once its best move has held for LATCH's segments in a row, each with the
cell reached by the goal's answer (the front head of a model trained with train.py --front-weight) or, without a
front head, sure of it; with fixed segments and with auto alike.

--arrival (Arrival): a model trained with train.py --front-weight --front-every, read by when its front head first
says the goal's answer has reached each cell: a cell's move goes to the open neighbour reached first, as a walk down
BFS distances would, and falls back to the model's move where no neighbour has been reached yet.
"""

import argparse
import json
import math

import torch

import data
import train
from hrm_controller import ABLATIONS
from poh_block import open_neighbours, shifted

PATIENCE = 3  # --segments auto: an item stops when PATIENCE segments in a row repeat the answer before them
# --latch (Latch), gate and hold: a cell keeps its answer once its best move has been the same in `hold` segments in
# a row (the first of them counted), each time with the front head's P(reached) >= gate ("front": a model with the
# head) or the move's probability >= gate ("sure": a model without it); chosen on validation mazes (docs/)
LATCH = {"front": (0.5, 3), "sure": (0.9, 3)}


def answer_keys(task, logits, x):
    """Per item, the answer --segments auto waits to hold still, or None while there is none to wait for: a maze's
    decoded path while it reaches the goal (data.decoded_paths), any other task's argmax class of every token.
    Watching every cell of a maze instead ran 12x12 mazes with loops 3.5x longer, into the segments where
    answers degrade (0.947 optimal against 0.970 on validation mazes; docs/experiments.md)."""
    if isinstance(task, data.MazeTask):
        return data.decoded_paths(logits, x)
    return [tuple(row) for row in logits.argmax(-1).tolist()]


def segment_cap(grid, n_layers, n_steps):
    """The most segments --segments auto runs: information moves about one cell per block application, so twice
    the cells over the block applications of a segment (at least 8) lets it cross any path of the grid twice."""
    return max(8, math.ceil(2 * grid[0] * grid[1] / (n_layers * n_steps)))


@torch.no_grad()
def run_adaptive(model, task, x, n_steps, temperature, cap, patience=PATIENCE, batch_size=64, device="cpu",
                 ablate=None, progress=False):
    """Segments until each item's answer (answer_keys) has not changed for `patience` segments, or `cap`. Returns
    the logits of each item's answer where it stopped (B, N, C) on the CPU and the segments each used (B,). An item
    that stops leaves the batch, so the time goes to the mazes still being solved. `progress`: a bar of the items
    that have stopped (a large maze that never settles runs all `cap` segments, which can take minutes)."""
    model.eval()
    answers, used_all = [], []
    bar = train.item_bar(len(x), "items stopped", progress)
    gen = torch.Generator().manual_seed(0)  # the ablations' random draws, as in train.evaluate
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        B = len(xb)
        active = torch.arange(B)  # the items still running, as indices into xb
        state, previous, final = None, None, None
        calm = torch.zeros(B, dtype=torch.long)  # per active item: segments in a row with an unchanged answer
        used = torch.full((B,), cap)
        for s in range(cap):
            xa = xb[active.to(device)]
            out = model(xa, state=state, temperature=temperature, grid=task.grid, n_steps=n_steps, ablate=ablate,
                        ablate_gen=gen)
            logits = out["logits"].float().cpu()
            if final is None:
                final = torch.empty(B, *logits.shape[1:])
            answer = answer_keys(task, logits, xa)
            if out.get("pending") is not None:  # a read-out that says an item's answer is not ready (Arrival)
                answer = [None if wait else a for a, wait in zip(answer, out["pending"].tolist())]
            if previous is not None:
                same = torch.tensor([a is not None and a == b for a, b in zip(answer, previous)])
                calm = torch.where(same, calm + 1, torch.zeros_like(calm))
            stop = (calm >= patience) | (s + 1 == cap)
            final[active[stop]], used[active[stop]] = logits[stop], s + 1
            bar.set_postfix(segment=f"{s + 1}/{cap}", running=int((~stop).sum()), refresh=False)
            bar.update(int(stop.sum()))  # redraws at most once a second, also when no item stopped (miniters=0)
            keep = ~stop
            active, calm = active[keep], calm[keep]
            previous = [a for a, k in zip(answer, keep.tolist()) if k]
            if not len(active):
                break
            state = {k: v[keep.to(v.device)] for k, v in out["state"].items()}
        answers.append(final)
        used_all.append(used)
    bar.close()
    model.train()
    return torch.cat(answers), torch.cat(used_all)


class Scoring(torch.nn.Module):
    """What SymmetryMean and Latch share: a maze model wrapped for scoring, called like it (run_adaptive,
    train.evaluate) and showing its cfg; it maps answers and state, not a loss or a trace, so it takes no labels
    and no trace (ValueError)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def refuse_training_inputs(self, kwargs):
        if kwargs.get("y") is not None or kwargs.get("trace"):
            raise ValueError(f"{type(self).__name__} scores mazes; it takes no labels and no trace")


class SymmetryMean(Scoring):
    """A maze model that solves each maze as `views` of its 8 square symmetries at once (data.symmetry: turns,
    then a transpose) and answers with the mean of their probabilities, each mapped back to the maze as given:
    test-time augmentation, at `views` times the compute. Called like the model; its state holds every maze's views
    together, (B, views, ...), so run_adaptive can drop a maze that has stopped as it does with the plain model.
    Views k = 0..views-1: 4 are the quarter turns, 8 add their mirror images. For scoring only: the logits and the
    state are mapped, not the loss or a trace, so it takes no labels and no trace."""

    def __init__(self, model, views):
        super().__init__(model)
        self.views = views

    def forward(self, x, state=None, grid=None, **kwargs):
        self.refuse_training_inputs(kwargs)
        B, n, V = len(x), grid[0], self.views
        views = torch.stack([data.symmetric_tokens(x, n, k) for k in range(V)], 1)  # (B, V, N)
        if state is not None:
            state = {k: v.flatten(0, 1) for k, v in state.items()}
        out = self.model(views.flatten(0, 1), state=state, grid=grid, **kwargs)
        # each view's answer (B, V, N, C), mapped back to the maze as given
        back = lambda t: torch.stack([data.from_symmetric(t[:, k], n, k) for k in range(V)], 1)
        logp = back(out["logits"].float().log_softmax(-1).unflatten(0, (B, V)))
        mean = logp.logsumexp(1) - math.log(V)  # the log of the mean probability
        reached = out.get("reached")
        if reached is not None:  # the front head's P(reached), mean over the views, each mapped back to its cell
            reached = back(reached.unflatten(0, (B, V))[..., None]).mean(1)[..., 0]
        return {**out, "logits": mean, "reached": reached,
                "state": {k: v.unflatten(0, (B, V)) for k, v in out["state"].items()}}


class Latch(Scoring):
    """A maze model whose answer at a cell is kept once it has held: when a cell's best class has stayed the same
    for `hold` segments in a row, each time with the cell ready, its logits from then on are those of that segment,
    whatever the model goes on to say there (the model's state is not touched). Ready: the front head's P(reached)
    >= gate for a model trained with --front-weight (rules["front"]), else the best class's own probability >= gate
    (rules["sure"]); rules maps each to (gate, hold), default LATCH. As BFS keeps the first distance it sets: an
    answer that held and would later be lost (probes.py race) stays; one the goal's answer has not yet reached
    stays free. Evaluation only, called like the model; its memory rides in the carried state (keys "latch_*",
    batch first), so run_adaptive drops a stopped maze's memory with the rest of its state, and SymmetryMean can
    sit inside it (P(reached) is then the mean over the views)."""

    def __init__(self, model, rules=None):
        super().__init__(model)
        self.rules = rules or LATCH

    def forward(self, x, state=None, **kwargs):
        self.refuse_training_inputs(kwargs)
        state = dict(state or {})
        memory = {k: state.pop(k) for k in [k for k in state if k.startswith("latch_")]}
        out = self.model(x, state=state or None, **kwargs)
        logits = out["logits"].float()
        best, reached = logits.argmax(-1), out.get("reached")  # (B, N) each; reached None without a front head
        gate, hold = self.rules["front" if reached is not None else "sure"]
        ready = (reached if reached is not None else logits.softmax(-1).amax(-1)) >= gate
        if memory:
            calm = torch.where(ready & (best == memory["latch_best"]), memory["latch_calm"] + 1, ready.long())
            kept, locked = memory["latch_logits"], memory["latch_locked"]
        else:
            calm, kept, locked = ready.long(), logits, torch.zeros_like(ready)
        new = (calm >= hold) & ~locked
        kept, locked = torch.where(new[..., None], logits, kept), locked | new
        memory = {"latch_logits": kept, "latch_locked": locked, "latch_calm": calm, "latch_best": best}
        return {**out, "logits": torch.where(locked[..., None], kept, logits), "state": {**out["state"], **memory}}


# --arrival: a cell arrives at the first inner step from which P(reached) >= ARRIVAL_GATE to its segment's end; BONUS
# is added to the log-probability of the moves toward the first-reached neighbour (above any log-probability)
ARRIVAL_GATE, BONUS = 0.5, 1e3


def arrival_logits(logits, x, arrival, grid):
    """Maze logits (B, N, 5) re-read by arrival times (B, N) (inf: not yet reached): at every cell but the goal, the
    moves toward the open neighbour with the earliest arrival get BONUS, so they win over any other class and, where
    several neighbours arrived at once, the model's own scores choose among them. A cell with no reached open
    neighbour keeps the model's answer. Returns log-probabilities plus the bonus. The neighbours are read as the
    gathered attention reads them (poh_block.open_neighbours, shifted)."""
    opened = open_neighbours(x, grid)[1][..., 1:]  # (B, N, 4): the open sides N, E, S, W
    views = shifted(arrival[:, None, :, None], grid)[1:]  # each neighbour's arrival, 4 x (B, 1, h, w, 1)
    around = torch.where(opened, torch.stack([v.reshape(arrival.shape) for v in views], -1), torch.inf)
    earliest = around.amin(-1, keepdim=True)
    first = (around == earliest) & earliest.isfinite() & (x // 16 != 2)[..., None]  # role 2: the goal (data.encode)
    logp = logits.float().log_softmax(-1)
    return torch.cat([logp[..., :4] + BONUS * first, logp[..., 4:]], -1)


class Arrival(Scoring):
    """A maze model with a front head trained at every inner step (train.py --front-every), read by arrival: a
    cell's arrival is the first inner step, counted over the segments, from which the head's P(reached) >= gate
    holds to the end of its segment (once set, it is kept), and its answer is the move toward the open neighbour
    that arrived first (arrival_logits). If the head's front moves at a constant speed of at most 2 cells per inner
    step (so that a nearer and a farther neighbour never arrive at the same step), arrivals order cells by their
    distance to the goal, and the greedy walk from the start follows a shortest path, however long the routes that
    race to a cell. Until the front reaches the start, an item is "pending" (run_adaptive waits; a maze the front
    never reaches runs to the cap). Arrivals ride in the carried state (keys "arrival_*", batch first), so
    run_adaptive drops a stopped maze's with the rest of its state."""

    def __init__(self, model, gate=ARRIVAL_GATE):
        super().__init__(model)
        if getattr(model, "front_head", None) is None:
            raise ValueError("--arrival reads the front head; this model has none (train.py --front-weight "
                             "--front-every)")
        self.gate = gate

    def forward(self, x, state=None, grid=None, **kwargs):
        self.refuse_training_inputs(kwargs)
        if grid[0] != grid[1]:
            raise ValueError(f"--arrival reads square mazes, got a {grid[0]}x{grid[1]} grid")
        state = dict(state or {})
        arrival, clock = state.pop("arrival_time", None), state.pop("arrival_clock", None)
        out = self.model(x, state=state or None, grid=grid, front_steps=True, **kwargs)
        reached = out["reached_steps"] >= self.gate  # (B, R, N)
        # from which inner step on a cell reads reached to the segment's end: a read that flickers up and falls
        # again within the segment (the first inner step of a fresh maze reads about the same everywhere) is no arrival
        stays = reached.flip(1).cummin(1).values.flip(1)
        if arrival is None:
            arrival = torch.full(reached[:, 0].shape, torch.inf, device=x.device)
            clock = torch.zeros(len(x), device=x.device)
        first = stays.float().argmax(1) + 1  # per cell, the first inner step of the segment's last run of reached
        arrival = torch.where(stays.any(1) & arrival.isinf(), clock[:, None] + first, arrival)
        logits = arrival_logits(out["logits"], x, arrival, grid)
        # (B,): the front has not reached the start (role 1), so the path from it still follows the model's own
        # moves; --segments auto waits for it
        pending = ((x // 16 == 1) & arrival.isinf()).any(1)
        return {**out, "logits": logits, "pending": pending,
                "state": {**out["state"], "arrival_time": arrival, "arrival_clock": clock + reached.shape[1]}}


def read_by_arrival(model, config, path):
    """Arrival(model) for a run trained with --front-every, else ValueError: the head's reads inside a segment,
    which the arrivals are, were never trained (this tool's and sample_maze.py's --arrival)."""
    if not config.get("front_every"):
        raise ValueError(f"--arrival reads the front head at every inner step; {path} was not trained with "
                         "--front-every")
    return Arrival(model)


def parse_segments(text):
    """--segments as given: None (unset), "auto", or a count >= 1 as an int; anything else ends in one line (this
    tool's and sample_maze.py's flag)."""
    if text is None or text == "auto":
        return text
    if not str(text).isdigit() or int(text) < 1:
        raise SystemExit(f"error: --segments must be >= 1 or auto, got {text}")
    return int(text)


def get_parser():
    p = argparse.ArgumentParser(description="Score a checkpoint on a held-out test split.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint file, or a run folder (its best.pt)")
    p.add_argument("--task", default=None, help="task to score on (default: the checkpoint's)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps per segment (default: the run's "
                   "--eval-steps, else its R)")
    p.add_argument("--segments", default=None, help="segments with carried state (default: the run's), or auto: "
                   "until each item's answer is stable, up to a cap that grows with the grid")
    p.add_argument("--n-test", type=int, default=None, help="test items (default: as many as the run was tested on "
                   "for its own task: 1,000 mazes, 10,000 sorts, all 2,077 sentences; 1,000 for another size)")
    p.add_argument("--data-dir", default=None, help="where generated maze sets are cached (default: the run's)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (with --symmetries V: "
                   "views, so batch-size / V mazes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--ablate-routing", default=None, choices=ABLATIONS,
                   help="replace the controller's head weights: uniform (all heads), shuffle (another token's "
                        "weights, same sample) or fixed (the most common head set for every token)")
    p.add_argument("--generator", default=None, help="mazes: score on mazes of this maze-dataset generator "
                   "(e.g. gen_dfs, gen_dfs_percolation, gen_wilson; default: the run's training mix, its --mazes)")
    p.add_argument("--gen-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of --generator, e.g. p=0.1 (loop density of gen_dfs_percolation); repeatable")
    p.add_argument("--data-seed", type=int, default=None, help="score on the pools of this data seed instead of "
                   "the run's, e.g. 3 (pools 9-11): mazes for choosing a setting, never the test mazes reported")
    p.add_argument("--by-distance", type=int, default=None, metavar="MOVES",
                   help="mazes: also print the answers' cell accuracy in bands of this many moves from the goal")
    p.add_argument("--symmetries", type=int, default=1, metavar="V",
                   help="mazes: solve each maze as V of its 8 symmetric images (4: the quarter turns; 8: and "
                        "their mirror images) and decode the mean of their answers, at V times the compute; 1: the "
                        "maze as given")
    p.add_argument("--plot", default=None, help="mazes, a fixed --segments: draw reach and optimal against "
                   "segments into this PNG")
    p.add_argument("--out", default=None, help="write the result here as JSON")
    p.add_argument("--latch", action="store_true", help="mazes: a cell keeps its answer once its best move has "
                   "held 3 segments in a row with the cell reached (front head) or sure (Latch, LATCH)")
    p.add_argument("--arrival", action="store_true", help="mazes, a model trained with --front-every: each cell "
                   "moves toward the open neighbour its front head read as reached first (Arrival)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    return p


def score(path, task_name=None, inner_steps=None, segments=None, n_test=None, data_dir=None,
          batch_size=64, device="cpu", ablate=None, generator=None, gen_kwargs=None, by_distance=None,
          data_seed=None, progress=False, symmetries=1, latch=False, plot=False, arrival=False):
    """Returns {"checkpoint" (the file scored), "step", "task", "data_seed", "inner_steps", "generator" (mazes: the
    kind scored, else None), "segments", "symmetries", "latch", "arrival", "temperature", "ablate", "n_test",
    **final segment metrics, "per_segment": [...], "routing": last segment's per-step head usage or None,
    "chance": {...}}; with segments="auto" also "segments_used" (mean), "segments_max", "segment_cap" and
    "segments_per_item", and per_segment holds the one set of metrics of the answers where each item stopped; with
    by_distance (mazes) also "by_distance", data.accuracy_by_distance of the answers (the last segment's, or where
    each item stopped)."""
    path = train.checkpoint_file(path)
    model, ckpt = train.load_checkpoint(path, device)
    config = ckpt.get("config") or {}
    own = config.get("task")
    task_name = task_name or own
    if task_name is None:
        raise ValueError(f"{path} records no task; pass --task")
    if train.task_kind(task_name) != train.task_kind(own or task_name):
        raise ValueError(f"{path} was trained on {own}; it cannot be scored on {task_name}")
    # the training and validation pools only serve the overlap check here: the run's own (already cached) for its
    # own task, so the test items are exactly train.py's; for another size or data seed a small training pool and
    # no validation
    run_seed = config.get("data_seed", 0)
    seed = run_seed if data_seed is None else data_seed
    same = task_name == own and generator is None and seed == run_seed
    if data_seed is not None and task_name == "ud_ewt":
        raise ValueError("--data-seed: ud_ewt has one fixed dev and test set; there are no other pools to score")
    if not 1 <= symmetries <= 8:
        raise ValueError(f"--symmetries must be 1 to 8, got {symmetries}")
    maze = train.task_kind(task_name) == "maze"
    for flag, given in (("--generator", generator is not None), ("--by-distance", by_distance),
                        ("--symmetries", symmetries != 1), ("--latch", latch), ("--plot", plot),
                        ("--arrival", arrival)):
        if given and not maze:  # here, before the scoring, which can take an hour (plot: the caller draws)
            raise ValueError(f"{flag} applies to mazes only; {task_name} is not a maze task")
    if ablate and model.controller is None:
        raise ValueError(f"{path} has no router (controller {model.cfg.controller}); nothing to ablate")
    if arrival and (latch or symmetries > 1):
        raise ValueError("--arrival reads one view's front head: not with --latch or --symmetries")
    # the read-outs wrap the model (each refuses what it cannot read), before the mazes are made
    if symmetries > 1:  # batch_size mazes' views per model call (batch_size // V mazes), not V times as many
        model, batch_size = SymmetryMean(model, symmetries), max(1, batch_size // symmetries)
    if latch:
        model = Latch(model)
    if arrival:
        model = read_by_arrival(model, config, path)
    n_test = n_test or (config.get("n_test") if same else 1000)  # None: the task's own default, as train.py
    task = data.make_task(task_name, seed=seed, n_train=config.get("n_train") if same else 100,
                          n_val=config.get("n_val") if same else 0, n_test=n_test,
                          cache_dir=data_dir or train.run_data_dir(config, path),
                          target=config.get("target", "direction"), progress=False,
                          upos=config.get("upos") == "gold",
                          # the run's own mix of maze kinds unless --generator
                          kinds=([(generator, gen_kwargs)] if generator
                                 else data.parse_kinds(config.get("mazes", data.GENERATOR))))
    if (task.vocab_size, task.n_classes) != (model.cfg.vocab_size, model.cfg.n_classes):
        raise ValueError(f"{task_name} has {task.n_classes} classes over {task.vocab_size} tokens, the model "
                         f"{model.cfg.n_classes} over {model.cfg.vocab_size} (a sorting model has a fixed length)")
    inner_steps = inner_steps or train.checkpoint_inner_steps(ckpt, model)  # as train.py's test.json was measured
    segments = segments or config["segments"]
    temperature = train.checkpoint_temperature(ckpt)  # the temperature it trained at when it was saved
    x, y = task.split("test")
    extra = {}
    if segments == "auto":
        if task.grid is None:
            raise ValueError(f"--segments auto sets its cap from the grid, and {task_name} has none; pass a count")
        cap = segment_cap(task.grid, model.cfg.n_layers, inner_steps)
        logits, used = run_adaptive(model, task, x, inner_steps, temperature, cap, batch_size=batch_size,
                                    device=device, ablate=ablate, progress=progress)
        per_seg, routing = [task.metrics(logits, x, y)], None
        extra = {"segments_used": used.float().mean().item(), "segments_max": int(used.max()), "segment_cap": cap,
                 "segments_per_item": used.tolist()}
    else:
        scored = train.evaluate(model, task, x, y, segments, n_steps=inner_steps, temperature=temperature,
                                batch_size=batch_size, device=device, ablate=ablate, keep_logits=bool(by_distance),
                                progress=progress)
        per_seg, routing, logits = scored["per_segment"], scored["routing"], scored.get("logits")
    if by_distance:
        extra["by_distance"] = data.accuracy_by_distance(logits, x, y, by_distance)
    # the yardstick printed beside the scores: random scores through the same decoder (mazes), or the simple
    # reference that puts hidden values at 0 (sorting, about the best possible tau with half hidden)
    chance = (task.chance(x, y) if hasattr(task, "chance") else
              task.reference_metrics(x, y, fill="zero") if hasattr(task, "reference_metrics") else None)
    return {"checkpoint": path, "step": ckpt.get("step"), "task": task_name, "data_seed": seed,
            "inner_steps": inner_steps,
            "generator": (data.generator_name(generator, gen_kwargs) if generator else config.get("mazes", data.GENERATOR))
            if maze else None,
            "segments": segments, "symmetries": symmetries, "latch": latch, "arrival": arrival,
            "temperature": temperature,
            "ablate": ablate,
            "n_test": len(x), **per_seg[-1],
            "per_segment": per_seg, "routing": routing, "chance": chance, **extra}


def main(argv=None):
    train.keep_freed_memory()  # no page faulting of freed blocks: about 30% less time on a CPU
    args = get_parser().parse_args(argv)
    args.segments = parse_segments(args.segments)
    train.check_at_least(("--inner-steps", args.inner_steps, 1), ("--n-test", args.n_test, 1),
                         ("--by-distance", args.by_distance, 1), ("--batch-size", args.batch_size, 1))
    if args.plot and args.segments == "auto":
        raise SystemExit("error: --plot draws the scores after each of a fixed number of segments; with --segments "
                         "auto each maze stops at its own segment, so pass a count")
    train.ready_to_write("--out", args.out)  # before the scoring, which can take an hour
    train.ready_to_write("--plot", args.plot)
    try:
        gen_kwargs = data.parse_gen_args(args.gen_arg)
    except ValueError as exc:
        raise SystemExit(f"error: --gen-arg: {exc}") from None
    try:
        result = score(args.checkpoint, task_name=args.task, inner_steps=args.inner_steps, segments=args.segments,
                       n_test=args.n_test, data_dir=args.data_dir, batch_size=args.batch_size,
                       device=train.pick_device(args.device), ablate=args.ablate_routing, generator=args.generator,
                       gen_kwargs=gen_kwargs or None, by_distance=args.by_distance, data_seed=args.data_seed,
                       progress=not args.no_progress, symmetries=args.symmetries, latch=args.latch,
                       plot=bool(args.plot), arrival=args.arrival)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: also an argument the generator does not take
        raise SystemExit(f"error: {exc}") from None
    print(f"{result['checkpoint']} (step {result['step']}) on {result['task']}"
          + (f" ({result['generator']})" if result["generator"] else "") + f": {result['n_test']} test items, "
          f"{result['segments']} segments x {result['inner_steps']} inner steps, temperature "
          f"{result['temperature']:.3f}"
          + (f", mean of {args.symmetries} symmetric views" if args.symmetries > 1 else "")
          + (", answers latched" if args.latch else "")
          + (", read by the front's arrival" if args.arrival else "")
          + (f", routing ablated: {args.ablate_routing}" if args.ablate_routing else ""))
    if result["segments"] == "auto":
        print(f"  segments used: mean {result['segments_used']:.2f}, max {result['segments_max']} "
              f"(cap {result['segment_cap']}, an item stops when its answer (a maze: its path) is unchanged for "
              f"{PATIENCE} segments)")
        print("  answers: " + " ".join(f"{k} {v:.4f}" for k, v in result["per_segment"][0].items()))
    else:
        for s, seg in enumerate(result["per_segment"]):
            print(f"  segment {s + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in seg.items()))
    for band in result.get("by_distance", []):
        print(f"  {band['from']}-{band['to'] - 1} moves from the goal: cell_acc {band['cell_acc']:.4f} "
              f"({band['cells']} cells)")
    if result["routing"]:  # share of tokens keeping each head, and the most common head set's share
        print("  routing in the last segment (step: tokens keeping each head | most common set):")
        for t, (u, m) in enumerate(zip(result["routing"]["usage"], result["routing"]["modal_share"])):
            print(f"    t {t}: " + " ".join(f"h{h} {v:.2f}" for h, v in enumerate(u)) + f" | {m:.2f}")
    if result["chance"]:
        what = "chance (random scores, same rollout)" if result["task"].startswith("maze") else "reference (hidden at 0)"
        print(f"  {what}: " + " ".join(f"{k} {v:.4f}" for k, v in result["chance"].items()))
    try:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        if args.plot:
            import plots  # here: matplotlib only when a picture is asked for
            title = f"{result['task']} ({result['generator']}), {result['n_test']} mazes"
            print(f"wrote {plots.segments_plot(result['per_segment'], args.plot, title)}")
    except OSError as exc:
        raise SystemExit(f"error: cannot write {exc.filename} ({exc.strerror})") from None
    return result


if __name__ == "__main__":
    main()
