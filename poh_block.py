"""
The Pointer-over-Heads transformer block: a pre-norm block whose attention weights each head by the
router's alpha before the output projection,

    out = W_O( concat_h( H * alpha_h * o_h ) ),   o_h = softmax(q_h k_h^T / sqrt(Dh)) v_h

With alpha = None (or uniform 1/H) this is exactly ordinary multi-head attention, so the `none` baseline is
this same code with the router switched off.

Positions: 2-D rotary embeddings (RoPE). Half of each head's dimensions rotate with the token's row, the other
half with its column, so q.k depends on the relative 2-D offset only and nothing is tied to the grid size: a
model trained on 12x12 mazes runs on 16x16 ones. A sequence (sorting) is the grid (1, L). Optionally attention
is restricted to self + the 4 grid neighbours ("local"), a strong bias for mazes: information then moves about
one cell per block application. For mazes, "open" restricts it further to the neighbours not behind a wall.
Both are computed by gathering each cell's 5 keys (attn_impl "gather", O(N)) or, for checking and benchmarks, as
dense attention with a mask (attn_impl "dense", O(N^2)); the two agree to float rounding. With far_heads > 0 the
last far_heads heads ignore that restriction and attend over the whole grid, so the router has a real choice to
make per token: look at the neighbours or far away.

Nothing to run on its own; `python -m pytest -q test_all.py -k block` tests it.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_BASE = 100.0  # grids are small (<= 64 cells a side), so a small base spreads the frequencies over them


@dataclass
class BlockConfig:
    d_model: int = 128  # token width
    n_heads: int = 4  # heads; head width d_model / n_heads must be a multiple of 4 for 2-D RoPE
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    far_heads: int = 0  # with a mask (local/open): this many heads (the last ones) attend globally instead
    dropout: float = 0.0  # dropout on the attention and MLP outputs before they join the residual (training only)


def grid_coords(grid, device=None):
    """Row and column index of each of the h*w tokens, row-major: two (N,) float tensors."""
    h, w = grid
    idx = torch.arange(h * w, device=device)
    return (idx // w).float(), (idx % w).float()


def rope_tables(grid, head_dim, device=None):
    """cos, sin of shape (N, head_dim/2): the first half of the angles follow the row, the second the column."""
    assert head_dim % 4 == 0, f"2-D RoPE needs head_dim % 4 == 0, got {head_dim}"
    rows, cols = grid_coords(grid, device)
    freqs = ROPE_BASE ** (-torch.arange(head_dim // 4, device=device).float() / (head_dim // 4))  # (Dh/4,)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (N, Dh/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate feature pairs (i, i + Dh/2) of x (B, H, N, Dh) by the per-token angles. With rope_tables' angles
    the row turns dims [0, Dh/4) and [Dh/2, 3Dh/4), the column the others; on a (1, L) grid (sorting) every row
    angle is 0, so half of each head's dims carry the position."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


SIDES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # N, E, S, W: data.MOVES' order, the wall bits' order


def local_mask(grid, device=None):
    """(N, N) bool, True where attention is allowed: the token itself and its 4 grid neighbours."""
    rows, cols = grid_coords(grid, device)
    dist = (rows[:, None] - rows[None, :]).abs() + (cols[:, None] - cols[None, :]).abs()
    return dist <= 1


def open_mask(tokens, grid):
    """(B, 1, N, N) bool for maze tokens: the token itself and the neighbours it has an open side to.
    Reads data.encode's layout: bit d of (token % 16) is the open side d in the order N, E, S, W. Walls are
    input, so masking attention with them is an inductive bias, not a peek at the answer."""
    rows, cols = grid_coords(grid, tokens.device)
    dr, dc = rows[None, :] - rows[:, None], cols[None, :] - cols[:, None]  # (N, N): offset from token i to j
    allowed = torch.eye(len(rows), dtype=torch.bool, device=tokens.device).expand(tokens.shape[0], -1, -1)
    for d, (mr, mc) in enumerate(SIDES):
        is_side_d = (dr == mr) & (dc == mc)  # (N, N): j is i's neighbour on side d
        side_open = ((tokens % 16) >> d) & 1 == 1  # (B, N)
        allowed = allowed | (is_side_d[None] & side_open[:, :, None])
    return allowed.unsqueeze(1)  # broadcasts over heads


# Gathered neighbour attention ("gather", the O(N) path): the same function as the masked dense path for "local"
# and "open", computed on the (at most) 5 keys each cell may see, so time and memory grow with N instead of N^2.
# The neighbours are read as shifted views of the zero-padded grid rather than by an index gather: the backward of
# a slice is a cheap copy, that of an index gather a scatter-add, which made the gather slower than dense attention
# at maze12 on CPU.


def neighbour_index(grid, device=None):
    """on_grid (N, 5) bool: True for each cell itself (column 0) and for its N, E, S, W neighbours that lie on the
    grid. Returned with the grid, as the `mask` that makes PoHAttention gather: (grid, allowed)."""
    h, w = grid
    rows, cols = (c.long() for c in grid_coords(grid, device))
    on_grid = [torch.ones_like(rows, dtype=torch.bool)]
    for dr, dc in SIDES:
        r, c = rows + dr, cols + dc
        on_grid.append((r >= 0) & (r < h) & (c >= 0) & (c < w))
    return grid, torch.stack(on_grid, 1)


def open_neighbours(tokens, grid):
    """(grid, allowed (B, N, 5)): as neighbour_index, allowed only where the side is open (bit d of token % 16, as in
    open_mask); a cell always sees itself. An open side never points off the grid in a valid maze, but the on-grid
    check keeps any token safe."""
    _, on_grid = neighbour_index(grid, tokens.device)
    sides = ((tokens % 16)[..., None] >> torch.arange(4, device=tokens.device)) & 1 == 1  # (B, N, 4)
    return grid, on_grid & torch.cat([torch.ones_like(sides[..., :1]), sides], -1)


def shifted(z, grid):
    """The 5 views of z (B, H, N, Dh) that hold, at each cell, the value of the cell itself and of its N, E, S, W
    neighbour (zeros off the grid): a list of (B, H, h, w, Dh) tensors."""
    (h, w), (B, H, _, Dh) = grid, z.shape
    z = z.view(B, H, h, w, Dh)
    padded = F.pad(z, (0, 0, 1, 1, 1, 1))  # (B, H, h+2, w+2, Dh)
    return [z] + [padded[:, :, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for dr, dc in SIDES]


def neighbour_attention(q, k, v, grid, allowed):
    """softmax attention of each query over its own key and its N, E, S, W neighbours' keys. q, k, v (B, H, N, Dh);
    allowed (N, 5) or (B, N, 5) bool. Returns (B, H, N, Dh), equal to SDPA with the matching dense mask."""
    (h, w), (B, H, N, Dh) = grid, q.shape
    qg = q.view(B, H, h, w, Dh) * Dh ** -0.5
    scores = torch.stack([(qg * kd).sum(-1) for kd in shifted(k, grid)], -1)  # (B, H, h, w, 5)
    allowed = allowed.view(-1, 1, h, w, 5)  # (B or 1, 1, h, w, 5)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # self is always allowed: no empty row
    o = sum(weights[..., d:d + 1] * vd for d, vd in enumerate(shifted(v, grid)))  # (B, H, h, w, Dh)
    return o.view(B, H, N, Dh)


def attend(q, k, v, mask):
    """Attention of q, k, v (B, H, N, Dh) under a mask as PoHAttention.forward takes it."""
    if isinstance(mask, tuple):
        return neighbour_attention(q, k, v, *mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PoHAttention(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads, self.far_heads = cfg.n_heads, cfg.far_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # W_O, applied after the head weighting

    def forward(self, x, alpha=None, rope=None, mask=None):
        """x (B, N, D); alpha (B, N, H) head weights or None for plain attention; rope (cos, sin); mask: None,
        a dense bool mask (N, N) or (B, 1, N, N), or a tuple (grid, allowed) for gathered neighbour attention."""
        B, N, D = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (z.view(B, N, H, D // H).transpose(1, 2) for z in (q, k, v))  # (B, H, N, Dh)
        if rope is not None:
            # contiguous first: RoPE's elementwise ops on these strided views ran about 5x slower on CPU, 12% of a
            # maze12 training step
            q, k = apply_rope(q.contiguous(), *rope), apply_rope(k.contiguous(), *rope)
        near = H - self.far_heads if mask is not None else H  # a mask restricts the near heads only
        o = attend(q[:, :near], k[:, :near], v[:, :near], mask)  # (B, near, N, Dh): one output per head
        if near < H:
            o = torch.cat([o, attend(q[:, near:], k[:, near:], v[:, near:], None)], 1)
        if alpha is not None:
            # scale by H so that uniform alpha = 1/H leaves o unchanged
            o = o * (H * alpha).transpose(1, 2).unsqueeze(-1)  # alpha (B, N, H) -> (B, H, N, 1)
        o = o.transpose(1, 2).reshape(B, N, D)  # (B, N, H*Dh): concat heads
        return self.proj(o)


class PoHBlock(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = PoHAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, alpha=None, rope=None, mask=None):
        x = x + self.drop(self.attn(self.ln1(x), alpha, rope, mask))
        return x + self.drop(self.mlp(self.ln2(x)))
