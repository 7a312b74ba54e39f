"""
The recurrent PoH model: one small transformer applied R times ("inner steps"), routed by a controller.

    e = embed(x);  h = e (detached, before dropout);  controller state = zeros
    for t in 0..R-1:
        alpha_t, state = controller(h + e, state, t)      (B, N, H); uniform for "none", heads 0..top_k-1 for "fixed"
        h = blocks(norm(h) + e, alpha_t)                   input injection, then the L PoH blocks
        logits_t = head(norm(h))                           (B, N, C), only at the steps whose answer is used

Gradients: grad="bptt" backpropagates through all R steps (memory grows with R); grad="tbptt" runs the first
R - grad_steps steps under torch.no_grad() and only the last grad_steps carry gradient (memory flat in R).
Supervision over the inner steps: supervise="last", "all" or "every-k" (every k-th step and always the last).
Pondering (ponder_weight > 0, PonderNet-style): a halting head gives lambda_t per sample, the halting
distribution p_t = lambda_t * prod_{j<t}(1 - lambda_j) (the remainder on the last step), the task loss is
sum_t p_t L_t and the regulariser KL(p || truncated Geometric(ponder_prior)). A sample's answer is taken at the
first step where its cumulative halting probability reaches 0.5. Pondering weighs every step's loss, so
`supervise` plays no part; with tbptt the steps run without gradient weigh the loss but learn nothing from it.
Distance head (dist_weight > 0, mazes): a linear read of each cell's BFS distance to the goal off the state the
answer comes from, an auxiliary loss only (distance_loss); the answer never reads it. With dist_period P > 0 the
head reads the distance as a phase, (cos, sin) of 2 pi d / P: a target of the same range at every maze size.
Front head (front_weight > 0, mazes): a logit, read off the same state, of whether an answer spreading from the
goal at train.py's --wave-speed can have reached each cell by the end of the segment; an auxiliary cross-entropy
only. Its target is 0 or 1 at every maze size and follows a local rule: a cell is reached once an open neighbour is.
Given one target per inner step (train.py --front-every), the head is scored at every inner step with a gradient, so
the front must keep its speed step by step, not only on average over a segment. forward returns its probability as
"reached" in eval mode (evaluate.py --latch keeps an answer once reached), and with front_steps=True that of every
inner step as "reached_steps" (evaluate.py --arrival walks towards the neighbour the front reached first).

The carried state (h, z_L, z_H) goes in and comes out of forward, detached, so train.py can run several
segments per batch (HRM-style deep supervision).

Nothing to run on its own; `python -m pytest -q test_all.py` tests it, `python train.py` trains it.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hrm_controller import (Controller, ControllerConfig, ablate_alpha, balance_loss, position_code, routing_entropy,
                            routing_stats)
from parsing import Biaffine, parse_loss
from poh_block import BlockConfig, PoHBlock, local_mask, neighbour_index, open_mask, open_neighbours, rope_tables


@dataclass
class ModelConfig:
    vocab_size: int = 48  # input tokens (48 for mazes: 16 open-side patterns x 3 roles: plain, start, goal)
    n_classes: int = 5  # output classes per token (5 for the maze direction field)
    d_model: int = 128  # token width
    n_heads: int = 4  # attention heads, the units the controller routes
    n_layers: int = 2  # PoH blocks applied at every inner step
    pos: str = "rope2d"  # "rope2d" or "none"
    attn: str = "global"  # "global", "local" (self + 4 grid neighbours) or "open" (self + open neighbours, mazes)
    far_heads: int = 0  # with attn local/open: the last far_heads heads attend over the whole grid
    attn_impl: str = "gather"  # local/open: "gather" the 5 neighbours (O(N)) or "dense" masked attention (O(N^2))
    R: int = 4  # inner refinement steps per forward
    controller: str = "hrm"  # "hrm", "poh", "none" (uniform head weights) or "fixed" (the same top_k heads for
    # every token: the A/B arm with as many active heads as the router keeps); none and fixed build no controller
    d_ctrl: int = 16  # controller width: small, so hrm, poh and none differ by a few % in parameters
    T: int = 2  # slow-module period
    top_k: int = 2  # heads kept per token
    hard_route: bool = False  # straight-through hard top-k
    h_gate: str = "fixed"  # "fixed" period T or "learned" gate for z_H
    ctrl_where: bool = True  # the controller also reads a periodic position code (hrm_controller.position_code)
    reset_controller: bool = False  # zero z_L/z_H at the start of every forward instead of carrying them
    grad: str = "bptt"  # "bptt" or "tbptt"
    grad_steps: int = 2  # with tbptt: the last grad_steps inner steps carry gradient
    supervise: str = "last"  # task loss on "last", "all" or "every-k" inner steps (steps with gradient only)
    ponder_weight: float = 0.0  # > 0 builds the halting head and adds beta * KL(p || geometric prior)
    ponder_prior: float = 0.5  # lambda_p of the geometric prior over halting steps
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    dist_weight: float = 0.0  # > 0 builds a head that reads each cell's distance to the goal (mazes) off the same
    # state as the answer, trained by a Huber loss of this weight: an auxiliary target, see distance_loss
    dist_period: int = 0  # 0: the head predicts the distance; P >= 3: its phase, one turn every P moves
    front_weight: float = 0.0  # > 0 builds a head that reads, off the same state, whether an answer spreading from
    # the goal can have reached each cell by the end of the segment (a cross-entropy of this weight; mazes)
    dropout: float = 0.0  # dropout on the embedded input and on each block's attention and MLP outputs (training)
    label_sets: bool = False  # labels are bitmasks of the right classes (mazes: every equally short move is right)
    output: str = "classes"  # "classes" (one class per token) or "biaffine" (a head and a relation per word: parsing)
    pad_token: int = -1  # >= 0: this input token is padding, never attended to (variable-length batches)
    feature_vocab: tuple = ()  # sizes of k more id columns: x is (B, N, 1 + k), each column embedded, all summed
    # (parsing: each word's suffix and shape, and its gold UPOS tag with --upos gold)

    def validate(self):
        """Raise ValueError with one clear line for settings that cannot work."""
        checks = [
            (self.R >= 1, f"R must be >= 1, got {self.R}"),
            (self.T >= 1, f"T must be >= 1, got {self.T}"),
            (self.controller in CONTROLLERS, f"controller must be one of {', '.join(CONTROLLERS)}, got {self.controller!r}"),
            (1 <= self.top_k <= self.n_heads, f"top-k must be in [1, n_heads={self.n_heads}], got {self.top_k}"),
            (self.d_model % self.n_heads == 0, f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}"),
            (self.pos != "rope2d" or (self.d_model // self.n_heads) % 4 == 0, "rope2d needs head width % 4 == 0"),
            (self.pos in ("rope2d", "none"), f"pos must be rope2d or none, got {self.pos!r}"),
            (self.attn in ("global", "local", "open"), f"attn must be global, local or open, got {self.attn!r}"),
            (0 <= self.far_heads <= self.n_heads, f"far-heads must be between 0 and n-heads, got {self.far_heads}"),
            (self.far_heads == 0 or self.attn in ("local", "open"), "far-heads needs attn local or open"),
            (self.attn_impl in ("gather", "dense"), f"attn-impl must be gather or dense, got {self.attn_impl!r}"),
            (self.grad in ("bptt", "tbptt"), f"grad must be bptt or tbptt, got {self.grad!r}"),
            (1 <= self.grad_steps, f"grad-steps must be >= 1, got {self.grad_steps}"),
            (self.h_gate in ("fixed", "learned"), f"h-gate must be fixed or learned, got {self.h_gate!r}"),
            (0.0 < self.ponder_prior < 1.0, f"ponder prior must be in (0, 1), got {self.ponder_prior}"),
            (self.output in ("classes", "biaffine"), f"output must be classes or biaffine, got {self.output!r}"),
            (self.output == "classes" or self.ponder_weight == 0, "pondering needs per-token classes, not biaffine"),
            (self.dist_weight >= 0, f"dist-weight must be >= 0, got {self.dist_weight}"),
            (self.dist_period == 0 or self.dist_period >= 3, f"dist-period must be 0 or >= 3, got {self.dist_period}"),
            (self.front_weight >= 0, f"front-weight must be >= 0, got {self.front_weight}"),
            # the front head's target is where the front is at the segment's end
            (self.front_weight == 0 or self.supervise == "last", "front-weight needs supervise last"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        supervised_steps(self.R, self.supervise)  # raises on a bad value


CONTROLLERS = ("hrm", "poh", "none", "fixed")


def supervised_steps(R, supervise):
    """The set of inner steps whose logits get the task loss."""
    if supervise == "last":
        return {R - 1}
    if supervise == "all":
        return set(range(R))
    if supervise.startswith("every-") and supervise[6:].isdigit() and int(supervise[6:]) >= 1:
        k = int(supervise[6:])
        return {t for t in range(R) if (t + 1) % k == 0} | {R - 1}
    raise ValueError(f"supervise must be last, all or every-K (K >= 1), got {supervise!r}")


def token_loss(logits, y, label_smoothing=0.0, label_sets=False):
    """Per-sample mean cross-entropy over labelled tokens: logits (B, N, C), y (B, N) -> (B,). With label_sets, y
    holds a bitmask of the right classes per token and the loss is -log of their total probability (for one right
    class, the usual cross-entropy); a token with no right class is skipped like the ignore index -100."""
    B, N, C = logits.shape
    if label_sets:
        right = ((y[..., None] >> torch.arange(C, device=y.device)) & 1).bool() & (y[..., None] >= 0)  # (B, N, C)
        logp = logits.float().log_softmax(-1)
        nll = -torch.logsumexp(logp.masked_fill(~right, float("-inf")), -1)  # (B, N)
        if label_smoothing:  # as F.cross_entropy smooths: towards the uniform distribution
            nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
        valid = right.any(-1)
        nll = nll.masked_fill(~valid, 0.0)
        return (nll * valid).sum(1) / valid.sum(1).clamp_min(1.0)
    ce = F.cross_entropy(logits.float().reshape(B * N, C), y.reshape(B * N), reduction="none",
                         ignore_index=-100, label_smoothing=label_smoothing).view(B, N)
    valid = (y != -100).float()
    return (ce * valid).sum(1) / valid.sum(1).clamp_min(1.0)


DIST_SCALE = 10.0  # the distance head predicts moves / DIST_SCALE: values of a few units at 12x12


def distance_loss(pred, dist, period=0):
    """Loss of the distance head against each cell's distance to the goal, dist (B, N) in moves (-1: unreachable,
    skipped). period 0: pred (B, N) in units of DIST_SCALE moves, a Huber loss, quadratic within one move of the
    truth and linear beyond (the answer needs distances right to the move, and a far-off start must not swamp the
    rest). period P: pred (B, N, 2) is the distance as a phase, (cos, sin) of 2 pi d / P, a squared error: a clock
    hand that turns 1/P of a turn per move. A read of the distance itself must count as far as the largest maze
    (a 12x12 model's read stops near 63 moves, and 24x24 mazes have paths of 300); a phase has the same range at
    every size, and a shortest move still shows, to a neighbour whose hand is 1/P of a turn behind (P >= 3)."""
    known = dist >= 0
    if period:
        angle = dist[known] * (2 * math.pi / period)
        return F.mse_loss(pred[known], torch.stack([angle.cos(), angle.sin()], -1), reduction="sum") / angle.numel()
    return F.smooth_l1_loss(pred[known], dist[known] / DIST_SCALE, beta=1.0 / DIST_SCALE)


def halting_distribution(lambdas):
    """lambdas (B, R) per-step halting probabilities -> p (B, R): p_t = lambda_t prod_{j<t}(1 - lambda_j),
    with whatever is left assigned to the last step, so each row sums to 1."""
    B, R = lambdas.shape
    not_halted = torch.cumprod(1 - lambdas, dim=1)  # (B, R): prob. of running past step t
    before = torch.cat([torch.ones_like(lambdas[:, :1]), not_halted[:, :-1]], dim=1)  # prob. of reaching step t
    p = lambdas * before
    return torch.cat([p[:, :-1], before[:, -1:]], dim=1)  # last step takes the remainder


def geometric_prior(R, lam, device=None):
    """Truncated geometric distribution over R steps (remainder on the last), shape (R,)."""
    t = torch.arange(R, device=device, dtype=torch.float32)
    g = lam * (1 - lam) ** t
    g[-1] = (1 - lam) ** (R - 1)
    return g


class PoHModel(nn.Module):
    def __init__(self, cfg: ModelConfig, verbose=True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # positions (rope) and the mask (attn) reach the blocks as forward arguments, built once per forward
        block_cfg = BlockConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, far_heads=cfg.far_heads, dropout=cfg.dropout)
        self.blocks = nn.ModuleList(PoHBlock(block_cfg) for _ in range(cfg.n_layers))
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_in = nn.LayerNorm(cfg.d_model)  # input injection: |h| does not grow with the step count
        self.norm_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes) if cfg.output == "classes" else Biaffine(cfg.d_model,
                                                                                                   cfg.n_classes)
        self.embed_features = nn.ModuleList(nn.Embedding(n, cfg.d_model) for n in cfg.feature_vocab)
        self.controller = None
        if cfg.controller in ("hrm", "poh"):
            self.controller = Controller(ControllerConfig(
                kind=cfg.controller, d_model=cfg.d_model, n_heads=cfg.n_heads, d_ctrl=cfg.d_ctrl, T=cfg.T,
                top_k=cfg.top_k, hard_route=cfg.hard_route, h_gate=cfg.h_gate, where=cfg.ctrl_where))
        self.halt = nn.Linear(cfg.d_model, 1) if cfg.ponder_weight > 0 else None
        self.dist_head = nn.Linear(cfg.d_model, 2 if cfg.dist_period else 1) if cfg.dist_weight > 0 else None
        self.front_head = nn.Linear(cfg.d_model, 1) if cfg.front_weight > 0 else None
        self.apply(self._init_weights)
        if self.halt is not None:  # special case: start halting at the prior's per-step probability
            nn.init.constant_(self.halt.bias, math.log(cfg.ponder_prior / (1 - cfg.ponder_prior)))
        if self.controller is not None and self.controller.where is not None:
            # special case: the position code (unit entries) must move the router about as much as the token
            # state does, or identical tokens still share one head set at step 0 (0.02 leaves sort12 collapsed)
            nn.init.normal_(self.controller.where.weight, std=self.controller.where.in_features ** -0.5)
        if verbose:
            n_ctrl = sum(p.numel() for p in self.controller.parameters()) if self.controller else 0
            print(f"model: {self.num_params():,} parameters ({n_ctrl:,} in the {cfg.controller} controller)")

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.GRUCell):
            # PyTorch's default biases are random and the same for every token; in a GRU this small they outweigh
            # the token-dependent input, so every token got the same router logits and top-k the same heads
            # (router collapse at step 0; test_routing_at_initialisation_is_per_token_not_one_head_set). Zero
            # biases leave the routing to the token's state.
            nn.init.zeros_(module.bias_ih)
            nn.init.zeros_(module.bias_hh)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed_input(self, x):
        """Token embeddings (B, N, D) of x (B, N), or of x (B, N, 1 + k) token and feature ids (their sum)."""
        if x.dim() == 3:
            return self.embed(x[..., 0]) + sum(emb(x[..., i + 1]) for i, emb in enumerate(self.embed_features))
        return self.embed(x)

    def init_state(self, x):
        """The one initial state: h = e (the embedded input, detached and without dropout: a constant starting
        point, as the carried state of later segments is), controller state zeros."""
        B, N = x.shape[:2]
        e = self.embed_input(x)
        state = {"h": e.detach().float()}
        if self.controller is not None:
            state.update(self.controller.init_state(B, N, x.device))
        return state

    def forward(self, x, y=None, state=None, temperature=1.0, entropy_weight=0.0, balance_weight=0.0, grid=None,
                n_steps=None, trace=False, ablate=None, ablate_gen=None, dist=None, front=None, front_steps=False):
        """x (B, N) tokens, y (B, N) labels or None; grid (h, w) with h*w = N, default (1, N); dist (B, N) each
        cell's distance to the goal (data.goal_distance), the target of the distance head (with dist_weight);
        front (B, N) 1 where the goal's answer can have reached a cell by the last inner step, 0 where not, -1 unknown
        (front_weight); or (R, B, N), the same at the end of each inner step, scored at every step with a gradient.
        balance_weight: weight of the load-balancing term (hrm_controller.balance_loss); ablate: None or one of
        hrm_controller.ABLATIONS, to replace the router's alpha at evaluation (random draws from ablate_gen).
        Returns a dict: logits (B, N, C) (the halted step's with pondering, else the last step's), loss (a tensor,
        or None without y), parts (task, entropy, balance, ponder tensors; expected_steps; steps_used; in eval
        mode for routed models, usage (R, H) and modal_share (R,) from hrm_controller.routing_stats), state
        (detached), reached (B, N): the front head's P(reached) read off the returned state (the last step's, also
        with pondering), in eval mode only, else None; with front_steps=True (eval mode, a front head) also
        reached_steps (B, R, N), that read after every inner step; with trace=True a list with per-step alpha, p,
        z_L, z_H, h_update, logits."""
        cfg = self.cfg
        B, N = x.shape[:2]
        R = n_steps or cfg.R
        grid = grid or (1, N)
        assert grid[0] * grid[1] == N, f"grid {grid} does not have {N} cells"
        e = self.drop(self.embed_input(x))  # one mask for the forward: every inner step sees the same input
        pad = (x[..., 0] if x.dim() == 3 else x) == cfg.pad_token  # (B, N): all False without padding
        real = ~pad if cfg.pad_token >= 0 else None  # routing statistics and terms count real tokens only (parsing)
        if state is None:
            state = self.init_state(x)
        elif cfg.reset_controller and self.controller is not None:
            state = {**state, **self.controller.init_state(B, N, x.device)}
        h = state["h"].to(e.dtype)
        ctrl = {k: v for k, v in state.items() if k != "h"}
        rope = rope_tables(grid, cfg.d_model // cfg.n_heads, x.device) if cfg.pos == "rope2d" else None
        mask = self.attention_mask(x, grid)
        routed_by_position = self.controller is not None and self.controller.where is not None
        code = position_code(grid, x.device) if routed_by_position else None  # once per forward, not per step

        first_grad = R - min(cfg.grad_steps, R) if cfg.grad == "tbptt" else 0
        supervised = supervised_steps(R, cfg.supervise)
        task_terms, entropies, balances, lambdas, step_losses, step_logits, steps = [], [], [], [], [], [], []
        dist_terms, front_terms, front_reads = [], [], []
        if front is not None and front.dim() == 3 and len(front) != R:
            raise ValueError(f"a front target per inner step needs {R} of them, got {len(front)}")
        front_every = front is not None and front.dim() == 3  # the head scored at every step with a gradient
        read_steps = front_steps and self.front_head is not None and not self.training
        usage, modal = [], []
        for t in range(R):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= first_grad):
                if self.controller is not None:
                    alpha, p, ctrl, h_update = self.controller(h + e, ctrl, t, temperature, code)
                    if ablate is not None:
                        alpha = ablate_alpha(alpha, ablate, ablate_gen)
                elif cfg.controller == "fixed":  # heads 0..top_k-1 for every token, no router (with --far-heads:
                    # near heads only while top_k <= n_heads - far_heads, since the far heads are the last ones)
                    alpha = torch.zeros(B, N, cfg.n_heads, device=x.device)
                    alpha[..., :cfg.top_k] = 1.0 / cfg.top_k
                    p = h_update = None
                else:
                    alpha = p = h_update = None
                if p is not None and not self.training:
                    u, m = routing_stats(alpha if real is None else alpha[real])  # evaluation only: may sync
                    usage.append(u)
                    modal.append(m)
                h = self.norm_in(h) + e
                for block in self.blocks:
                    h = block(h, alpha, rope, mask)
                scored = y is not None and t in supervised and t >= first_grad  # this step's answer gets the loss
                # the output layer only where its answer is used (the biaffine parser's is a large part of a step)
                front_scored = self.front_head is not None and front is not None and (
                    t >= first_grad if front_every else scored)
                if self.halt is not None or trace or t == R - 1 or scored or front_scored or read_steps:
                    out = self.norm_out(h)
                    logits = self.head(out) if cfg.output == "classes" else self.head(out, pad)
                if p is not None and t >= first_grad:
                    entropies.append(routing_entropy(p, real))
                    if balance_weight:
                        balances.append(balance_loss(alpha, p, real))
                if self.halt is not None:
                    lambdas.append(torch.sigmoid(self.halt(h.mean(1)).float()).squeeze(-1))  # (B,)
                    step_logits.append(logits)
                    if y is not None:
                        step_losses.append(token_loss(logits, y, cfg.label_smoothing, cfg.label_sets))
                elif scored:
                    loss_t = (token_loss(logits, y, cfg.label_smoothing, cfg.label_sets) if cfg.output == "classes"
                              else parse_loss(logits, y))
                    task_terms.append(loss_t.mean())
                if scored and self.dist_head is not None and dist is not None:  # the auxiliary target
                    pred = self.dist_head(out).float()
                    dist_terms.append(distance_loss(pred if cfg.dist_period else pred.squeeze(-1), dist,
                                                    cfg.dist_period))
                if front_scored or read_steps:
                    logit = self.front_head(out).squeeze(-1).float()
                if front_scored:
                    target = front[t] if front_every else front
                    known = target >= 0
                    front_terms.append(F.binary_cross_entropy_with_logits(logit[known], target[known].float()))
                if read_steps:
                    front_reads.append(torch.sigmoid(logit))
            if trace:
                detach = lambda v: v if v is None else v.detach()  # a trace is for reading: no graph kept
                steps.append({"alpha": detach(alpha), "p": detach(p), "h_update": detach(h_update),
                              "logits": detach(logits) if torch.is_tensor(logits) else tuple(map(detach, logits)),
                              **{k: v.detach().clone() for k, v in ctrl.items()}})

        zero = torch.zeros((), device=x.device)
        entropy = torch.stack(entropies).mean() if entropies else zero
        balance = torch.stack(balances).mean() if balances else zero
        parts = {"entropy": entropy, "balance": balance, "ponder": zero, "task": zero}
        if dist_terms:
            parts["dist"] = torch.stack(dist_terms).mean()
        if front_terms:
            parts["front"] = torch.stack(front_terms).mean()
        if usage:
            parts["usage"], parts["modal_share"] = torch.stack(usage), torch.stack(modal)
        if self.halt is not None:
            lam = torch.stack(lambdas, 1)  # (B, R)
            p_halt = halting_distribution(lam)
            prior = geometric_prior(R, cfg.ponder_prior, x.device)
            kl = (p_halt * (p_halt.clamp_min(1e-12).log() - prior.log())).sum(1).mean()
            steps_idx = torch.arange(1, R + 1, device=x.device, dtype=torch.float32)
            parts["expected_steps"] = (p_halt * steps_idx).sum(1).mean()
            parts["ponder"] = kl  # unweighted, like the other parts; the loss below weighs it
            parts["halt_p"] = p_halt
            # a sample answers at the first step where its cumulative halting probability reaches 0.5
            stop = (p_halt.cumsum(1) >= 0.5).float().argmax(1)  # (B,)
            parts["steps_used"] = (stop + 1).float().mean()
            logits = torch.stack(step_logits, 1)[torch.arange(B, device=x.device), stop]  # (B, N, C)
            if y is not None:
                parts["task"] = (p_halt * torch.stack(step_losses, 1)).sum(1).mean()
        else:
            parts["steps_used"] = torch.tensor(float(R))
            if task_terms:
                parts["task"] = torch.stack(task_terms).mean()
        loss = None
        if y is not None:
            loss = (parts["task"] + cfg.ponder_weight * parts["ponder"] + entropy_weight * entropy
                    + balance_weight * balance)
            if dist_terms:
                loss = loss + cfg.dist_weight * parts["dist"]
            if front_terms:
                loss = loss + cfg.front_weight * parts["front"]
        out_state = {"h": h.detach().float(), **{k: v.detach().float() for k, v in ctrl.items()}}
        # only where it is read (evaluate.py --latch), not on the training path
        reached = self.reached(out_state["h"]) if self.front_head is not None and not self.training else None
        result = {"logits": logits, "loss": loss, "parts": parts, "state": out_state, "trace": steps, "reached": reached}
        if read_steps:
            result["reached_steps"] = torch.stack(front_reads, 1)  # (B, R, N)
        return result

    @torch.no_grad()
    def reached(self, h):
        """The front head's read of a state h (..., N, d): P(the goal's answer has reached each cell), (..., N)."""
        return torch.sigmoid(self.front_head(self.norm_out(h.to(self.norm_out.weight.dtype))).squeeze(-1).float())

    def attention_mask(self, x, grid):
        """What the blocks' attention may see: None (global), a dense mask, or (grid, allowed) to gather."""
        attn, gather = self.cfg.attn, self.cfg.attn_impl == "gather"
        if self.cfg.pad_token >= 0:  # global attention that never looks at padding: (B, 1, 1, N), True = attend
            assert attn == "global", "padding is supported with global attention only"
            return ((x[..., 0] if x.dim() == 3 else x) != self.cfg.pad_token)[:, None, None, :]
        if attn == "local":
            return neighbour_index(grid, x.device) if gather else local_mask(grid, x.device)
        if attn == "open":
            return open_neighbours(x, grid) if gather else open_mask(x, grid)
        return None

    def controller_parameters(self):
        """Names of the controller's parameters (for a separate learning rate)."""
        return {n for n, _ in self.named_parameters() if n.startswith("controller.")}

    def configure_optimizers(self, lr, weight_decay, betas=(0.9, 0.95), lr_controller=None, verbose=True):
        """AdamW: tensors with 2+ dims get weight decay, the rest don't; the controller optionally has its own LR."""
        ctrl_names = self.controller_parameters() if lr_controller is not None else set()
        groups = []
        for is_ctrl in (False, True):
            params = [(n, p) for n, p in self.named_parameters() if p.requires_grad and (n in ctrl_names) == is_ctrl]
            if not params:
                continue
            group_lr = lr_controller if is_ctrl else lr
            decay = [p for _, p in params if p.dim() >= 2]
            no_decay = [p for _, p in params if p.dim() < 2]
            groups.append({"params": decay, "weight_decay": weight_decay, "lr": group_lr, "base_lr": group_lr})
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr": group_lr, "base_lr": group_lr})
            if verbose:
                who = "controller" if is_ctrl else "model" if ctrl_names else "all"
                print(f"optimizer [{who}, lr {group_lr:g}]: {sum(p.numel() for p in decay):,} decayed, "
                      f"{sum(p.numel() for p in no_decay):,} not decayed parameters")
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def model_args(model):
    """The plain dict that rebuilds the model: stored in checkpoints instead of a pickled object."""
    return asdict(model.cfg)
