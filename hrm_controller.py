"""
The routing controller: which attention heads each token uses at each inner step.

Two variants share one class:
  hrm  two GRU cells at two timescales (as in the HRM paper, arXiv 2506.21734): the fast f_L updates at every
       inner step, the slow f_H only when t % T == 0 (or, with h_gate="learned", by a learned sigmoid gate);
       f_L reads z_H, so the slow state conditions the fast one. Within a step f_H (when it updates) runs first,
       on the input u_t and the previous z_L, then f_L on u_t and the new z_H. In the paper's equations, as we
       read them, both modules read the previous step's states, f_H updates after every T-th f_L step (i = T, 2T,
       ... counting from 1, not at t = 0, T, ...), and f_H does not read the input.
  poh  one GRU cell, single timescale (Pointer-over-Heads).
The third controller of the A/B, `none`, is not a module at all: model.py then uses uniform head weights.

The state is per token: z_L, z_H have shape (B, N, d_ctrl); the GRU cells run on the flattened (B*N, .) tokens.
The controller reads each token's state and, through a learned projection, a short periodic code of where the
token is (position_code): identical tokens (the hidden values of sorting, the corridors of a maze) can then start
with different heads instead of one shared head set.
Routing: logits -> p = softmax(logits / temperature) -> keep the top-k per token, renormalise. With hard routing
the forward value is the hard top-k (m / k) while the gradient is that of the full softmax p (straight-through),
so every head's logit keeps learning. Top-k saves no FLOPs here: every head is still computed.

Nothing to run on its own; `python -m pytest -q test_all.py -k controller` tests it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from poh_block import grid_coords


@dataclass
class ControllerConfig:
    kind: str = "hrm"  # "hrm" (two timescales) or "poh" (one GRU)
    d_model: int = 128  # width of the token states the controller reads
    n_heads: int = 4  # one routing weight per attention head
    d_ctrl: int = 16  # controller width
    T: int = 2  # the slow module f_H updates when t % T == 0, t counted from 0 in every segment
    top_k: int = 2  # heads kept per token
    hard_route: bool = False  # straight-through hard top-k instead of renormalised soft top-k
    h_gate: str = "fixed"  # "fixed" (period T) or "learned" (sigmoid gate on every step)
    where: bool = True  # also read position_code (False: checkpoints from before it existed)


POSITION_PERIODS = (2, 3, 4, 5)  # short periods: the code repeats, so it means nearly the same on a grid of any size


def position_code(grid, device=None):
    """(N, 4 * len(POSITION_PERIODS)) cos and sin of row and column at each period, minus their mean over the
    grid: a constant part would add the same bias to every token (on a 1-row grid the row terms vanish). The mean
    makes a cell's code depend a little on the grid's size (up to 0.08 between maze12 and maze16) and, for parsing,
    on the padded length of the batch; every checkpoint was trained with it, so it stays."""
    periods = torch.tensor(POSITION_PERIODS, dtype=torch.float32, device=device)
    angles = torch.cat([c[:, None] / periods for c in grid_coords(grid, device)], 1) * (2 * math.pi)
    code = torch.cat([angles.cos(), angles.sin()], 1)
    return code - code.mean(0)


def route(logits, temperature, top_k, hard):
    """Router logits (..., H) -> (alpha, p): the head weights used, and the full softmax p (for the entropy, the
    balance term and the straight-through gradient)."""
    p = F.softmax(logits / temperature, dim=-1)
    keep = torch.zeros_like(p).scatter_(-1, p.topk(top_k, dim=-1).indices, 1.0)  # top-k indicator m
    if hard:
        # forward value m / k; gradient of p, so the logits of dropped heads learn too
        alpha = keep / top_k + p - p.detach()
    else:
        kept = p * keep
        alpha = kept / kept.sum(-1, keepdim=True)
    return alpha, p


def kept_heads(alpha):
    """(..., H) bool: the heads a token keeps. Dropped heads have alpha exactly 0 (soft and hard routing alike)."""
    return alpha.detach() > 0


def balance_loss(alpha, p, real=None):
    """Load balancing in the Switch-Transformer form, H * sum_h f_h * P_h: f_h the share of routed slots that go
    to head h (from the discrete top-k choice, no gradient), P_h the mean router probability of h (the gradient
    path). It is 1 when heads are used and preferred evenly and up to H/k when every token keeps the same k heads
    and the router puts all its probability on them, so a positive weight pushes probability away from the heads
    that are already over-used: the counterweight to top-k's rich-get-richer dynamic, where (with soft routing)
    dropped heads get no gradient and fall further behind. real (...) bool: the tokens counted (None: all);
    padding is weighted 0 rather than indexed out, which would sync a GPU."""
    H = p.shape[-1]
    keep, p = kept_heads(alpha).float().reshape(-1, H), p.reshape(-1, H)
    if real is None:
        P = p.mean(0)  # (H,)
    else:
        w = real.reshape(-1, 1).to(p.dtype)
        keep, P = keep * w, (p * w).sum(0) / w.sum().clamp_min(1.0)
    f = keep.sum(0) / keep.sum().clamp_min(1.0)  # (H,) share of the routed slots
    return H * (f * P).sum()


def head_sets(alpha):
    """(keep (M, H) bool, sets (M,) long) over all M tokens of alpha (..., H): the kept heads, and each token's kept
    set as one bit pattern (so tokens with the same set have the same number)."""
    H = alpha.shape[-1]
    keep = kept_heads(alpha).reshape(-1, H)
    return keep, (keep.long() << torch.arange(H, device=alpha.device)).sum(1)


@torch.no_grad()
def routing_stats(alpha):
    """How varied the routing is, over all tokens of alpha (..., H): usage (H,) the share of tokens that keep
    each head, and modal_share, the share of tokens that keep the most common head set. Collapsed routing has a
    modal share near 1 and heads with usage near 0."""
    keep, sets = head_sets(alpha)
    return keep.float().mean(0), sets.bincount(minlength=2 ** alpha.shape[-1]).max().float() / len(sets)


ABLATIONS = ("uniform", "shuffle", "fixed")


def ablate_alpha(alpha, how, gen=None):
    """Replace the router's head weights alpha (B, N, H) for an ablation at evaluation:
    uniform  every head at 1/H (ordinary attention, as the `none` controller);
    shuffle  each token gets the alpha of a random token of the same sample (a permutation per sample, padding
             included; a few tokens keep their own):
             the same mix of head sets, but no longer tied to the token that chose it;
    fixed    every token gets the batch's most common kept head set, with equal weights.
    If the per-token routing carries information, shuffle must hurt."""
    B, N, H = alpha.shape
    if how == "uniform":
        return torch.full_like(alpha, 1.0 / H)
    if how == "shuffle":
        perm = torch.rand(B, N, generator=gen).argsort(1).to(alpha.device)  # (B, N): where each token's alpha comes from
        return alpha.gather(1, perm[:, :, None].expand(B, N, H))
    if how == "fixed":
        modal = head_sets(alpha)[1].bincount(minlength=2 ** H).argmax()
        m = ((modal >> torch.arange(H, device=alpha.device)) & 1).to(alpha.dtype)  # (H,) the modal set
        return (m / m.sum()).expand(B, N, H).clone()
    raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {how!r}")


def routing_entropy(p, real=None):
    """Mean entropy (nats) of the per-token head distributions p (..., H); a tensor, so it can be a loss term.
    real (...) bool: the tokens counted (None: all), weighted rather than indexed (no GPU sync)."""
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return entropy.mean() if real is None else (entropy * real).sum() / real.sum().clamp_min(1)


def anneal(start, end, frac):
    """Linear schedule from start (frac=0) to end (frac>=1); used for temperature and entropy weight."""
    frac = min(max(frac, 0.0), 1.0)
    return start + (end - start) * frac


def temperature_at(frac, start=2.0, end=1.0, floor=0.0):
    """Router temperature at training progress frac in [0, 1]; never below floor."""
    return max(anneal(start, end, frac), floor)


class Controller(nn.Module):
    def __init__(self, cfg: ControllerConfig):
        super().__init__()
        assert cfg.kind in ("hrm", "poh"), f"controller kind must be hrm or poh, got {cfg.kind!r}"
        assert 1 <= cfg.top_k <= cfg.n_heads, f"top_k={cfg.top_k} must be in [1, n_heads={cfg.n_heads}]"
        assert cfg.T >= 1, f"T must be >= 1, got {cfg.T}"
        assert cfg.h_gate in ("fixed", "learned"), f"h_gate must be fixed or learned, got {cfg.h_gate!r}"
        self.cfg = cfg
        c = cfg.d_ctrl
        self.inp = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, c))  # u_t per token
        # position_code -> a term of u_t ("where" the token is); None for checkpoints from before the code
        self.where = nn.Linear(4 * len(POSITION_PERIODS), c, bias=False) if cfg.where else None
        if cfg.kind == "hrm":
            self.f_H = nn.GRUCell(2 * c, c)  # slow: reads [u_t, z_L]
            self.f_L = nn.GRUCell(2 * c, c)  # fast: reads [u_t, z_H]
            self.router = nn.Linear(2 * c, cfg.n_heads)
            if cfg.h_gate == "learned":
                self.gate = nn.Linear(3 * c, 1)
        else:
            self.f_L = nn.GRUCell(c, c)
            self.router = nn.Linear(c, cfg.n_heads)

    def init_state(self, B, N, device):
        """Zeros: the one initial controller state, per token."""
        z = torch.zeros(B, N, self.cfg.d_ctrl, device=device)
        return {"z_L": z, "z_H": z.clone()} if self.cfg.kind == "hrm" else {"z_L": z}

    def forward(self, x, state, t, temperature=1.0, code=None):
        """x (B, N, d_model) token states; state dict of (B, N, d_ctrl); t the inner step index; code the
        position_code of the grid (computed once per forward by the caller; default that of a 1-row grid).
        Returns alpha (B, N, H), p (B, N, H), the new state, and how much z_H was updated (1.0, 0.0 or the gate)."""
        B, N, _ = x.shape
        cfg = self.cfg
        u = self.inp(x)
        if self.where is not None:
            u = u + self.where((position_code((1, N), x.device) if code is None else code).to(u.dtype))
        u = u.reshape(B * N, -1)  # (B*N, c): tokens flattened for the GRU cells
        z_L = state["z_L"].reshape(B * N, -1)
        if cfg.kind == "hrm":
            z_H = state["z_H"].reshape(B * N, -1)
            if cfg.h_gate == "learned":
                g = torch.sigmoid(self.gate(torch.cat([u, z_L, z_H], -1)))  # (B*N, 1)
                z_H = g * self.f_H(torch.cat([u, z_L], -1), z_H) + (1 - g) * z_H
                h_update = g.mean()
            elif t % cfg.T == 0:
                z_H = self.f_H(torch.cat([u, z_L], -1), z_H)
                h_update = torch.tensor(1.0)
            else:
                h_update = torch.tensor(0.0)
            z_L = self.f_L(torch.cat([u, z_H], -1), z_L)
            logits = self.router(torch.cat([z_L, z_H], -1))
            new_state = {"z_L": z_L.view(B, N, -1), "z_H": z_H.view(B, N, -1)}
        else:
            z_L = self.f_L(u, z_L)
            logits = self.router(z_L)
            new_state = {"z_L": z_L.view(B, N, -1)}
            h_update = torch.tensor(0.0)
        alpha, p = route(logits.view(B, N, cfg.n_heads), temperature, cfg.top_k, cfg.hard_route)
        return alpha, p, new_state, h_update
