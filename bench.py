"""
Benchmarks of the model and the training step on this machine: prints a table and writes JSON.

    python bench.py                      # throughput, memory against R, FLOP/s (a few minutes on a 2-core CPU)
    python bench.py --quick 600          # also: train the default maze12 recipe for 600 s, report held-out optimal
    python bench.py --compile            # also: the training step under torch.compile (minutes to compile on CPU)
    python bench.py --device cuda --out bench-gpu.json
    python bench.py --task maze4 --batch-size 4 --R 2 4 --attn-sizes 4:4 6:2 --eval-mazes 8   # seconds (tests)

1. Training throughput (samples/s) of hrm, poh and none at the same shape, and the hrm/none step-time ratio.
2. Memory against R (2, 4, 8, 16) for bptt and tbptt: bytes saved for backward (autograd hooks) and the peak
   memory of a fresh process running one training step (CPU: max RSS; CUDA: max allocated).
3. Achieved FLOP/s of a training step against a matmul peak measured in the same run. FLOPs are counted by hand
   for the matmuls of the transformer (weights and attention): 2 per multiply-add forward, twice that backward,
   inner steps without gradient counted forward only; attention counts only the keys a query may see (5 with
   local/open attention). Controller, norms and softmax are left out (small). With --compile, the same step of a
   torch.compile'd model too (its compile time apart), after checking that it gives the eager loss and gradients.
4. Neighbour attention, dense masked vs gathered: training step time of the default maze model at several sizes
   (--attn-sizes N:BATCH, default maze12 batch 64, maze24 batch 16, maze48 batch 4).
5. Evaluation throughput: real mazes per second through train.evaluate (the recipe's segments, the rollout
   metrics included), on --eval-mazes fresh mazes of the task's size.
6. --quick SECONDS: time-to-accuracy of the task's default hrm recipe through train.main with --time-budget.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import torch

import train
from model import ModelConfig, PoHModel
from train import model_config, pick_device, resolve_args, task_kind


def shape_args(task="maze12"):
    """The default recipe's flags for a task, as train.py resolves them."""
    return resolve_args(["--task", task])


def make_model(task, controller, device, **overrides):
    args = shape_args(task)
    vocab, classes = (48, 5) if task_kind(task) == "maze" else (201, int(task[4:].split("-")[0]))
    fake_task = argparse.Namespace(vocab_size=vocab, n_classes=classes)
    cfg = model_config(args, fake_task)
    cfg.controller = controller
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return PoHModel(cfg, verbose=False).to(device), args


def fake_batch(model, args, task, device, batch_size=None):
    """Random tokens and labels of the task's shape for `model` (from make_model); batch_size None: the recipe's."""
    n = int(task[4:]) if task_kind(task) == "maze" else int(task[4:].split("-")[0])
    N, grid = (n * n, (n, n)) if task_kind(task) == "maze" else (n, (1, n))
    g = torch.Generator().manual_seed(0)
    B = batch_size or args.batch_size
    x = torch.randint(0, 48, (B, N), generator=g).to(device)
    y = torch.randint(0, model.cfg.n_classes, (B, N), generator=g)
    y = 1 << y if model.cfg.label_sets else y  # maze labels are bitmasks of the right classes
    return x, y.to(device), grid


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, x, y, grid, device, n_steps=5, warmup=2):
    """Seconds per training step (forward, backward, AdamW) of one segment."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(warmup + n_steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with amp:
            loss = model(x, y, grid=grid)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - t0) / n_steps


def step_flops(cfg, B, N):
    """Hand count of matmul FLOPs in one training step (see the docstring)."""
    d, L = cfg.d_model, cfg.n_layers
    attn_span = 5 if cfg.attn in ("local", "open") else N  # SDPA with a mask still computes all N keys; count what is used
    per_token = L * (2 * (3 * d * d + d * d + 2 * 4 * d * d) + 2 * 2 * attn_span * d)  # forward, one inner step
    grad_steps = min(cfg.grad_steps, cfg.R) if cfg.grad == "tbptt" else cfg.R
    return B * N * per_token * (cfg.R + 2 * grad_steps)


def compiled_step(task, device, batch_size, backend):
    """The hrm training step under torch.compile: seconds to compile (the first call and step), seconds per step
    after, and the largest difference from the eager model's loss and gradients on the same weights and batch (it
    must compute the same thing for its speed to count)."""
    model, args = make_model(task, "hrm", device)
    x, y, grid = fake_batch(model, args, task, device, batch_size)
    compiled = torch.compile(model, backend=backend)  # shares model's parameters

    def loss_and_grads(m):
        model.zero_grad(set_to_none=True)
        loss = m(x, y, grid=grid)["loss"]
        loss.backward()
        return [loss.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(model)
    t0 = time.perf_counter()
    diff = max((a - b).abs().max().item() for a, b in zip(eager, loss_and_grads(compiled)))  # compiles
    time_steps(compiled, x, y, grid, device, n_steps=1, warmup=0)
    return {"backend": backend, "compile_seconds": time.perf_counter() - t0, "max_abs_diff": diff,
            "step_seconds": time_steps(compiled, x, y, grid, device)}


def matmul_peak(device, n=2048, reps=10):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def saved_bytes(model, x, y, grid):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y, grid=grid)["loss"].backward()
    return total


def peak_memory_probe(task, R, grad, device, batch_size=None):
    """One training step in this process (started fresh by the parent): print its peak memory in bytes."""
    model, args = make_model(task, "hrm", device, R=R, grad=grad, grad_steps=2)
    x, y, grid = fake_batch(model, args, task, device, batch_size)
    model(x, y, grid=grid)["loss"].backward()
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated())
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def main(argv=None):
    train.keep_freed_memory()  # as train.py and evaluate.py run
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--task", default="maze12", help="the shape to benchmark (a task's default recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="batch for sections 1-3 (default: the recipe's)")
    p.add_argument("--R", type=int, nargs="+", default=[2, 4, 8, 16], help="inner steps for the memory table")
    p.add_argument("--attn-sizes", nargs="+", default=["12:64", "24:16", "48:4"],
                   help="maze sizes and batches (N:BATCH) for the dense vs gathered attention table")
    p.add_argument("--eval-mazes", type=int, default=256, help="fresh mazes for the evaluation throughput")
    p.add_argument("--quick", type=float, default=0.0, help="also train the task's recipe for this many seconds")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time the hrm step under torch.compile (BACKEND, default inductor)")
    p.add_argument("--out", default="bench.json", help="JSON results")
    p.add_argument("--probe", nargs=2, metavar=("R", "GRAD"), help=argparse.SUPPRESS)  # internal: memory probe
    a = p.parse_args(argv)
    try:
        device = pick_device(a.device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not re.fullmatch(r"maze\d+|sort\d+(-visible)?", a.task):
        raise SystemExit(f"error: --task {a.task}: bench.py times maze and sorting shapes (mazeN, sortN)")
    if a.probe:
        return peak_memory_probe(a.task, int(a.probe[0]), a.probe[1], device, a.batch_size)
    train.ready_to_write("--out", a.out)  # now, not after minutes of timing
    results = {"device": str(device), **train.run_env(), "task": a.task}  # torch, threads, CPU, Python

    print(f"1. training throughput, {a.task} default shape, {device}")
    step_s = {}
    for controller in ("none", "hrm", "poh"):
        model, args = make_model(a.task, controller, device)
        x, y, grid = fake_batch(model, args, a.task, device, a.batch_size)
        step_s[controller] = time_steps(model, x, y, grid, device)
        if controller == "hrm":
            flops = step_flops(model.cfg, *x.shape)  # for section 3
        print(f"  {controller:5s} {model.num_params():>9,} params  {step_s[controller]:.3f} s/step  "
              f"{len(x) / step_s[controller]:8.1f} samples/s")
    results["step_seconds"] = step_s
    results["hrm_over_none"] = step_s["hrm"] / step_s["none"]
    print(f"  hrm/none step time ratio {results['hrm_over_none']:.3f} (goal <= 1.15)")

    print(f"2. memory against R (hrm, {a.task} shape, batch 8 for saved bytes; section 1's batch for peak memory)")
    rows = []
    for grad in ("bptt", "tbptt"):
        for R in a.R:
            model, args = make_model(a.task, "hrm", device, R=R, grad=grad, grad_steps=2)
            x, y, grid = fake_batch(model, args, a.task, device, batch_size=8)
            sb = saved_bytes(model, x, y, grid)
            cmd = [sys.executable, os.path.abspath(__file__), "--task", a.task, "--device", str(device),
                   "--probe", str(R), grad] + (["--batch-size", str(a.batch_size)] if a.batch_size else [])
            peak = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
            rows.append({"grad": grad, "R": R, "saved_bytes": sb, "peak_bytes": peak})
            print(f"  {grad:5s} R={R:2d}  saved for backward {sb / 2**20:8.1f} MiB  peak {peak / 2**20:8.1f} MiB")
    results["memory"] = rows

    print("3. achieved FLOP/s of a training step")
    peak = matmul_peak(device)
    achieved = flops / step_s["hrm"]
    results["flops"] = {"matmul_peak": peak, "step_flops": flops, "achieved": achieved, "fraction": achieved / peak}
    print(f"  matmul peak {peak / 1e9:.1f} GFLOP/s; step {flops / 1e9:.1f} GFLOP; achieved {achieved / 1e9:.1f} "
          f"GFLOP/s ({100 * achieved / peak:.0f}% of peak)")
    if a.compile:
        c = compiled_step(a.task, device, a.batch_size, a.compile)
        c["achieved"] = flops / c["step_seconds"]
        c["fraction"] = c["achieved"] / peak
        results["flops"]["compiled"] = c
        print(f"  torch.compile ({c['backend']}, {c['compile_seconds']:.0f} s to compile; loss and gradients within "
              f"{c['max_abs_diff']:.1e} of eager): {c['step_seconds']:.3f} s/step, achieved "
              f"{c['achieved'] / 1e9:.1f} GFLOP/s ({100 * c['fraction']:.0f}% of peak)")

    if task_kind(a.task) == "maze":
        print("4. neighbour attention, dense masked vs gathered: training step of the default maze model (hrm)")
        rows = []
        for size in a.attn_sizes:
            n, B = (int(v) for v in size.split(":"))
            row = {"task": f"maze{n}", "batch": B}
            for impl in ("dense", "gather"):
                model, args = make_model(f"maze{n}", "hrm", device, attn_impl=impl)
                x, y, grid = fake_batch(model, args, f"maze{n}", device, B)
                row[impl] = time_steps(model, x, y, grid, device, n_steps=3, warmup=1)
            row["speedup"] = row["dense"] / row["gather"]
            rows.append(row)
            print(f"  maze{n:<3d} batch {B:3d}: dense {row['dense']:.3f} s/step, gather {row['gather']:.3f} s/step, "
                  f"x{row['speedup']:.2f}")
        results["attention"] = rows

        import data
        print(f"5. evaluation throughput: {a.eval_mazes} fresh {a.task} mazes, the recipe's segments, rollout included")
        model, args = make_model(a.task, "hrm", device)
        n = int(a.task[4:])
        pool = data.generate_mazes(n, a.eval_mazes, 10**6)
        x = torch.from_numpy(data.encode(pool["open"], pool["start"], pool["goal"]).reshape(a.eval_mazes, n * n))
        y = torch.from_numpy(data.batch_labels(pool["open"], pool["start"], pool["dist"].astype("int64")))
        task = argparse.Namespace(grid=(n, n), metrics=data.maze_metrics)
        t0 = time.perf_counter()
        train.evaluate(model, task, x, y, args.segments, batch_size=256, device=device)
        rate = a.eval_mazes / (time.perf_counter() - t0)
        results["eval_mazes_per_s"] = rate
        print(f"  {rate:.1f} mazes/s ({args.segments} segments x {args.R} inner steps)")

    if a.quick > 0:
        print(f"6. time-to-accuracy: default {a.task} hrm recipe for {a.quick:.0f} s of training")
        out_dir = f"runs/bench-quick-{int(time.time())}"
        result = train.main(["--task", a.task, "--time-budget", str(a.quick), "--out-dir", out_dir,
                             "--device", a.device, "--no-progress"])
        results["quick"] = {"seconds": a.quick, "out_dir": out_dir,
                            **{k: v for k, v in result.items() if k != "per_segment"}}
        metric = train.SELECT[task_kind(a.task)][0]  # the metric the run selects its checkpoint by
        print(f"  held-out test {metric} {result[metric]:.4f} over {result['n_test']} items (run in {out_dir})")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
