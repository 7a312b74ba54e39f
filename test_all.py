"""
All tests, on tiny CPU shapes: python -m pytest -q test_all.py   (well under 5 minutes on 2 CPU cores)

Each test checks values, shapes or gradients against a reference (PyTorch's own attention, hand-computed numbers,
a naive re-computation), so it fails when the code it covers breaks.
"""

import copy
import csv
import errno
import itertools
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import types
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.colors import to_hex

import ab
import bench
import data
import evaluate
import model as model_mod
import parsing
import plots
import probes
import sample_maze
import stats
import train

from hrm_controller import (POSITION_PERIODS, Controller, ControllerConfig, anneal, balance_loss, kept_heads,
                            position_code, route, routing_entropy, temperature_at)
from model import ModelConfig, PoHModel, halting_distribution, supervised_steps
from poh_block import BlockConfig, PoHAttention, PoHBlock, grid_coords, local_mask, open_mask, rope_tables


def tiny_model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=20, n_classes=3, d_model=16, n_heads=4, n_layers=1, d_ctrl=8, R=4)
    base.update(kw)
    return PoHModel(ModelConfig(**base), verbose=False)


def tiny_batch(B=3, N=12, vocab=20, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, N), generator=g), torch.randint(0, classes, (B, N), generator=g)


# ---- core method: controller, block, model (issue 2)

@pytest.mark.parametrize("controller", ["hrm", "poh", "none"])
@pytest.mark.parametrize("B,grid,heads,k", [(1, (1, 5), 2, 1), (3, (3, 4), 4, 2), (2, (2, 2), 4, 4)])
def test_model_output_shapes(controller, B, grid, heads, k):
    m = tiny_model(controller=controller, n_heads=heads, top_k=k, d_model=8 * heads)
    x, y = tiny_batch(B, grid[0] * grid[1])
    out = m(x, y, grid=grid, trace=True)
    assert out["logits"].shape == (B, grid[0] * grid[1], 3)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["state"]["h"].shape == (B, grid[0] * grid[1], 8 * heads)
    assert len(out["trace"]) == m.cfg.R
    if controller != "none":
        assert out["trace"][0]["alpha"].shape == (B, grid[0] * grid[1], heads)
        assert out["state"]["z_L"].shape == (B, grid[0] * grid[1], 8)


def test_controller_step_by_hand_f_H_first_then_f_L_on_the_new_z_H():
    """One hrm controller step at t % T == 0 by hand: z_H' = f_H([u, z_L], z_H), then z_L' = f_L([u, z_H'], z_L) (the
    fast module reads the slow state just updated), then p = softmax(router([z_L', z_H']) / temperature)."""
    ctrl = tiny_model(controller="hrm", T=2).controller
    B, N, c = 2, 5, ctrl.cfg.d_ctrl
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, 16, generator=g)
    state = {"z_L": torch.randn(B, N, c, generator=g), "z_H": torch.randn(B, N, c, generator=g)}
    with torch.no_grad():
        _, p, new, _ = ctrl(x, state, 0, 1.5)
        u = (ctrl.inp(x) + ctrl.where(position_code((1, N)))).reshape(B * N, -1)
        zL, zH = state["z_L"].reshape(B * N, -1), state["z_H"].reshape(B * N, -1)
        zH = ctrl.f_H(torch.cat([u, zL], -1), zH)
        zL = ctrl.f_L(torch.cat([u, zH], -1), zL)
        want_p = F.softmax(ctrl.router(torch.cat([zL, zH], -1)) / 1.5, -1).view(B, N, -1)
    torch.testing.assert_close(new["z_H"], zH.view(B, N, -1))
    torch.testing.assert_close(new["z_L"], zL.view(B, N, -1))
    torch.testing.assert_close(p, want_p)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_controller_slow_state_updates_only_every_T_steps_inside_model_forward(T):
    m = tiny_model(controller="hrm", R=7, T=T)
    x, _ = tiny_batch()
    steps = m(x, trace=True)["trace"]
    prev_H = prev_L = torch.zeros_like(steps[0]["z_H"])
    for t, s in enumerate(steps):
        assert s["z_H"].abs().sum() > 0, "slow state must never be reset to zero"
        changed_H = not torch.equal(s["z_H"], prev_H)
        assert changed_H == (t % T == 0), f"z_H changed={changed_H} at t={t}, T={T}"
        assert float(s["h_update"]) == float(t % T == 0)
        assert not torch.equal(s["z_L"], prev_L), f"z_L must change at every step (t={t})"
        prev_H, prev_L = s["z_H"], s["z_L"]


def test_the_model_routes_step_0_from_h_plus_e_and_the_grids_position_code():
    """At inner step 0 the controller reads h + e (h the carried state, e the embedded input) with the position code
    of the model's own grid (not that of a 1-row grid): the traced p and alpha equal the controller called by hand."""
    m = tiny_maze_model("hrm", R=1, T=1)
    torch.nn.init.normal_(m.controller.where.weight, std=1.0)  # make the position code matter
    x = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(0))
    grid = (3, 4)
    state = m.init_state(x)
    state["h"] = torch.randn(state["h"].shape, generator=torch.Generator().manual_seed(1))  # a carried h, not e
    with torch.no_grad():
        step = m(x, state=state, grid=grid, trace=True, temperature=1.3)["trace"][0]
        ctrl = {k: v for k, v in state.items() if k != "h"}
        alpha, p, _, _ = m.controller(state["h"] + m.embed(x), ctrl, 0, 1.3, position_code(grid))
    torch.testing.assert_close(step["p"], p)
    torch.testing.assert_close(step["alpha"], alpha)


def test_controller_state_really_carries_across_steps():
    # recompute step 1 by hand from the traced step-0 state: it must match; from a zero state it must not
    m = tiny_model(controller="hrm", R=2, T=1)
    x, _ = tiny_batch()
    steps = m(x, trace=True)["trace"]
    ctrl = m.controller
    h_in = None

    def capture(mod, args):
        nonlocal h_in
        h_in = args[0].detach().clone()
    handle = ctrl.register_forward_pre_hook(lambda mod, args: capture(mod, args) if args[2] == 1 else None)
    m(x)
    handle.remove()
    carried = {"z_L": steps[0]["z_L"], "z_H": steps[0]["z_H"]}
    _, _, from_carried, _ = ctrl(h_in, carried, 1)
    _, _, from_zero, _ = ctrl(h_in, ctrl.init_state(*h_in.shape[:2], h_in.device), 1)
    assert torch.allclose(from_carried["z_L"], steps[1]["z_L"], atol=1e-6)
    assert not torch.allclose(from_zero["z_L"], steps[1]["z_L"], atol=1e-3)


def test_learned_h_gate_value_is_sigmoid_of_the_gate_on_u_z_L_z_H_and_mixes_by_it():
    """h_gate learned: g = sigmoid(gate([u, z_L, z_H])) per token (unsaturated), z_H' = g f_H + (1 - g) z_H, and
    the reported h_update is g's mean."""
    m = tiny_model(controller="hrm", R=4, T=3, h_gate="learned")
    ctrl = m.controller
    torch.manual_seed(1)
    h_in = torch.randn(2, 5, m.cfg.d_model)
    state = {"z_L": torch.randn(2, 5, m.cfg.d_ctrl), "z_H": torch.randn(2, 5, m.cfg.d_ctrl)}
    with torch.no_grad():
        ctrl.gate.weight.normal_(0, 0.5)
        u = (ctrl.inp(h_in) + ctrl.where(position_code((1, 5)))).flatten(0, 1)
        zl, zh = state["z_L"].flatten(0, 1), state["z_H"].flatten(0, 1)
        g = torch.sigmoid(ctrl.gate(torch.cat([u, zl, zh], -1)))
        assert 0.05 < g.min() and g.max() < 0.95 and g.std() > 0.05
        update = ctrl.f_H(torch.cat([u, zl], -1), zh)
        _, _, new, h_update = ctrl(h_in, state, t=1)
    torch.testing.assert_close(new["z_H"], (g * update + (1 - g) * zh).view(2, 5, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_update, g.mean())


def test_learned_h_gate_updates_slow_state_every_step_by_a_gate_in_0_1():
    m = tiny_model(controller="hrm", R=4, T=3, h_gate="learned")
    x, _ = tiny_batch()
    steps = m(x, trace=True)["trace"]
    for t in range(1, 4):
        assert not torch.equal(steps[t]["z_H"], steps[t - 1]["z_H"])
        assert 0.0 < float(steps[t]["h_update"]) < 1.0
    # z_H = g * f_H(u, z_L, z_H) + (1 - g) * z_H: a closed gate keeps z_H, an open one takes f_H's update
    ctrl = m.controller
    h_in = torch.randn(2, 5, m.cfg.d_model)
    state = {"z_L": torch.randn(2, 5, m.cfg.d_ctrl), "z_H": torch.randn(2, 5, m.cfg.d_ctrl)}
    u = ctrl.inp(h_in) + ctrl.where(position_code((1, 5)))
    update = ctrl.f_H(torch.cat([u, state["z_L"]], -1).flatten(0, 1), state["z_H"].flatten(0, 1)).view(2, 5, -1)
    with torch.no_grad():
        for bias, expected in ((-30.0, state["z_H"]), (30.0, update)):
            ctrl.gate.bias.fill_(bias)
            _, _, new, _ = ctrl(h_in, state, t=1)  # t = 1: a fixed gate with T = 3 would not update here
            torch.testing.assert_close(new["z_H"], expected, atol=1e-5, rtol=1e-5)


def test_topk_keeps_exactly_k_heads_summing_to_one():
    logits = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 3, 6):
        for hard in (False, True):  # every token keeps exactly k heads (alpha > 0), soft or hard
            alpha, p = route(logits, 1.0, k, hard=hard)
            assert ((alpha > 0).sum(-1) == k).all()
            assert torch.allclose(alpha.sum(-1), torch.ones(5, 7), atol=1e-6)
            # the kept heads are the k largest of p
            assert torch.equal(alpha.topk(k, -1).indices.sort(-1).values, p.topk(k, -1).indices.sort(-1).values)


def test_routing_entropy_is_the_per_token_entropy_in_nats():
    """routing_entropy is the mean over tokens of -sum_h p_h log p_h: log H for uniform routing, 0 for one head, and
    the textbook value for a given distribution."""
    assert float(routing_entropy(torch.full((2, 3, 4), 0.25))) == pytest.approx(math.log(4))
    assert float(routing_entropy(F.one_hot(torch.tensor([[0, 3]]), 4).float())) == pytest.approx(0.0)
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    assert float(routing_entropy(p)) == pytest.approx(1.5 * math.log(2))


def test_anneal_holds_its_end_value_past_the_end_and_its_start_before_it():
    """anneal is linear on [0, 1] and flat outside: past the end of the schedule it stays at the end value."""
    assert [anneal(2.0, 1.0, 1.5), anneal(2.0, 1.0, -0.5), anneal(0.1, 0.0, 3.0)] == pytest.approx([1.0, 2.0, 0.0])
    assert [temperature_at(2.0, 2.0, 1.0), temperature_at(0.25, 2.0, 1.0)] == pytest.approx([1.0, 1.75])


def test_lower_temperature_gives_sharper_routing():
    logits = torch.randn(4, 9, 4)
    _, p_hot = route(logits, 2.0, 4, hard=False)
    _, p_cold = route(logits, 0.5, 4, hard=False)
    assert routing_entropy(p_cold) < routing_entropy(p_hot)
    assert (p_cold.max(-1).values >= p_hot.max(-1).values - 1e-7).all()
    assert temperature_at(0.0, 2.0, 1.0) == 2.0 and temperature_at(1.0, 2.0, 1.0) == 1.0
    assert temperature_at(0.5, 2.0, 0.5, floor=0.7) == pytest.approx(1.25)
    assert temperature_at(1.0, 2.0, 0.5, floor=0.7) == pytest.approx(0.7)


def test_hard_routing_backward_is_the_full_softmax_gradient():
    """Straight-through hard routing: the gradient that reaches the logits is that of the full (tempered) softmax p,
    including the dropped heads' probabilities, not only the kept part of it."""
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    alpha, _ = route(logits, 0.7, 2, hard=True)
    got = torch.autograd.grad((alpha * g).sum(), logits)[0]
    want = torch.autograd.grad((F.softmax(logits / 0.7, -1) * g).sum(), logits)[0]
    torch.testing.assert_close(got, want)


def test_hard_routing_forward_is_hard_topk_and_router_still_gets_gradient():
    logits = torch.randn(3, 5, 4, requires_grad=True)
    alpha, p = route(logits, 1.0, 2, hard=True)
    m = torch.zeros_like(p).scatter_(-1, p.topk(2, -1).indices, 1.0)
    assert torch.allclose(alpha, m / 2, atol=1e-6)
    (alpha * torch.randn_like(alpha)).sum().backward()
    assert (logits.grad.abs() > 0).all(), "every head's logit must receive gradient (straight-through)"
    # and inside the model: the router's weights get a non-zero gradient
    model = tiny_model(controller="hrm", hard_route=True, top_k=1)
    x, y = tiny_batch()
    model(x, y)["loss"].backward()
    assert model.controller.router.weight.grad.abs().sum() > 0


def test_entropy_and_ponder_terms_are_tensors_with_gradient():
    m = tiny_model(controller="hrm", ponder_weight=0.1)
    x, y = tiny_batch()
    parts = m(x, y)["parts"]
    for name in ("entropy", "ponder", "expected_steps"):
        assert isinstance(parts[name], torch.Tensor) and parts[name].requires_grad, name
    router = torch.autograd.grad(parts["entropy"], m.controller.router.weight, retain_graph=True)[0]
    assert router.abs().sum() > 0
    halt_from_ponder = torch.autograd.grad(parts["ponder"], m.halt.weight, retain_graph=True)[0]
    halt_from_steps = torch.autograd.grad(parts["expected_steps"], m.halt.bias)[0]
    assert halt_from_ponder.abs().sum() > 0 and halt_from_steps.abs().sum() > 0
    # their values by hand from the traced steps: the KL to the geometric prior, the task loss weighted by the
    # halting distribution, and each sample's answer from the first step where its halting mass reaches 0.5
    out = m(x, y, trace=True)
    p = out["parts"]["halt_p"]
    prior = model_mod.geometric_prior(p.shape[1], m.cfg.ponder_prior)
    torch.testing.assert_close(out["parts"]["ponder"], (p * (p.log() - prior.log())).sum(1).mean())
    losses = torch.stack([model_mod.token_loss(s["logits"], y) for s in out["trace"]], 1)
    torch.testing.assert_close(out["parts"]["task"], (p * losses).sum(1).mean())
    stop = (p.cumsum(1) >= 0.5).float().argmax(1)
    for b in range(len(x)):
        torch.testing.assert_close(out["logits"][b], out["trace"][int(stop[b])]["logits"][b])


def test_entropy_weight_sign_positive_penalises_entropy():
    m = tiny_model(controller="hrm")
    x, y = tiny_batch()
    plain = m(x, y)["loss"]
    out = m(x, y, entropy_weight=0.5)
    assert torch.allclose(out["loss"], plain + 0.5 * out["parts"]["entropy"])
    # and through the gradient: the router's gradient moves by 0.5 x the entropy's (a detached term would not)
    w = m.controller.router.weight
    base = torch.autograd.grad(plain, w)[0]
    with_term, entropy = torch.autograd.grad(out["loss"], w, retain_graph=True)[0], torch.autograd.grad(
        out["parts"]["entropy"], w)[0]
    assert entropy.abs().sum() > 0
    torch.testing.assert_close(with_term - base, 0.5 * entropy, rtol=1e-4, atol=1e-6)


def test_uniform_alpha_block_equals_torch_multihead_attention():
    torch.manual_seed(0)
    D, H = 16, 4
    attn = PoHAttention(BlockConfig(d_model=D, n_heads=H))  # no rope passed: no positions
    ref = nn.MultiheadAttention(D, H, bias=False, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.out_proj.weight.copy_(attn.proj.weight)
    x = torch.randn(2, 7, D)
    expected, _ = ref(x, x, x, need_weights=False)
    assert torch.allclose(attn(x), expected, atol=1e-5)
    assert torch.allclose(attn(x, alpha=torch.full((2, 7, H), 1.0 / H)), expected, atol=1e-5)
    # with a local mask too (nn.MultiheadAttention's bool mask means "blocked")
    mask = local_mask((1, 7))
    expected_local, _ = ref(x, x, x, attn_mask=~mask, need_weights=False)
    assert torch.allclose(attn(x, mask=mask), expected_local, atol=1e-5)


def test_the_block_is_pre_norm_attention_then_pre_norm_mlp_on_the_residual():
    """PoHBlock(x) = x' + mlp(ln2(x')), x' = x + attn(ln1(x)): each sublayer reads a LayerNorm of the residual."""
    torch.manual_seed(0)
    block = PoHBlock(BlockConfig(d_model=16, n_heads=4))
    x = 3 * torch.randn(2, 6, 16) + 1.0  # far from unit scale: a missing norm shows
    alpha = torch.softmax(torch.randn(2, 6, 4), -1)
    with torch.no_grad():
        mid = x + block.attn(block.ln1(x), alpha)
        want = mid + block.mlp(block.ln2(mid))
        torch.testing.assert_close(block(x, alpha), want)


def test_nonuniform_alpha_changes_block_output_per_head():
    torch.manual_seed(0)
    block = PoHBlock(BlockConfig(d_model=16, n_heads=4))
    x = torch.randn(2, 6, 16)
    uniform = block(x, torch.full((2, 6, 4), 0.25))
    one_head = torch.zeros(2, 6, 4)
    one_head[..., 0] = 1.0
    assert not torch.allclose(block(x, one_head), uniform, atol=1e-4)
    # alpha really weights heads before W_O: with only head 0 on, the output equals W_O applied to 4 * o_0
    attn = block.attn
    zero_others = torch.zeros(2, 6, 4)
    zero_others[..., 0] = 0.25
    with torch.no_grad():
        w = attn.proj.weight.clone()
        attn.proj.weight[:, 4:] = 0  # head 0 only in W_O
        masked_wo = attn(x, torch.full((2, 6, 4), 0.25))
        attn.proj.weight.copy_(w)
    assert torch.allclose(attn(x, zero_others), masked_wo, atol=1e-6)


def test_rope_turns_with_the_column_too():
    """The cos/sin tables turn half of each head by the row and half by the column: a 1-row grid (sorting) still
    has positions."""
    cos, sin = rope_tables((3, 5), 4)
    rows, cols = grid_coords((3, 5))
    torch.testing.assert_close(cos, torch.stack([rows.cos(), cols.cos()], 1))
    # behaviour: on a 1-row grid (sorting) positions must still change attention
    torch.manual_seed(0)
    block, x = PoHBlock(BlockConfig(d_model=16, n_heads=4)), torch.randn(1, 7, 16)
    assert (block(x, rope=rope_tables((1, 7), 4)) - block(x)).abs().max() > 1e-3


def test_rope2d_attention_depends_on_relative_position_only():
    # moving every token's content one row down and one column right on a larger grid leaves the outputs of the
    # tokens whose neighbours all moved with them unchanged; and the rotation matters, by row and by column
    torch.manual_seed(0)
    block = PoHBlock(BlockConfig(d_model=16, n_heads=4))  # local: the mask passed to it below
    x = torch.randn(1, 3 * 5, 16)
    rope_a, mask_a = rope_tables((3, 5), 4), local_mask((3, 5))
    out = block(x, rope=rope_a, mask=mask_a)
    grid_b = torch.zeros(1, 4, 6, 16)
    grid_b[:, 1:, 1:] = x.view(1, 3, 5, 16)
    out_b = block(grid_b.view(1, 24, 16), rope=rope_tables((4, 6), 4), mask=local_mask((4, 6)))
    inner_a = out.view(1, 3, 5, 16)[:, 1:2, 1:4]
    inner_b = out_b.view(1, 4, 6, 16)[:, 2:3, 2:5]
    assert torch.allclose(inner_a, inner_b, atol=1e-5)
    cos, sin = rope_a  # (N, 2) for head_dim 4: the row's angle, then the column's
    for half in (0, 1):  # without the row's (or the column's) rotation the outputs change
        c, s_ = cos.clone(), sin.clone()
        c[:, half], s_[:, half] = 1.0, 0.0
        assert (block(x, rope=(c, s_), mask=mask_a) - out).abs().max() > 1e-3, half


def test_each_inner_step_is_blocks_of_norm_h_plus_e_from_h_equal_e():
    """The unrouted recurrence by hand: h_0 = e (the embedded input), h_{t+1} = blocks(norm_in(h_t) + e), logits =
    head(norm_out(h_R)); the returned state is h_R."""
    m = tiny_maze_model("none", R=3)
    x = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(x, grid=(3, 3))
        e = m.embed(x)
        h = e
        rope, mask = rope_tables((3, 3), 4), m.attention_mask(x, (3, 3))
        for _ in range(3):
            h = m.norm_in(h) + e
            for block in m.blocks:
                h = block(h, None, rope, mask)
    torch.testing.assert_close(out["state"]["h"], h)
    torch.testing.assert_close(out["logits"], m.head(m.norm_out(h)))
    torch.testing.assert_close(m.init_state(x)["h"], e)


def test_bptt_reaches_first_step_state_and_tbptt_does_not():
    x, y = tiny_batch()
    for grad, reaches in (("bptt", True), ("tbptt", False)):
        m = tiny_model(controller="hrm", R=4, grad=grad, grad_steps=2, T=2)
        state = m.init_state(x)
        state["h"].requires_grad_(True)
        m(x, y, state=state)["loss"].backward()
        got = state["h"].grad is not None and state["h"].grad.abs().sum() > 0
        assert got == reaches, grad
        assert m.controller.f_H.weight_ih.grad.abs().sum() > 0, "f_H must get gradient (grad_steps >= T)"


def test_tbptt_graph_is_flat_in_R_and_bptt_grows():
    x, y = tiny_batch(B=2, N=16)
    sizes = {}
    for grad in ("bptt", "tbptt"):
        for R in (2, 8):
            sizes[grad, R] = bench.saved_bytes(tiny_model(controller="hrm", R=R, grad=grad, grad_steps=2), x, y, None)
    bptt_ratio = sizes["bptt", 8] / sizes["bptt", 2]
    tbptt_ratio = sizes["tbptt", 8] / sizes["tbptt", 2]
    print(f"saved-for-backward bytes: {sizes}; bptt x{bptt_ratio:.2f}, tbptt x{tbptt_ratio:.2f}")
    assert 3.0 < bptt_ratio < 4.5
    assert abs(tbptt_ratio - 1.0) < 0.10


def test_supervised_steps_and_every_k_supervision_uses_only_those_steps():
    assert supervised_steps(6, "last") == {5}
    assert supervised_steps(6, "all") == set(range(6))
    assert supervised_steps(7, "every-3") == {2, 5, 6}
    with pytest.raises(ValueError):
        supervised_steps(4, "every-0")
    # the loss equals the mean of the per-step losses recomputed from the traced logits
    m = tiny_model(controller="poh", R=7, supervise="every-3")
    x, y = tiny_batch()
    out = m(x, y, trace=True)
    ce = [nn.functional.cross_entropy(s["logits"].reshape(-1, 3), y.reshape(-1)) for s in out["trace"]]
    assert torch.allclose(out["loss"], (ce[2] + ce[5] + ce[6]) / 3, atol=1e-5)


def test_halting_distribution_is_valid_and_matches_hand_computation():
    lam = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.3]])
    p = halting_distribution(lam)
    assert torch.allclose(p, torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]]))
    p = halting_distribution(torch.rand(10, 6))
    assert (p >= 0).all() and (p.sum(1) <= 1 + 1e-6).all()


def test_biasing_halting_head_lowers_steps_used():
    m = tiny_model(controller="hrm", R=8, ponder_weight=0.01)
    x, y = tiny_batch()
    m.eval()
    used, expected = [], []
    for bias in (-4.0, 0.0, 4.0):
        with torch.no_grad():
            m.halt.bias.fill_(bias)
            out = m(x, y)
        p = out["parts"]["halt_p"]
        assert (p >= 0).all() and (p.sum(1) <= 1 + 1e-6).all()
        used.append(float(out["parts"]["steps_used"]))
        expected.append(float(out["parts"]["expected_steps"]))
    # steps_used is discrete: compared only at the two ends, far from the 0.5 cut-off (at bias 0 the samples'
    # first-step halting mass lies within 0.01 of it, so either side is right there)
    assert expected[0] > expected[1] + 0.5 and expected[1] > expected[2] + 0.5, expected
    assert used[0] >= 6 and used[2] == 1.0, used


def test_none_controller_is_hrm_transformer_minus_controller():
    counts = {}
    names = {}
    for c in ("hrm", "poh", "none"):
        m = tiny_model(controller=c)
        counts[c] = m.num_params()
        names[c] = {n for n, _ in m.named_parameters()}
    print(f"parameters: {counts}")
    assert names["none"] == {n for n in names["hrm"] if not n.startswith("controller.")}
    assert names["none"] == {n for n in names["poh"] if not n.startswith("controller.")}
    assert counts["none"] < counts["poh"] < counts["hrm"]
    # the default-size models differ by a few percent only
    full = {c: PoHModel(ModelConfig(controller=c), verbose=False).num_params() for c in ("hrm", "none")}
    assert full["hrm"] / full["none"] < 1.05


def test_reset_controller_zeroes_carried_controller_state():
    x, _ = tiny_batch()
    for reset in (False, True):
        m = tiny_model(controller="hrm", R=1, T=2, reset_controller=reset)
        state = m(x)["state"]
        state["z_H"] = torch.full_like(state["z_H"], 5.0)
        state["z_L"] = torch.full_like(state["z_L"], 5.0)
        # R=1, T=2: step 0 updates z_H from its input state, so a reset is visible in the new state
        fresh = m(x, state={"h": state["h"]} | m.controller.init_state(3, 12, x.device))["state"]
        carried = m(x, state=state)["state"]
        assert torch.allclose(carried["z_H"], fresh["z_H"]) == reset


def test_bad_model_settings_raise_clear_errors():
    for kw, msg in [({"R": 0}, "R must be"), ({"T": 0}, "T must be"), ({"top_k": 5}, "top-k"),
                    ({"controller": "gru"}, "controller")]:
        with pytest.raises(ValueError, match=msg):
            tiny_model(**kw)


def test_controller_parameter_group_gets_its_own_lr():
    m = tiny_model(controller="hrm")
    opt = m.configure_optimizers(lr=1e-3, weight_decay=0.1, lr_controller=5e-4, verbose=False)
    ctrl_ids = {id(p) for p in m.controller.parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == g["base_lr"] == (5e-4 if id(p) in ctrl_ids else 1e-3)  # the schedule scales base_lr
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_supervise_every_3_gives_gradient_only_to_the_intended_steps():
    m = tiny_model(controller="hrm", R=7, supervise="every-3")
    x, y = tiny_batch()
    got, step = [], itertools.count()

    def keep_grad(module, inputs, out):  # trace=True runs the head at every step; note which steps get gradient
        t = next(step)
        out.register_hook(lambda g, t=t: got.append(t) if g.abs().sum() > 0 else None)
    m.head.register_forward_hook(keep_grad)
    m(x, y, trace=True)["loss"].backward()
    assert next(step) == 7 and sorted(got) == [2, 5, 6]
    assert train.resolve_args(["--task", "sort12", "--supervise-every", "3"]).supervise == "every-3"


def test_unset_flags_take_the_task_recipe_and_explicit_flags_win():
    maze, sort = train.resolve_args(["--task", "maze12"]), train.resolve_args(["--task", "sort12"])
    assert (maze.batching, maze.max_steps, maze.attn, maze.segments, maze.R) == ("rolling", 3000, "open", 32, 2)
    assert (maze.ema, sort.ema, train.resolve_args(["--task", "maze12", "--ema", "0"]).ema) == (0.995, 0.0, 0.0)
    assert (sort.batching, sort.max_steps, sort.attn, sort.segments) == ("fixed", 2000, "global", 1)
    mine = train.resolve_args(["--task", "maze12", "--batching", "fixed", "--max-steps", "4000", "--R", "3"])
    assert (mine.batching, mine.max_steps, mine.R, mine.d_model) == ("fixed", 4000, 3, 64)
    assert (maze.top_k, sort.top_k) == (2, 2)
    # --top-k 0 keeps every head (the parsing recipe's choice); an explicit value still wins
    assert train.resolve_args(["--task", "maze12", "--top-k", "0", "--n-heads", "8"]).top_k == 8
    parse = train.resolve_args(["--task", "ud_ewt", "--top-k", "1"])
    assert (parse.top_k, parse.n_layers, parse.max_steps, parse.ema) == (1, 3, 4000, 0.999)


@pytest.mark.parametrize("L", [16, 20, 24])
def test_longer_sort_tasks_give_permutations_and_a_reference_near_half(L):
    task = data.make_task(f"sort{L}", n_val=200, n_test=400)
    x, y = task.split("test")
    assert x.shape == (400, L) and (x == data.SORT_MASK).sum(1).eq(L // 2).all()
    assert torch.equal(y.sort(1).values, torch.arange(L).expand(400, L))
    ranks = data.greedy_ranks(torch.randn(400, L, L))
    assert torch.equal(ranks.sort(1).values, torch.arange(L).expand(400, L))
    ref = task.reference_metrics(x, y)
    assert 0.40 < ref["tau"] < 0.60, ref


# ---- tasks: mazes and sorting (issue 3)

@pytest.fixture(scope="module")
def cache8(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def maze8(cache8):
    return data.make_task("maze8", n_train=200, n_val=40, n_test=40, progress=False, cache_dir=cache8)


def pool_mazes(task, split="val"):
    p = task.pools[split]
    return [(p["open"][i], tuple(p["start"][i]), tuple(p["goal"][i])) for i in range(len(p["plen"]))]


def assert_valid_tree(o, start, goal):
    """Openings agree between neighbours, the border is closed, and the maze is a spanning tree."""
    n = o.shape[0]
    assert np.array_equal(o[:, :-1, 1], o[:, 1:, 3]) and np.array_equal(o[:-1, :, 2], o[1:, :, 0])
    assert not (o[0, :, 0].any() or o[:, -1, 1].any() or o[-1, :, 2].any() or o[:, 0, 3].any())
    assert o[:, :, 1].sum() + o[:, :, 2].sum() == n * n - 1
    dist, path = data.solve(o, start, goal)
    assert (dist >= 0).all() and path[0] == tuple(start) and path[-1] == tuple(goal)


def test_changed_wall_changes_input_at_both_cells(maze8):
    x, _ = maze8.split("val")
    o, s, g = data.decode(x[0].numpy(), 8)
    assert np.array_equal(data.encode(o, s, g), x[0].numpy())  # decode inverts encode
    r, c = map(int, np.argwhere(~o[:, :-1, 1])[0])  # a closed wall between (r, c) and (r, c+1)
    o2 = o.copy()
    o2[r, c, 1] = o2[r, c + 1, 3] = True
    changed = np.flatnonzero(data.encode(o2, s, g) != x[0].numpy())
    assert sorted(changed.tolist()) == [r * 8 + c, r * 8 + c + 1]


def test_open_attention_mask_follows_the_walls_and_nothing_behind_a_wall_reaches_a_cell(maze8):
    x, _ = maze8.split("val")
    mask = open_mask(x[:4], (8, 8))[:, 0]  # (B, N, N)
    for b in range(4):
        o, _, _ = data.decode(x[b].numpy(), 8)
        expected = np.eye(64, dtype=bool)
        for r, c, d in np.argwhere(o):
            expected[r * 8 + c, (r + data.MOVES[d][0]) * 8 + c + data.MOVES[d][1]] = True
        assert np.array_equal(mask[b].numpy(), expected) and np.array_equal(expected, expected.T)
    # one block, one step: a cell's output ignores its neighbour behind a wall and depends on an open one
    torch.manual_seed(0)
    model = PoHModel(ModelConfig(vocab_size=48, n_classes=5, d_model=16, n_heads=4, n_layers=1, R=1,
                                 attn="open", controller="none"), verbose=False)
    o, _, _ = data.decode(x[0].numpy(), 8)
    plain = x[0] < 16  # cells with no start/goal role: adding 16 changes their token but not their walls
    for side_open, tol_ok in [(False, lambda diff: diff < 1e-6), (True, lambda diff: diff > 1e-4)]:
        r, c = next((r, c) for r, c in np.argwhere(o[:, :-1, 1] == side_open) if plain[r * 8 + c + 1])
        x2 = x[:1].clone()
        x2[0, r * 8 + c + 1] += 16
        with torch.no_grad():
            a, b = (model(z, grid=(8, 8))["logits"][0, r * 8 + c] for z in (x[:1], x2))
        assert tol_ok((a - b).abs().max().item()), (side_open, (a - b).abs().max().item())


def test_train_val_test_disjoint_under_symmetries_and_planted_copy_dropped(tmp_path, capsys):
    task = data.make_task("maze3", n_train=300, n_val=60, n_test=60, cache_dir=str(tmp_path), progress=False)
    keys = {s: set(data.canonical_keys(*(task.pools[s][k] for k in ("open", "start", "goal"))))
            for s in ("train", "val", "test")}
    assert keys["train"].isdisjoint(keys["val"]) and keys["train"].isdisjoint(keys["test"])
    assert keys["val"].isdisjoint(keys["test"])
    # 3x3 mazes repeat often, so the build really did drop (and report) held-out copies here
    assert "dropped" in capsys.readouterr().out and len(task.split("val")[0]) < 60
    # a rotated-and-reflected copy of a training maze, planted among held-out mazes, is caught
    tr = task.pools["train"]
    o, s, g = data.symmetry(tr["open"][:1], tr["start"][:1], tr["goal"][:1], 5)
    held = {"open": np.concatenate([o, task.pools["val"]["open"][:3]]),
            "start": np.concatenate([s, task.pools["val"]["start"][:3]]),
            "goal": np.concatenate([g, task.pools["val"]["goal"][:3]]), "plen": np.zeros(4, dtype=np.int64)}
    kept, dropped = data.drop_overlap(held, keys["train"])
    assert dropped == 1 and np.array_equal(kept["open"], task.pools["val"]["open"][:3])


def test_labels_follow_shortest_path_equal_to_maze_dataset_solution():
    for m in data.maze_dataset_chunk(8, 20, seed=11):
        o, s, g = data.from_solved(m)
        assert_valid_tree(o, s, g)
        dist, path = data.solve(o, s, g)
        assert path == [tuple(int(v) for v in p) for p in m.solution]  # also checks the connection_list layout
        y = data.first_class(data.labels(o, s, g, "direction")).reshape(8, 8)  # a tree: one right move per cell
        assert (data.labels(o, s, g) == 1 << y.reshape(-1)).all()
        cur, moves = s, 0
        while cur != g:
            d = int(y[cur])
            assert o[cur][d]  # the labelled move goes through an open side
            nxt = (cur[0] + data.MOVES[d][0], cur[1] + data.MOVES[d][1])
            assert dist[nxt] == dist[cur] - 1
            cur, moves = nxt, moves + 1
        assert moves == len(path) - 1 and y[g] == data.GOAL_CLASS
        on_path = data.first_class(data.labels(o, s, g, "path")).reshape(8, 8)
        assert {tuple(map(int, p)) for p in np.argwhere(on_path == 1)} == set(path)


def test_rollout_perfect_on_true_labels_and_fails_on_broken_predictions(maze8):
    for target, C in (("direction", 5), ("path", 2)):
        mazes = pool_mazes(maze8)
        x = torch.from_numpy(np.stack([data.encode(*m) for m in mazes]))
        y = torch.from_numpy(np.stack([data.labels(*m, target) for m in mazes]))
        logits = F.one_hot(torch.from_numpy(data.first_class(y.numpy())), C).float()
        assert data.maze_metrics(logits, x, y) == {"reach": 1.0, "optimal": 1.0, "exact": 1.0, "cell_acc": 1.0,
                                                   "unique": 1.0}
        # break one maze: at the first path cell with a side branch, favour that branch (a dead end in a tree)
        o, s, g = mazes[0]
        path = data.solve(o, s, g)[1]
        for i, cell in enumerate(path[:-1]):
            branch = [d for d in range(4) if o[cell][d] and (cell[0] + data.MOVES[d][0], cell[1] + data.MOVES[d][1])
                      not in path[max(i - 1, 0):i + 2]]
            if branch:
                break
        nb = (cell[0] + data.MOVES[branch[0]][0]) * 8 + cell[1] + data.MOVES[branch[0]][1]
        broken = logits.clone()
        if target == "direction":
            broken[0, cell[0] * 8 + cell[1], branch[0]] = 10.0
        else:
            broken[0, nb, 1] = 10.0
        assert data.rollout(broken[0].numpy(), o, s, g, target)[-1] != g
        assert data.maze_metrics(broken, x, y)["reach"] == pytest.approx(1 - 1 / len(mazes))
    # direction logits pointing into a wall at the start cannot walk through it: the rollout still solves it
    wall = [d for d in range(4) if not o[s][d]][0]
    into_wall = F.one_hot(torch.from_numpy(data.first_class(data.labels(o, s, g))).clamp(min=0), 5).float()
    into_wall[s[0] * 8 + s[1], wall] = 10.0
    assert data.rollout(into_wall.numpy(), o, s, g) == path


def ring_maze():
    """A 2x2 ring: two equally short ways from (0, 0) to (1, 1)."""
    o = np.zeros((2, 2, 4), dtype=bool)
    o[0, 0, [1, 2]] = o[0, 1, [2, 3]] = o[1, 0, [0, 1]] = o[1, 1, [0, 3]] = True
    return o


def test_cell_acc_leaves_out_cells_the_goal_cannot_reach():
    """cell_acc counts only the cells the goal can reach: walled-off cells (IGNORE) never count, whatever is
    predicted there."""
    spur = np.zeros((2, 3, 4), dtype=bool)
    spur[:, :2] = ring_maze()
    spur[0, 1, 1] = spur[0, 2, 3] = True
    spur = np.pad(spur, ((0, 1), (0, 0), (0, 0)))  # (1, 2) and the last row walled off: 4 IGNORE cells
    x = torch.from_numpy(data.encode(spur, (0, 0), (1, 1)))[None]
    y = torch.from_numpy(data.labels(spur, (0, 0), (1, 1)))[None]
    assert (y == data.IGNORE).sum() == 4
    logits = F.one_hot(torch.from_numpy(data.first_class(y.numpy())).clamp(min=0), 5).float()
    assert data.maze_metrics(logits, x, y)["cell_acc"] == 1.0


def test_a_path_of_the_right_length_into_a_dead_end_is_not_optimal():
    """A rollout as long as the shortest path that ends in a dead end neither reaches nor is optimal."""
    o, s, g = maze_from_edges(3, EDGES), (1, 1), (2, 0)  # best: (1,1) (1,0) (2,0); N then W: (0,1) (0,0) dead end
    x = torch.from_numpy(data.encode(o, s, g))[None]
    y = torch.from_numpy(data.labels(o, s, g))[None]
    logits = F.one_hot(torch.from_numpy(data.first_class(y.numpy())), 5).float()
    logits[0, 4, 0] = logits[0, 1, 3] = 10.0
    assert data.rollout(logits[0].numpy(), o, s, g) == [(1, 1), (0, 1), (0, 0)]
    m = data.maze_metrics(logits, x, y)
    assert (m["reach"], m["optimal"], m["exact"]) == (0.0, 0.0, 0.0)


def test_path_labels_mark_every_cell_of_every_shortest_path():
    """The 'path' target marks the cells of every shortest path (a ring has two), not only the lowest-move one."""
    y = data.labels(ring_maze(), (0, 0), (1, 1), "path")
    assert y.tolist() == [2, 2, 2, 2]  # 1 << 1 on all four cells: both ways round the ring are shortest


def test_path_target_scores_a_maze_with_two_shortest_paths_as_not_unique():
    """The path target on a maze with two shortest paths: optimal, but not unique, so not scored as exact."""
    o = ring_maze()
    x = torch.from_numpy(data.encode(o, (0, 0), (1, 1)))[None]
    y = torch.from_numpy(data.labels(o, (0, 0), (1, 1), "path"))[None]
    logits = F.one_hot(torch.from_numpy(data.first_class(y.numpy())), 2).float()
    m = data.maze_metrics(logits, x, y, per_item=True)
    assert m["unique"] == [0.0] and np.isnan(m["exact"][0]) and m["optimal"] == [1.0]


def test_label_smoothing_of_set_labels_with_one_right_class_is_torchs_smoothed_cross_entropy():
    """With label smoothing, the set loss on one right class per token equals F.cross_entropy's label_smoothing
    (towards the uniform distribution); and smoothing raises the loss of a confident right answer."""
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[3, 0, 4, -100], [1, 1, 2, 0]])
    single = torch.where(classes >= 0, 1 << classes.clamp(min=0), classes)
    for ls in (0.1, 0.3):
        torch.testing.assert_close(model_mod.token_loss(logits, single, ls, label_sets=True),
                                   model_mod.token_loss(logits, classes, ls))
    sure = 10 * F.one_hot(classes.clamp(min=0), 5).float()
    assert (model_mod.token_loss(sure, single, 0.1, True) > model_mod.token_loss(sure, single, 0.0, True)).all()


def test_right_answers_count_any_of_several_equally_short_moves():
    """right_answers: a cell with two shortest moves (a ring) is right with either one; a move off them is wrong."""
    y = torch.from_numpy(data.labels(ring_maze(), (0, 0), (1, 1)))[None]  # (0, 0): E and S both shortest
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 2] = logits[0, 2, 1] = logits[0, 3, data.GOAL_CLASS] = 1.0  # S, S, E, goal
    assert data.right_answers(y, logits).tolist() == [[True, True, True, True]]
    logits[0, 0] = 0.0
    logits[0, 0, 0] = 1.0  # N: into a wall
    assert data.right_answers(y, logits).tolist() == [[False, True, True, True]]


def test_a_maze_with_two_equally_short_moves_gives_both_full_credit_and_no_exact_score():
    o = ring_maze()
    x = torch.from_numpy(data.encode(o, (0, 0), (1, 1)))[None]
    y = torch.from_numpy(data.labels(o, (0, 0), (1, 1)))[None]
    E, S, GOAL = 1 << 1, 1 << 2, 1 << data.GOAL_CLASS
    assert y.tolist() == [[E | S, S, E, GOAL]]  # at the start both E and S are shortest moves
    for first in (1, 2):  # go E first, or S first: both are right, at every cell and as a path
        logits = F.one_hot(torch.tensor([[first, 2, 1, 4]]), 5).float()
        assert data.maze_metrics(logits, x, y) == pytest.approx(
            {"reach": 1.0, "optimal": 1.0, "exact": float("nan"), "cell_acc": 1.0, "unique": 0.0}, nan_ok=True)
    # the loss gives both moves the same credit: all the probability on E or all on S costs the same
    loss = lambda logits: float(model_mod.token_loss(logits, y, label_sets=True))
    assert loss(10 * F.one_hot(torch.tensor([[1, 2, 1, 4]]), 5).float()) == pytest.approx(
        loss(10 * F.one_hot(torch.tensor([[2, 2, 1, 4]]), 5).float()))
    logits = torch.randn(1, 4, 5)  # and equals -log(p_E + p_S) at the start
    p = logits.softmax(-1)
    expected = (-torch.log(p[0, 0, 1] + p[0, 0, 2]) - torch.log(p[0, 1, 2]) - torch.log(p[0, 2, 1])
                - torch.log(p[0, 3, 4])) / 4
    assert loss(logits) == pytest.approx(float(expected), rel=1e-5)
    # on one labelled class, the set loss is the usual cross-entropy
    single = torch.tensor([[1 << 3, 1 << 0, 1 << 4, -100]])
    classes = torch.tensor([[3, 0, 4, -100]])
    assert float(model_mod.token_loss(logits, single, label_sets=True)) == pytest.approx(
        float(model_mod.token_loss(logits, classes)), rel=1e-5)
    # equal scores go N, E, S, W in that order, so flat logits follow the labelled (E-first) path
    assert data.rollout(np.zeros((4, 5)), o, (0, 0), (1, 1)) == [(0, 0), (0, 1), (1, 1)]
    assert data.rollout(np.zeros((4, 2)), o, (1, 1), (0, 0), "path") == [(1, 1), (0, 1), (0, 0)]
    # the path target marks every cell of both shortest paths as on the path; a dead end off them stays off
    ON, OFF = 1 << 1, 1 << 0
    assert data.labels(o, (0, 0), (1, 1), "path").tolist() == [ON, ON, ON, ON]
    spur = np.zeros((2, 3, 4), dtype=bool)
    spur[:, :2] = o  # the ring, and a dead end east of (0, 1): (0, 2)
    spur[0, 1, 1] = spur[0, 2, 3] = True
    spur = np.pad(spur, ((0, 1), (0, 0), (0, 0)))  # a 3x3 grid, its last row walled off (unreachable)
    assert data.labels(spur, (0, 0), (1, 1), "path").reshape(3, 3).tolist() == [
        [ON, ON, OFF], [ON, ON, -100], [-100, -100, -100]]


def test_training_batches_show_a_maze_under_all_8_symmetries(tmp_path):
    """Augmented training batches draw each of the 8 square symmetries (rotations and reflections): from a one-maze
    pool, a large batch holds exactly that maze's 8 images."""
    task = data.make_task("maze5", n_train=1, n_val=0, n_test=0, cache_dir=str(tmp_path), progress=False)
    p = task.pools["train"]
    images = {data.encode(*data.symmetry(p["open"][0], tuple(p["start"][0]), tuple(p["goal"][0]), k)).tobytes()
              for k in range(8)}
    assert len(images) == 8  # this maze has no symmetry of its own
    x, _ = task.train_batch(400, torch.Generator().manual_seed(0))
    assert {row.numpy().astype(np.int64).tobytes() for row in x} == images


def test_symmetries_give_valid_mazes_with_consistently_transformed_labels(maze8, cache8):
    for o, s, g in pool_mazes(maze8)[:10]:
        y = data.first_class(data.labels(o, s, g))
        field = np.zeros((8, 8, 4), dtype=bool)  # the direction field as one-hot "open sides"
        field.reshape(64, 4)[y < 4, y[y < 4]] = True
        forms = set()
        for k in range(8):
            o2, s2, g2 = data.symmetry(o, s, g, k)
            assert_valid_tree(o2, s2, g2)
            assert len(data.solve(o2, s2, g2)[1]) == len(data.solve(o, s, g)[1])
            f2 = data.symmetry(field, s, g, k)[0]
            expected = np.where(f2.any(-1), f2.argmax(-1), -1).reshape(-1)
            expected[g2[0] * 8 + g2[1]] = data.GOAL_CLASS
            assert np.array_equal(expected, data.first_class(data.labels(o2, s2, g2)))
            forms.add(data.encode(o2, s2, g2).tobytes())
        assert len(forms) == 8
        assert data.symmetry(o, s, g, 0)[1:] == (s, g) and np.array_equal(data.symmetry(o, s, g, 0)[0], o)
    # the batches the model trains on are augmented mazes with their own labels, for both targets
    on_path = data.make_task("maze8", n_train=200, n_val=40, n_test=40, target="path", cache_dir=cache8)
    for task in (maze8, on_path):
        x, y = task.train_batch(32, torch.Generator().manual_seed(0))
        for xi, yi in zip(x.numpy(), y.numpy()):
            o, s, g = data.decode(xi, 8)
            assert_valid_tree(o, s, g)
            assert np.array_equal(yi, data.labels(o, s, g, task.target))


def test_sort_validation_and_test_sets_are_different_arrays():
    """The sorting task's validation and test arrays come from different seeds: no array is in both."""
    task = data.make_task("sort12", n_val=200, n_test=200)
    val, test = (set(map(tuple, task.split(s)[0].tolist())) for s in ("val", "test"))
    assert not val & test


def test_reference_ranks_put_hidden_values_at_the_mean_visible_value_ties_by_position():
    """fill="mean": a hidden value is ranked as the mean of the visible ones (here 30, tied with the visible 30 and
    placed before it by position); fill="zero" ranks it as 0."""
    M = data.SORT_MASK
    x = torch.tensor([[110, M, 130, 150]])  # visible 10, 30, 50: mean 30
    assert data.reference_ranks(x).tolist() == [[0, 1, 2, 3]]
    assert data.reference_ranks(x, fill="zero").tolist() == [[1, 0, 2, 3]]


def test_sort_targets_metrics_by_hand_and_reference_tau():
    task = data.make_task("sort12", n_val=2000, n_test=10)
    x, y = task.split("val")
    assert torch.equal(y.sort(1).values, torch.arange(12).expand(2000, 12))
    assert ((x == data.SORT_MASK).sum(1) == 6).all() and x.max() <= 200 and task.vocab_size == 201
    seen = x != data.SORT_MASK  # visible tokens are value + 100, so they order like their ranks
    assert all(torch.equal(xi[m].argsort(), yi[m].argsort()) for xi, yi, m in zip(x[:50], y[:50], seen[:50]))
    ident = torch.arange(4)[None]
    assert data.rank_metrics(ident, ident) == {"tau": 1.0, "elem_acc": 1.0, "perfect": 1.0}
    assert data.rank_metrics(ident.flip(1), ident)["tau"] == -1.0
    swap = data.rank_metrics(torch.tensor([[0, 2, 1, 3]]), ident)
    assert swap["tau"] == pytest.approx((5 - 1) / 6) and swap["elem_acc"] == 0.5 and swap["perfect"] == 0.0
    # greedy assignment: every position wants rank 0; the best claim wins and the rest take what is left
    logits = torch.tensor([[[3.0, 1.0, 0.0], [5.0, 2.0, 0.0], [4.0, 0.0, 1.0]]])
    assert data.greedy_ranks(logits).tolist() == [[1, 0, 2]]
    # expected-rank decoding: position 0 is sure of rank 0, position 1 torn between ranks 1 and 2 (expected
    # 1.5), position 2 leans to rank 2 but has mass at rank 0 (expected 1.4): the order is 0, 2, 1
    probs = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.3, 0.0, 0.7]]])
    assert data.expected_ranks(probs.log()).tolist() == [[0, 2, 1]]
    assert data.greedy_ranks(probs.log()).tolist() == [[0, 1, 2]]
    assert data.expected_ranks(torch.zeros(1, 64, 64)).tolist() == [list(range(64))]  # ties by position
    perfect = {"tau": 1.0, "elem_acc": 1.0, "perfect": 1.0}
    assert task.metrics(F.one_hot(y, 12).float() * 20, x, y) == {**perfect, **{k + "_assign": 1.0 for k in perfect}}
    ref = task.reference_metrics(x, y)
    assert 0.45 < ref["tau"] < 0.55 and ref["perfect"] < 0.01
    assert 0.45 < task.reference_metrics(x, y, fill="zero")["tau"] < 0.55
    vis = data.make_task("sort12-visible", n_val=200, n_test=10)
    assert (vis.split("val")[0] != data.SORT_MASK).all()
    assert vis.reference_metrics(*vis.split("val"))["tau"] == 1.0


def test_pools_of_other_generators_with_the_same_size_and_seed_are_cached_apart(tmp_path):
    """The maze cache keys every setting: pools of the same n, count and seed but another generator or generator
    argument are never read from each other's cache file."""
    d = str(tmp_path)
    perfect = data.load_mazes(5, 12, 0, d, progress=False)
    loops = data.load_mazes(5, 12, 0, d, progress=False, generator="gen_dfs_percolation", gen_kwargs={"p": 0.4})
    fewer = data.load_mazes(5, 12, 0, d, progress=False, generator="gen_dfs_percolation", gen_kwargs={"p": 0.1})
    assert (perfect["open"].sum((1, 2, 3)) // 2 == 24).all()  # trees
    for got, kw in ((loops, {"p": 0.4}), (fewer, {"p": 0.1})):
        want = data.generate_mazes(5, 12, 0, generator="gen_dfs_percolation", gen_kwargs=kw)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert len(set(data.pool_file(5, 12, 0, g, kw) for g, kw in
                   (("gen_dfs", None), ("gen_dfs_percolation", {"p": 0.4}), ("gen_dfs_percolation", {"p": 0.1})))) == 3


def test_generation_keeps_caller_rngs_is_seeded_and_cache_recovers(tmp_path, capsys, monkeypatch):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    a = data.load_mazes(5, 30, seed=7, cache_dir=str(tmp_path), progress=False)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[2])
    assert all(np.array_equal(u, v) for u, v in zip(np.random.get_state(), before[1]))
    b = data.generate_mazes(5, 30, seed=7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["open"], data.generate_mazes(5, 30, seed=8)["open"])
    assert np.array_equal(data.generate_mazes(5, 10, seed=7)["open"], a["open"][:10])  # prefixes are shared
    # a cache hit never regenerates; a corrupt or mis-shaped file is reported and rebuilt
    path = next(tmp_path.glob("*.npz"))
    real_generate = data.generate_mazes
    monkeypatch.setattr(data, "generate_mazes", lambda *args, **kwargs: pytest.fail("regenerated a good cache file"))
    assert np.array_equal(data.load_mazes(5, 30, 7, str(tmp_path))["goal"], a["goal"])
    monkeypatch.setattr(data, "generate_mazes", real_generate)
    for bad in (b"not a zip file", None):
        if bad is None:
            np.savez(path, **{k: v[:5] for k, v in a.items()})
        else:
            path.write_bytes(bad)
        c = data.load_mazes(5, 30, 7, str(tmp_path), progress=False)
        assert "unusable" in capsys.readouterr().out
        assert all(np.array_equal(a[k], c[k]) for k in a)
    assert np.load(path)["open"].shape == (30, 5, 5, 4)


def test_curriculum_starts_on_short_paths_and_lifts_the_limit_over_its_steps():
    """--curriculum-steps: max path length starts at 1/12 of the cells, grows with the step, and is gone after the
    curriculum (and for other tasks)."""
    args, task = types.SimpleNamespace(task="maze12", curriculum_steps=100), types.SimpleNamespace(seq_len=144)
    limits = [train.curriculum_at(s, args, task)["max_path_len"] for s in (0, 50, 99)]
    assert limits[0] == 12 and limits[0] < limits[1] < limits[2] <= 144
    assert train.curriculum_at(100, args, task) == {}
    assert train.curriculum_at(0, types.SimpleNamespace(task="sort12", curriculum_steps=100), task) == {}


def test_train_batch_path_length_bounds_are_inclusive(maze8):
    """min_path_len <= length <= max_path_len, both ends included: asking for exactly L gives mazes of length L."""
    plen = maze8.pools["train"]["plen"]
    L = int(np.median(plen))
    assert (plen == L).any() and L not in (plen.min(), plen.max())
    x, _ = maze8.train_batch(16, torch.Generator().manual_seed(0), min_path_len=L, max_path_len=L)
    assert {len(data.solve(*data.decode(xi, 8))[1]) for xi in x.numpy()} == {L}


def test_train_batch_reproducible_from_generator_and_respects_path_len_bounds(maze8):
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    x1, y1 = maze8.train_batch(32, gen)
    x2, _ = maze8.train_batch(32, gen)
    gen.set_state(state)
    x3, y3 = maze8.train_batch(32, gen)
    assert torch.equal(x1, x3) and torch.equal(y1, y3) and not torch.equal(x1, x2)
    lengths = lambda x: [len(data.solve(*data.decode(xi, 8))[1]) for xi in x.numpy()]
    plen = maze8.pools["train"]["plen"]
    cut = int(np.percentile(plen, 75))
    assert min(lengths(maze8.train_batch(64, gen, min_path_len=cut)[0])) >= cut
    assert set(lengths(maze8.train_batch(16, gen, min_path_len=10**6)[0])) == {plen.max()}
    short = int(np.percentile(plen, 25))
    assert max(lengths(maze8.train_batch(64, gen, max_path_len=short)[0])) <= short
    assert set(lengths(maze8.train_batch(16, gen, max_path_len=0)[0])) == {plen.min()}


def test_make_task_rejects_unknown_names_and_lists_valid_ones():
    for bad in ("maze", "maze2", "maze65", "sort1", "sort12-hidden", "cifar10"):
        with pytest.raises(ValueError, match="valid tasks: maze8, maze12.*sort12-visible"):
            data.make_task(bad)
    t = data.make_task("sort5-visible", n_val=4, n_test=4)
    assert (t.n_classes, t.grid, t.seq_len, t.n_hidden) == (5, (1, 5), 5, 0)
    with pytest.raises(ValueError, match="target"):
        data.make_task("maze5", target="walls")


# ---- training end to end (issue 3)

def tiny_run_args(tmp_path, task="maze5", *extra):
    return ["--task", task, "--n-train", "60", "--n-val", "12", "--n-test", "12", "--data-dir", str(tmp_path / "cache"),
            "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ctrl", "8", "--R", "2", "--T", "2",
            "--segments", "2", "--batch-size", "4", "--max-steps", "2", "--eval-interval", "2", "--warmup", "1",
            "--grad-steps", "1", "--no-progress", "--out-dir", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("task", ["maze5", "sort6"])
@pytest.mark.parametrize("controller", ["hrm", "poh", "none"])
@pytest.mark.parametrize("grad", ["bptt", "tbptt"])
def test_two_step_training_run_writes_config_checkpoint_log_and_test(tmp_path, task, controller, grad):
    result = train.main(tiny_run_args(tmp_path, task, "--controller", controller, "--grad", grad))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["controller"] == controller and config["model"]["grad"] == grad
    assert config["env"]["torch"] == torch.__version__ and config["env"]["threads"] == torch.get_num_threads()
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["model_args"]["controller"] == controller
    records = read_log(run)
    assert [r["split"] for r in records] == ["train", "val", "test"]
    keys = {"reach", "optimal", "exact", "cell_acc"} if task.startswith("maze") else {"tau", "elem_acc", "perfect"}
    assert keys <= set(result) and result["n_test"] > 0
    assert all(0.0 <= result[k] <= 1.0 for k in keys - {"tau"})
    assert len(result["per_segment"]) == 2  # evaluation runs and scores every segment


def test_logged_samples_per_second_leave_out_evaluation_time(tmp_path, monkeypatch):
    real_evaluate, real_time, skipped = train.evaluate, time.time, [0.0]

    def slow_evaluate(*args, **kwargs):  # each evaluation takes 1,000 s by the clock train.py reads
        skipped[0] += 1000.0
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    monkeypatch.setattr(time, "time", lambda: real_time() + skipped[0])
    train.main(tiny_run_args(tmp_path, "sort6", "--max-steps", "4"))  # evaluations at steps 2 and 4
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    after_eval = [r for r in rows if r.get("split") == "train" and r["step"] == 4][0]
    # 8 samples (batch 4 x 2 segments) since the evaluation: counting it would give under 0.008 samples/s; 0.1
    # leaves a busy machine 80 s for the two tiny steps themselves
    assert after_eval["samples_per_s"] > 0.1


def read_log(run):
    """A run's metrics.jsonl as a list of records."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scripted_validations(monkeypatch, values):
    """train.evaluate with its validations' (optimal, cell_acc) replaced by `values`, in order; the test evaluation
    after them is left as it is."""
    real = train.evaluate
    values = list(values)

    def scripted(*args, **kwargs):
        scored = real(*args, **kwargs)
        if values:
            scored["per_segment"][-1].update(zip(("optimal", "cell_acc"), values.pop(0)))
        return scored
    monkeypatch.setattr(train, "evaluate", scripted)


def test_a_tie_in_validation_optimal_is_broken_by_cell_accuracy(tmp_path, monkeypatch):
    scripted_validations(monkeypatch, [(0.5, 0.90), (0.5, 0.95), (0.5, 0.93)])  # validations at steps 2, 4, 6
    train.main(tiny_run_args(tmp_path, "maze5", "--max-steps", "6"))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["step"] == 4 and best["best_val"] == pytest.approx((0.5, 0.95))  # not the first of the tie


def test_an_exact_tie_in_every_selection_metric_keeps_the_earlier_best_checkpoint(tmp_path, monkeypatch):
    """best.pt moves only on a strict improvement of (optimal, cell_acc): an exact tie keeps the earlier one."""
    scripted_validations(monkeypatch, [(0.5, 0.90), (0.5, 0.90)])
    train.main(tiny_run_args(tmp_path, "maze5", "--max-steps", "4"))
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["step"] == 2


def test_test_json_names_the_step_of_the_best_checkpoint_not_the_last_step(tmp_path, monkeypatch):
    """test.json scores best.pt and records best.pt's step (4 here), not the run's last step (6)."""
    scripted_validations(monkeypatch, [(0.5, 0.90), (0.6, 0.10), (0.5, 0.99)])
    result = train.main(tiny_run_args(tmp_path, "maze5", "--max-steps", "6"))
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["step"] == 4
    assert json.loads((tmp_path / "run" / "test.json").read_text())["step"] == 4 == result["step"]


def test_a_max_steps_inside_a_batch_still_ends_with_a_log_validation_and_checkpoint_at_the_last_step(tmp_path):
    """--max-steps 3 with 2 segments per batch stops mid-batch: the last step is still logged, validated and saved
    (ckpt.pt at step 3), as the end of every run is."""
    train.main(tiny_run_args(tmp_path, "sort6", "--segments", "2", "--max-steps", "3", "--eval-interval", "100"))
    assert [(r["step"], r["split"]) for r in read_log(tmp_path / "run")] == [
        (2, "train"), (3, "train"), (3, "val"), (3, "test")]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3


def test_resuming_a_run_whose_test_json_was_removed_logs_one_test_record(tmp_path):
    """A finished run resumed (test.json removed, as ab.py does for an interrupted test) tests again; the log keeps
    exactly one test record, the old one trimmed."""
    train.main(tiny_run_args(tmp_path, "sort6"))
    (tmp_path / "run" / "test.json").unlink()
    train.main(tiny_run_args(tmp_path, "sort6", "--resume"))
    assert [(r["step"], r["split"]) for r in read_log(tmp_path / "run")] == [(2, "train"), (2, "val"), (2, "test")]


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_down_to_min_lr_frac(tmp_path):
    """lr_at: step s < warmup gives (s+1)/warmup (never 0, the peak at the last warmup step); then a cosine from 1 at
    the end of warmup to min_lr_frac at max_steps, and min_lr_frac after it. The run applies it to each group's
    base LR: the first train record (step 2) logs lr x lr_at(1) = lr / 2 (lr_at counts steps from 0)."""
    a = types.SimpleNamespace(warmup=4, max_steps=104, min_lr_frac=0.1)
    got = [train.lr_at(s, a) for s in (0, 1, 3, 4, 54, 104, 500)]
    assert got == pytest.approx([0.25, 0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1])
    assert train.lr_at(29, types.SimpleNamespace(warmup=4, max_steps=104, min_lr_frac=0.0)) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.25)))
    train.main(with_flags(tiny_run_args(tmp_path, "sort6"), warmup=4, lr=1e-3))
    first = read_log(tmp_path / "run")[0]
    assert first["split"] == "train" and first["lr"] == pytest.approx(1e-3 * 2 / 4)


def test_grad_clip_bounds_the_gradient_norm_the_optimizer_sees(tmp_path, monkeypatch):
    """--grad-clip c: the gradients reaching the optimizer step have total norm <= c (the tiny model's raw norm is
    far above 1e-3)."""
    real, seen = torch.nn.utils.clip_grad_norm_, []

    def spy(parameters, max_norm, *a, **k):
        parameters = list(parameters)
        before = real(parameters, max_norm, *a, **k)
        after = torch.norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        seen.append((float(before), float(after)))
        return before
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train.main(tiny_run_args(tmp_path, "sort6", "--grad-clip", "1e-3"))
    assert len(seen) == 2 and all(before > 1e-2 for before, _ in seen)
    assert all(after <= 1e-3 * (1 + 1e-4) for _, after in seen), seen


def test_save_then_resume_continues_from_the_saved_step(tmp_path):
    train.main(tiny_run_args(tmp_path, "sort6"))
    before = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    args = tiny_run_args(tmp_path, "sort6", "--resume")
    args[args.index("--max-steps") + 1] = "4"
    train.main(args)
    after = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert after["step"] == 4
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    # the data order continued where it stopped instead of replaying the first batches
    assert not torch.equal(before["data_rng"], after["data_rng"])


@pytest.mark.parametrize("extra,message", [
    (["--task", "cifar10"], "valid tasks"),
    (["--top-k", "3"], "--top-k 3 must be between 1 and --n-heads 2"),
    (["--T", "0"], "--T must be >= 1"),
    (["--R", "0"], "--R must be >= 1"),
    (["--ema", "1"], "--ema must be in [0, 1)"),
    (["--resume"], "no checkpoint"),
    (["--eval-interval", "0"], "--eval-interval must be >= 1, got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
    (["--n-val", "0"], "--n-val must be >= 1, got 0"),
    (["--n-test", "-5"], "--n-test must be >= 1, got -5"),
    (["--temp-start", "-1"], "--temp-start must be > 0"),
    (["--temp-end", "0"], "--temp-end must be > 0"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--balance-weight", "-1"], "--balance-weight must be >= 0"),
    (["--far-heads", "9"], "far-heads must be between 0 and n-heads"),  # the model's own checks
    (["--d-model", "17"], "d_model 17 is not divisible by n_heads 2"),
])
def test_bad_flags_give_one_line_errors(tmp_path, capsys, monkeypatch, extra, message):
    """Out-of-range settings stop with one error line before any data is made (an unknown task: when it is asked
    for)."""
    if extra[0] != "--task":
        monkeypatch.setattr(train, "make_task", lambda *a, **k: pytest.fail("made the task before checking the flags"))
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_run_args(tmp_path, "sort6") + extra)
    text = str(exc.value.code) + capsys.readouterr().err
    assert message in text and "Traceback" not in text


# ---- every flag reaches the place that acts on it (a flag silently ignored would fail one of these)

MODEL_FLAGS = [  # (extra argv, ModelConfig field, value it must hold); tiny_run_args sets d_ctrl 8, n_layers 1, T 2
    (["--hard-route"], "hard_route", True),
    (["--h-gate", "learned"], "h_gate", "learned"),
    (["--reset-controller"], "reset_controller", True),
    (["--ponder-weight", "0.05"], "ponder_weight", 0.05),
    (["--ponder-weight", "0.05", "--ponder-prior", "0.2"], "ponder_prior", 0.2),
    (["--label-smoothing", "0.1"], "label_smoothing", 0.1),
    (["--attn-impl", "dense"], "attn_impl", "dense"),
    (["--d-ctrl", "6"], "d_ctrl", 6),
    (["--n-layers", "3"], "n_layers", 3),
    (["--supervise", "all"], "supervise", "all"),
    (["--dropout", "0.3"], "dropout", 0.3),
    (["--T", "3"], "T", 3),
]


@pytest.mark.parametrize("extra,field,value", MODEL_FLAGS, ids=[f for _, f, _ in MODEL_FLAGS])
def test_every_model_flag_of_train_py_reaches_the_models_config(tmp_path, extra, field, value):
    """Each model flag of train.py is carried by train.model_config into the ModelConfig the run builds (and so
    into config.json's "model" and the checkpoints' model_args), not left at its default."""
    args = train.resolve_args(tiny_run_args(tmp_path, "maze5", *extra))
    cfg = train.model_config(args, types.SimpleNamespace(vocab_size=48, n_classes=5, feature_vocab=()))
    assert getattr(cfg, field) == value
    model = model_mod.PoHModel(cfg, verbose=False)  # and the model built from it really has it
    if field == "n_layers":
        assert len(model.blocks) == value
    if field == "d_ctrl":
        assert model.controller.cfg.d_ctrl == value


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """A 2-step sort6 run (2 segments: optimizer steps 0 and 1) with the loop's flags set away from their defaults;
    records the temperature of each training step, the balance weight given to the model, the batch sizes of the
    evaluations and what torch.compile was asked to compile."""
    tmp = tmp_path_factory.mktemp("watched")
    seen = {"temperature": [], "balance_weight": [], "eval_batch": [], "compiled": []}
    real_step, real_eval = train.train_step, train.evaluate

    def step(r, model, *a, **kw):
        def spy(*args, **kwargs):
            seen["balance_weight"].append(kwargs.get("balance_weight"))
            return model(*args, **kwargs)
        out, temperature = real_step(r, spy, *a, **kw)
        seen["temperature"].append(temperature)
        return out, temperature

    def evaluate_spy(*a, **kw):
        seen["eval_batch"].append(kw.get("batch_size"))
        return real_eval(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_step", step)
        mp.setattr(train, "evaluate", evaluate_spy)
        mp.setattr(torch, "compile", lambda m, *a, **k: seen["compiled"].append(m) or m)
        train.main(tiny_run_args(tmp, "sort6", "--temp-start", "4", "--temp-end", "1", "--temp-floor", "3",
                                 "--balance-weight", "0.37", "--weight-decay", "0.05", "--lr-controller", "0.002",
                                 "--eval-batch-size", "5", "--compile"))
    return tmp / "run", seen


def test_training_steps_anneal_from_temp_start_and_never_go_below_temp_floor(watched_run):
    """--temp-start 4, --temp-end 1, --temp-floor 3 over 2 steps: step 0 routes at 4, step 1 at max(3, 2.5) = 3, and
    the logged train temperature is the last step's."""
    run, seen = watched_run
    assert seen["temperature"] == [pytest.approx(4.0), pytest.approx(3.0)]
    assert [r["temperature"] for r in read_log(run) if r["split"] == "train"] == [pytest.approx(3.0)]


def test_balance_weight_flag_is_the_weight_every_training_forward_gets(watched_run):
    """--balance-weight 0.37 reaches the model at every training step (not the default 0.01)."""
    _, seen = watched_run
    assert seen["balance_weight"] == [0.37, 0.37]


def test_weight_decay_and_lr_controller_reach_the_optimizer(watched_run):
    """The saved optimizer has the 2-D tensors' groups at --weight-decay 0.05 (the rest at 0), and the controller's
    groups at --lr-controller 0.002 while the others keep the run's --lr."""
    run, _ = watched_run
    groups = torch.load(run / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0}
    lr = json.loads((run / "config.json").read_text())["lr"]
    assert sorted({g["base_lr"] for g in groups}) == sorted({0.002, lr})


def test_eval_batch_size_is_the_batch_of_every_validation_and_the_test(watched_run):
    """--eval-batch-size 5: the validation and the final test are scored in batches of 5."""
    _, seen = watched_run
    assert seen["eval_batch"] == [5, 5]


def test_compile_flag_compiles_the_model_that_trains(watched_run):
    """--compile hands the run's model to torch.compile (a spy here) once."""
    _, seen = watched_run
    assert len(seen["compiled"]) == 1 and isinstance(seen["compiled"][0], model_mod.PoHModel)


class Stop(Exception):
    """Raised by a spy to end a run where it was looked at."""


def task_kwargs(monkeypatch, argv):
    """The keyword arguments train.main gives make_task for argv (the run stops there)."""
    seen = {}

    def spy(name, **kw):
        seen.update(kw, name=name)
        raise Stop
    monkeypatch.setattr(train, "make_task", spy)
    with pytest.raises(Stop):
        train.main(argv)
    return seen


def test_data_seed_n_val_and_n_test_pick_the_runs_pools(tmp_path, monkeypatch):
    """--data-seed, --n-val and --n-test reach make_task; and behaviourally, a maze5 run with --n-test 7 is tested
    on 7 mazes."""
    kw = task_kwargs(monkeypatch, tiny_run_args(tmp_path, "maze5", "--data-seed", "5", "--n-val", "9",
                                                 "--n-test", "7"))
    assert (kw["seed"], kw["n_val"], kw["n_test"]) == (5, 9, 7)
    monkeypatch.undo()
    result = train.main(tiny_run_args(tmp_path / "b", "sort6", "--n-test", "7", "--n-val", "5"))
    assert result["n_test"] == 7


def test_upos_and_word_dropout_reach_the_parsing_task(tmp_path, monkeypatch):
    """ud_ewt --upos gold --word-dropout 0.2: make_task builds the parsing task with UPOS tags and that dropout."""
    kw = task_kwargs(monkeypatch, ["--task", "ud_ewt", "--data-dir", str(tmp_path), "--upos", "gold",
                                   "--word-dropout", "0.2", "--out-dir", str(tmp_path / "run"), "--no-progress"])
    assert kw["name"] == "ud_ewt" and kw["upos"] is True and kw["word_dropout"] == 0.2


def test_existing_output_folder_needs_resume(tmp_path):
    train.main(tiny_run_args(tmp_path, "sort6"))
    with pytest.raises(SystemExit, match="already holds a run; pass --resume to continue it or pick"):
        train.main(tiny_run_args(tmp_path, "sort6"))


def test_ctrl_c_during_the_test_exits_130_and_resume_tests_once(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "test_best", interrupted)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_run_args(tmp_path, "sort6"))
    assert exc.value.code == 130 and not (tmp_path / "run" / "test.json").exists()
    monkeypatch.undo()
    result = train.main(tiny_run_args(tmp_path, "sort6", "--resume"))
    log = read_log(tmp_path / "run")
    assert [(r["step"], r["split"]) for r in log] == [(2, "train"), (2, "val"), (2, "test")]
    assert json.loads((tmp_path / "run" / "test.json").read_text())["tau"] == pytest.approx(result["tau"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again_with_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()  # what a crash before the first evaluation leaves: config.json and training lines, no ckpt.pt
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 99.0}) + "\n")
    with pytest.raises(SystemExit, match="stopped before its first checkpoint: it starts again from step 0"):
        train.main(tiny_run_args(tmp_path, "sort6"))
    train.main(tiny_run_args(tmp_path, "sort6", "--resume"))
    assert "starting again from step 0" in capsys.readouterr().out
    log = read_log(run)
    assert [(r["step"], r["split"]) for r in log] == [(2, "train"), (2, "val"), (2, "test")]  # the old line is gone
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 2


def test_ctrl_c_during_a_validation_leaves_it_to_resume_which_ends_as_the_uninterrupted_run(tmp_path, monkeypatch,
                                                                                             one_thread):
    args = with_flags(tiny_run_args(tmp_path, "sort6"), max_steps=6, out_dir=tmp_path / "a")
    train.main(args)
    whole = read_log(tmp_path / "a")
    real, calls = train.validate, []

    def validate_then_ctrl_c(*a, **k):  # the second validation (step 4) is logged, then Ctrl-C before the save
        calls.append(real(*a, **k))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return calls[-1]
    monkeypatch.setattr(train, "validate", validate_then_ctrl_c)
    args = with_flags(args, out_dir=tmp_path / "b")
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == 130
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["pending_eval"]
    monkeypatch.undo()
    train.main(args + ["--resume"])
    resumed = read_log(tmp_path / "b")
    assert [(r["step"], r["split"]) for r in resumed] == [(r["step"], r["split"]) for r in whole]  # step 4 once
    for mine, theirs in zip(resumed, whole):
        assert mine.get("loss", mine.get("tau")) == pytest.approx(theirs.get("loss", theirs.get("tau")), abs=1e-6)
    assert not torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["pending_eval"]


# ---- looking at runs: sample_maze.py, plots.py, ab.py (issues 5 and 7)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def maze_from_edges(n, edges):
    """Open sides (n, n, 4) of a maze given as the list of open passages between neighbouring cells."""
    o = np.zeros((n, n, 4), dtype=bool)
    for a, b in edges:
        d = data.MOVES.index((b[0] - a[0], b[1] - a[1]))
        o[a][d] = o[b][(d + 2) % 4] = True  # the opposite side of the neighbour opens with it
    return o


def assert_png(path):
    raw = open(path, "rb").read()
    assert raw[:8] == PNG_MAGIC and len(raw) > 2000  # a real picture, not an empty figure


# ---- ASCII renderer

# A hand-made 3x3 perfect maze (8 passages); the shortest path from S (0, 0) to G (2, 0) goes through the middle.
EDGES = [((0, 0), (0, 1)), ((0, 1), (0, 2)), ((0, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 2), (2, 1)),
         ((0, 1), (1, 1)), ((1, 1), (1, 0)), ((1, 0), (2, 0))]


def test_render_ascii_on_hand_made_3x3_maze_gives_exact_text():
    o = maze_from_edges(3, EDGES)
    true = data.solve(o, (0, 0), (2, 0))[1]
    assert true == [(0, 0), (0, 1), (1, 1), (1, 0), (2, 0)]
    # the prediction turns right at (0, 1) and runs into the dead end at (2, 1)
    pred = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1)]
    expected = "\n".join([
        "+---+---+---+",
        "| S   *   x |",
        "+---+   +   +",
        "| o   o | x |",
        "+   +---+   +",
        "| G | x   x |",
        "+---+---+---+",
    ])
    assert sample_maze.render_ascii(o, (0, 0), (2, 0), true, pred) == expected
    # a perfect prediction marks its inner cells * and nothing wrong or missed
    perfect = sample_maze.render_ascii(o, (0, 0), (2, 0), true, true)
    assert perfect.count("*") == 3 and "x" not in perfect and "o" not in perfect


# ---- routing diagnostics

def tiny_maze_model(controller, R=7, T=3, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=48, n_classes=5, d_model=16, n_heads=4, n_layers=1, d_ctrl=8, R=R, T=T,
                      controller=controller, attn="local", **kw)
    return PoHModel(cfg, verbose=False)


def test_diag_marks_h_update_exactly_where_t_mod_T_is_zero_and_z_H_changes():
    m = tiny_maze_model("hrm", R=7, T=3)
    x = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    _, steps = sample_maze.run_traced(m, x, (3, 3), segments=2, n_steps=7, temperature=1.0)
    rows = sample_maze.step_diagnostics(steps, top=2)
    lines = sample_maze.format_diag(rows, temperature=1.0)[1:]
    assert len(rows) == len(lines) == 14
    marked = [(r["seg"], r["t"]) for r, line in zip(rows, lines) if "H-UPDATE" in line]
    assert marked == [(s, t) for s in (1, 2) for t in (0, 3, 6)]  # segments counted from 1, as evaluate.py does
    # the markers sit where the slow state really changed, the carried state included (segment 1, t = 0)
    prev = torch.zeros_like(steps[0]["z_H"])
    for s in steps:
        assert (not torch.equal(s["z_H"], prev)) == (s["t"] % 3 == 0)
        prev = s["z_H"]
    for r in rows:
        assert 0.0 < r["entropy"] <= math.log(4) + 1e-6
        assert 0.5 <= r["max_weight"] <= 1.0  # top-2 renormalised: the larger weight is at least a half
        assert sum(r["usage"]) == pytest.approx(1.0, abs=1e-5)
        assert r["usage"][r["top"][0]] == max(r["usage"])
    # one timescale: never an H-UPDATE; no controller: nothing to diagnose
    poh_rows = sample_maze.step_diagnostics(sample_maze.run_traced(tiny_maze_model("poh"), x, (3, 3), 1, 7, 1.0)[1])
    assert not any("H-UPDATE" in line for line in sample_maze.format_diag(poh_rows, 1.0))
    assert sample_maze.step_diagnostics(sample_maze.run_traced(tiny_maze_model("none"), x, (3, 3), 1, 7, 1.0)[1]) == []


# ---- statistics

def test_summarize_matches_hand_computed_mean_std_and_t_interval():
    mean, std, ci = stats.summarize([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; t(3) = 3.182; CI = t * std / sqrt(4)
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3)) and ci == pytest.approx(3.182 * math.sqrt(5 / 3) / 2)
    mean, std, ci = stats.summarize([0.5, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02)) and ci == pytest.approx(1.2706)
    mean, std, ci = stats.summarize([0.42])
    assert mean == 0.42 and math.isnan(std) and math.isnan(ci)  # one run: no spread, no interval
    assert stats.t_critical(22) == 2.086 and stats.t_critical(500) == 1.960  # between rows: the smaller df
    with pytest.raises(ValueError):
        stats.summarize([])


def test_t_critical_uses_the_table_through_120_degrees_of_freedom():
    """df = 120 is the table's last row (1.980); only beyond it is the normal 1.960 used."""
    assert stats.t_critical(120) == 1.980 and stats.t_critical(121) == 1.960 and stats.t_critical(1) == 12.706


def test_summary_table_shows_seconds_per_step_the_t_interval_and_warns_only_above_5_percent():
    """The table's s/step is wall seconds over steps (10 s / 100 steps = 0.100), the cell shows the 95% CI
    half-width t(1) * std / sqrt(2) = 0.6353 for [0.5, 0.6], and exactly 5% more parameters is no warning."""
    rows = [{"controller": "none", "params": 1000, "wall_s": 10.0, "steps": 100, "tau": v} for v in (0.5, 0.6)]
    rows.append({"controller": "hrm", "params": 1050, "wall_s": 30.0, "steps": 100, "tau": 0.7})
    table = ab.summary_table(rows, ["tau"])
    lines = table.splitlines()
    assert "0.100" in lines[1] and "0.300" in lines[2]
    assert "0.5500 ± 0.0707 (CI ±0.6353)" in table and "WARNING" not in table


def test_summary_table_warns_only_when_parameter_counts_differ_by_more_than_5_percent():
    def rows(p_hrm):
        return [{"controller": c, "params": p, "wall_s": 10.0, "steps": 100, "tau": v}
                for c, p, v in (("none", 1000, 0.5), ("none", 1000, 0.6), ("hrm", p_hrm, 0.7))]
    table = ab.summary_table(rows(1040), ["tau"])
    assert "WARNING" not in table and "0.5500 ± 0.0707" in table and "0.7000" in table
    assert "WARNING: parameter counts differ by more than 5%" in ab.summary_table(rows(1060), ["tau"])


@pytest.mark.parametrize("task", ["maze12", "sort12"])
def test_recipe_controllers_are_matched_within_5_percent_in_parameters(task):
    # the A/B compares hrm, poh and none at the recipe's shape; a wider controller would break the match
    params = {c: bench.make_model(task, c, torch.device("cpu"))[0].num_params() for c in ("hrm", "poh", "none")}
    assert params["none"] < params["poh"] < params["hrm"] <= 1.05 * params["none"], params


def test_bench_refuses_a_task_it_cannot_shape_and_an_unwritable_out_before_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "time_steps", lambda *a, **k: pytest.fail("timed before the flags were checked"))
    (tmp_path / "file").write_text("")
    for argv, message in [(["--task", "ud_ewt"], "bench.py times maze and sorting shapes"),
                          (["--out", str(tmp_path / "file" / "b.json")], "--out: cannot make the folder of")]:
        with pytest.raises(SystemExit) as exc:
            bench.main(["--device", "cpu", *argv])
        assert str(exc.value.code).startswith("error: ") and message in str(exc.value.code)


def test_bench_compiled_step_check_sees_a_compiled_model_that_computes_something_else(monkeypatch):
    """compiled_step's max_abs_diff compares the compiled model's loss and gradients with the eager model's: a
    'compiled' model whose loss is 1% off must show a difference, not 0."""
    class Off(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a, **kw):
            out = self.m(*a, **kw)
            return {**out, "loss": out["loss"] * 1.01}
    monkeypatch.setattr(torch, "compile", lambda m, backend=None: Off(m))
    c = bench.compiled_step("maze4", torch.device("cpu"), 2, "eager")
    assert c["max_abs_diff"] > 1e-4


def test_bench_memory_table_probes_each_R_and_grad_in_its_own_process(tmp_path, monkeypatch):
    """Section 2's peak memory comes from a fresh process per row, run with that row's R and gradient mode."""
    probed = []

    def fake_run(cmd, **kw):
        probed.append(tuple(cmd[cmd.index("--probe") + 1:cmd.index("--probe") + 3]))
        return type("Done", (), {"stdout": str(100 + len(probed))})()
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "time_steps", lambda *a, **k: 0.01)
    monkeypatch.setattr(bench, "matmul_peak", lambda device: 1e9)
    results = bench.main(["--task", "maze4", "--device", "cpu", "--batch-size", "2", "--R", "2", "4", "--attn-sizes",
                          "4:2", "--eval-mazes", "4", "--out", str(tmp_path / "b.json")])
    assert probed == [("2", "bptt"), ("4", "bptt"), ("2", "tbptt"), ("4", "tbptt")]
    assert [r["peak_bytes"] for r in results["memory"]] == [101, 102, 103, 104]


def test_bench_main_writes_its_table_as_json_with_flat_tbptt_memory(tmp_path):
    # the whole benchmark on a tiny maze shape: every section present (with --compile), tbptt flat in R, bptt growing
    out = tmp_path / "bench.json"
    results = bench.main(["--task", "maze4", "--device", "cpu", "--batch-size", "4", "--R", "2", "4", "--out", str(out),
                          "--attn-sizes", "4:4", "6:2", "--eval-mazes", "8", "--compile", "aot_eager"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert set(results["step_seconds"]) == {"none", "hrm", "poh"} and min(results["step_seconds"].values()) > 0
    assert results["hrm_over_none"] == pytest.approx(results["step_seconds"]["hrm"] / results["step_seconds"]["none"])
    mem = {(r["grad"], r["R"]): r for r in results["memory"]}
    assert set(mem) == {(g, R) for g in ("bptt", "tbptt") for R in (2, 4)}
    assert mem["tbptt", 4]["saved_bytes"] == mem["tbptt", 2]["saved_bytes"]
    assert mem["bptt", 4]["saved_bytes"] > 1.5 * mem["bptt", 2]["saved_bytes"]
    assert all(r["peak_bytes"] > 10 * 2**20 for r in results["memory"])  # a real process's RSS, not a stub
    flops = results["flops"]
    assert flops["step_flops"] == bench.step_flops(bench.make_model("maze4", "hrm", torch.device("cpu"))[0].cfg, 4, 16)
    assert 0 < flops["fraction"] == pytest.approx(flops["achieved"] / flops["matmul_peak"])
    # the compiled step (aot_eager here: traced like inductor, no C++ to build) computes the eager loss and gradients
    c = flops["compiled"]
    assert c["backend"] == "aot_eager" and c["max_abs_diff"] < 1e-5 and c["compile_seconds"] > 0
    assert c["fraction"] == pytest.approx(flops["step_flops"] / c["step_seconds"] / flops["matmul_peak"])
    assert [(r["task"], r["batch"]) for r in results["attention"]] == [("maze4", 4), ("maze6", 2)]
    assert all(r["dense"] > 0 and r["gather"] > 0 and r["speedup"] == pytest.approx(r["dense"] / r["gather"])
               for r in results["attention"])
    assert results["eval_mazes_per_s"] > 0
    assert "quick" not in results


def test_bench_hand_flop_count_agrees_with_torch_flop_counter():
    """bench.step_flops counts the transformer's matmuls by hand (the attention's used keys included, the controller
    and head left out); torch's FlopCounterMode counts every mm/addmm run (the controller and head included, the
    gathered attention's elementwise products not). The two agree within 2% at the default shapes (1.016 maze12,
    1.002 sort12), with full and truncated BPTT; the test allows 3%, and a missed backward factor or inner step
    would be 33% or more off."""
    from torch.utils.flop_counter import FlopCounterMode
    for task, B, overrides in [("maze12", 2, {}), ("maze12", 2, {"R": 6}), ("sort12", 4, {}),
                               ("sort12", 4, {"grad": "tbptt", "R": 8})]:
        model, args = bench.make_model(task, "hrm", torch.device("cpu"), **overrides)
        x, y, grid = bench.fake_batch(model, args, task, torch.device("cpu"), B)
        with FlopCounterMode(display=False) as counter:
            model(x, y, grid=grid)["loss"].backward()
        hand = bench.step_flops(model.cfg, *x.shape)
        assert counter.get_total_flops() == pytest.approx(hand, rel=0.03), (task, overrides)


# ---- pictures and sample_maze from a real (tiny) run

@pytest.fixture(scope="module")
def maze_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("maze5")
    train.main(tiny_run_args(tmp, "maze5", "--controller", "hrm", "--R", "3", "--T", "2", "--eval-steps", "4"))
    return tmp / "run"


def keep_figures(monkeypatch):
    """plots.py closes each figure once saved; this list keeps them, so a test can read the lines drawn."""
    figures, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    return figures


def drawn_maze(monkeypatch, tmp_path, **extra):
    """Draws the EDGES 3x3 maze (true path via the middle, prediction into the dead end) with draw_refinement;
    returns the figure and its one axis."""
    o = maze_from_edges(3, EDGES)
    true = data.solve(o, (0, 0), (2, 0))[1]
    pred = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1)]
    maze = {"open": o, "start": (0, 0), "goal": (2, 0), "true_path": true, "pred_path": pred, **extra}
    figures = keep_figures(monkeypatch)
    plots.draw_refinement([maze], str(tmp_path / "r.png"), ["seg 1 t 0: 2 cells wrong"])
    assert_png(tmp_path / "r.png")
    return figures[-1], figures[-1].axes[0], o, true, pred


def test_draw_maze_draws_a_wall_segment_on_exactly_each_closed_side(monkeypatch, tmp_path):
    """Each panel's black lines are the closed sides of the cells (border included), none on an open passage."""
    _, ax, o, _, _ = drawn_maze(monkeypatch, tmp_path)
    ends = {0: ((0, 0), (1, 0)), 1: ((1, 0), (1, 1)), 2: ((0, 1), (1, 1)), 3: ((0, 0), (0, 1))}
    want = sorted((c + x0, r + y0, c + x1, r + y1) for r in range(3) for c in range(3) for d, ((x0, y0), (x1, y1))
                  in ends.items() if not o[r, c, d])
    walls = sorted(tuple(float(v) for v in (*line.get_xdata(), *line.get_ydata()))
                   for line in ax.lines if line.get_color() == "k")
    walls = sorted((a, c, b, d) for a, b, c, d in walls)  # (x0, x1, y0, y1) -> (x0, y0, x1, y1)
    assert len(want) == 36 - 16 and walls == want


def test_draw_maze_shades_predicted_cells_off_the_true_path_and_missed_true_cells(monkeypatch, tmp_path):
    """Red ('wrong') squares sit on predicted cells off the true path, orange ('missed') on true cells the
    prediction lacks; cells on both paths are not shaded."""
    _, ax, _, true, pred = drawn_maze(monkeypatch, tmp_path)
    shaded = {}
    for p in ax.patches:
        colour = to_hex(p.get_facecolor(), keep_alpha=False)
        shaded.setdefault(colour, set()).add((int(p.get_y()), int(p.get_x())))  # (row, col)
    assert shaded == {plots.COLORS["wrong"]: set(pred) - set(true), plots.COLORS["missed"]: set(true) - set(pred)}
    assert shaded[plots.COLORS["wrong"]] == {(0, 2), (1, 2), (2, 2), (2, 1)}


def test_draw_maze_marks_each_wrong_class_cell_with_an_x_at_its_centre(monkeypatch, tmp_path):
    """cell_errors (row, col) are drawn as 'x' markers at x = col + 0.5, y = row + 0.5 (row 0 at the top)."""
    _, ax, _, _, _ = drawn_maze(monkeypatch, tmp_path, cell_errors=[(0, 2), (2, 1)])
    marks = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(marks) == 1
    assert list(marks[0].get_xdata()) == [2.5, 1.5] and list(marks[0].get_ydata()) == [0.5, 2.5]


def test_draw_refinement_titles_each_panel_and_the_strip(monkeypatch, tmp_path):
    """Each panel of the refinement strip carries its own title (the step and its wrong-cell count), under the
    strip's suptitle."""
    fig, ax, _, _, _ = drawn_maze(monkeypatch, tmp_path)
    assert ax.get_title() == "seg 1 t 0: 2 cells wrong"
    assert fig.get_suptitle() == "prediction after each inner step"


def test_evaluate_plot_draws_reach_and_optimal_of_each_segment(maze_run, tmp_path, monkeypatch):
    """evaluate.py --plot: the 'reach' and 'optimal' lines hold the result's per-segment values at segments 1..S."""
    figures = keep_figures(monkeypatch)
    result = evaluate.main([str(maze_run), "--n-test", "12", "--segments", "3", "--no-progress",
                            "--plot", str(tmp_path / "seg.png")])
    assert_png(tmp_path / "seg.png")
    lines = {line.get_label(): line for line in figures[-1].axes[0].lines}
    for key in ("reach", "optimal"):
        assert list(lines[key].get_xdata()) == [1, 2, 3]
        assert list(lines[key].get_ydata()) == [seg[key] for seg in result["per_segment"]]


def test_segments_plot_draws_reach_and_optimal_as_given_per_segment(tmp_path, monkeypatch):
    """segments_plot (evaluate.py --plot): the 'reach' line holds each segment's reach and the 'optimal' line its
    optimal, at x = 1..S (distinct values, so the two lines cannot be swapped unseen)."""
    figures = keep_figures(monkeypatch)
    per_segment = [{"reach": 0.6, "optimal": 0.2}, {"reach": 0.9, "optimal": 0.5}, {"reach": 1.0, "optimal": 0.7}]
    plots.segments_plot(per_segment, str(tmp_path / "seg.png"), "maze5")
    assert_png(tmp_path / "seg.png")
    lines = {line.get_label(): line for line in figures[-1].axes[0].lines}
    assert list(lines["reach"].get_ydata()) == [0.6, 0.9, 1.0] and list(lines["optimal"].get_ydata()) == [0.2, 0.5, 0.7]
    assert list(lines["reach"].get_xdata()) == [1, 2, 3] and figures[-1].axes[0].get_title() == "maze5"


def test_plot_run_writes_a_png_from_the_metrics_log(maze_run, tmp_path, monkeypatch):
    log = plots.read_metrics(str(maze_run))
    val = log["val"]
    assert "unique" in val[0] and "unique" not in plots.score_keys(val, [])  # a share of the data, not a score
    assert {"reach", "optimal"} <= set(plots.score_keys(val, []))
    figures = keep_figures(monkeypatch)
    assert plots.plot_run(str(maze_run)) == str(maze_run / "curves.png")
    assert_png(maze_run / "curves.png")
    lines = {line.get_label(): line for ax in figures[-1].axes for line in ax.lines}  # the log's values, drawn
    assert list(lines["loss"].get_ydata()) == [r["loss"] for r in log["train"]]
    assert list(lines["optimal"].get_xdata()) == [r["step"] for r in val]
    assert list(lines["optimal"].get_ydata()) == [r["optimal"] for r in val]
    plots.main([str(maze_run), "--out", str(tmp_path / "c.png")])
    assert_png(tmp_path / "c.png")


def test_segments_curves_draws_several_evaluations_and_rejects_auto_results(tmp_path, monkeypatch):
    paths = []
    for i, (task, curve) in enumerate([("maze12", [0.5, 0.9, 1.0]), ("maze24", [0.1, 0.4, 0.7, 0.8])]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"task": task, "generator": "gen_dfs", "n_test": 300, "segments": len(curve),
                                         "per_segment": [{"optimal": v} for v in curve]}))
    figures = keep_figures(monkeypatch)
    plots.main(["--segments", *map(str, paths), "--out", str(tmp_path / "seg.png")])
    assert_png(tmp_path / "seg.png")
    assert [list(line.get_ydata()) for line in figures[-1].axes[0].lines] == [[0.5, 0.9, 1.0], [0.1, 0.4, 0.7, 0.8]]
    # lines of several models name the model's folder; one model's lines need not
    one = {"task": "maze12", "generator": "gen_dfs", "n_test": 300, "checkpoint": os.path.join("runs", "lft", "s2", "best.pt")}
    assert plots.curve_label(one, True) == "lft/s2: maze12 gen_dfs (300)"
    assert plots.curve_label(one, False) == "maze12 gen_dfs (300)"
    for bad in ({"task": "maze12", "segments": "auto", "n_test": 3, "per_segment": [{}]},
                {"task": "sort12", "segments": 2, "n_test": 3, "per_segment": [{"tau": 0.5}, {"tau": 0.6}]}):
        paths[0].write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match="on mazes with a fixed number of segments"):
            plots.main(["--segments", str(paths[0]), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):  # neither a run folder nor --segments
        plots.main([])
    # a JSON list, a folder where a file should be, a file that is no JSON: one line each, naming the file
    paths[1].write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{not json")
    for given, message in ((str(paths[1]), "on mazes with a fixed number of segments"),
                           (str(tmp_path), "cannot read or write"),
                           (str(tmp_path / "broken.json"), "is not a JSON file")):
        with pytest.raises(SystemExit) as exc:
            plots.main(["--segments", given, "--out", str(tmp_path / "x.png")])
        text = str(exc.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, text
    with pytest.raises(SystemExit):  # matplotlib would pick the format from the suffix, or refuse it late
        plots.main(["--segments", str(paths[0]), "--out", str(tmp_path / "x.foo")])
    assert not (tmp_path / "x.png").exists()


def test_hide_goal_shows_the_goal_as_a_plain_cell_and_keeps_the_rest(cache8, maze8):
    x, _ = maze8.split("test")
    hidden = data.hide_goal(x)
    assert (x // 16 == 2).sum(1).eq(1).all() and not (hidden // 16 == 2).any()  # one goal each, then none
    assert torch.equal(hidden % 16, x % 16) and torch.equal(hidden // 16 == 1, x // 16 == 1)  # walls, start kept
    goal = x // 16 == 2
    assert torch.equal(hidden[~goal], x[~goal]) and torch.equal(data.hide_goal(hidden), hidden)


def probe_pool(maze_run, n=12):
    """The tiny maze5 run's model as probes.py loads it, and a validation pool of n mazes (task, grid, x, y)."""
    task = data.make_task("maze5", seed=3, n_train=100, n_val=0, n_test=n, cache_dir=str(maze_run.parent / "cache"),
                          progress=False, kinds=[("gen_dfs", None)])
    grid, x, y = probes.maze_pool("maze5", n, 3, "gen_dfs", None, str(maze_run.parent / "cache"))
    return probes.load(str(maze_run)), task, grid, x, y


def test_probe_hide_with_nothing_hidden_scores_each_segment_as_evaluate_does(maze_run):
    probe, task, grid, x, y = probe_pool(maze_run)
    model, steps, temperature = probe
    assert steps == 4  # the run's --eval-steps, as evaluate.py scores it
    curves = probes.hide(probe, grid, x, y, 3, [0, 2])
    scored = train.evaluate(model, task, x, y, 3, n_steps=steps, temperature=temperature)["per_segment"]
    assert [len(c) for c in curves.values()] == [3, 3]
    # and as evaluate.py --data-seed 3 scores the same run: the probes' pool is its validation pool
    cli = evaluate.score(str(maze_run), "maze5", segments=3, n_test=12, data_dir=str(maze_run.parent / "cache"),
                         generator="gen_dfs", data_seed=3)["per_segment"]
    for mine, theirs, other in zip(curves[0], scored, cli):
        assert mine == pytest.approx(theirs["optimal"], abs=1e-9) and mine == pytest.approx(other["optimal"], abs=1e-9)
    # two segments that see the mazes without their goal, then one with it, by hand
    logits, state = {}, {"hidden": None, "shown": None}
    with torch.no_grad():
        for s in range(3):
            for kind in state:
                seen = data.hide_goal(x) if kind == "hidden" and s < 2 else x
                out = model(seen, state=state[kind], temperature=temperature, grid=grid, n_steps=steps)
                state[kind], logits[kind] = out["state"], out["logits"].float()
    torch.testing.assert_close(next(probes.rollout(probe, grid, x, 1, hidden_for=2))[1], logits["hidden"])
    assert (logits["hidden"] - logits["shown"]).abs().max() > 1e-3  # hiding the goal changed the answer


def test_probe_hide_runs_each_curve_after_its_hidden_segments(maze_run, monkeypatch):
    """hide: the curve for K comes from a rollout that first shows the mazes K segments without their goal."""
    probe, _, grid, x, y = probe_pool(maze_run)
    calls, real = [], probes.rollout
    def spy(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs.get("hidden_for", 0))
        return real(*args, **kwargs)
    monkeypatch.setattr(probes, "rollout", spy)
    curves = probes.hide(probe, grid, x, y, 2, [0, 2])
    assert calls == [0, 2] and [len(c) for c in curves.values()] == [2, 2]
    monkeypatch.setattr(probes, "rollout", real)
    by_hand = [data.maze_metrics(lg, x, y)["optimal"] for _, lg in probes.rollout(probe, grid, x, 2, hidden_for=2)]
    assert curves[2] == by_hand


def test_probe_settle_finds_when_each_cell_settles(maze_run, monkeypatch):
    probe, _, grid, x, y = probe_pool(maze_run)
    known = y != data.IGNORE
    S, (B, N) = 4, y.shape
    # hand-made answers: each known cell right or wrong at each segment by a random pattern
    pattern = torch.rand(S, B, N, generator=torch.Generator().manual_seed(0)) < 0.6
    right_class = torch.where(known, (y.clamp(min=0) & -y.clamp(min=0)).clamp(min=1).log2().long(), 0)
    wrong_class = torch.tensor([[next(c for c in range(5) if not (int(v) >> c) & 1) if v >= 0 else 0
                                 for v in row] for row in y])
    answers = [torch.nn.functional.one_hot(torch.where(pattern[s], right_class, wrong_class), 5).float()
               for s in range(S)]
    monkeypatch.setattr(probes, "rollout", lambda *args, **kwargs: ((None, a) for a in answers))
    rows = probes.settle(probe, grid, x, y, S, 2)
    dist = data.goal_distance(x, grid)
    assert rows and all(r["to"] - r["from"] == 2 for r in rows)
    for r in rows:  # the same figures counted cell by cell
        cells = [(b, n) for b in range(B) for n in range(N) if known[b, n] and r["from"] <= dist[b, n] < r["to"]]
        needs = [c for c in cells if not pattern[0][c]]
        keeps = [c for c in cells if pattern[0][c]]
        done = [c for c in needs if pattern[-1][c]]
        first_of_last_run = [min(s for s in range(S) if all(pattern[t][c] for t in range(s, S))) + 1 for c in done]
        assert (r["cells"], r["needs"]) == (len(cells), len(needs))
        assert r["right_end"] == pytest.approx(sum(bool(pattern[-1][c]) for c in cells) / len(cells))
        assert r["needs_right_end"] == pytest.approx(len(done) / len(needs))
        assert r["needs_settled_at"] == pytest.approx(float(np.median(first_of_last_run)))
        assert r["drifted"] == pytest.approx(sum(not pattern[-1][c] for c in keeps) / len(keeps))


def test_probe_read_fits_a_linear_read_and_the_cli_runs_each_probe(maze_run, tmp_path, capsys):
    features = torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    w = probes.ridge(features, features @ a + 7.0, lam=1e-6)
    torch.testing.assert_close(w, torch.cat([a, torch.tensor([7.0])]).double(), atol=1e-4, rtol=0)
    probe, _, grid, x, y = probe_pool(maze_run)
    got = probes.read(probe, (grid, x, y, 2), grid, x, y, 3, 2, [1, 3])
    assert got["r2"] <= 1 and got["bands"]
    # the fit and the read by hand, in numpy: fitted after 2 segments, read after 3
    h2, h3 = [state["h"].double().numpy() for state, _ in list(probes.rollout(probe, grid, x, 3))[1:]]
    known, dist = (y != data.IGNORE).numpy(), data.goal_distance(x, grid).double().numpy()
    w = probes.ridge(torch.from_numpy(h2[known]), torch.from_numpy(dist[known])).numpy()
    fitted = h2[known] @ w[:-1] + w[-1]
    assert got["r2"] == pytest.approx(1 - ((fitted - dist[known]) ** 2).mean() / dist[known].var(), abs=1e-9)
    for b in got["bands"]:
        cells = known & (dist >= b["from"]) & (dist < b["to"])
        assert b["read"][3] == pytest.approx((h3[cells] @ w[:-1] + w[-1]).mean(), abs=1e-6)
    settled = probes.settle(probe, grid, x, y, 3, 2)
    assert [(b["from"], b["cells"]) for b in got["bands"]] == [(r["from"], r["cells"]) for r in settled]
    for b, r in zip(got["bands"], settled):
        assert set(b["read"]) == set(b["right"]) == {1, 3}
        assert b["right"][3] == pytest.approx(r["right_end"])  # the same answers, read two ways
    cache, out = str(maze_run.parent / "cache"), tmp_path / "p.json"
    common = [str(maze_run), "--task", "maze5", "--n-test", "12", "--data-dir", cache, "--band", "2"]
    probes.main(["settle", *common, "--segments", "3", "--out", str(out)])
    assert json.loads(out.read_text())["result"][0]["from"] == 0
    probes.main(["hide", *common, "--segments", "2", "--hide", "0,1"])
    assert "optimal after 1 / 2 with it: " in capsys.readouterr().out
    probes.main(["read", *common, "--segments", "3", "--at", "1,2", "--fit-task", "maze5", "--fit-n", "12",
                 "--fit-segments", "2"])
    text = capsys.readouterr().out
    assert torch.is_grad_enabled()  # the probes leave the process as they found it
    assert "mean read / accuracy after 1, 2, 3 segments" in text
    for argv, message in [(["--task", "sort6"], "for mazes (mazeN)"), (["--segments", "0"], "--segments must be"),
                          (["--n-test", "-1"], "--n-test must be"), (["--at", "4"], "--at 4 is beyond --segments 3"),
                          (["--fit-task", "maze2"], "error: ")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            probes.main(["read", *common, "--segments", "3", "--fit-n", "12", *argv])
    train.main(tiny_run_args(tmp_path, "maze5", "--target", "path"))  # a maze model that marks the path instead
    with pytest.raises(SystemExit, match="not a maze model that answers with moves"):
        probes.main(["settle", str(tmp_path / "run"), "--task", "maze5", "--data-dir", cache])
    with pytest.raises(SystemExit, match="error: "):
        probes.main(["settle", str(tmp_path / "nothing"), "--task", "maze5"])
    with pytest.raises(SystemExit):
        probes.main(["hide", *common, "--hide", "-1"])
    assert "expected counts >= 0" in capsys.readouterr().err


def loop_maze():
    """A hand-made 3x3 maze: the loop (0,0)-(0,1)-(0,2)-(1,2)-(1,1)-(1,0)-(0,0) and a dead end (2,0) below the start
    (1,0); the goal (0,1) is 2 moves away through (0,0) and 4 through (1,1) (a rival route 2 moves longer)."""
    o = np.zeros((3, 3, 4), dtype=bool)
    for a, b in [((0, 0), (0, 1)), ((0, 1), (0, 2)), ((0, 2), (1, 2)), ((1, 2), (1, 1)), ((1, 1), (1, 0)),
                 ((1, 0), (0, 0)), ((1, 0), (2, 0))]:
        d = data.MOVES.index((b[0] - a[0], b[1] - a[1]))
        o[a][d] = o[b][(d + 2) % 4] = True
    return o, (1, 0), (0, 1)


def scores_along(path, n, goal_class=data.GOAL_CLASS):
    """(n*n, 5) scores whose best move at each cell of path is the move to the next cell, the goal class at its end."""
    s = np.zeros((n * n, 5), dtype=np.float32)
    for a, b in zip(path, path[1:]):
        s[a[0] * n + a[1], data.MOVES.index((b[0] - a[0], b[1] - a[1]))] = 1.0
    s[path[-1][0] * n + path[-1][1], goal_class] = 1.0
    return s


def test_bfs_distances_with_a_blocked_cell_and_the_rival_routes_of_a_loop():
    o, start, goal = loop_maze()
    dist = data.bfs_distances(o, goal)
    assert dist.tolist() == [[1, 0, 1], [2, 3, 2], [3, -1, -1]]
    assert np.array_equal(dist, data.solve(o, start, goal)[0])
    around = data.bfs_distances(o, goal, blocked=(1, 0))  # the start walled off: (1,1) only around the far side
    assert around.tolist() == [[1, 0, 1], [-1, 3, 2], [-1, -1, -1]]
    # at the start: (1,1) is a route 1 + 3 - 2 = 2 moves longer, (2,0) a dead end; (0,0) is the right move
    assert sorted(probes.rivals(o, dist, goal, [start, (0, 0), goal], 0)) == [((1, 1), 2), ((2, 0), None)]
    # at (0,0) coming from the start: no rival ((1,0) is one move farther, but the path came from it)
    assert probes.rivals(o, dist, goal, [start, (0, 0), goal], 1) == []
    assert [probes.extra_class(e) for e in (2, 4, 8, 10, None)] == ["+2", "+4 to +8", "+4 to +8", "+10 or more",
                                                                    "dead end"]


def test_the_chance_level_of_a_maze_with_one_three_way_choice_is_a_third():
    """Random scores through the greedy rollout (MazeTask.chance) on loop_maze: at the start the three open
    neighbours are equally likely; (0,0) then leads straight to the goal (optimal), (1,1) around the loop (reached,
    4 moves instead of 2), (2,0) into the dead end (not reached); every later cell has one unvisited way on. So
    optimal 1/3 and reach 2/3, here on 600 copies (one standard error 0.019)."""
    o, start, goal = loop_maze()
    x = torch.from_numpy(np.stack([data.encode(o, start, goal)] * 600))
    y = torch.from_numpy(np.stack([data.labels(o, start, goal)] * 600))
    chance = data.MazeTask.chance(type("Task", (), {"n_classes": 5})(), x, y)
    assert chance["optimal"] == pytest.approx(1 / 3, abs=0.07) and chance["reach"] == pytest.approx(2 / 3, abs=0.07)


def test_probe_race_finds_the_first_wrong_move_its_rival_and_an_answer_lost(maze_run, tmp_path, capsys):
    o, start, goal = loop_maze()
    x = torch.from_numpy(np.stack([data.encode(o, start, goal)] * 2))
    y = torch.from_numpy(np.stack([data.labels(o, start, goal)] * 2))
    right = torch.zeros(9, 5)
    for k, bits in enumerate(y[0].tolist()):
        if bits >= 0:
            right[k, (bits & -bits).bit_length() - 1] = 1.0  # the lowest right move (or the goal class)
    wrong = right.clone()
    wrong[3] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # the start (1,0) = cell 3 moves east, into the long route
    # maze 0: wrong, right, right, wrong; maze 1: right throughout
    answers = [torch.stack([w, right]) for w in (wrong, right, right, wrong)]

    class Scripted:
        def __init__(self):
            self.calls = 0

        def __call__(self, x, state=None, **kwargs):
            self.calls += 1
            return {"state": {}, "logits": answers[self.calls - 1]}

    got = probes.race((Scripted(), 1, 1.0), (3, 3), x, y, 4, 10)
    assert got["optimal"] == 0.5 and got["reach"] == 1.0
    assert got["failures"] == [{"maze": 0, "cell": [1, 0], "distance": 2, "extra": 2, "held": True, "last_right": 3}]
    # both mazes meet the +2 rival and the dead end at the start; maze 0 takes the +2 one
    assert got["bands"] == [{"from": 0, "to": 10, "+2": [1, 2], "+4 to +8": [0, 0], "+10 or more": [0, 0],
                             "dead end": [0, 2]}]
    answers[2] = wrong.expand(2, 9, 5)  # wrong, right, wrong, wrong: right once, never two segments in a row
    failure = probes.race((Scripted(), 1, 1.0), (3, 3), x, y, 4, 10)["failures"][0]
    assert failure["held"] is False and failure["last_right"] == 2
    # the command line on the tiny run: every maze not optimal has one first wrong move, taken from one rival
    cache, out = str(maze_run.parent / "cache"), tmp_path / "race.json"
    probes.main(["race", str(maze_run), "--task", "maze5", "--n-test", "12", "--data-dir", cache, "--segments", "2",
                 "--out", str(out)])
    result = json.loads(out.read_text())["result"]
    taken = sum(b[k][0] for b in result["bands"] for k in probes.EXTRA)
    assert taken == len(result["failures"]) == round(12 * (1 - result["optimal"]))
    assert "Rival routes met on each path" in capsys.readouterr().out


def test_probe_race_bands_a_rival_by_the_distance_of_the_cell_it_branches_off():
    """race counts each rival in the band of the path cell where it branches off (the start, 2 moves from the goal),
    not of the rival cell (3 moves): with bands of one move, band 2."""
    o, start, goal = loop_maze()
    x = torch.from_numpy(np.stack([data.encode(o, start, goal)] * 2))
    y = torch.from_numpy(np.stack([data.labels(o, start, goal)] * 2))
    right = torch.from_numpy(scores_along([start, (0, 0), goal], 3))
    wrong = torch.from_numpy(scores_along([start, (1, 1), (1, 2), (0, 2), goal], 3))
    answers = iter([torch.stack([wrong, right])] * 2)
    model = lambda x, state=None, **kw: {"state": {}, "logits": next(answers)}
    got = probes.race((model, 1, 1.0), (3, 3), x, y, 2, 1)
    assert got["bands"] == [{"from": 2, "to": 3, "+2": [1, 2], "+4 to +8": [0, 0], "+10 or more": [0, 0],
                             "dead end": [0, 2]}]


def test_probe_front_reads_the_front_head_band_by_band(maze_run, tmp_path, capsys):
    cache = str(maze_run.parent / "cache")
    train.main(tiny_run_args(tmp_path, "maze5", "--wave-speed", "2", "--front-weight", "0.1", "--data-dir", cache))
    _, _, grid, x, y = probe_pool(maze_run)
    probe = probes.load(str(tmp_path / "run"))
    got = probes.front(probe, grid, x, y, 3, 2, [1, 3])
    model = probe[0]
    known, dist = (y != data.IGNORE).numpy(), data.goal_distance(x, grid).numpy()
    states = [state["h"] for state, _ in probes.rollout(probe, grid, x, 3)]
    with torch.no_grad():  # by hand: the head's probability after 1 and 3 segments, averaged over each band
        p = {s: torch.sigmoid(model.front_head(model.norm_out(states[s - 1]))).squeeze(-1).double().numpy()
             for s in (1, 3)}
    assert got and all(set(b["reached"]) == set(b["right"]) == {1, 3} for b in got)
    for b in got:
        cells = known & (dist >= b["from"]) & (dist < b["to"])
        assert b["cells"] == cells.sum()
        for s in (1, 3):
            assert b["reached"][s] == pytest.approx(p[s][cells].mean(), abs=1e-6)
    assert len({round(b["reached"][3], 6) for b in got}) > 1  # the bands differ: the test can tell them apart
    probes.main(["front", str(tmp_path / "run"), "--task", "maze5", "--n-test", "12", "--data-dir", cache,
                 "--band", "2", "--segments", "3", "--at", "1"])
    assert "front head's mean P(reached) / accuracy after 1, 3 segments" in capsys.readouterr().out
    # without --at: the default segments up to --segments (48 and the like are left out, not an error)
    probes.main(["front", str(tmp_path / "run"), "--task", "maze5", "--n-test", "12", "--data-dir", cache,
                 "--band", "2", "--segments", "3"])
    assert "front head's mean P(reached) / accuracy after 1, 2, 3 segments" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no front head"):
        probes.main(["front", str(maze_run), "--task", "maze5", "--n-test", "12", "--data-dir", cache, "--at", "1"])


def test_sample_maze_solves_larger_fresh_mazes_prints_and_draws(maze_run, tmp_path, capsys):
    out = tmp_path / "s.png"
    total = sample_maze.main([str(maze_run), "--num-samples", "2", "--grid-n", "6", "--inner-steps", "4",
                              "--show-steps", "--diag", "--out", str(out)])
    text = capsys.readouterr().out
    assert set(total) == {"reach", "optimal", "exact", "cell_acc", "unique"} and all(0 <= v <= 1 for v in total.values())
    # two 6x6 mazes of 13 lines each, 25 characters wide, each with its start and goal
    maze_lines = [line for line in text.splitlines() if len(line) == 25 and set(line) <= set("+-| SGx*o")]
    assert len(maze_lines) == 2 * 13 and text.count(" S ") == 2 and text.count(" G ") == 2
    # another grid size than trained: auto segments (at least 1 + 3 to see an answer hold), each of 4 inner steps,
    # slow updates at t = 0, 2 with T = 2
    ran = int(re.search(r"ran (\d+) segments", text).group(1))
    assert "auto (at most" in text and 4 <= ran <= evaluate.segment_cap((6, 6), 1, 4)
    diag = [line for line in text.splitlines() if line[:3].strip().isdigit()]
    assert len(diag) == 4 * ran and [line.endswith("H-UPDATE") for line in diag] == [True, False] * 2 * ran
    for path in (out, tmp_path / "s_steps.png", tmp_path / "s_heads.png"):
        assert_png(path)


def test_sample_maze_draws_mazes_with_loops_and_shows_an_equally_short_path_as_right(maze_run, tmp_path, capsys):
    # a 2x2 maze with every passage open: (0,0) -> (1,1) has two shortest paths; the labels' own goes east first
    o = np.array([[[0, 1, 1, 0], [0, 0, 1, 1]], [[1, 1, 0, 0], [1, 0, 0, 1]]], dtype=bool)
    dist, labelled = data.solve(o, (0, 0), (1, 1))
    assert labelled == [(0, 0), (0, 1), (1, 1)]
    y = data.batch_labels(o[None], np.array([[0, 0]]), dist[None].astype(np.int64))[0]
    scores = np.zeros((4, 5), dtype=np.float32)
    scores[0, 2] = scores[2, 1] = 1.0  # south, then east: the other shortest path
    scores[1, 2] = scores[3, 4] = 1.0  # and every other cell right too: (0,1) south, the goal stays
    m = sample_maze.maze_record({"open": o[None], "start": [(0, 0)], "goal": [(1, 1)]}, 0, scores, y, "direction")
    assert m["pred_path"] == m["true_path"] == [(0, 0), (1, 0), (1, 1)] and m["cell_errors"] == []
    assert sample_maze.render_ascii(o, (0, 0), (1, 1), m["true_path"], m["pred_path"]).count("x") == 0
    # fresh mazes with loops: more open passages than a tree's n*n - 1
    out = tmp_path / "loops.png"
    sample_maze.main([str(maze_run), "--num-samples", "3", "--grid-n", "6", "--generator", "gen_dfs_percolation",
                      "--gen-arg", "p=0.5", "--no-ascii", "--out", str(out)])
    assert "(gen_dfs_percolation-p0.5)" in capsys.readouterr().out
    assert_png(out)
    _, _, pool = sample_maze.fresh_mazes(6, 3, 0, "direction", "gen_dfs_percolation", {"p": 0.5})
    assert (pool["open"].sum((1, 2, 3)) // 2 > 35).all()
    for argv, message in [(["--generator", "gen_nothing"], "no generator 'gen_nothing'"),
                          (["--generator", "__class__"], "no generator '__class__'"),
                          (["--generator", "gen_dfs", "--gen-arg", "q=1"], "could not make gen_dfs-q1 mazes: TypeError"),
                          (["--gen-arg", "p"], "--gen-arg: generator arguments are KEY=VALUE"),
                          (["--segments", "0"], "--segments must be >= 1 or auto, got 0")]:
        with pytest.raises(SystemExit, match=message):
            sample_maze.main([str(maze_run), "--num-samples", "1", "--no-ascii", "--out", str(out), *argv])


def test_evaluate_reproduces_test_json_and_scores_larger_mazes_with_more_steps(maze_run, tmp_path, capsys):
    own = evaluate.main([str(maze_run), "--out", str(tmp_path / "e.json")])  # by default the run's own test items
    test = json.load(open(maze_run / "test.json"))
    assert own["inner_steps"] == 4  # the run's --eval-steps, as its test.json was measured
    # the same weights on the same items in one batch: the same logits, so even the discrete scores agree
    assert own["n_test"] == test["n_test"] and len(own["per_segment"]) == len(test["per_segment"])
    for mine, theirs in zip(own["per_segment"], test["per_segment"]):
        assert mine == pytest.approx(theirs)
    assert json.load(open(tmp_path / "e.json"))["per_segment"] == own["per_segment"]
    big = evaluate.main([str(maze_run), "--task", "maze7", "--inner-steps", "5", "--segments", "3", "--n-test", "30"])
    assert big["task"] == "maze7" and len(big["per_segment"]) == 3 and 25 <= big["n_test"] <= 30
    assert all(seg["steps_used"] == 5 and 0 <= seg["optimal"] <= seg["reach"] <= 1 for seg in big["per_segment"])
    assert "segment 3: reach" in capsys.readouterr().out
    for argv, message in [(["--task", "sort6"], "was trained on maze5"), (["--segments", "0"], "--segments must be"),
                          (["--task", "maze1"], "unknown task")]:
        with pytest.raises(SystemExit, match=message):
            evaluate.main([str(maze_run), *argv])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        evaluate.main([str(tmp_path / "nothing.pt")])


def test_evaluate_prints_one_line_per_segment_with_its_metrics(maze_run, capsys):
    """With a fixed --segments, evaluate.py prints every segment's metrics (segment 1, 2, 3), each line holding that
    segment's own numbers, not only the last segment's."""
    result = evaluate.main([str(maze_run), "--n-test", "6", "--segments", "3", "--no-progress"])
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines() if re.match(r"\s+segment \d+:", line)]
    assert len(lines) == 3
    for s, (line, seg) in enumerate(zip(lines, result["per_segment"]), 1):
        assert line == f"segment {s}: " + " ".join(f"{k} {v:.4f}" for k, v in seg.items())


def test_evaluate_prints_the_routing_of_every_inner_step_of_the_last_segment(maze_run, capsys):
    """The routing per inner step: one 't T: h0 .. h1 .. | modal' line per inner step (4 here), with the head usage
    and modal share evaluate.score returns."""
    result = evaluate.main([str(maze_run), "--n-test", "6", "--segments", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert "routing in the last segment" in out
    rows = [line.strip() for line in out.splitlines() if re.match(r"\s+t \d+: h0 ", line)]
    usage, modal = result["routing"]["usage"], result["routing"]["modal_share"]
    assert len(rows) == len(usage) == result["inner_steps"] == 4
    for t, (row, u, m) in enumerate(zip(rows, usage, modal)):
        assert row == f"t {t}: " + " ".join(f"h{h} {v:.2f}" for h, v in enumerate(u)) + f" | {m:.2f}"


def test_evaluate_top_level_metrics_and_out_json_are_the_last_segments(maze_run, tmp_path, monkeypatch):
    """The result's (and --out JSON's) top-level optimal, reach, ... are the final segment's, not the first's (each
    segment's optimal is scripted to differ, since the tiny model's answers barely change between segments)."""
    real = train.evaluate

    def scripted(*a, **kw):
        scored = real(*a, **kw)
        scored["per_segment"] = [dict(seg, optimal=s / 10) for s, seg in enumerate(scored["per_segment"])]
        return scored
    monkeypatch.setattr(train, "evaluate", scripted)
    out = tmp_path / "e.json"
    result = evaluate.main([str(maze_run), "--n-test", "12", "--segments", "3", "--out", str(out), "--no-progress"])
    last = result["per_segment"][-1]
    assert last["optimal"] == 0.2 and {k: result[k] for k in last} == last
    saved = json.loads(out.read_text())
    assert saved["optimal"] == 0.2 and saved["per_segment"] == result["per_segment"]


def test_evaluate_checks_its_outputs_and_flags_before_scoring(maze_run, tmp_path, monkeypatch):
    """Flags that cannot work, and output paths that cannot be written, end in one line before any scoring (which
    can take an hour); a missing output folder is made."""
    monkeypatch.setattr(evaluate, "score", lambda *a, **k: pytest.fail("scored before the flags were checked"))
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a folder should be
    for argv, message in [(["--batch-size", "0"], "--batch-size must be >= 1"),
                          (["--segments", "auto", "--plot", str(tmp_path / "p.png")], "pass a count"),
                          (["--out", str(blocker / "e.json")], "--out: cannot make the folder")]:
        with pytest.raises(SystemExit) as exc:
            evaluate.main([str(maze_run), *argv])
        assert str(exc.value.code).startswith("error: ") and message in str(exc.value.code)
    monkeypatch.undo()
    result = evaluate.main([str(maze_run), "--n-test", "6", "--segments", "2",
                            "--out", str(tmp_path / "new" / "e.json"), "--plot", str(tmp_path / "pics" / "p.png")])
    assert json.load(open(tmp_path / "new" / "e.json"))["n_test"] == result["n_test"]
    assert_png(tmp_path / "pics" / "p.png")


def test_evaluate_data_seed_scores_other_pools_than_the_test_set(maze_run, monkeypatch):
    own = evaluate.score(str(maze_run), segments=1)
    loaded, load = [], data.load_mazes
    monkeypatch.setattr(data, "load_mazes", lambda n, count, seed, *a, **kw: loaded.append(seed) or load(n, count, seed,
                                                                                                         *a, **kw))
    other = evaluate.score(str(maze_run), segments=1, n_test=12, data_seed=3)
    assert (own["data_seed"], other["data_seed"]) == (0, 3)
    assert 11 in loaded and 2 not in loaded  # seed 3's test pool is 3 * 3 + 2, never seed 0's (2)
    assert other["per_segment"][0] != own["per_segment"][0]  # other mazes, other scores (cell_acc is continuous)


def test_distance_bands_of_width_one_cover_every_cell():
    """Bands of one move: every cell in one band, the farthest distance the last band's start."""
    pool = data.generate_mazes(5, 6, 3)
    x = torch.from_numpy(data.encode(pool["open"], pool["start"], pool["goal"]))
    y = torch.from_numpy(data.batch_labels(pool["open"], pool["start"], pool["dist"].astype(np.int64)))
    logits = F.one_hot(torch.from_numpy(data.first_class(y.numpy())), 5).float()
    bands = data.accuracy_by_distance(logits, x, y, 1)
    assert sum(b["cells"] for b in bands) == 6 * 25 and bands[-1]["from"] == int(data.goal_distance(x, (5, 5)).max())


def test_accuracy_by_distance_bands_the_cells_by_their_moves_to_the_goal(maze_run, capsys):
    pool = data.generate_mazes(5, 6, 3)
    x = torch.from_numpy(data.encode(pool["open"], pool["start"], pool["goal"]))
    y = torch.from_numpy(data.batch_labels(pool["open"], pool["start"], pool["dist"].astype(np.int64)))
    dist = data.goal_distance(x, (5, 5))
    logits = torch.nn.functional.one_hot(torch.from_numpy(data.first_class(y.numpy())), 5).float()
    logits[dist >= 4] = logits[dist >= 4].roll(1, dims=-1)  # every cell 4 or more moves out scores a wrong move
    bands = data.accuracy_by_distance(logits, x, y, 2)
    assert [b["from"] for b in bands] == list(range(0, 2 * len(bands), 2)) and bands[-1]["from"] <= dist.max()
    assert sum(b["cells"] for b in bands) == 6 * 25  # perfect mazes: every cell reaches the goal
    assert [b["cell_acc"] for b in bands[:2]] == [1.0, 1.0] and all(b["cell_acc"] == 0.0 for b in bands[2:])
    # evaluate.py: the bands of the last segment's answers, which average to its cell accuracy
    result = evaluate.main([str(maze_run), "--n-test", "12", "--segments", "2", "--by-distance", "3"])
    bands = result["by_distance"]
    mean = sum(b["cells"] * b["cell_acc"] for b in bands) / sum(b["cells"] for b in bands)
    assert mean == pytest.approx(result["per_segment"][-1]["cell_acc"], abs=1e-6)
    shown = capsys.readouterr()
    assert "0-2 moves from the goal: cell_acc" in shown.out and "items scored" in shown.err  # a bar with fixed segments
    evaluate.main([str(maze_run), "--n-test", "12", "--segments", "2", "--no-progress"])
    assert "items scored" not in capsys.readouterr().err
    # the logits train.evaluate keeps are the last segment's: the model run by hand, segment after segment
    model, ckpt = train.load_checkpoint(train.checkpoint_file(str(maze_run)))
    task = data.make_task("maze5", n_train=60, n_val=0, n_test=8, cache_dir=str(maze_run.parent / "cache"),
                          progress=False)
    x, y = task.split("test")
    kept = train.evaluate(model, task, x, y, 3, temperature=1.0, batch_size=5, keep_logits=True)["logits"]
    state = None
    with torch.no_grad():
        for _ in range(3):
            out = model.eval()(x, state=state, temperature=1.0, grid=task.grid)
            state = out["state"]
    torch.testing.assert_close(kept, out["logits"].float(), rtol=1e-4, atol=1e-5)
    # with fixed segments too, the progress bar counts the items scored and changes nothing
    capsys.readouterr()
    shown = train.evaluate(model, task, x, y, 3, temperature=1.0, batch_size=5, keep_logits=True, progress=True)
    assert torch.equal(shown["logits"], kept)
    assert "items scored" in (err := capsys.readouterr().err) and "8/8" in err and "segment=3/3" in err
    with pytest.raises(SystemExit, match="--by-distance must be >= 1"):
        evaluate.main([str(maze_run), "--by-distance", "0"])


def test_evaluate_from_another_folder_uses_the_runs_cache_and_writes_no_new_pool(maze_run, tmp_path, monkeypatch,
                                                                                  capsys):
    cache = maze_run.parent / "cache"
    before = sorted(os.listdir(cache))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = evaluate.main([str(maze_run), "--n-test", "12"])
    assert sorted(os.listdir(cache)) == before and os.listdir(elsewhere) == []  # nothing generated, nothing left
    # the chance level: the same rollout on random scores, printed and returned beside the model's metrics
    assert set(result["chance"]) == {"reach", "optimal", "exact", "cell_acc", "unique"}
    assert 0 <= result["chance"]["optimal"] <= result["chance"]["reach"] <= 1
    task = data.make_task("maze5", n_train=60, n_val=12, n_test=12, cache_dir=str(cache), progress=False)
    assert result["chance"] == task.chance(*task.split("test"))  # random scores on the very mazes scored
    assert "chance (random scores, same rollout): reach" in capsys.readouterr().out


def test_run_data_dir_finds_a_relative_cache_beside_the_run_from_any_folder(tmp_path, monkeypatch):
    # a run recorded before data_dir was made absolute: "cache", relative to the project folder it ran in
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "cache").mkdir(parents=True)
    (project / "runs" / "r").mkdir(parents=True)
    elsewhere.mkdir()
    (project / "cache" / data.pool_file(5, 60, 3)).write_bytes(b"")
    config = {"task": "maze5", "n_train": 60, "data_seed": 1, "data_dir": "cache"}
    monkeypatch.chdir(elsewhere)
    ckpt = str(project / "runs" / "r" / "best.pt")
    assert train.run_data_dir(config, ckpt) == str(project / "cache")
    # the recorded absolute path wins when it holds the pool; a new run records an absolute path
    assert train.run_data_dir({**config, "data_dir": str(project / "cache")}, "/nowhere/best.pt") == str(project / "cache")
    assert os.path.isabs(train.resolve_args(["--data-dir", "cache"]).data_dir)


def test_run_data_dir_without_the_pool_anywhere_takes_the_first_folder_that_exists(tmp_path, monkeypatch):
    """No candidate holds the training pool: the first existing folder (here the cache beside the run) wins over a
    recorded relative path that does not exist from the current folder."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "cache").mkdir(parents=True)
    (project / "runs" / "r").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = {"task": "maze5", "n_train": 60, "data_seed": 1, "data_dir": "cache"}
    assert train.run_data_dir(config, str(project / "runs" / "r" / "best.pt")) == str(project / "cache")


def test_a_device_this_machine_lacks_is_one_line_naming_the_devices_it_has(maze_run, tmp_path):
    missing = "cuda" if not torch.cuda.is_available() else "cuda:99"
    with pytest.raises(ValueError, match="not available on this machine; it has: cpu"):
        train.pick_device(missing)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        train.pick_device("gpu")
    assert train.pick_device("cpu:0").type == "cpu" and train.pick_device("auto") in map(torch.device, train.available_devices())
    calls = [lambda: train.main(tiny_run_args(tmp_path, "sort6", "--device", missing)),
             lambda: evaluate.main([str(maze_run), "--device", missing]),
             lambda: sample_maze.main([str(maze_run), "--device", missing]),
             lambda: bench.main(["--task", "maze4", "--device", missing])]
    for call in calls:
        with pytest.raises(SystemExit) as exc:
            call()
        text = str(exc.value.code)
        assert text.startswith("error: device") and "it has: cpu" in text and "\n" not in text


def test_an_empty_maze_pool_is_neither_generated_nor_cached(tmp_path):
    pool = data.load_mazes(5, 0, 0, cache_dir=str(tmp_path / "c"))
    assert pool["open"].shape == (0, 5, 5, 4) and pool["dist"].dtype == np.int16 and not (tmp_path / "c").exists()


def test_evaluate_scores_a_sort_model_on_its_own_length_and_refuses_another(tmp_path):
    train.main(tiny_run_args(tmp_path, "sort6"))
    own = evaluate.main([str(tmp_path / "run"), "--n-test", "1000"])
    assert own["task"] == "sort6" and own["n_test"] == 1000 and -1 <= own["tau"] <= 1
    with pytest.raises(SystemExit, match="a sorting model has a fixed length"):
        evaluate.main([str(tmp_path / "run"), "--task", "sort12"])
    with pytest.raises(SystemExit, match="--plot applies to mazes only; sort6 is not a maze task"):  # before scoring
        evaluate.main([str(tmp_path / "run"), "--n-test", "50", "--plot", str(tmp_path / "p.png"),
                       "--out", str(tmp_path / "e.json")])
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "p.png").exists()


def test_evaluate_of_a_sort_model_prints_the_reference_with_hidden_values_at_zero(tmp_path, capsys):
    """A sorting model's yardstick is the simple reference with hidden values at 0, on the very arrays scored."""
    train.main(tiny_run_args(tmp_path, "sort6"))
    result = evaluate.main([str(tmp_path / "run"), "--n-test", "300", "--no-progress"])
    task = data.make_task("sort6", n_val=12, n_test=300)
    assert result["chance"] == task.reference_metrics(*task.split("test"), fill="zero")
    assert "reference (hidden at 0): tau" in capsys.readouterr().out


def test_diag_of_an_unrouted_model_is_empty_not_a_crash():
    x = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    for controller in ("none", "fixed"):  # none: no head weights; fixed: weights but no router probabilities
        _, steps = sample_maze.run_traced(tiny_maze_model(controller), x, (3, 3), segments=1, n_steps=2,
                                          temperature=1.0)
        assert len(steps) == 2 and sample_maze.step_diagnostics(steps) == []


class ScriptedPaths(nn.Module):
    """Per segment, direction scores that walk one of two paths of loop_maze: the short one or the loop."""

    def __init__(self, plan):
        super().__init__()
        self.plan, self.calls = plan, 0
        self.answers = {"short": torch.from_numpy(scores_along([(1, 0), (0, 0), (0, 1)], 3)),
                        "loop": torch.from_numpy(scores_along([(1, 0), (1, 1), (1, 2), (0, 2), (0, 1)], 3))}

    def forward(self, x, state=None, **kw):
        self.calls += 1
        return {"logits": self.answers[self.plan[self.calls - 1]].expand(len(x), 9, 5).clone(), "state": {}}


def test_sample_maze_auto_segments_restart_the_count_when_the_path_changes():
    """run_traced with patience 2 waits for the decoded path to hold 2 segments in a row: paths A A B B B stop after
    segment 5 (not 4, counting the earlier A A as well)."""
    o, start, goal = loop_maze()
    x = torch.from_numpy(np.stack([data.encode(o, start, goal)]))
    model = ScriptedPaths(["short", "short", "loop", "loop", "loop", "loop", "loop"])
    _, steps = sample_maze.run_traced(model, x, (3, 3), 7, 1, 1.0, patience=2, trace=False)
    assert steps[-1]["seg"] == 5


def test_a_path_that_reaches_the_goal_the_long_way_round_is_drawn_off_the_true_path():
    """A prediction that reaches G by a longer route than the shortest one keeps the shortest path as the true one:
    its detour cells show as x and the skipped shortest cell as o (only an equally short path replaces it)."""
    o, start, goal = loop_maze()
    long_way = [start, (1, 1), (1, 2), (0, 2), goal]  # 4 moves; the shortest is start, (0,0), goal
    y = data.labels(o, start, goal)
    m = sample_maze.maze_record({"open": o[None], "start": [start], "goal": [goal]}, 0, scores_along(long_way, 3), y,
                                "direction")
    assert m["pred_path"] == long_way and m["true_path"] == [start, (0, 0), goal]
    text = sample_maze.render_ascii(o, start, goal, m["true_path"], m["pred_path"])
    assert text.count("x") == 3 and text.count("o") == 1


def test_cell_kinds_by_hand_on_the_3x3_maze():
    """--diag's cell kinds: start, goal and their open neighbours 0; then 1 dead end, 2 corridor, 3 junction."""
    o = maze_from_edges(3, EDGES)
    kinds = sample_maze.cell_kinds({"open": o[None], "start": np.array([(2, 1)]), "goal": np.array([(2, 0)])})
    assert kinds.tolist() == [[1, 3, 2, 0, 2, 2, 0, 0, 0]]


def test_usage_by_kind_counts_the_heads_each_kind_keeps_by_hand():
    """--diag's heads by cell kind: the share of each kind's token-steps that keep (alpha > 0) each head."""
    kinds = np.array([[1, 3, 2, 0, 2, 2, 0, 0, 0]])
    alpha = torch.nn.functional.one_hot(torch.arange(9) % 2, 2).float()[None]  # cell k keeps head k % 2 only
    got = sample_maze.usage_by_kind([{"alpha": alpha}, {"alpha": alpha}], kinds)
    assert got == {"start/goal": (4, [0.5, 0.5]), "dead end": (1, [1.0, 0.0]),
                   "corridor": (3, pytest.approx([2 / 3, 1 / 3])), "junction": (1, [0.0, 1.0])}


def test_show_steps_panels_are_the_first_maze_after_each_picked_step(maze_run, tmp_path, monkeypatch):
    """--show-steps draws the first maze as it stood after each picked inner step (that step's wrong cells), not the
    final answer repeated. Each step's logits are scripted (random), since the tiny model's barely change."""
    drawn, real, scripted = {}, sample_maze.run_traced, []

    def traced(*a, **kw):
        logits, steps = real(*a, **kw)
        for i, step in enumerate(steps):
            step["logits"] = torch.randn(step["logits"].shape, generator=torch.Generator().manual_seed(i))
            scripted.append(step["logits"][0].numpy())
        return logits, steps
    monkeypatch.setattr(sample_maze, "run_traced", traced)
    monkeypatch.setattr(plots, "draw_refinement", lambda panels, out, titles: drawn.update(panels=panels) or out)
    sample_maze.main([str(maze_run), "--num-samples", "2", "--segments", "2", "--show-steps", "--max-panels", "100",
                      "--no-ascii", "--out", str(tmp_path / "s.png")])
    _, y, _ = sample_maze.fresh_mazes(5, 2, 0, "direction")
    wrong = []
    for scores in scripted:  # by hand: cells whose best class is not one of the right ones
        best = scores.argmax(-1)
        wrong.append(sorted(divmod(k, 5) for k in range(25) if y[0, k] >= 0 and not (int(y[0, k]) >> best[k]) & 1))
    assert len(drawn["panels"]) == len(wrong) == 8  # 2 segments x 4 inner steps, all picked
    assert [sorted(p["cell_errors"]) for p in drawn["panels"]] == wrong
    assert len({tuple(w) for w in wrong}) > 1


def test_evaluate_batch_size_flag_is_the_scoring_batch(maze_run, monkeypatch):
    """evaluate.py --batch-size 3 scores in batches of 3 (train.evaluate gets it), not the default 64."""
    seen, real = [], train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **kw: seen.append(kw["batch_size"]) or real(*a, **kw))
    evaluate.main([str(maze_run), "--n-test", "6", "--segments", "1", "--batch-size", "3", "--no-progress"])
    assert seen == [3]


def test_sample_maze_seed_picks_other_fresh_mazes(maze_run, tmp_path, monkeypatch):
    """sample_maze.py --seed 5 solves the mazes of fresh_mazes' seed 5 (other mazes than seed 0's)."""
    seen, real = [], sample_maze.fresh_mazes
    monkeypatch.setattr(sample_maze, "fresh_mazes", lambda *a, **kw: seen.append(a[2]) or real(*a, **kw))
    sample_maze.main([str(maze_run), "--num-samples", "1", "--seed", "5", "--no-ascii",
                      "--out", str(tmp_path / "s.png")])
    assert seen == [5]
    assert not torch.equal(real(5, 1, 5, "direction")[0], real(5, 1, 0, "direction")[0])


def test_sample_maze_max_panels_caps_the_steps_drawn(maze_run, tmp_path, monkeypatch):
    """--show-steps --max-panels 3 over 2 segments x 4 inner steps (8 steps) draws 3 panels: the first, middle and
    last step, not all 8."""
    drawn = {}
    monkeypatch.setattr(plots, "draw_refinement", lambda panels, out, titles: drawn.update(titles=titles) or out)
    sample_maze.main([str(maze_run), "--num-samples", "1", "--segments", "2", "--show-steps", "--max-panels", "3",
                      "--no-ascii", "--out", str(tmp_path / "s.png")])
    assert [t.split(":")[0] for t in drawn["titles"]] == ["seg 1 t 0", "seg 2 t 0", "seg 2 t 3"]


def probe_cli(maze_run, monkeypatch, name, argv):
    """Run probes.py NAME on the tiny run's 12 validation mazes with a spy on probes.NAME; returns its arguments."""
    seen, real = [], getattr(probes, name)
    monkeypatch.setattr(probes, name, lambda *a: seen.append(a) or real(*a))
    probes.main([name, str(maze_run), "--task", "maze5", "--n-test", "12", "--data-dir", str(maze_run.parent / "cache"),
                 *argv])
    assert len(seen) == 1
    return seen[0]


def test_probe_settle_bands_the_cells_by_band_moves(maze_run, tmp_path, monkeypatch):
    """probes.py settle --band 2: rows of 2 moves each (0-2, 2-4, ...), in the JSON written with --out."""
    out = tmp_path / "settle.json"
    args = probe_cli(maze_run, monkeypatch, "settle", ["--segments", "2", "--band", "2", "--out", str(out)])
    assert args[4:] == (2, 2)
    rows = json.loads(out.read_text())["result"]
    assert len(rows) > 1 and all(r["to"] - r["from"] == 2 for r in rows)


def test_probe_hide_runs_the_hidden_counts_given(maze_run, tmp_path, monkeypatch):
    """probes.py hide --hide 0,1: curves after 0 and after 1 hidden segments, and no others."""
    out = tmp_path / "hide.json"
    args = probe_cli(maze_run, monkeypatch, "hide", ["--segments", "2", "--hide", "0,1", "--out", str(out)])
    assert args[4:] == (2, [0, 1])
    assert sorted(json.loads(out.read_text())["result"]) == ["0", "1"]


def test_probe_race_runs_the_segments_given(maze_run, monkeypatch):
    """probes.py race --segments 2 rolls the mazes out for 2 segments (rollout asked for 2), not the default 48."""
    seen, real = [], probes.rollout
    monkeypatch.setattr(probes, "rollout", lambda probe, grid, x, segments, *a, **k: seen.append(segments) or
                        real(probe, grid, x, segments, *a, **k))
    args = probe_cli(maze_run, monkeypatch, "race", ["--segments", "2"])
    assert args[4] == 2 and seen == [2]


@pytest.mark.parametrize("flag, value, least", [("--inner-steps", 0, 1), ("--max-panels", 0, 1), ("--grid-n", 2, 3),
                                               ("--num-samples", -1, 1)])
def test_sample_maze_bad_counts_give_one_line_errors(maze_run, flag, value, least):
    with pytest.raises(SystemExit) as exc:
        sample_maze.main([str(maze_run), flag, str(value)])
    assert str(exc.value.code) == f"error: {flag} must be >= {least}, got {value}"


def test_sample_maze_refuses_grids_over_64_and_runs_untraced_to_the_same_answer(maze_run):
    with pytest.raises(SystemExit) as exc:
        sample_maze.main([str(maze_run), "--grid-n", "65"])
    assert str(exc.value.code) == "error: --grid-n must be <= 64, got 65"
    x = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(1))
    model = tiny_maze_model("hrm")
    traced, steps = sample_maze.run_traced(model, x, (3, 3), segments=3, n_steps=2, temperature=1.0)
    asked = []

    class Watched(nn.Module):  # the model as it is, noting whether each forward was asked for a trace
        def forward(self, *args, **kwargs):
            asked.append(kwargs.get("trace"))
            return model(*args, **kwargs)
    plain, light = sample_maze.run_traced(Watched(), x, (3, 3), segments=3, n_steps=2, temperature=1.0, trace=False)
    torch.testing.assert_close(plain, traced)  # the trace only watches
    assert len(steps) == 6 and "alpha" in steps[0]
    assert light == [{"seg": 1, "t": 1}, {"seg": 2, "t": 1}, {"seg": 3, "t": 1}]  # no tensors kept
    assert asked == [False, False, False]  # the model itself keeps no per-step state either


def test_sample_maze_missing_or_foreign_checkpoint_gives_one_line_error(tmp_path, capsys):
    cases = [(tmp_path / "nope.pt", "no checkpoint at")]
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    cases.append((tmp_path / "foreign.pt", "not an hrm-poh checkpoint"))
    (tmp_path / "text.pt").write_text("hello")
    cases.append((tmp_path / "text.pt", "not a readable checkpoint"))
    m = tiny_maze_model("hrm")
    torch.save({"model": m.state_dict(), "model_args": asdict(m.cfg), "config": {"task": "sort6"}},
               tmp_path / "sort.pt")
    cases.append((tmp_path / "sort.pt", "not a maze task"))
    for path, message in cases:
        with pytest.raises(SystemExit) as exc:
            sample_maze.main([str(path)])
        text = str(exc.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text


# ---- the A/B harness and its sweep

TINY_SORT = ["--n-val", "12", "--n-test", "200", "--d-model", "16", "--n-heads", "2", "--n-layers", "1",
             "--d-ctrl", "8", "--batch-size", "4", "--max-steps", "2", "--eval-interval", "2", "--warmup", "1",
             "--no-progress"]


def test_tiny_sweep_writes_one_row_per_value_controller_seed_and_reuses_runs(tmp_path, capsys):
    argv = ["--task", "sort6", "--controller", "none", "hrm", "--seeds", "1", "2", "--sweep", "R", "1", "2",
            "--root", str(tmp_path), "--", *TINY_SORT]
    ab.main(argv)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [(r["sweep_value"], r["controller"], r["seed"]) for r in rows]
    assert sorted(keys) == sorted((v, c, s) for v in "12" for c in ("none", "hrm") for s in "12")
    for r in rows:
        assert r["sweep_flag"] == "R" and r["task"] == "sort6" and int(r["steps"]) == 2
        assert json.load(open(f"{r['run_dir']}/config.json"))["R"] == int(r["sweep_value"])
        assert -1 <= float(r["tau"]) <= 1 and int(r["params"]) > 0 and float(r["wall_s"]) > 0
    # the none controller builds no controller modules: smaller by exactly the hrm controller's parameters
    hrm = next(r for r in rows if r["controller"] == "hrm")
    n_ctrl = sum(p.numel() for p in train.load_checkpoint(f"{hrm['run_dir']}/best.pt")[0].controller.parameters())
    assert {int(r["params"]) for r in rows if r["controller"] == "none"} == {int(hrm["params"]) - n_ctrl}
    text = capsys.readouterr().out
    assert text.count("sort6, R = ") == 2 and "reference (visible values in order, hidden at 0)" in text
    assert_png(tmp_path / "sweep_R_tau.png")
    # a second call reuses every finished run; other flags into the same folders are refused
    ab.main(argv)
    assert capsys.readouterr().out.count("reusing the finished run") == 8
    # an interrupted run (no test.json) is resumed, one stopped before its first checkpoint starts again
    first, second = rows[0]["run_dir"], rows[1]["run_dir"]
    os.remove(os.path.join(first, "test.json"))
    for name in ("test.json", "ckpt.pt", "best.pt"):
        os.remove(os.path.join(second, name))
    again = ab.main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 6 and f"resuming into {first}" in out
    assert f"training into {second}" in out and len(again) == 8
    assert all(os.path.isfile(os.path.join(d, "test.json")) for d in (first, second))
    with pytest.raises(SystemExit, match="other flags"):
        ab.main(argv + ["--max-steps", "3"])
    for passthrough in (["--seed", "4"], ["--see", "4"], ["--out=x"]):  # abbreviations too: train.py takes them
        with pytest.raises(SystemExit, match="set by ab.py"):
            ab.main(["--root", str(tmp_path), "--", *passthrough])
    for flags, message in ((["--seeds", "1", "1", "2"], "--seeds repeats a value"),
                           (["--controller", "hrm", "hrm"], "--controller repeats a value"),
                           (["--threads", "-1"], "--threads must be >= 0")):
        with pytest.raises(SystemExit, match=message):  # the same run twice would pass for two seeds
            ab.main(["--root", str(tmp_path), *flags])
    with pytest.raises(SystemExit):  # argparse: not a controller, before any run starts
        ab.main(["--root", str(tmp_path), "--controller", "nonee"])
    with pytest.raises(SystemExit, match="--sweep seed: ab.py sets --seed for every run"):
        ab.main(["--root", str(tmp_path / "s"), "--sweep", "seed", "1", "2"])
    # a metric the runs do not report: one line naming those they do, after results.csv is written
    with pytest.raises(SystemExit, match="--metric las: the runs report tau"):
        ab.main(["--metric", "las", *argv])  # the runs are reused


def test_ab_row_counts_the_steps_a_time_budget_run_really_trained(tmp_path):
    """A run stopped by --time-budget before --max-steps: the row's steps and best_step are the steps trained (one
    step: sort6's recipe has 1 segment), not --max-steps 50."""
    row = ab.run_one(str(tmp_path), "sort6", "none", 1, TINY_SORT + ["--max-steps", "50", "--time-budget", "1e-9"])
    assert row["steps"] == 1 and row["best_step"] == 1


def test_ab_wall_seconds_add_up_over_a_resume(tmp_path):
    """A resumed run's wall_s is the time before the interruption plus the time of the resume."""
    row = ab.run_one(str(tmp_path), "sort6", "none", 1, TINY_SORT)
    record_path = os.path.join(row["run_dir"], "ab.json")
    record = json.loads(Path(record_path).read_text())
    record["wall_s"] = 1000.0  # as if the first attempt had run 1000 s before it was interrupted
    Path(record_path).write_text(json.dumps(record))
    os.remove(os.path.join(row["run_dir"], "test.json"))
    again = ab.run_one(str(tmp_path), "sort6", "none", 1, TINY_SORT)
    assert 1000.0 < again["wall_s"] < 1000.0 + 600


# ---- reliability (issue 6)


REPO = os.path.dirname(os.path.abspath(__file__))


def with_flags(args, **flags):
    """argv with some flags set: with_flags(tiny_run_args(...), max_steps=300) replaces --max-steps' value."""
    args = list(args)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture
def one_thread():
    """The environment for train.py subprocesses, one thread each; the test process uses one thread too, since the
    thread count can change the order of float sums and so the last bits of the weights (and on 2 busy cores,
    2 threads per process can make a tiny run 50 times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torch.set_num_threads(n)


def train_cli(args, env, resume=False):
    """Run train.py in a subprocess (a fresh interpreter, as a user would) and return the CompletedProcess."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *args] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def wait_for_checkpoint(proc, path, min_step, timeout=60):
    """Poll until the running proc has saved a checkpoint at min_step or later; returns that step."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the run finished before the test could interrupt it: make it longer"
        if path.exists():  # os.replace swaps whole files, so a reader never sees half of one
            step = torch.load(path, weights_only=True)["step"]
            if step >= min_step:
                return step
        time.sleep(0.02)
    pytest.fail(f"no checkpoint at step >= {min_step} after {timeout} s")


def same_tensors(a, b):
    """Exact equality of two nested dicts / lists of tensors and numbers (state dicts, optimizer states)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def log_without_timings(run):
    drop = {"samples_per_s", "train_seconds"}  # wall-clock numbers, never reproducible
    return [{k: v for k, v in record.items() if k not in drop} for record in read_log(run)]


@pytest.mark.parametrize("batching", ["fixed", "rolling"])
def test_sigkill_mid_run_then_resume_gives_exactly_the_uninterrupted_weights_metrics_and_log(tmp_path, one_thread,
                                                                                             batching):
    # hrm controller, 2 segments per sample, EMA and a warmup: every piece of state a resume must restore; with
    # rolling batches half the samples are one segment in at every checkpoint, so their carried state must be saved
    flags = dict(max_steps=300, eval_interval=20, warmup=30, ema=0.9, batching=batching)
    ref_args = with_flags(tiny_run_args(tmp_path / "ref", "sort6"), **flags)
    args = with_flags(tiny_run_args(tmp_path / "cut", "sort6"), **flags)
    ref_result = train.main(ref_args)
    run = tmp_path / "cut" / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], env=one_thread,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(proc, run / "ckpt.pt", min_step=100)
    finally:
        proc.kill()  # SIGKILL: no handler runs, whatever the run was doing is lost
        proc.wait()
    killed_at = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert 100 <= killed_at < 300 and not (run / "test.json").exists()
    done = train_cli(args, one_thread, resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {run / 'ckpt.pt'} at step {killed_at}" in done.stdout
    ref, cut = (torch.load(p / "ckpt.pt", weights_only=True) for p in (tmp_path / "ref" / "run", run))
    assert ref["step"] == cut["step"] == 300
    for key in ("model", "ema", "optimizer", "data_rng", "best_val"):
        assert same_tensors(ref[key], cut[key]), key
    ref_best, cut_best = (torch.load(p / "best.pt", weights_only=True) for p in (tmp_path / "ref" / "run", run))
    assert ref_best["step"] == cut_best["step"] and same_tensors(ref_best["model"], cut_best["model"])
    assert json.loads((run / "test.json").read_text()) == json.loads(json.dumps(ref_result))
    # the log was trimmed back to the checkpoint and continued: no gaps, no repeats
    assert log_without_timings(run) == log_without_timings(tmp_path / "ref" / "run")
    # and the training clock went on from the checkpoint instead of starting again at 0
    clock = [r["train_seconds"] for r in read_log(run) if r["split"] == "val"]
    assert len(clock) == 15 and clock == sorted(clock) and clock[0] > 0


def test_time_budget_counts_the_training_time_before_a_resume(tmp_path):
    args = with_flags(tiny_run_args(tmp_path, "sort6"), max_steps=40, eval_interval=20)
    train.main(args)
    trained = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["train_seconds"]
    val = read_log(tmp_path / "run")
    assert trained >= [r for r in val if r["split"] == "val"][-1]["train_seconds"] > 0
    # a budget the run has already spent (as for a run stopped while testing): no more steps, only the test
    (tmp_path / "run" / "test.json").unlink()
    train.main(with_flags(args, max_steps=4000, time_budget=trained / 2) + ["--resume"])
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and ckpt["train_seconds"] == trained and (tmp_path / "run" / "test.json").is_file()
    # with time left it trains on: one batch (2 segments, 2 steps), then the budget is spent
    train.main(with_flags(args, max_steps=4000, time_budget=trained * 1.0001) + ["--resume"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 42


def test_ctrl_c_inside_the_optimizer_step_waits_for_its_end_and_an_ignored_one_stays_ignored():
    done, outer = [], signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C handler
        with pytest.raises(KeyboardInterrupt):
            with train.sigint_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # time for the handler to run, as a long optimizer step would give it
                done.append("step finished")
        assert done == ["step finished"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `cmd &` in a shell script leaves it
        with train.sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            done.append("ignored")
        assert done == ["step finished", "ignored"] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def start_with_default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the child gets Python's Ctrl-C handling however pytest was started


def test_ctrl_c_saves_a_consistent_checkpoint_exits_130_and_the_run_resumes(tmp_path, one_thread):
    args = with_flags(tiny_run_args(tmp_path, "sort6"), max_steps=100000, eval_interval=20)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], env=one_thread,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=start_with_default_sigint)
    try:
        wait_for_checkpoint(proc, tmp_path / "run" / "ckpt.pt", min_step=20)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved" in out and "Traceback" not in err
    _, ckpt = train.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    step = ckpt["step"]
    assert 20 <= step < 100000 and f"at step {step};" in out
    # a state the run was really in: the step counter matches the optimizer's own count of updates
    assert max(int(s["step"]) for s in ckpt["optimizer"]["state"].values()) == step
    # the batch in flight was saved with it: 2 segments per batch, so one segment done after an odd step; after an
    # even step both, or none if the Ctrl-C came after the next batch was drawn
    age = ckpt["carry"]["age"].tolist()
    assert age == [1] * 4 if step % 2 else age in ([2] * 4, [0] * 4)
    # --resume picks it up (and goes on with that batch) and finishes
    result = train.main(with_flags(args, max_steps=step + 3) + ["--resume"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == step + 3 and "tau" in result


@pytest.mark.parametrize("batching", ["fixed", "rolling"])
def test_carry_gives_each_sample_all_its_segments_and_the_state_it_ended_with(batching):
    args = train.resolve_args(["--task", "sort6", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--R", "2",
                               "--segments", "4", "--batch-size", "8", "--batching", batching])
    task = data.make_task("sort6", n_val=8, n_test=8)
    model = PoHModel(train.model_config(args, task), verbose=False)
    carry = train.Carry(args, task, torch.Generator().manual_seed(0))
    x_prev = state_prev = None
    for step in range(12):
        x, y, state = (v.clone() if torch.is_tensor(v) else {k: t.clone() for k, t in v.items()}
                       for v in carry.next(model, step, "cpu"))
        assert x.shape == y.shape == (8, 6)
        if step:
            # rolling: slot i is replaced once its 4 segments are done, at steps where (i + step) % 4 == 0
            # (slot i started i % 4 segments in); fixed: all slots together, every 4th step
            slot = torch.arange(8)
            new = (slot + step) % 4 == 0 if batching == "rolling" else torch.full((8,), step % 4 == 0)
            assert torch.equal((x != x_prev).any(1), new), step
            fresh = model.init_state(x)
            for k in state:  # a new sample starts from the initial state; the others carry what they ended with
                assert torch.equal(state[k][new], fresh[k][new]) and torch.equal(state[k][~new], state_prev[k][~new])
        out = model(x, y, state=state)
        carry.advance(out["state"])
        x_prev, state_prev = x, {k: v.clone() for k, v in out["state"].items()}  # the carry writes into its own
    start = torch.arange(8) % 4 if batching == "rolling" else torch.zeros(8, dtype=torch.long)
    assert torch.equal(carry.age, (start + 11) % 4 + 1)  # segments run by each slot's sample after step 11


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()])
def test_a_save_failing_midway_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch,
                                                                                           failure):
    path = str(tmp_path / "ckpt.pt")
    data.save_atomic({"step": 1, "w": torch.arange(1000.0)}, path)
    real_save = torch.save

    def half_save(obj, f, *a, **kw):  # writes the first part of a real checkpoint, then the disk fills up
        real_save(obj, f, *a, **kw)
        f.truncate(100)
        raise failure
    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(type(failure)) as info:
        data.save_atomic({"step": 2, "w": torch.zeros(1000)}, path)
    if isinstance(failure, OSError):
        assert info.value.filename == path  # so main() can name the file in its one-line error
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.arange(1000.0))


def test_save_atomic_syncs_the_temporary_file_before_the_rename(tmp_path, monkeypatch):
    """save_atomic makes the new bytes durable (fsync of the temporary file) before os.replace makes them the file,
    so a crash of the machine right after the rename cannot leave an empty or partial ckpt.pt."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    path = str(tmp_path / "ckpt.pt")
    data.save_atomic({"step": 1}, path)
    assert events == ["fsync", ("replace", f"{path}.{os.getpid()}.tmp")]


def test_two_processes_writing_one_file_at_once_never_mix_their_bytes(tmp_path, monkeypatch):
    """Two runs filling one maze cache together: each writes its own temporary file, and the file is one whole copy."""
    path = str(tmp_path / "pool.npz")
    pids = itertools.count(101)  # each call a new process id: run A's, then run B's
    monkeypatch.setattr(os, "getpid", lambda: next(pids))

    def first_half_then_wait(text, f):  # run A is halfway through its write when run B writes the whole file
        f.write(text[:5])
        data.save_atomic(b"B's whole file", path, dump=lambda b, g: g.write(b))
        assert Path(path).read_bytes() == b"B's whole file"
        f.write(text[5:])
    data.save_atomic(b"A's whole file", path, dump=first_half_then_wait)
    monkeypatch.undo()
    assert Path(path).read_bytes() == b"A's whole file" and os.listdir(tmp_path) == ["pool.npz"]


def test_torchrun_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, one_thread):
    flags = dict(max_steps=8, eval_interval=4, batch_size=8)
    single = train.main(with_flags(tiny_run_args(tmp_path / "one", "sort6"), **flags))
    args = with_flags(tiny_run_args(tmp_path / "two", "sort6"), **flags)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), *args]
    r = subprocess.run(cmd, env=one_thread, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "two" / "run"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    one, two = (torch.load(p / "run" / "ckpt.pt", weights_only=True) for p in (tmp_path / "one", tmp_path / "two"))
    # each rank trained on its own half of the batch; DDP's averaged gradient is the full batch's
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-5, atol=1e-5)
    # a rank holds only its half of the batch in flight, so the two-process checkpoint saves none
    assert one["carry"] is not None and two["carry"] is None
    # only rank 0 logged: one test line, and the same records as the single process (none twice)
    assert r.stdout.count("test (") == 1 and "tau" in single
    logs = [log_without_timings(p) for p in (tmp_path / "one" / "run", run)]
    assert [(x["step"], x["split"]) for x in logs[0]] == [(x["step"], x["split"]) for x in logs[1]]
    # the two trained models give the same validation logits, to float tolerance; the logged tau is not compared:
    # it ranks nearly tied expected ranks of an untrained model, and a 1e-6 change in the weights can flip a pair
    task = data.make_task("sort6", n_val=64)
    x_val, _ = task.split("val")
    logits = []
    for ckpt in (one, two):
        model = PoHModel(ModelConfig(**ckpt["model_args"]), verbose=False).eval()
        model.load_state_dict(ckpt["model"])
        with torch.no_grad():
            logits.append(model(x_val, grid=task.grid)["logits"])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


NAN_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {repo!r})
import model, train
real_forward, calls = model.PoHModel.forward, []

def forward(self, x, y=None, **kw):  # training calls pass labels; on rank 1 only, the 7th loss is NaN
    out = real_forward(self, x, y, **kw)
    if y is not None and os.environ["RANK"] == "1":
        calls.append(1)
        if len(calls) == 7:
            out["loss"] = out["loss"] + float("nan")  # the loss only: the gradients stay finite
    return out

model.PoHModel.forward = forward
train.main(sys.argv[1:])
"""


def test_torchrun_nan_on_one_rank_stops_every_rank_at_the_same_step_with_one_line(tmp_path, one_thread):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1.format(repo=REPO))
    args = with_flags(tiny_run_args(tmp_path, "sort6"), max_steps=12, eval_interval=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    r = subprocess.run(cmd, env=one_thread, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    # both ranks stop cleanly at step 6 (rank 0 with a finite loss of its own), neither waits for the other
    # (counted, not split into lines: the two processes' stderr can interleave)
    assert r.stderr.count("error: non-finite loss or gradient at step 6 (") == 2, r.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 4


def test_bad_checkpoints_give_one_line_errors_and_are_left_as_they_were(tmp_path, one_thread):
    args = tiny_run_args(tmp_path, "sort6")
    train.main(args)
    run = tmp_path / "run"
    good, best = (run / "ckpt.pt").read_bytes(), (run / "best.pt").read_bytes()
    log = (run / "metrics.jsonl").read_text()
    torch.save({"weights": torch.zeros(3), "epoch": 7}, tmp_path / "foreign.pt")
    cases = [
        (np.random.default_rng(0).bytes(5000), [], "is not a readable checkpoint"),
        (good[:len(good) // 2], [], "is not a readable checkpoint"),  # cut short
        ((tmp_path / "foreign.pt").read_bytes(), [], "is not an hrm-poh checkpoint"),
        (best, [], "holds weights only"),
        (good, ["--d-model", "32"], "differs from the flags (saved, flags): {'d_model': (16, 32)}"),
        (good, ["--ema", "0.9"], "other data or batches than these flags ask for (saved, flags): {'ema': (0.0, 0.9)}"),
        (good, ["--seed", "7"], "(saved, flags): {'seed': (0, 7)}"),  # another data order
        (good, ["--batch-size", "8"], "(saved, flags): {'batch_size': (4, 8)}"),
        (good, ["--segments", "4"], "(saved, flags): {'segments': (2, 4)}"),
        (good, ["--n-val", "20"], "(saved, flags): {'n_val': (12, 20)}"),  # best.pt is picked on one validation set
        (good, ["--batching", "rolling"], "(saved, flags): {'batching': ('fixed', 'rolling')}"),
        (good, ["--data-seed", "1"], "(saved, flags): {'data_seed': (0, 1)}"),
        (good, ["--n-train", "80"], "(saved, flags): {'n_train': (60, 80)}"),
    ]
    for content, extra, message in cases:
        (run / "ckpt.pt").write_bytes(content)
        with pytest.raises(SystemExit) as exc:
            train.main(args + ["--resume"] + extra)
        text = str(exc.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, text
        # nothing was written: the file is left for the user to inspect, the other files are untouched
        assert (run / "ckpt.pt").read_bytes() == content and (run / "best.pt").read_bytes() == best
        assert (run / "metrics.jsonl").read_text() == log


@pytest.mark.parametrize("extra,flag,before,after", [(["--no-augment"], "no_augment", False, True),
                                                     (["--mazes", "loops"], "mazes", "gen_dfs", "loops")])
def test_resume_with_other_augmentation_or_maze_kinds_is_one_line(tmp_path, extra, flag, before, after):
    """--resume with another --no-augment or --mazes than the run had stops with one error line, files untouched."""
    args = tiny_run_args(tmp_path, "maze5")
    train.main(args)
    run = tmp_path / "run"
    saved = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(SystemExit) as exc:
        train.main(with_flags(args, max_steps=4) + extra + ["--resume"])
    text = str(exc.value.code)
    assert text.startswith("error: ") and f"{flag!r}: ({before!r}, {after!r})" in text and "\n" not in text
    assert {p.name: p.read_bytes() for p in run.iterdir()} == saved


def test_init_from_starts_from_the_trained_weights_with_a_fresh_schedule(tmp_path, one_thread):
    args = tiny_run_args(tmp_path, "sort6", "--ema", "0.9")
    train.main(args)
    trained = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]  # the EMA weights it scored
    source = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)  # one validation, at its last step
    assert all(torch.equal(trained[k], source["ema"][k]) for k in trained)
    assert any(not torch.equal(trained[k], source["model"][k]) for k in trained)  # the EMA, not the raw weights
    out = tmp_path / "tuned"
    # learning rate 0: the fine-tuned run's weights are exactly the source's EMA weights, and its step starts at 0
    tuned = args + ["--out-dir", str(out), "--init-from", str(tmp_path / "run"), "--lr", "0", "--seed", "5"]
    train.main(tuned)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2
    for name, value in trained.items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=0, atol=0)
    # a different model, or no checkpoint there, is one line
    for extra, message in [(["--d-model", "32"], "differs from the flags (saved, flags): {'d_model': (16, 32)}"),
                           (["--init-from", str(tmp_path / "nowhere")], "no checkpoint at")]:
        with pytest.raises(SystemExit) as exc:
            train.main(args + ["--out-dir", str(tmp_path / "other"), "--init-from", str(tmp_path / "run"), *extra])
        text = str(exc.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, text


def test_validation_scores_the_ema_weights(tmp_path, monkeypatch, one_thread):
    """With --ema, validation (which picks best.pt) scores the EMA copy, not the raw weights."""
    seen, real = [], train.evaluate
    def spy(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)
    monkeypatch.setattr(train, "evaluate", spy)
    train.main(tiny_run_args(tmp_path, "sort6", "--ema", "0.9"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)  # saved at step 2, after the validation
    assert all(torch.equal(seen[0][k], ckpt["ema"][k]) for k in ckpt["ema"])
    assert any(not torch.equal(seen[0][k], ckpt["model"][k]) for k in ckpt["model"])


def test_load_checkpoint_of_a_ckpt_with_ema_gives_the_ema_weights(tmp_path, one_thread):
    """load_checkpoint on a ckpt.pt that kept an EMA (evaluate.py / sample_maze.py on ckpt.pt) loads the EMA
    weights, the ones the run validates and keeps, not the raw weights."""
    train.main(tiny_run_args(tmp_path, "sort6", "--ema", "0.9"))
    model, ckpt = train.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["ema"].items())
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())


def test_the_ema_weights_move_a_tenth_of_the_way_to_the_model_at_each_step_with_ema_0_9(tmp_path, one_thread):
    """With --ema 0.9 one step gives ema' = ema + 0.1 (model' - ema)."""
    args = with_flags(tiny_run_args(tmp_path, "sort6", "--ema", "0.9"), segments=1, max_steps=1, eval_interval=1)
    train.main(args)
    a = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    train.main(with_flags(args, max_steps=2) + ["--resume"])
    b = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert (a["step"], b["step"]) == (1, 2)
    for k in a["ema"]:
        assert not torch.equal(b["model"][k], a["model"][k]) or not torch.is_floating_point(a["model"][k])
        torch.testing.assert_close(b["ema"][k], a["ema"][k] + 0.1 * (b["model"][k] - a["ema"][k]))


def test_init_from_may_change_the_inner_steps_and_add_or_drop_the_distance_head(tmp_path, one_thread, capsys):
    train.main(tiny_run_args(tmp_path, "maze5"))
    trained = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    tuned = tmp_path / "tuned"
    result = train.main(tiny_run_args(tmp_path, "maze5", "--out-dir", str(tuned), "--init-from", str(tmp_path / "run"),
                                      "--lr", "0", "--dist-weight", "0.3", "--R", "3", "--grad-steps", "2"))
    ckpt = torch.load(tuned / "ckpt.pt", weights_only=True)
    assert set(ckpt["model"]) == set(trained) | {"dist_head.weight", "dist_head.bias"}
    for name, value in trained.items():  # learning rate 0: the shared weights are the source's
        torch.testing.assert_close(ckpt["model"][name], value, rtol=0, atol=0)
    assert (ckpt["model_args"]["dist_weight"], ckpt["model_args"]["R"], ckpt["model_args"]["grad_steps"]) == (0.3, 3, 2)
    assert "optimal" in result
    logged = read_log(tuned)
    assert all(row["dist"] > 0 for row in logged if row["split"] == "train")
    # and back: a model with the head starts a run without it
    train.main(tiny_run_args(tmp_path, "maze5", "--out-dir", str(tmp_path / "back"), "--init-from", str(tuned)))
    assert "dist_head.weight" not in torch.load(tmp_path / "back" / "ckpt.pt", weights_only=True)["model"]
    # a head for another --dist-period starts fresh; everything else is copied
    train.main(tiny_run_args(tmp_path, "maze5", "--out-dir", str(tmp_path / "mod"), "--init-from", str(tuned),
                             "--lr", "0", "--dist-weight", "0.3", "--dist-period", "3"))
    modded = torch.load(tmp_path / "mod" / "ckpt.pt", weights_only=True)["model"]
    assert modded["dist_head.weight"].shape == (2, ckpt["model"]["dist_head.weight"].shape[1])
    torch.testing.assert_close(modded["head.weight"], ckpt["model"]["head.weight"], rtol=0, atol=0)
    # the carried batch computes each sample's target once, when it arrives, and keeps it with the sample
    args = train.resolve_args(tiny_run_args(tmp_path, "maze5", "--dist-weight", "0.3", "--batch-size", "6"))
    task = data.make_task("maze5", n_train=60, n_val=0, n_test=0, cache_dir=str(tmp_path / "cache"), progress=False)
    model, carry = PoHModel(train.model_config(args, task), verbose=False), train.Carry(args, task, torch.Generator())
    for step in range(5):
        x, _, state = carry.next(model, step, "cpu")
        assert torch.equal(carry.dist, data.goal_distance(x, (5, 5))), step
        carry.advance(state)
    with pytest.raises(SystemExit):
        train.main(tiny_run_args(tmp_path, "sort6", "--dist-weight", "0.3"))
    assert "--dist-weight is for mazes only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(tiny_run_args(tmp_path, "maze5", "--dist-period", "3"))
    assert "--dist-period needs --dist-weight" in capsys.readouterr().err


def test_flags_of_another_task_and_a_missing_init_from_stop_before_any_data(tmp_path, capsys):
    for argv, message in [(["--task", "sort12", "--attn", "open"], "--attn open is for mazes only"),
                          (["--task", "sort12", "--target", "path"], "--target is for mazes only"),
                          (["--task", "maze12", "--upos", "gold"], "--upos is for ud_ewt only")]:
        with pytest.raises(SystemExit):
            train.resolve_args(argv)
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exc:  # before the mazes are made, not minutes later
        train.resolve_args(["--task", "maze12", "--init-from", str(tmp_path / "nope")])
    assert str(exc.value.code) == f"error: --init-from: no checkpoint at {tmp_path / 'nope'}"


def test_a_carry_restored_mid_batch_gets_its_wave_mask_back(tmp_path):
    """A batch carried through ckpt.pt gets its wave mask back: resuming a maze run with --wave-speed (the maze12
    recipe) mid-batch must score the cells the original would."""
    args = train.resolve_args(tiny_run_args(tmp_path, "maze5", "--wave-speed", "1.5", "--batching", "fixed"))
    task = data.make_task("maze5", n_train=60, n_val=0, n_test=0, cache_dir=str(tmp_path / "cache"), progress=False)
    model = PoHModel(train.model_config(args, task), verbose=False)
    carry = train.Carry(args, task, torch.Generator().manual_seed(0))
    _, _, state = carry.next(model, 0, "cpu")
    carry.advance(state)  # one of the 2 segments run: the batch goes on after a resume
    again = train.Carry(args, task, torch.Generator())
    again.load_state_dict(copy.deepcopy(carry.state_dict()), "cpu")  # as through ckpt.pt: no shared tensors
    x, y, _ = again.next(model, 1, "cpu")
    assert torch.equal(x, carry.x) and torch.equal(again.reached(y), carry.reached(carry.y))


def test_wave_speed_scores_a_cell_only_once_an_answer_from_the_goal_can_have_reached_it(tmp_path, one_thread,
                                                                                        capsys):
    args = train.resolve_args(tiny_run_args(tmp_path, "maze5", "--wave-speed", "1.5", "--batch-size", "6",
                                            "--segments", "3", "--batching", "rolling"))
    task = data.make_task("maze5", n_train=60, n_val=0, n_test=0, cache_dir=str(tmp_path / "cache"), progress=False)
    model, carry = PoHModel(train.model_config(args, task), verbose=False), train.Carry(args, task, torch.Generator())
    for step in range(4):
        x, y, state = carry.next(model, step, "cpu")
        dist, reach = data.goal_distance(x, (5, 5)), 1.5 * 2 * (carry.age + 1)  # R = 2 inner steps per segment
        masked = carry.reached(y)
        far = dist > reach[:, None]
        assert far.any() and (~far & (y != data.IGNORE)).any(), step  # both kinds occur: the test can fail
        assert (masked[far] == data.IGNORE).all() and torch.equal(masked[~far], y[~far]), step
        assert torch.equal(carry.y, y)  # the carried labels themselves stay whole
        carry.advance(state)
    # off (0): the labels as they are; and the flag trains end to end
    plain = train.Carry(train.resolve_args(tiny_run_args(tmp_path, "maze5", "--wave-speed", "0")), task,
                        torch.Generator())
    x, y, _ = plain.next(model, 0, "cpu")
    assert plain.reached(y) is y
    assert "optimal" in train.main(tiny_run_args(tmp_path, "maze5", "--wave-speed", "2"))
    # the recipes: on for every mazeN (speed 2: two blocks per inner step), off for the first run and other tasks
    assert [train.resolve_args(["--task", t]).wave_speed for t in ("maze12", "maze24", "maze8", "sort12")] == \
        [2.0, 2.0, 0.0, 0.0]
    with pytest.raises(SystemExit):
        train.main(tiny_run_args(tmp_path, "sort6", "--wave-speed", "2"))
    assert "--wave-speed is for mazes only" in capsys.readouterr().err


@pytest.mark.parametrize("what,poison", [
    ("loss", lambda loss: loss + float("nan")),
    ("gradient", lambda loss: loss + torch.sqrt(loss * 0)),  # value unchanged; d sqrt(u)/du at 0 is inf, times 0
])
def test_non_finite_loss_or_gradient_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                           one_thread, what, poison):
    real_forward, calls = PoHModel.forward, []

    def forward(self, x, y=None, **kw):
        out = real_forward(self, x, y, **kw)
        if y is not None:  # a training call: the 7th optimizer step goes bad
            calls.append(1)
            if len(calls) == 7:
                out["loss"] = poison(out["loss"])
                assert torch.isfinite(out["loss"]) == (what == "gradient")
        return out
    monkeypatch.setattr(PoHModel, "forward", forward)
    with pytest.raises(SystemExit) as exc:
        train.main(with_flags(tiny_run_args(tmp_path, "sort6"), max_steps=12, eval_interval=4))
    text = str(exc.value.code)
    assert text.startswith("error: non-finite loss or gradient at step 6") and "\n" not in text
    assert f"the last good checkpoint is {tmp_path / 'run' / 'ckpt.pt'}" in text
    monkeypatch.undo()
    model, ckpt = train.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["step"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())
    best_model, _ = train.load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert all(torch.isfinite(p).all() for p in best_model.parameters())


def test_disk_full_or_unwritable_output_gives_one_line_and_keeps_what_was_saved(tmp_path, monkeypatch, one_thread):
    run, real_save, calls, saved = tmp_path / "run", torch.save, [], {}

    def save(obj, f, *a, **kw):  # the first two saves (best.pt, ckpt.pt at step 4) work, then the disk is full
        calls.append(f.name)
        if len(calls) <= 2:
            return real_save(obj, f, *a, **kw)
        saved.update({p.name: p.read_bytes() for p in run.glob("*.pt")})
        f.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as exc:
        train.main(with_flags(tiny_run_args(tmp_path, "sort6"), max_steps=8, eval_interval=4))
    text = str(exc.value.code)
    assert text.startswith(f"error: could not read or write {run}") and text.endswith("No space left on device")
    assert "\n" not in text
    monkeypatch.undo()
    assert sorted(p.name for p in run.glob("*.pt*")) == ["best.pt", "ckpt.pt"]  # no temporary file left
    for name in ("best.pt", "ckpt.pt"):
        assert (run / name).read_bytes() == saved[name]
        assert train.load_checkpoint(str(run / name))[1]["step"] == 4
    # an output folder that cannot be made (its parent is a file)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_run_args(tmp_path, "sort6", "--out-dir", str(tmp_path / "a_file" / "run")))
    text = str(exc.value.code)
    assert text.startswith("error: could not read or write") and "a_file" in text and "\n" not in text


def test_same_seed_gives_identical_weights_and_metrics_another_seed_differs(tmp_path, one_thread):
    results, ckpts = {}, {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        args = with_flags(tiny_run_args(tmp_path / name, "maze5", "--seed", str(seed)), max_steps=6, eval_interval=2,
                          data_dir=tmp_path / "cache")  # one maze cache for all three
        results[name] = train.main(args)
        ckpts[name] = torch.load(tmp_path / name / "run" / "ckpt.pt", weights_only=True)
    assert results["a"] == results["b"]
    assert same_tensors(ckpts["a"]["model"], ckpts["b"]["model"])
    assert same_tensors(ckpts["a"]["optimizer"], ckpts["b"]["optimizer"])
    assert log_without_timings(tmp_path / "a" / "run") == log_without_timings(tmp_path / "b" / "run")
    # another seed: another init and data order, on the same data (the maze pools follow --data-seed)
    assert not same_tensors(ckpts["a"]["model"], ckpts["c"]["model"])
    losses = lambda name: [r["loss"] for r in log_without_timings(tmp_path / name / "run") if r["split"] == "train"]
    assert all(u != v for u, v in zip(losses("a"), losses("c")))


# ---- routing: diversity, load balancing, ablations, the temperature a run is scored at

def recipe_model_and_batch(task_name, seed):
    """The default recipe's model for task_name at initialisation (as train.py builds it) and 64 real inputs."""
    args = train.resolve_args(["--task", task_name, "--seed", str(seed)])
    if task_name.startswith("maze"):
        pool = data.generate_mazes(12, 64, 123)
        x, grid = torch.from_numpy(data.encode(pool["open"], pool["start"], pool["goal"]).reshape(64, -1)), (12, 12)
        task = type("Maze", (), {"vocab_size": 48, "n_classes": 5})
    else:
        task = data.make_task(task_name, n_val=64, n_test=4)
        x, grid = task.split("val")[0], task.grid
    torch.manual_seed(seed)
    return PoHModel(train.model_config(args, task), verbose=False).eval(), x, grid, args


@pytest.mark.parametrize("task_name", ["maze12", "sort12"])
def test_routing_at_initialisation_is_per_token_not_one_head_set(task_name):
    # before the GRU biases were zeroed, every token kept the same heads at most steps (modal share 0.95-1.0) and
    # one head was kept by no token at all; with zero biases alone one maze seed in five and every sort12 seed still
    # missed (sort12: the six identical hidden-value tokens shared one set). With the position code every seed
    # meets the issue's thresholds at every inner step: the most common set <= 0.5 of tokens, every head >= 0.15
    for seed in range(5):
        model, x, grid, args = recipe_model_and_batch(task_name, seed)
        with torch.no_grad():
            parts = model(x, grid=grid, temperature=args.temp_start)["parts"]
        assert parts["usage"].shape == (args.R, args.n_heads)
        torch.testing.assert_close(parts["usage"].sum(1), torch.full((args.R,), float(args.top_k)))  # k kept each
        assert parts["modal_share"].max() <= 0.5 and parts["usage"].min() >= 0.15, (seed, parts["modal_share"],
                                                                                  parts["usage"])


def test_position_code_is_the_centred_cos_and_sin_of_row_and_column_phases():
    """position_code by hand: [cos, sin] of 2 pi row / P and 2 pi col / P for each period P, minus the grid mean; so
    columns c and P - c (mirror images) get different codes."""
    grid = (3, 5)
    rows, cols = grid_coords(grid)
    periods = torch.tensor(POSITION_PERIODS, dtype=torch.float32)
    ang = torch.cat([rows[:, None] / periods, cols[:, None] / periods], 1) * 2 * math.pi
    want = torch.cat([ang.cos(), ang.sin()], 1)
    torch.testing.assert_close(position_code(grid), want - want.mean(0))
    row0 = position_code((1, 5))
    assert not torch.allclose(row0[1], row0[4], atol=1e-3)  # columns 1 and 4 differ (period 5: sin tells them apart)


def test_position_code_is_centred_periodic_and_old_checkpoints_load_without_it(tmp_path):
    code = position_code((6, 10))
    assert code.shape == (60, 4 * len(POSITION_PERIODS))
    torch.testing.assert_close(code.mean(0), torch.zeros(code.shape[1]), atol=1e-6, rtol=0)
    assert torch.allclose(position_code((1, 12))[:, :len(POSITION_PERIODS)], torch.zeros(12, len(POSITION_PERIODS)))
    # rows 0 and 60 (the longest period product) of a tall grid get the same code before centring
    tall = position_code((61, 1))
    torch.testing.assert_close(tall[0], tall[60])
    # the code changes the routing of identical tokens: same token everywhere, different heads by position
    m = tiny_maze_model("hrm", R=2, T=1)
    torch.nn.init.normal_(m.controller.where.weight, std=1.0)
    alpha = m(torch.full((1, 16), 3), grid=(4, 4), trace=True)["trace"][0]["alpha"]
    assert len(set(map(tuple, (alpha[0] > 0).tolist()))) > 1
    # a checkpoint saved before the code existed has no ctrl_where in its config and no where weight: it loads
    m_old = PoHModel(ModelConfig(vocab_size=48, n_classes=5, d_model=32, n_heads=4, ctrl_where=False), verbose=False)
    args = {k: v for k, v in asdict(m_old.cfg).items() if k != "ctrl_where"}
    torch.save({"model": m_old.state_dict(), "model_args": args}, tmp_path / "old.pt")
    loaded, _ = train.load_checkpoint(str(tmp_path / "old.pt"))
    assert loaded.controller.where is None


def test_the_routing_terms_over_real_tokens_equal_the_terms_of_the_real_tokens_alone():
    """routing_entropy and balance_loss with a real-token mask (padding weighted 0, as model.py passes it for
    parsing) equal the terms computed on the real tokens picked out, and differ from the terms over every token."""
    g = torch.Generator().manual_seed(0)
    alpha, p = route(torch.randn(2, 5, 4, generator=g), 1.0, 2, hard=False)
    real = torch.tensor([[True] * 5, [True, True, False, False, False]])
    torch.testing.assert_close(routing_entropy(p, real), routing_entropy(p[real]))
    torch.testing.assert_close(balance_loss(alpha, p, real), balance_loss(alpha[real], p[real]))
    assert not torch.allclose(routing_entropy(p, real), routing_entropy(p), atol=1e-4)
    assert not torch.allclose(balance_loss(alpha, p, real), balance_loss(alpha, p), atol=1e-4)


def test_balance_loss_counts_kept_slots_not_alpha_weights():
    """f_h is the share of kept (token, head) slots; with soft top-2 the kept heads' alpha differ, so weighting by
    alpha would give another value."""
    alpha, p = route(torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(0)), 1.0, 2, hard=False)
    keep = (alpha > 0).float().reshape(-1, 4)
    f = keep.sum(0) / keep.sum()
    torch.testing.assert_close(balance_loss(alpha, p), 4 * (f * p.reshape(-1, 4).mean(0)).sum())


def test_balance_loss_is_one_when_even_larger_when_collapsed_and_its_gradient_reaches_the_router():
    even_p = torch.full((2, 6, 4), 0.25)
    spread = torch.zeros(2, 6, 4)
    for i in range(6):  # 12 tokens, each pair of heads kept equally often
        spread[:, i, [i % 4, (i + 1) % 4]] = 0.5
    assert float(balance_loss(spread, even_p)) == pytest.approx(1.0)
    collapsed, p = torch.zeros(2, 6, 4), torch.tensor([0.4, 0.4, 0.1, 0.1]).expand(2, 6, 4)
    collapsed[..., :2] = 0.5
    assert float(balance_loss(collapsed, p)) == pytest.approx(4 * (0.5 * 0.4 + 0.5 * 0.4))
    # through the real model: the term alone moves the router, the fast and the slow GRU
    m = tiny_maze_model("hrm", R=4, T=2)
    x = torch.randint(0, 48, (3, 16), generator=torch.Generator().manual_seed(1))
    out = m(x, torch.zeros(3, 16, dtype=torch.long), grid=(4, 4), balance_weight=1.0)
    assert torch.isfinite(out["parts"]["balance"]) and out["parts"]["balance"] > 0
    out["parts"]["balance"].backward()
    for name in ("router.weight", "f_L.weight_ih", "f_H.weight_ih"):
        grad = dict(m.controller.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # and it is part of the loss with its weight
    m.zero_grad()
    y = torch.randint(0, 5, (3, 16), generator=torch.Generator().manual_seed(2))
    a, b = (m(x, y, grid=(4, 4), balance_weight=w) for w in (0.0, 0.5))
    torch.testing.assert_close(b["loss"] - a["loss"], 0.5 * b["parts"]["balance"])


def test_ablations_replace_alpha_as_named_and_shuffle_permutes_it_across_tokens():
    from hrm_controller import ablate_alpha
    m = tiny_maze_model("hrm", R=3, T=2)
    x = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = m(x, grid=(4, 4), trace=True)["trace"][0]["alpha"]
        shuffled = m(x, grid=(4, 4), trace=True, ablate="shuffle", ablate_gen=torch.Generator().manual_seed(0))
    got = shuffled["trace"][0]["alpha"]  # step 0 sees the same state, so only the shuffle differs
    # the same draws as ablate_alpha's: token i of sample b gets the whole weight vector of token perm[b, i]
    perm = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)).argsort(1)
    for b in range(4):
        assert torch.equal(got[b], plain[b][perm[b]])
    assert (perm != torch.arange(16)).any(1).all() and not torch.equal(got, plain)
    uniform = ablate_alpha(plain, "uniform")
    assert torch.equal(uniform, torch.full_like(plain, 0.25))
    with torch.no_grad():  # at every inner step of the model, not only the first
        steps = m(x, grid=(4, 4), trace=True, ablate="uniform")["trace"]
    assert len(steps) == 3 and all(torch.equal(s["alpha"], torch.full_like(plain, 0.25)) for s in steps)
    fixed = ablate_alpha(plain, "fixed")
    kept = (fixed > 0)[0, 0]
    assert kept.sum() == m.cfg.top_k and torch.equal(fixed > 0, kept.expand_as(fixed))
    # the most common kept set, by hand: heads {1, 3} for 10 tokens, {0, 1} for 6, {2, 3} for 4 -> {1, 3}
    sets = [[0, 0.7, 0, 0.3]] * 10 + [[0.6, 0.4, 0, 0]] * 6 + [[0, 0, 0.5, 0.5]] * 4
    chosen = ablate_alpha(torch.tensor(sets).view(2, 10, 4), "fixed")
    assert torch.equal(chosen, torch.tensor([0.0, 0.5, 0.0, 0.5]).expand(2, 10, 4))
    with pytest.raises(ValueError, match="ablation must be one of"):
        ablate_alpha(plain, "zero")


def test_fixed_controller_keeps_the_same_top_k_heads_for_every_token_with_no_controller_parameters():
    fixed, none = tiny_maze_model("fixed", R=2, top_k=2), tiny_maze_model("none", R=2)
    assert fixed.controller is None and fixed.num_params() == none.num_params()
    x = torch.randint(0, 48, (2, 16), generator=torch.Generator().manual_seed(4))
    alpha = fixed(x, grid=(4, 4), trace=True)["trace"][1]["alpha"]
    assert torch.equal(alpha, torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(2, 16, 4))


def test_a_budgeted_run_is_validated_and_tested_at_the_temperature_it_trained_at(tmp_path):
    # --max-steps 200 anneals 2.0 -> 1.0, but the budget stops the run after its first 2 steps: it trained at ~2.0
    args = with_flags(tiny_run_args(tmp_path, "maze5", "--top-k", "1"), max_steps=200, time_budget=1e-9)
    result = train.main(args)
    run = tmp_path / "run"
    expected = temperature_at(2 / 200, 2.0, 1.0)
    assert result["step"] == 2 and result["temperature"] == pytest.approx(expected) and expected > 1.98
    assert json.loads((run / "test.json").read_text())["temperature"] == pytest.approx(expected)
    val = [r for r in read_log(run) if r["split"] == "val"]
    assert val[-1]["temperature"] == pytest.approx(expected)
    # routing is logged at every evaluation: per inner step, the share of tokens keeping each head (top-1 of 2)
    routing = val[-1]["routing"]
    assert len(routing["usage"]) == 2 and all(sum(u) == pytest.approx(1.0) for u in routing["usage"])
    assert len(routing["modal_share"]) == 2 and 0 < val[-1]["modal_max"] <= 1 and 0 <= val[-1]["head_min"] <= 1
    # evaluate.py scores the checkpoint at that temperature too, and can ablate its routing
    assert evaluate.main([str(run), "--n-test", "12"])["temperature"] == pytest.approx(expected)
    ablated = evaluate.main([str(run), "--n-test", "12", "--ablate-routing", "uniform"])
    assert ablated["ablate"] == "uniform" and ablated["head_min"] == 1.0  # every head kept by every token


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2), (1, 7)])
@pytest.mark.parametrize("attn", ["local", "open"])
def test_gathered_neighbour_attention_equals_the_dense_masked_path_in_values_and_gradients(grid, attn):
    torch.manual_seed(0)
    N = grid[0] * grid[1]
    x = torch.randint(0, 48, (3, N), generator=torch.Generator().manual_seed(5))
    outs, grads = [], []
    for impl in ("dense", "gather"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=48, n_classes=5, d_model=16, n_heads=2, n_layers=2, d_ctrl=8, R=3, attn=attn,
                          attn_impl=impl, controller="hrm")
        m = PoHModel(cfg, verbose=False)
        y = torch.randint(0, 5, (3, N), generator=torch.Generator().manual_seed(6))
        out = m(x, y, grid=grid)
        out["loss"].backward()
        outs.append(out["logits"])
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["open-gather", "open-dense", "local-gather"])
def test_far_heads_attend_globally_and_the_near_heads_as_before(mask_kind):
    # one attention module, 4 heads, the last 2 far: with alpha on one head only the output is that head's, so a
    # near head must equal the same weights under the restricted mask, a far head the same weights unrestricted
    attn, impl = mask_kind.split("-")
    grid, B = (4, 5), 2
    x = torch.randn(B, 20, 16, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 48, (B, 20), generator=torch.Generator().manual_seed(1))
    m = PoHModel(ModelConfig(vocab_size=48, n_classes=5, d_model=16, n_heads=4, attn=attn, attn_impl=impl), verbose=False)
    mask = m.attention_mask(tokens, grid)
    split, plain = PoHAttention(BlockConfig(16, 4, far_heads=2)), PoHAttention(BlockConfig(16, 4))
    plain.load_state_dict(split.state_dict())
    for head, plain_mask in ((0, mask), (1, mask), (2, None), (3, None)):
        alpha = F.one_hot(torch.tensor(head), 4).float().expand(B, 20, 4)
        torch.testing.assert_close(split(x, alpha, None, mask), plain(x, alpha, None, plain_mask), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="far-heads"):
        ModelConfig(vocab_size=48, n_classes=5, n_heads=4, attn="global", far_heads=1).validate()
    with pytest.raises(ValueError, match="far-heads"):
        ModelConfig(vocab_size=48, n_classes=5, n_heads=4, attn="open", far_heads=5).validate()


def test_default_maze_model_forward_and_backward_on_maze64_batch_8_fits_in_2_gib():
    # in a fresh process, so the peak resident memory is this model's alone
    code = ("import resource, torch, train; from model import PoHModel\n"
            "args = train.resolve_args(['--task', 'maze64'])\n"
            "task = type('T', (), {'vocab_size': 48, 'n_classes': 5})\n"
            "m = PoHModel(train.model_config(args, task), verbose=False)\n"
            "x = torch.randint(0, 48, (8, 64 * 64)); y = torch.randint(0, 5, (8, 64 * 64))\n"
            "m(x, y, grid=(64, 64))['loss'].backward()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    peak = int(r.stdout.split()[-1])
    assert peak < 2 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"


def test_the_project_modules_import_each_other_without_a_circle():
    # every import of a project module, at the top or inside a function, read with ast: an edge of the graph
    import ast
    mods = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py") and f != "test_all.py"}
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(REPO, m + ".py")).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = {name.split(".")[0] for name in names} & mods - {m}
    assert graph["plots"] == {"stats"} and "plots" in graph["train"]  # the circle ab -> plots -> ab is gone

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(c, b, seen + (a,)) for c in graph[a] if c not in seen)
    assert [m for m in sorted(mods) if reaches(m, m)] == []


@pytest.mark.parametrize("generator, kwargs", [("gen_dfs", None), ("gen_dfs_percolation", {"p": 0.3})])
def test_the_labelled_path_read_off_direction_labels_is_the_solved_shortest_path(generator, kwargs):
    # with loops (percolation) several moves can be equally short: both pick the lowest direction index
    pool = data.generate_mazes(7, 30, 11, generator=generator, gen_kwargs=kwargs)
    y = data.batch_labels(pool["open"], pool["start"], pool["dist"].astype(np.int64))
    for b in range(30):
        best = data.solve(pool["open"][b], tuple(pool["start"][b]), tuple(pool["goal"][b]))[1]
        path, unique = data.labelled_path(y[b], tuple(pool["start"][b]), 7)
        assert path == best and (unique or generator != "gen_dfs")  # trees have one shortest path


@pytest.mark.parametrize("generator, kwargs", [("gen_dfs", None), ("gen_dfs_percolation", {"p": 0.3})])
def test_goal_distance_from_the_tokens_is_the_bfs_distance_of_solve(generator, kwargs):
    # --dist-weight's target, computed in torch from the tokens alone, on mazes with and without loops, turned
    pool = data.generate_mazes(7, 16, 5, generator=generator, gen_kwargs=kwargs)
    o, s, g = data.symmetry(pool["open"], pool["start"], pool["goal"], 3)
    x = torch.from_numpy(data.encode(o, s, g))
    want = np.stack([data.solve(o[b], tuple(s[b]), tuple(g[b]))[0].reshape(-1) for b in range(16)])
    assert np.array_equal(data.goal_distance(x, (7, 7)).numpy(), want)
    # a 2 x 3 grid (not square) with a cell the goal cannot reach: goal (0, 2), corridor west, down, east
    N, E, S, W = (1 << d for d in range(4))
    sides = [[E | S, E | W, W], [N | E, W, 0]]
    role = [[0, 0, 2], [0, 1, 0]]
    x = torch.tensor([[b + 16 * r for rb, rr in zip(sides, role) for b, r in zip(rb, rr)]])
    assert data.goal_distance(x, (2, 3)).tolist() == [[2.0, 1.0, 0.0, 3.0, 4.0, -1.0]]


def test_the_distance_head_reads_the_normalised_state_the_answer_reads():
    """parts["dist"] is distance_loss of dist_head(norm_out(h)) on the last step's state h, the same read as the
    answer's head (and as the front head's)."""
    m = tiny_maze_model("hrm", R=2, dist_weight=0.5, label_sets=True)
    with torch.no_grad():  # a non-trivial LayerNorm, so norm_out(h) and h differ a lot
        m.norm_out.weight.uniform_(0.5, 2.0)
        m.norm_out.bias.uniform_(-1.0, 1.0)
    pool = data.generate_mazes(5, 4, 3)
    x = torch.from_numpy(data.encode(pool["open"], pool["start"], pool["goal"]))
    y = torch.from_numpy(data.batch_labels(pool["open"], pool["start"], pool["dist"].astype(np.int64)))
    dist = data.goal_distance(x, (5, 5))
    out = m(x, y, grid=(5, 5), dist=dist)
    with torch.no_grad():
        pred = m.dist_head(m.norm_out(out["state"]["h"])).squeeze(-1)
    torch.testing.assert_close(out["parts"]["dist"].detach(), model_mod.distance_loss(pred, dist))


def test_the_distance_head_trains_on_its_own_loss_and_leaves_the_answer_alone():
    # dist_weight 0 builds no head; > 0 adds dist_weight x a Huber loss that is 0 at the truth, skips unreachable
    # cells, and whose gradient reaches the head and the blocks but never changes the answer's logits
    assert tiny_maze_model("hrm", R=2).dist_head is None
    pred, dist = torch.tensor([[0.3, 0.2, 9.0]]), torch.tensor([[3.0, 2.0, -1.0]])
    assert float(model_mod.distance_loss(pred, dist)) == pytest.approx(0.0, abs=1e-7)
    assert float(model_mod.distance_loss(pred + 0.5, dist)) == pytest.approx(0.5 - 0.05, rel=1e-5)  # linear part
    m = tiny_maze_model("hrm", R=2, dist_weight=0.5, label_sets=True)
    pool = data.generate_mazes(5, 4, 3, generator="gen_dfs_percolation", gen_kwargs={"p": 0.3})
    x = torch.from_numpy(data.encode(pool["open"], pool["start"], pool["goal"]))
    y = torch.from_numpy(data.batch_labels(pool["open"], pool["start"], pool["dist"].astype(np.int64)))
    dist = data.goal_distance(x, (5, 5))
    plain = m(x, y, grid=(5, 5))
    out = m(x, y, grid=(5, 5), dist=dist)
    torch.testing.assert_close(out["logits"], plain["logits"], rtol=0, atol=0)
    assert float(out["parts"]["dist"].detach()) > 0 and "dist" not in plain["parts"]
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.5 * out["parts"]["dist"])
    out["parts"]["dist"].backward()
    assert m.dist_head.weight.grad.abs().sum() > 0 and m.blocks[0].mlp[0].weight.grad.abs().sum() > 0
    assert m.head.weight.grad is None or m.head.weight.grad.abs().sum() == 0


def test_the_periodic_distance_target_is_a_phase_that_turns_once_every_period():
    # dist_period P: the head reads (cos, sin) of 2 pi d / P, a squared error, unreachable cells skipped; so cells P
    # moves apart share a target, and the target of a neighbour one move closer is 1/P of a turn behind
    dist = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, -1.0]])
    turn = torch.tensor([[0.0, 1.0, 2.0, 0.0, 1.0, 0.0]]) * (2 * math.pi / 3)
    right = torch.stack([turn.cos(), turn.sin()], -1)
    right[0, 5] = 7.0  # an unreachable cell: anything goes
    assert float(model_mod.distance_loss(right, dist, period=3)) == pytest.approx(0.0, abs=1e-6)
    opposite = -right  # every hand half a turn off: a squared distance of 4 per cell
    opposite[0, 5] = 7.0
    assert float(model_mod.distance_loss(opposite, dist, period=3)) == pytest.approx(4.0, rel=1e-5)
    m = tiny_maze_model("hrm", R=2, dist_weight=0.5, dist_period=3, label_sets=True)
    assert m.dist_head.out_features == 2
    pool = data.generate_mazes(5, 4, 3, generator="gen_dfs_percolation", gen_kwargs={"p": 0.3})
    x = torch.from_numpy(data.encode(pool["open"], pool["start"], pool["goal"]))
    y = torch.from_numpy(data.batch_labels(pool["open"], pool["start"], pool["dist"].astype(np.int64)))
    out = m(x, y, grid=(5, 5), dist=data.goal_distance(x, (5, 5)))
    assert 0.5 < float(out["parts"]["dist"].detach()) < 2.0  # about 1 (the target's squared length) from a fresh head
    out["parts"]["dist"].backward()
    assert m.dist_head.weight.grad.abs().sum() > 0 and m.blocks[0].mlp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dist-period"):
        tiny_maze_model("hrm", R=2, dist_weight=0.5, dist_period=2)
    with pytest.raises(ValueError, match="front-weight needs supervise last"):  # its target is the segment's end
        tiny_maze_model("hrm", R=2, front_weight=0.1, supervise="all")
    with pytest.raises(ValueError, match="front-weight must be >= 0"):
        tiny_maze_model("hrm", R=2, front_weight=-0.1)


def test_a_users_own_mazes_are_encoded_and_scored_per_item_through_the_public_api(tmp_path):
    # mazes from elsewhere (here another generator, with loops) go through MazeTask.encode_pool and train.evaluate
    # with per_item=True: no private pieces, no monkey-patching
    task = data.make_task("maze5", n_train=40, n_val=8, n_test=8, cache_dir=str(tmp_path), progress=False)
    pool = data.generate_mazes(5, 6, 7, generator="gen_dfs_percolation", gen_kwargs={"p": 0.3})
    assert (pool["open"].sum((1, 2, 3)) / 2 > 5 * 5 - 1).any()  # more passages than a tree has: loops
    x, y = task.encode_pool(pool)
    assert x.shape == y.shape == (6, 25)
    model = tiny_maze_model("hrm", R=2)
    scored = train.evaluate(model, task, x, y, segments=2, per_item=True)
    items = scored["items"]
    assert set(items) == {"reach", "optimal", "exact", "cell_acc", "unique"} and all(len(v) == 6 for v in items.values())
    for k, v in items.items():  # the per-item values average to the reported means (exact: where it is defined)
        assert stats.nan_mean(v) == pytest.approx(scored["per_segment"][-1][k], nan_ok=True)
    with pytest.raises(ValueError, match="no generator 'gen_nothing'"):
        data.generate_mazes(5, 2, 0, generator="gen_nothing")
    assert data.pool_file(5, 6, 7, "gen_dfs_percolation", {"p": 0.3}) != data.pool_file(5, 6, 7)


def test_every_command_in_the_readme_names_flags_that_its_script_has(capsys):
    text = open(os.path.join(REPO, "README.md")).read()
    tools = {"train.py": train, "evaluate.py": evaluate, "sample_maze.py": sample_maze, "ab.py": ab,
             "bench.py": bench, "plots.py": plots, "probes.py": probes}
    helps = {}
    for name, module in tools.items():
        with pytest.raises(SystemExit):
            module.main(["--help"])
        helps[name] = capsys.readouterr().out
    checked = 0
    for line in text.splitlines():
        for m in re.finditer(r"python (\w+\.py)([^`|#]*)", line):
            script, rest = m.group(1), m.group(2)
            if script not in tools:
                continue
            own, _, passed = rest.partition(" -- ")  # ab.py hands the flags after -- to train.py
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", own):
                assert re.search(rf"{flag}\b", helps[script]), f"README: {script} has no {flag}: {line.strip()}"
                checked += 1
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", passed):
                assert re.search(rf"{flag}\b", helps["train.py"]), f"README: train.py has no {flag}: {line.strip()}"
                checked += 1
    assert checked > 20  # the README really was read


class StableOrRestless(nn.Module):
    """A stand-in model for --segments auto: an item of 0 tokens always answers class 1; an item of 1 tokens answers
    its segment count mod 5 (carried in its state), so its answer changes every segment. It records batch sizes."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x, state=None, **kw):
        self.batch_sizes.append(len(x))
        count = torch.zeros(len(x), dtype=torch.long) if state is None else state["count"] + 1
        answer = torch.where(x[:, 0] == 1, count % 5, torch.ones_like(count))
        logits = F.one_hot(answer, 5).float()[:, None, :].expand(-1, x.shape[1], -1).clone()
        return {"logits": logits, "state": {"count": count}, "trace": [{"logits": logits}]}


class ChangesOnce(nn.Module):
    """Answers class 1 in segments 1-2 and class 2 from segment 3 on."""

    def forward(self, x, state=None, **kw):
        count = torch.zeros(len(x), dtype=torch.long) if state is None else state["count"] + 1
        answer = torch.where(count < 2, 1, 2)
        return {"logits": F.one_hot(answer, 5).float()[:, None].expand(-1, x.shape[1], -1).clone(),
                "state": {"count": count}}


def test_segments_auto_counts_unchanged_segments_in_a_row():
    """A change of answer restarts the count of unchanged segments: answers 1, 1, 2, 2, 2 stop at segment 5 with
    patience 2, not at 4."""
    task = type("T", (), {"grid": (1, 3)})
    _, used = evaluate.run_adaptive(ChangesOnce(), task, torch.zeros(1, 3, dtype=torch.long), n_steps=1,
                                    temperature=1.0, cap=10, patience=2)
    assert used.tolist() == [5]  # answer 2 first at segment 3, unchanged at 4 and 5


def test_segments_auto_stops_a_stable_answer_and_runs_a_changing_one_to_the_cap(maze_run, capsys):
    task = type("T", (), {"grid": (3, 3)})
    model, x = StableOrRestless(), torch.tensor([[0] * 9, [1] * 9, [0] * 9])
    logits, used = evaluate.run_adaptive(model, task, x, n_steps=1, temperature=1.0, cap=10, patience=2)
    # the stable items: the same answer at segments 1, 2, 3, i.e. unchanged for 2 segments -> stop after 3
    assert used.tolist() == [3, 10, 3]
    assert (logits[0].argmax(-1) == 1).all() and (logits[1].argmax(-1) == 9 % 5).all()  # answers where they stopped
    assert model.batch_sizes == [3, 3, 3] + [1] * 7  # stopped items leave the batch
    # the progress bar counts stopped items and changes nothing
    again = evaluate.run_adaptive(StableOrRestless(), task, x, n_steps=1, temperature=1.0, cap=10, patience=2,
                                  progress=True)
    assert torch.equal(again[0], logits) and torch.equal(again[1], used)
    assert "items stopped" in (err := capsys.readouterr().err) and "3/3" in err
    assert evaluate.segment_cap((12, 12), 2, 8) == 18 and evaluate.segment_cap((3, 3), 2, 8) == 8
    # through the command line, on a real (tiny) run: segments used are reported and within the cap
    result = evaluate.main([str(maze_run), "--segments", "auto", "--n-test", "12"])
    assert result["segments"] == "auto" and 1 <= result["segments_used"] <= result["segments_max"] <= result["segment_cap"]
    assert len(result["segments_per_item"]) == result["n_test"] and 0 <= result["optimal"] <= 1
    assert "segments used: mean" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--segments must be >= 1 or auto"):
        evaluate.main([str(maze_run), "--segments", "many"])


def test_symmetric_views_move_tokens_and_answers_both_ways(maze8):
    x, y = maze8.split("val")
    multi_hot = lambda labels: ((labels.clamp(min=0)[..., None] >> torch.arange(5)) & 1).float()
    for k in range(8):
        o, s, g = data.symmetry(maze8.pools["val"]["open"], maze8.pools["val"]["start"], maze8.pools["val"]["goal"], k)
        seen = data.symmetric_tokens(x, 8, k)
        assert torch.equal(seen, torch.from_numpy(data.encode(o, s, g)))
        # the right moves of the maze seen under k, mapped back, are the right moves of the maze as given
        y_seen = torch.from_numpy(np.stack([data.labels(*m) for m in zip(o, map(tuple, s), map(tuple, g))]))
        assert torch.equal(data.from_symmetric(multi_hot(y_seen), 8, k), multi_hot(y))
        # on-path scores (two classes) move with their cells only
        on_path = lambda mazes: (torch.from_numpy(np.stack([data.labels(*m, target="path") for m in mazes]))[..., None]
                                 >> torch.arange(2) & 1)
        seen_path = on_path(zip(o, map(tuple, s), map(tuple, g))).float()
        assert torch.equal(data.from_symmetric(seen_path, 8, k), on_path(pool_mazes(maze8)).float())


class SharpByToken(nn.Module):
    """A stand-in maze model with sharp answers that depend on how a maze is turned: each cell's class is its token
    mod 5, at logit 10."""
    cfg = controller = None

    def forward(self, x, state=None, **kw):
        return {"logits": 10.0 * F.one_hot(x % 5, 5).float(), "state": {"h": x.float()}}


def test_latch_count_restarts_at_one_when_a_sure_cell_changes_its_move():
    """A sure cell that changes its move restarts its count at 1 (the segment of the change counts): move 2 held
    segments 2-4 latches, so segment 5's move 3 is not taken."""
    sure = lambda c: 10.0 * F.one_hot(torch.tensor(c), 5).float()
    script = [sure(c)[None] for c in (1, 2, 2, 2, 3)]  # one cell: move 1, then move 2 for 3 segments, then 3

    class Scripted(nn.Module):
        cfg = None

        def forward(self, x, state=None, **kw):
            s = 0 if state is None else int(state["h"][0]) + 1
            return {"logits": script[s].expand(len(x), 1, 5), "state": {"h": torch.full((len(x),), float(s))}}

    latched, state = evaluate.Latch(Scripted()), None
    for _ in script:
        out = latched(torch.zeros(1, 1, dtype=torch.long), state=state)
        state = out["state"]
    # move 2 held segments 2, 3, 4 (the segment of the change counted): latched at 4, so segment 5 still answers 2
    assert state["latch_locked"].tolist() == [[True]] and out["logits"][0, 0].argmax().item() == 2


def test_latch_keeps_an_answer_that_held_sure_and_frees_one_that_did_not(maze_run, monkeypatch):
    sure = lambda c: 10.0 * F.one_hot(torch.tensor(c), 5).float()  # p(c) about 0.9998
    unsure = lambda c: sure(c) * 0.2  # p(c) about 0.5: below the latch's 0.9
    # per segment, the logits of 4 cells: 0 sure of move 1 for 3 segments, then of move 2 (latched at segment 3);
    # 1 the same but unsure (never latched); 2 sure of move 1 for 2 segments only (hold 3: not latched);
    # 3 sure of moves 1, 2, 1, 2 (its count starts again at each change); cell 0's new move 2 holds 3 segments too
    # (4-6) and must not replace the kept one
    script = [torch.stack([sure(1), unsure(1), sure(1), sure(1)]), torch.stack([sure(1), unsure(1), sure(1), sure(2)]),
              torch.stack([sure(1), unsure(1), sure(2), sure(1)]), torch.stack([sure(2), unsure(2), sure(2), sure(2)]),
              torch.stack([sure(2), unsure(2), sure(3), sure(3)]), torch.stack([sure(2), unsure(2), sure(3), sure(3)])]

    class Scripted(nn.Module):
        cfg = controller = None

        def forward(self, x, state=None, **kw):
            s = 0 if state is None else int(state["h"][0]) + 1
            return {"logits": script[s].expand(len(x), 4, 5), "state": {"h": torch.full((len(x),), float(s))}}

    latched, state, moves = evaluate.Latch(Scripted()), None, []
    for _ in script:
        out = latched(torch.zeros(2, 4, dtype=torch.long), state=state)
        state = out["state"]
        moves.append(out["logits"][0].argmax(-1).tolist())
        assert all(v.shape[0] == 2 for v in state.values())  # batch first: a stopped maze leaves with its memory
    assert moves == [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 2, 1], [1, 2, 2, 2], [1, 2, 3, 3], [1, 2, 3, 3]]
    torch.testing.assert_close(out["logits"][0, 0], sure(1))  # the latched cell answers with its kept logits
    assert state["latch_locked"][0].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="no labels"):
        latched(torch.zeros(2, 4, dtype=torch.long), y=torch.zeros(2, 4))
    # a model with a front head: the front gates, not the answer's own probability. Every cell answers move 1 in
    # segments 1-4 (sure, unsure, sure, unsure) and move 2 in segment 5. Cell 0 is reached from segment 2 (latched
    # at 4, hold 3), cell 1 from segment 1 (latched at 3, though unsure there), cells 2 and 3 never
    fronts = torch.tensor([[0.2, 0.9, 0.1, 0.0]] + [[0.9, 0.9, 0.1, 0.0]] * 4)
    script[:] = [torch.stack([f(1)] * 4) for f in (sure, unsure, sure, unsure)] + [torch.stack([sure(2)] * 4)]

    class Reached(Scripted):
        def forward(self, x, state=None, **kw):
            out = super().forward(x, state)
            return {**out, "reached": fronts[int(out["state"]["h"][0])].expand(len(x), 4)}

    latched, state, moves = evaluate.Latch(Reached()), None, []
    for _ in range(5):
        out = latched(torch.zeros(2, 4, dtype=torch.long), state=state)
        state = out["state"]
        moves.append(out["logits"][1].argmax(-1).tolist())
    assert moves == [[1, 1, 1, 1]] * 4 + [[1, 1, 2, 2]]
    assert state["latch_locked"][1].tolist() == [True, True, False, False]
    # each keeps the logits of the segment it latched in (cell 0: segment 4, unsure; cell 1: segment 3, sure)
    torch.testing.assert_close(out["logits"][1, :2], torch.stack([unsure(1), sure(1)]))
    # the front through SymmetryMean: the mean of the views' fronts, each back on its cell, so a turned maze's front
    # mapped back is the maze's own
    model = tiny_maze_model("hrm", R=2, T=2, front_weight=0.1).eval()
    torch.nn.init.normal_(model.front_head.weight, std=1.0)  # a head that differs from cell to cell
    x = torch.from_numpy(np.stack([data.encode(*loop_maze())] * 2))
    kw = dict(grid=(3, 3), n_steps=2, temperature=1.0)
    base = evaluate.SymmetryMean(model, 8)(x, **kw)["reached"]
    assert base.shape == (2, 9) and base.std() > 1e-3
    for k in (1, 5):
        turned = evaluate.SymmetryMean(model, 8)(data.symmetric_tokens(x, 3, k), **kw)["reached"]
        torch.testing.assert_close(data.from_symmetric(turned[..., None], 3, k)[..., 0], base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, **kw)["reached"], model.reached(model(x, **kw)["state"]["h"]))
    # through the command line, fixed and auto segments, with views inside: the latch is called at every segment
    calls = []

    class Counted(evaluate.Latch):
        def forward(self, *args, **kwargs):
            calls.append(isinstance(self.model, evaluate.SymmetryMean))
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(evaluate, "Latch", Counted)
    for segments in ("3", "auto"):
        calls.clear()
        result = evaluate.main([str(maze_run), "--n-test", "8", "--segments", segments, "--latch", "--symmetries",
                                "2", "--no-progress"])
        assert result["latch"] is True and 0 <= result["optimal"] <= 1
        assert len(calls) >= 3 and all(calls)


def test_symmetry_mean_answers_a_turned_maze_as_the_maze_itself_over_carried_segments(maze8, maze_run):
    model = tiny_maze_model("hrm", R=2, T=2).eval()
    x = maze8.split("val")[0][:6]
    ens = evaluate.SymmetryMean(model, 8)
    kw = dict(grid=(8, 8), n_steps=2, temperature=1.0)

    def segments(net, xs, k=0):  # each segment's answers, mapped back from view k
        state, out = None, []
        for _ in range(3):
            o = net(xs, state=state, **kw)
            state = o["state"]
            out.append(data.from_symmetric(o["logits"].log_softmax(-1), 8, k))
        return out, state

    base, state = segments(ens, x)
    assert state["h"].shape[:2] == (6, 8)  # every maze's views held together, so a stopped maze can leave the batch
    plain = segments(model, x)[0]
    for k in (1, 4, 6):
        turned = segments(ens, data.symmetric_tokens(x, 8, k), k)[0]
        for a, b in zip(turned, base):  # the same 8 views in another order: the same answers, segment by segment
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        # the plain model sees a turned maze differently (so the check above can fail)
        assert (segments(model, data.symmetric_tokens(x, 8, k), k)[0][-1] - plain[-1]).abs().max() > 1e-2
    one = evaluate.SymmetryMean(model, 1)(x, **kw)["logits"]
    torch.testing.assert_close(one, model(x, **kw)["logits"].log_softmax(-1))
    # the answers are probabilities' logs: mean probabilities sum to 1 per cell
    torch.testing.assert_close(base[0].exp().sum(-1), torch.ones(6, 64))
    # ... the log of the mean probability, not the mean log-probability: views that disagree sharply (a stand-in
    # scoring each cell by its token) tell the two apart
    sharp = SharpByToken()
    mean_p = torch.stack([data.from_symmetric(sharp(data.symmetric_tokens(x, 8, k))["logits"].softmax(-1), 8, k)
                          for k in range(8)]).mean(0)
    torch.testing.assert_close(evaluate.SymmetryMean(sharp, 8)(x, grid=(8, 8))["logits"], mean_p.log())
    # through the command line: recorded, and bad values stop with one line
    result = evaluate.main([str(maze_run), "--n-test", "8", "--segments", "auto", "--symmetries", "4",
                            "--no-progress"])
    assert result["symmetries"] == 4 and 0 <= result["optimal"] <= 1 and len(result["segments_per_item"]) == 8
    fixed = evaluate.main([str(maze_run), "--n-test", "8", "--segments", "2", "--symmetries", "8",
                           "--batch-size", "16"])  # the fixed-segments path (train.evaluate), 2 mazes per call
    assert fixed["symmetries"] == 8 and len(fixed["per_segment"]) == 2 and 0 <= fixed["optimal"] <= 1
    with pytest.raises(ValueError, match="no labels"):
        ens(x, y=torch.zeros_like(x), **kw)
    with pytest.raises(SystemExit, match="--symmetries must be 1 to 8"):
        evaluate.main([str(maze_run), "--symmetries", "9"])


class FlickeringMazeAnswers(nn.Module):
    """A stand-in maze model for --segments auto: answers each maze (looked up by its tokens) with fixed logits,
    except one cell whose best move turns every segment (the segment count is carried in the state)."""

    def __init__(self, answers, cell):
        super().__init__()
        self.answers, self.cell = answers, cell

    def forward(self, x, state=None, **kw):
        count = torch.zeros(len(x), dtype=torch.long) if state is None else state["count"] + 1
        logits = torch.stack([self.answers[tuple(row.tolist())] for row in x]).clone()
        logits[:, self.cell] = 5.0 * F.one_hot(count % 4, 5).float()
        return {"logits": logits, "state": {"count": count}, "trace": [{"logits": logits}]}


def test_segments_auto_on_mazes_waits_for_the_decoded_path_not_for_every_cell():
    o = maze_from_edges(3, EDGES)  # the shortest path from (0, 0) to (2, 0) goes through the middle
    solved = torch.from_numpy(data.encode(o, (0, 0), (2, 0)))
    stuck = torch.from_numpy(data.encode(o, (0, 2), (2, 0)))  # from (0, 2): its answer heads S into a dead end
    right = 5.0 * F.one_hot(torch.from_numpy(data.first_class(data.labels(o, (0, 0), (2, 0)))), 5).float()
    wrong = right.clone()
    wrong[[2, 5]] = 5.0 * F.one_hot(torch.tensor(2), 5).float()  # (0, 2) and (1, 2) go S, to (2, 2) and (2, 1)
    model = FlickeringMazeAnswers({tuple(solved.tolist()): right, tuple(stuck.tolist()): wrong}, cell=8)
    x = torch.stack([solved, stuck])
    assert data.decoded_paths(right[None], solved[None]) == [((0, 0), (0, 1), (1, 1), (1, 0), (2, 0))]
    assert data.decoded_paths(wrong[None], stuck[None]) == [None]  # it stops at the dead end (2, 1)
    # (2, 2)'s answer changes every segment, off the solved maze's path: the solved maze stops once its path has
    # held for 2 segments; the stuck one never reaches the goal and runs to the cap
    task = object.__new__(data.MazeTask)
    task.grid = (3, 3)
    _, used = evaluate.run_adaptive(model, task, x, n_steps=1, temperature=1.0, cap=10, patience=2)
    assert used.tolist() == [3, 10]
    # sample_maze.py's auto: the whole batch stops once every maze's path has held, else it runs to the cap
    for batch, ran in [(x[:1], 3), (x, 10)]:
        _, steps = sample_maze.run_traced(model, batch, (3, 3), 10, 1, 1.0, patience=2)
        assert steps[-1]["seg"] == ran
    _, steps = sample_maze.run_traced(model, x[:1], (3, 3), 5, 1, 1.0)  # a fixed count runs every segment
    assert steps[-1]["seg"] == 5


def test_every_entry_point_keeps_freed_memory_first(monkeypatch, tmp_path):
    # glibc (Linux): the setting takes; elsewhere it reports that it did nothing
    assert train.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
    class Called(Exception):
        pass

    def first(): raise Called
    monkeypatch.setattr(train, "keep_freed_memory", first)
    # each argv fails at an early check (evaluate's: --out is a folder); the setting comes before any of them
    for main, argv in [(train.main, ["--task", "nosuchtask"]),
                       (evaluate.main, [str(tmp_path / "none.pt"), "--out", str(tmp_path)]),
                       (sample_maze.main, [str(tmp_path / "none.pt")]), (bench.main, ["--device", "nosuchdevice"])]:
        with pytest.raises(Called):
            main(argv)


def test_a_checkpoint_that_records_the_old_n_tags_field_still_loads(tmp_path):
    """checkpoint_config drops n_tags (a field of older versions), so such a checkpoint loads with its weights."""
    m = tiny_model()
    torch.save({"model": m.state_dict(), "model_args": {**asdict(m.cfg), "n_tags": 0}}, tmp_path / "old.pt")
    loaded, _ = train.load_checkpoint(str(tmp_path / "old.pt"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())


def test_checkpoints_of_older_versions_resume_and_are_scored_at_the_end_of_the_anneal(tmp_path):
    args = tiny_run_args(tmp_path, "sort6")
    train.main(args)
    run = tmp_path / "run"
    for name in ("ckpt.pt", "best.pt"):  # as an older version wrote them: no attn_impl, no temperature
        ckpt = torch.load(run / name, weights_only=True)
        del ckpt["model_args"]["attn_impl"]
        ckpt.pop("temperature", None)
        torch.save(ckpt, run / name)
    assert train.checkpoint_temperature(torch.load(run / "best.pt", weights_only=True)) == 1.0
    result = train.main(with_flags(args, max_steps=4) + ["--resume"])
    assert result["step"] in (2, 4) and torch.load(run / "ckpt.pt", weights_only=True)["step"] == 4


# ---- parsing (UD English EWT): the reader, the tree decoder, attachment scores
UD_SAMPLE = os.path.join(REPO, "samples", "en_ewt-ud-dev-sample.conllu")


def test_conllu_reader_keeps_the_last_sentence_without_a_final_blank_line():
    """A file without a blank line after its last sentence keeps that sentence."""
    lines = open(UD_SAMPLE, encoding="utf-8").read().splitlines()
    while not lines[-1].strip():
        lines.pop()
    assert len(parsing.read_conllu(lines)[0]) == len(parsing.read_conllu(UD_SAMPLE)[0]) == 41


def test_conllu_reader_keeps_the_integer_id_words_and_skips_comments_multiword_ranges_and_empty_nodes():
    sentences, skipped = parsing.read_conllu(UD_SAMPLE)
    lines = open(UD_SAMPLE, encoding="utf-8").read().splitlines()
    word_lines = [line for line in lines if line and line.split("\t")[0].isdigit()]
    assert len(sentences) == 41 and sum(len(s.words) for s in sentences) == len(word_lines)
    assert skipped["multiword"] == sum(1 for line in lines if "-" in line.split("\t")[0] and "\t" in line) == 17
    assert skipped["empty"] == 1 and skipped["comment"] == sum(line.startswith("#") for line in lines)
    first = sentences[0]  # "From the AP comes this story :"
    assert first.words[:4] == ["From", "the", "AP", "comes"] and first.heads[:4] == [3, 3, 4, 0]
    assert first.upos[3] == "VERB" and first.deprels[2] == "obl"
    for s in sentences:  # heads in range, one root word, and the gold trees are trees
        assert all(0 <= h <= len(s.words) for h in s.heads) and parsing.is_tree(s.heads)
        assert all(":" not in label for label in s.labels()) and len(s.labels()) == len(s.words)
    subtyped = [(d, u) for s in sentences for d, u in zip(s.deprels, s.labels()) if ":" in d]
    assert subtyped and all(u == d.split(":")[0] for d, u in subtyped)  # obl:tmod -> obl, subtypes kept too
    with pytest.raises(ValueError, match="not 10"):
        parsing.read_conllu(["1\tword\t_"])


def brute_force_best_tree(scores):
    n = len(scores) - 1
    best = -np.inf
    for heads in itertools.product(range(n + 1), repeat=n):
        if all(h != d for d, h in enumerate(heads, 1)) and parsing.is_tree(heads):
            best = max(best, parsing.tree_score(scores, [-1, *heads]))
    return best


def test_tree_decoder_returns_the_best_single_root_tree_for_random_scores():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 6))
        scores = rng.normal(size=(n + 1, n + 1))
        heads = parsing.decode_tree(scores)
        assert len(heads) == n and parsing.is_tree(heads)
        # exhaustive search over every head assignment: the decoder's tree scores as high as the best one
        assert parsing.tree_score(scores, [-1, *heads]) == pytest.approx(brute_force_best_tree(scores))
    for n in (20, 60):  # larger sentences: still a tree
        assert parsing.is_tree(parsing.decode_tree(rng.normal(size=(n + 1, n + 1))))


def test_tree_decoder_recovers_the_gold_tree_from_scores_that_favour_it():
    sentences, _ = parsing.read_conllu(UD_SAMPLE)
    rng = np.random.default_rng(1)
    for s in sentences[:10]:
        n = len(s.words)
        scores = rng.normal(size=(n + 1, n + 1))
        scores[np.arange(1, n + 1), s.heads] += 10.0  # the gold arcs stand out
        assert parsing.decode_tree(scores) == s.heads


def test_attachment_scores_on_hand_made_cases():
    gold_h, gold_l = [[2, 0, 2], [0]], [["det", "root", "punct"], ["root"]]
    assert parsing.attachment_scores(gold_h, gold_l, gold_h, gold_l) == {"uas": 1.0, "las": 1.0}
    # one wrong head (word 3), one right head with the wrong label (word 1): 3 of 4 heads, 2 of 4 with labels
    got = parsing.attachment_scores([[2, 0, 1], [0]], [["nsubj", "root", "punct"], ["root"]], gold_h, gold_l)
    assert got == {"uas": 0.75, "las": 0.5}
    with pytest.raises(ValueError, match="one head and one label per word"):
        parsing.attachment_scores([1], ["x"], [1, 2], ["x", "y"])


@pytest.fixture
def ud_sample_dir(tmp_path):
    """A data folder holding the committed sample under the three file names of the release."""
    folder = tmp_path / "ud"
    folder.mkdir()
    for name in parsing.UD_FILES.values():
        (folder / name[:-3]).write_text(open(UD_SAMPLE, encoding="utf-8").read(), encoding="utf-8")
    return folder


@pytest.mark.parametrize("controller", ["hrm", "poh", "none"])
def test_two_step_parsing_run_on_the_sample_prints_uas_and_las(ud_sample_dir, tmp_path, controller, capsys):
    result = train.main(["--task", "ud_ewt", "--data-dir", str(ud_sample_dir), "--controller", controller,
                         "--d-model", "16", "--n-heads", "2", "--d-ctrl", "8", "--R", "2", "--batch-size", "4",
                         "--max-steps", "2", "--eval-interval", "2", "--no-progress", "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "val uas" in out and " las " in out and result["n_test"] == 41
    assert 0 <= result["las"] <= result["uas"] <= 1 and 0 <= result["not_tree"] <= 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["output"] == "biaffine" and config["model"]["pad_token"] == 0
    assert config["model"]["top_k"] == 2 and config["top_k"] == 2  # the parsing recipe keeps all (here 2) heads
    if controller == "hrm":  # evaluate.py flags that have no meaning for parsing end in one line
        for argv, message in [(["--segments", "auto"], "ud_ewt has none; pass a count"),
                              (["--data-seed", "3"], "one fixed dev and test set")]:
            with pytest.raises(SystemExit, match=message):
                evaluate.main([str(tmp_path / "run"), *argv])


def test_biaffine_scores_by_hand_shapes_and_padding_heads():
    """Biaffine: arc[b, d, j] = a_dep[d] U a_head[j] + a_head[j] . u (a head prior, not a dependent one), padding
    heads -inf; lab (B, N, N, L) = bilinear label scores with bias rows, for every pair."""
    torch.manual_seed(0)
    b = parsing.Biaffine(8, 3, d_arc=4, d_label=2)
    for p in (b.U, b.u, b.W):  # zero at init: give them values, so every term shows
        nn.init.normal_(p)
    h, pad = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():
        arc, lab = b(h, pad)
        dep, head = b.arc_dep(h), b.arc_head(h)
        want = torch.einsum("bdi,ij,bhj->bdh", dep, b.U, head) + (head @ b.u)[:, None, :]
        one = torch.ones(2, 5, 1)
        ld, lh = torch.cat([b.lab_dep(h), one], -1), torch.cat([b.lab_head(h), one], -1)
        want_lab = torch.einsum("bdi,lij,bhj->bdhl", ld, b.W, lh)
    assert arc.shape == (2, 5, 5) and lab.shape == (2, 5, 5, 3)
    torch.testing.assert_close(arc, want.masked_fill(pad[:, None, :], float("-inf")))
    assert torch.isinf(arc[1, :, 3:]).all() and torch.isfinite(arc[1, :, :3]).all()
    torch.testing.assert_close(lab, want_lab, rtol=1e-5, atol=1e-5)


def test_padding_never_changes_the_parsers_scores_for_the_real_words(ud_sample_dir):
    task = parsing.ParseTask("ud_ewt", str(ud_sample_dir), upos=True, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=task.vocab_size, n_classes=task.n_classes, d_model=16, n_heads=2, n_layers=1,
                      d_ctrl=8, R=3, pos="rope2d", attn="global", controller="hrm", output="biaffine", pad_token=0,
                      feature_vocab=task.feature_vocab)
    model = PoHModel(cfg, verbose=False).eval()
    sentences = task.sentences["dev"]
    short = min(sentences, key=lambda s: len(s.words))
    alone_x, _ = task.encode([short])
    batch_x, _ = task.encode([short, max(sentences, key=lambda s: len(s.words))])  # short is padded here
    assert batch_x.shape[1] > alone_x.shape[1] and batch_x.shape[2] == 4  # word, suffix, shape and tag ids
    n = alone_x.shape[1]
    with torch.no_grad():
        arc_a, lab_a = model(alone_x)["logits"]
        arc_b, lab_b = model(batch_x)["logits"]
    torch.testing.assert_close(arc_b[0, :n, :n], arc_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lab_b[0, :n, :n], lab_a[0], rtol=1e-5, atol=1e-5)
    assert torch.isinf(arc_b[0, :n, n:]).all()  # padding is never a candidate head
    # the routing statistics count the real words only: by hand from the trace, padding left out (2 of 4 heads
    # kept, so the usage can differ between tokens)
    torch.manual_seed(0)
    model = PoHModel(replace(cfg, n_heads=4, top_k=2), verbose=False).eval()
    with torch.no_grad():
        out = model(batch_x, trace=True)
    real = batch_x[..., 0] != 0
    for t, step in enumerate(out["trace"]):
        keep = kept_heads(step["alpha"])
        torch.testing.assert_close(out["parts"]["usage"][t], keep[real].float().mean(0))
        assert not torch.allclose(out["parts"]["usage"][t], keep.float().mean((0, 1)), atol=1e-4)


def test_the_output_layer_runs_only_at_the_steps_whose_answer_is_used(ud_sample_dir):
    task = parsing.ParseTask("ud_ewt", str(ud_sample_dir), progress=False)
    cfg = ModelConfig(vocab_size=task.vocab_size, n_classes=task.n_classes, d_model=16, n_heads=2, n_layers=1,
                      d_ctrl=8, R=4, pos="rope2d", attn="global", controller="hrm", output="biaffine", pad_token=0,
                      feature_vocab=task.feature_vocab, supervise="last")
    model = PoHModel(cfg, verbose=False)
    calls = []
    model.head.register_forward_hook(lambda *_: calls.append(1))
    x, y = task.encode(task.sentences["dev"][:3])
    model(x, y=y)["loss"].backward()
    assert len(calls) == 1  # the biaffine scores of 3 unsupervised inner steps are never computed
    calls.clear()
    out = model(x, y=y, trace=True)
    assert len(calls) == 4 and all(step["logits"] is not None for step in out["trace"])


def test_uas_and_las_are_means_over_all_words_not_over_sentences(ud_sample_dir):
    task = parsing.ParseTask("ud_ewt", str(ud_sample_dir), progress=False)
    # sentence 0: one word, its head (ROOT) and label right; sentence 1: three words, every head wrong
    y = torch.tensor([[[-100, -100], [0, 5], [-100, -100], [-100, -100]],
                      [[-100, -100], [0, 5], [1, 6], [1, 7]]])
    arc = torch.full((2, 4, 4), -10.0)
    lab = torch.zeros(2, 4, 4, task.n_classes)
    arc[0, 1, 0], lab[0, 1, 0, 5] = 5.0, 5.0
    arc[1, 1, 3], arc[1, 2, 0], arc[1, 3, 2] = 5.0, 5.0, 5.0  # the tree 3 -> 1, 0 -> 2 -> 3: all three heads wrong
    lab[1, :, :, 5] = 5.0
    got = task.metrics((arc, lab), None, y)
    assert got["uas"] == pytest.approx(1 / 4) and got["las"] == pytest.approx(1 / 4)  # per sentence it would be 1/2
    items = task.metrics((arc, lab), None, y, per_item=True)
    assert items["uas"] == [1.0, 0.0] and items["words"] == [1, 3] and got["not_tree"] == 0.0
    assert stats.item_means(items) == got


def test_each_word_is_read_as_its_word_suffix_and_shape_and_an_unknown_word_keeps_the_last_two():
    assert [parsing.shape(w) for w in ["The", "IBM", "2024", "report", ",", "I"]] == \
        ["title", "upper", "digit", "lower", "symbol", "title"]
    words, suffixes, shapes = (parsing.build_vocab(v) for v in (["the", "report"], ["the", "ort"], ["lower", "title"]))
    x, y = parsing.encode_sentences([parsing.Sentence(["The", "Exxport"], ["DET", "NOUN"], [2, 0], ["det", "root"])],
                                    [words, suffixes, shapes], parsing.build_vocab(["det", "root"]))
    assert x.shape == (1, 3, 3) and (x[0, 0] == parsing.ROOT).all()
    assert x[0, 1].tolist() == [words["the"], suffixes["the"], shapes["title"]]
    assert x[0, 2].tolist() == [parsing.UNK, suffixes["ort"], shapes["title"]]  # unknown word, known suffix
    assert y[0, 1:, 0].tolist() == [2, 0]


def test_parse_task_word_vocab_keeps_only_words_seen_min_count_times(ud_sample_dir):
    """The word (and suffix) vocabularies hold only training items seen >= MIN_COUNT times; a word seen once is read
    as UNK, so the model meets UNK in training."""
    from collections import Counter
    task = parsing.ParseTask("ud_ewt", str(ud_sample_dir), progress=False)
    counts = Counter(w.lower() for s in task.sentences["train"] for w in s.words)
    kept = {w for w in task.words if w not in ("<pad>", "<unk>", "<root>")}
    assert kept == {w for w, c in counts.items() if c >= parsing.MIN_COUNT}
    once = next(s for s in task.sentences["train"] if any(counts[w.lower()] == 1 for w in s.words))
    x, _ = task.encode([once])
    singles = [i + 1 for i, w in enumerate(once.words) if counts[w.lower()] == 1]
    assert (x[0, singles, 0] == parsing.UNK).all()


def test_parse_training_batches_are_runs_of_similar_length(ud_sample_dir):
    """train_batch draws a run of consecutive sentences in length order: the batch's lengths are a contiguous
    slice of the sorted training lengths."""
    task = parsing.ParseTask("ud_ewt", str(ud_sample_dir), progress=False)
    lengths = sorted(len(s.words) for s in task.sentences["train"])
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        _, y = task.train_batch(8, gen)
        got = sorted((y[..., 0] != -100).sum(1).tolist())
        assert any(lengths[i:i + 8] == got for i in range(len(lengths) - 7)), got
        assert y.shape[1] == max(got) + 1  # padded to its own longest sentence only


def test_not_tree_counts_sentences_whose_greedy_heads_are_not_a_tree(ud_sample_dir):
    """not_tree: the share of sentences whose argmax heads are not one tree (here two words on ROOT), though the
    decoded (Chu-Liu/Edmonds) heads always are."""
    task = parsing.ParseTask("ud_ewt", str(ud_sample_dir), progress=False)
    y = torch.tensor([[[-100, -100], [0, 5], [1, 6]], [[-100, -100], [0, 5], [1, 6]]])
    arc = torch.full((2, 3, 3), -10.0)
    arc[:, 1, 0] = 5.0  # word 1 on ROOT in both
    arc[0, 2, 0], arc[0, 2, 1] = 4.0, 3.0  # sentence 0: word 2 prefers ROOT too (greedy: two roots); 1 is next best
    arc[1, 2, 1] = 5.0  # sentence 1: word 2 on word 1, a tree
    lab = torch.zeros(2, 3, 3, task.n_classes)
    got = task.metrics((arc, lab), None, y, per_item=True)
    assert got["not_tree"] == [1.0, 0.0] and got["uas"] == [1.0, 1.0]


def test_parse_task_splits_read_dev_for_val_and_test_for_test(ud_sample_dir):
    """ParseTask.split: val from the dev file, test from the test file (the fixture's files are all the same, so a
    shorter test file tells them apart)."""
    text = open(UD_SAMPLE, encoding="utf-8").read()
    test_name = parsing.UD_FILES["test"][:-3]
    blocks = [b for b in text.strip().split("\n\n") if any(line and line[0].isdigit() for line in b.splitlines())]
    (ud_sample_dir / test_name).write_text("\n\n".join(blocks[:5]) + "\n\n", encoding="utf-8")
    task = parsing.ParseTask("ud_ewt", str(ud_sample_dir), progress=False)
    assert len(task.split("test")[0]) == 5 and len(task.split("val")[0]) == len(task.sentences["dev"]) > 5
    with pytest.raises(ValueError, match="unknown split"):
        task.split("train")


def test_word_dropout_reads_some_real_words_as_unknown_and_nothing_else(ud_sample_dir):
    plain, dropped = (parsing.ParseTask("ud_ewt", str(ud_sample_dir), upos=True, word_dropout=p, progress=False)
                      for p in (0.0, 0.5))
    (x0, y0), (x1, y1) = (t.train_batch(16, torch.Generator().manual_seed(3)) for t in (plain, dropped))
    assert torch.equal(y0, y1) and torch.equal(x0[..., 1:], x1[..., 1:])  # same sentences; suffix, shape, tag kept
    changed = x0[..., 0] != x1[..., 0]
    real = y0[..., 0] != -100
    assert (x1[..., 0][changed] == parsing.UNK).all() and not (changed & ~real).any()  # never ROOT or padding
    share = (changed | (x0[..., 0] == parsing.UNK))[real].float().mean().item()
    assert 0.35 < share < 0.65, share  # about half the words read as unknown


def test_block_dropout_acts_on_both_the_attention_and_the_mlp_outputs():
    """Dropout sits on each sublayer's output before the residual add: dropping everything leaves x itself."""
    class DropAll(nn.Module):
        def forward(self, t):
            return torch.zeros_like(t)
    torch.manual_seed(0)
    block = PoHBlock(BlockConfig(d_model=16, n_heads=4, dropout=0.5)).train()
    block.drop = DropAll()
    x, alpha = torch.randn(2, 6, 16), torch.softmax(torch.randn(2, 6, 4), -1)
    torch.testing.assert_close(block(x, alpha), x, rtol=0, atol=0)


def test_the_initial_state_is_the_embedding_without_dropout_even_in_training():
    """init_state: h = the embedded input, detached and never dropped out (a constant starting point)."""
    torch.manual_seed(0)
    m = PoHModel(ModelConfig(vocab_size=8, n_classes=3, d_model=16, n_heads=2, n_layers=1, d_ctrl=8, R=2,
                             dropout=0.5), verbose=False).train()
    x = torch.randint(0, 8, (2, 9))
    h = m.init_state(x)["h"]
    torch.testing.assert_close(h, m.embed_input(x).detach().float(), rtol=0, atol=0)
    assert not h.requires_grad


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    x = torch.randint(0, 8, (2, 9))
    model = PoHModel(ModelConfig(vocab_size=8, n_classes=3, d_model=16, n_heads=2, n_layers=1, d_ctrl=8, R=2,
                                 dropout=0.5), verbose=False)
    plain = PoHModel(ModelConfig(**{**asdict(model.cfg), "dropout": 0.0}), verbose=False)
    plain.load_state_dict(model.state_dict())  # dropout holds no weights: the same model without it
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x)["logits"], plain(x)["logits"])
    model.train(), plain.train()
    assert (model(x)["logits"] - plain(x)["logits"]).abs().max() > 1e-3


def test_parse_loss_is_the_mean_over_real_words_whatever_the_padding():
    """Each sentence's loss is the mean over its words of head CE + label CE; padding the batch (longer rows, -inf
    padding heads as Biaffine gives) leaves it unchanged."""
    torch.manual_seed(0)
    arc, lab = torch.randn(1, 3, 3), torch.randn(1, 3, 3, 4)
    y = torch.tensor([[[-100, -100], [2, 1], [0, 3]]])
    by_hand = sum(F.cross_entropy(arc[0, d], torch.tensor(h)) + F.cross_entropy(lab[0, d, h], torch.tensor(l))
                  for d, (h, l) in ((1, (2, 1)), (2, (0, 3)))) / 2
    loss = parsing.parse_loss((arc, lab), y)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    arc_p = torch.full((1, 6, 6), float("-inf"))
    arc_p[:, :3, :3] = arc
    arc_p[:, 3:, :3] = 0.0  # padded rows: finite, never scored
    lab_p = torch.zeros(1, 6, 6, 4)
    lab_p[:, :3, :3] = lab
    y_p = torch.cat([y, torch.full((1, 3, 2), -100)], 1)
    assert parsing.parse_loss((arc_p, lab_p), y_p).item() == pytest.approx(loss.item(), rel=1e-5)


def test_parse_loss_reaches_arcs_and_labels_and_ignores_padding():
    torch.manual_seed(0)
    arc = torch.randn(2, 4, 4, requires_grad=True)
    lab = torch.randn(2, 4, 4, 5, requires_grad=True)
    y = torch.tensor([[[-100, -100], [2, 3], [0, 4], [2, 3]], [[-100, -100], [0, 3], [-100, -100], [-100, -100]]])
    loss = parsing.parse_loss((arc, lab), y)
    loss.sum().backward()
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert arc.grad[0, 1:].abs().sum() > 0 and arc.grad[1, 2:].abs().sum() == 0  # padded rows get nothing
    assert lab.grad[0, 1, 2].abs().sum() > 0 and lab.grad[0, 1, 1].abs().sum() == 0  # only the gold arc's labels


def test_without_the_treebank_files_or_a_network_the_parsing_task_says_where_to_put_them(tmp_path, monkeypatch):
    def offline(*a, **kw):
        raise OSError("network unreachable")
    monkeypatch.setattr(parsing.urllib.request, "urlopen", offline)
    with pytest.raises(ValueError, match="into .* by hand") as exc:
        parsing.ud_files(str(tmp_path / "ud"), progress=False)
    assert "\n" not in str(exc.value) and not list((tmp_path / "ud").iterdir())  # one line, nothing half-written
    with pytest.raises(SystemExit) as exc:
        train.main(["--task", "ud_ewt", "--data-dir", str(tmp_path / "ud"), "--out-dir", str(tmp_path / "run")])
    assert str(exc.value.code).startswith("error: could not download") and "\n" not in str(exc.value.code)


def test_a_damaged_treebank_file_in_the_folder_is_one_line_naming_it(ud_sample_dir, tmp_path):
    test_file = ud_sample_dir / parsing.UD_FILES["test"][:-3]
    for damage, what in [(b"\x1f\x8b\x08 cut short", "can't decode"),  # binary where text should be
                         (b"1\tword\t_\tX\t_\t_\tnone\t_\t_\t_\n", "HEAD 'none' is not a number")]:
        test_file.write_bytes(damage)
        with pytest.raises(SystemExit) as exc:
            train.main(["--task", "ud_ewt", "--data-dir", str(ud_sample_dir), "--out-dir", str(tmp_path / "run")])
        text = str(exc.value.code)
        assert text.startswith(f"error: {test_file}: ") and what in text and "\n" not in text, text
    gz = ud_sample_dir / parsing.UD_FILES["test"]  # a .gz is read first when both are there
    gz.write_bytes(b"\x1f\x8b\x08\x00 cut short")
    with pytest.raises(ValueError, match=f"{gz}: .*delete it to download it again"):
        parsing.read_split(str(gz))


def test_evaluate_scores_mazes_of_another_generator_with_loops(maze_run, capsys):
    result = evaluate.main([str(maze_run), "--generator", "gen_dfs_percolation", "--gen-arg", "p=0.4", "--n-test", "20",
                            "--plot", str(maze_run.parent / "segments.png")])
    assert_png(maze_run.parent / "segments.png")  # reach and optimal against segments
    assert result["generator"] == "gen_dfs_percolation-p0.4" and "(gen_dfs_percolation-p0.4)" in capsys.readouterr().out
    assert 0 <= result["unique"] < 1 and 0 <= result["optimal"] <= result["reach"] <= 1  # loops: some ties
    for argv, message in [(["--gen-arg", "p"], "KEY=VALUE"), (["--generator", "gen_nothing"], "no generator"),
                          (["--generator", "gen_dfs_percolation", "--gen-arg", "q=1"], "error:")]:
        with pytest.raises(SystemExit, match=message):
            evaluate.main([str(maze_run), "--n-test", "4", *argv])


def test_the_pretrained_maze_model_loads_and_solves_fresh_mazes_with_and_without_loops_read_by_arrival():
    path = os.path.join(REPO, "pretrained", "maze12-hrm")
    assert os.path.getsize(os.path.join(path, "best.pt")) < 2**20  # under 1 MB, as committed
    model, ckpt = train.load_checkpoint(train.checkpoint_file(path))
    assert ckpt["config"]["front_every"]  # it has the front head that --arrival reads
    task = type("T", (), {"grid": (12, 12), "metrics": staticmethod(data.maze_metrics)})
    temperature, scores = train.checkpoint_temperature(ckpt), {}
    for name, gen_kwargs in [("gen_dfs", None), ("gen_dfs_percolation", {"p": 0.1})]:
        x, y, _ = sample_maze.fresh_mazes(12, 100, seed=0, target="direction", generator=name, gen_kwargs=gen_kwargs)
        reads = [("arrival", evaluate.Arrival(model))] + ([("moves", model)] if gen_kwargs else [])
        for read, scorer in reads:
            scored = train.evaluate(scorer, task, x, y, 8, temperature=temperature)
            scores[name, read] = scored["per_segment"][-1]["optimal"]
    # by arrival, as it is meant to be read, and by moves, as train.py scores: 1.00, 1.00 and 0.99 here (8
    # segments; it trained at 16), where the perfect-maze model scores 0.29 with loops (p = 0.1, a density it did
    # not train on)
    assert scores["gen_dfs", "arrival"] >= 0.99 and scores["gen_dfs_percolation", "arrival"] >= 0.99, scores
    assert scores["gen_dfs_percolation", "moves"] >= 0.95, scores
    # trained at 12x12 only, it solves 24x24 mazes with loops, read by arrival (1.00 here from segment 4 on; 1.000
    # of 300 test mazes with --segments auto, 5.9 used on average)
    x, y, _ = sample_maze.fresh_mazes(24, 20, seed=0, target="direction", generator="gen_dfs_percolation",
                                      gen_kwargs={"p": 0.1})
    task.grid = (24, 24)
    big = train.evaluate(evaluate.Arrival(model), task, x, y, 8, temperature=temperature)["per_segment"][-1]
    assert big["optimal"] >= 0.9, big
    recorded = json.load(open(os.path.join(path, "test.json")))  # its own test set: the training mix, by moves
    assert recorded["generator"] == ckpt["config"]["mazes"] and recorded["optimal"] > 0.95


def test_sample_maze_arrival_reads_the_pretrained_model_and_draws_segment_ends(maze_run, tmp_path, monkeypatch):
    """sample_maze.py --arrival: the pretrained model read by arrival solves fresh 12x12 mazes with loops, and
    --show-steps draws segment ends (the read is per segment); --diag and a model without --front-every are refused."""
    drawn = {}
    monkeypatch.setattr(plots, "draw_refinement", lambda panels, out, titles: drawn.update(titles=titles) or out)
    total = sample_maze.main([os.path.join(REPO, "pretrained", "maze12-hrm"), "--num-samples", "3", "--arrival",
                              "--generator", "gen_dfs_percolation", "--gen-arg", "p=0.1", "--segments", "6",
                              "--show-steps", "--no-ascii", "--out", str(tmp_path / "s.png")])
    assert total["optimal"] >= 2 / 3  # 3 of 3 here (0.998 of 1,000 such test mazes with --segments auto)
    assert [t.split(":")[0] for t in drawn["titles"]] == [f"seg {s} t 7" for s in range(1, 7)]
    for argv, message in ((["--arrival", "--diag"], "--diag"), (["--arrival"], "not trained with --front-every")):
        with pytest.raises(SystemExit, match=message):
            sample_maze.main([str(maze_run), "--num-samples", "1", "--no-ascii", "--out", str(tmp_path / "t.png"),
                              *argv])


def test_the_pretrained_sort_model_is_stored_in_half_precision_and_ranks_fresh_arrays():
    path = os.path.join(REPO, "pretrained", "sort12-hrm")
    assert os.path.getsize(os.path.join(path, "best.pt")) < 2**20  # float16 weights keep it under 1 MB
    model, ckpt = train.load_checkpoint(train.checkpoint_file(path))
    assert ckpt["model"]["embed.weight"].dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # loaded into the usual float32 model
    task = data.make_task("sort12", n_val=10, n_test=10)
    x, y = task.train_batch(500, torch.Generator().manual_seed(7))
    scored = train.evaluate(model, task, x, y, 1, temperature=train.checkpoint_temperature(ckpt))
    assert scored["per_segment"][-1]["tau"] > 0.45  # an untrained model ranks the hidden values at chance
    assert json.load(open(os.path.join(path, "test.json")))["tau"] > 0.49


def test_mix_parts_of_the_train_val_and_test_pools_never_share_a_seed():
    """Each part of a mixed pool draws from a stream of its own: across a task's train, val and test pools (pool seeds
    3 * seed + 0, 1, 2) no two parts share a seed (a percolation maze starts as the DFS maze of its seed)."""
    kinds = data.parse_kinds("loops")
    for seed in range(5):
        seeds = [s for i in range(3) for _, s, *_ in data.mix_parts(30, 3 * seed + i, kinds)]
        assert len(set(seeds)) == len(seeds) == 9, (seed, seeds)


def test_a_mix_of_maze_kinds_trains_and_evaluates_on_the_same_mix(tmp_path, capsys):
    assert data.parse_kinds("gen_dfs, gen_dfs_percolation:p=0.1:q=x") == [
        ("gen_dfs", {}), ("gen_dfs_percolation", {"p": 0.1, "q": "x"})]
    assert data.parse_gen_args(["p=0.5", "n=3", "do_forks=False", "name=x"]) == {"p": 0.5, "n": 3, "do_forks": False,
                                                                               "name": "x"}
    for bad in ("gen_dfs:p", "gen_dfs,,gen_dfs", ":p=1"):
        with pytest.raises(ValueError):
            data.parse_kinds(bad)
    assert data.parse_kinds("loops") == [("gen_dfs", {}), ("gen_dfs_percolation", {"p": 0.05}),
                                         ("gen_dfs_percolation", {"p": 0.2})]
    kinds = data.parse_kinds("gen_dfs,gen_dfs_percolation:p=0.4,gen_dfs_percolation:p=0.2")
    parts = data.mix_parts(13, 5, kinds)
    assert [c for c, *_ in parts] == [5, 4, 4] and len({s for _, s, *_ in parts}) == 3
    assert data.mix_parts(13, 5, kinds[:1]) == [(13, 5, "gen_dfs", {})]  # one kind: the pool it always was
    # a run on perfect mazes and mazes with loops: its pools hold both, and evaluate scores the same mix by default
    spec = "gen_dfs,gen_dfs_percolation:p=0.4"
    train.main(tiny_run_args(tmp_path, "maze5", "--mazes", spec, "--n-test", "20"))
    task = data.make_task("maze5", n_train=60, n_val=12, n_test=20, cache_dir=str(tmp_path / "cache"),
                          progress=False, kinds=data.parse_kinds(spec))
    edges = task.pools["train"]["open"].sum((1, 2, 3)) // 2
    assert (edges[:30] == 24).all() and (edges[30:] > 24).mean() > 0.5  # trees first, then mostly loops
    result = evaluate.main([str(tmp_path / "run"), "--n-test", "20"])
    assert result["generator"] == spec and result["n_test"] == 20
    test = json.load(open(tmp_path / "run" / "test.json"))
    assert result["optimal"] == pytest.approx(test["optimal"])  # the same 20 test mazes as train.py scored
    with pytest.raises(SystemExit):
        train.main(tiny_run_args(tmp_path / "b", "maze5", "--mazes", "gen_dfs:p"))


def test_the_front_target_marks_the_cells_an_answer_from_the_goal_can_have_reached(tmp_path, one_thread, capsys):
    # --front-weight: 1 where dist <= speed x R x (segments run, this one included), 0 beyond, -1 unreachable; the
    # model adds front_weight x a cross-entropy over the known cells, which leaves the answer's logits alone
    args = train.resolve_args(tiny_run_args(tmp_path, "maze5", "--wave-speed", "1.5", "--front-weight", "0.2",
                                            "--batch-size", "6", "--segments", "3", "--batching", "rolling"))
    task = data.make_task("maze5", n_train=60, n_val=0, n_test=0, cache_dir=str(tmp_path / "cache"), progress=False)
    model, carry = PoHModel(train.model_config(args, task), verbose=False), train.Carry(args, task, torch.Generator())
    for step in range(4):
        x, y, state = carry.next(model, step, "cpu")
        dist, reach = data.goal_distance(x, (5, 5)), 1.5 * 2 * (carry.age + 1)  # R = 2 inner steps per segment
        front = carry.front()
        assert front.dtype == torch.long and (front == 1).any() and (front == 0).any(), step  # both occur
        assert torch.equal(front == 1, (dist >= 0) & (dist <= reach[:, None])), step
        assert torch.equal(front == 0, dist > reach[:, None]), step
        out = model(x, carry.reached(y), state=state, grid=(5, 5), front=front)
        plain = model(x, carry.reached(y), state=state, grid=(5, 5))
        torch.testing.assert_close(out["logits"], plain["logits"], rtol=0, atol=0)
        logit = model.front_head(model.norm_out(out["state"]["h"])).squeeze(-1)
        by_hand = F.binary_cross_entropy_with_logits(logit, front.float())
        torch.testing.assert_close(out["parts"]["front"], by_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["loss"], plain["loss"] + 0.2 * by_hand, rtol=1e-5, atol=1e-6)
        # --front-speed (resolved to the --wave-speed when unset) moves the target alone; the mask stays where it was
        assert args.front_speed == 1.5
        mask, carry.args.front_speed = carry.reached(y), 0.5
        slow = 0.5 * 2 * (carry.age + 1)
        assert torch.equal(carry.front() == 1, (dist >= 0) & (dist <= slow[:, None])), step
        assert torch.equal(carry.reached(y), mask) and not torch.equal(carry.front(), front), step
        carry.args.front_speed = 1.5
        carry.advance(state)
    unknown = torch.tensor([[-1, 1, 0]])  # a cell the goal cannot reach gets no loss
    m = tiny_maze_model("hrm", R=2, front_weight=1.0, label_sets=True)
    x = torch.zeros(1, 3, dtype=torch.long)
    h = m(x, grid=(1, 3))["state"]["h"]
    logit = m.front_head(m.norm_out(h)).squeeze(-1)[:, 1:]
    y = torch.full((1, 3), data.IGNORE)
    out = m(x, y, grid=(1, 3), front=unknown)
    torch.testing.assert_close(out["parts"]["front"], F.binary_cross_entropy_with_logits(logit, unknown[:, 1:].float()))
    out["parts"]["front"].backward()
    assert m.front_head.weight.grad.abs().sum() > 0 and m.blocks[0].mlp[0].weight.grad.abs().sum() > 0
    assert tiny_maze_model("hrm", R=2).front_head is None and train.Carry(
        train.resolve_args(tiny_run_args(tmp_path, "maze5")), task, torch.Generator()).front() is None
    # it trains end to end, from a model without the head; and it needs the wave it reads
    tuned = tmp_path / "tuned"
    train.main(tiny_run_args(tmp_path, "maze5", "--wave-speed", "2"))
    train.main(tiny_run_args(tmp_path, "maze5", "--out-dir", str(tuned), "--init-from", str(tmp_path / "run"),
                             "--wave-speed", "2", "--front-weight", "0.1"))
    logged = read_log(tuned)
    assert all(row["front"] > 0 for row in logged if row["split"] == "train")
    # the front loss at the end, against the bound for an exact head: in test.json and printed (2 steps: far above)
    fronts = [row["front"] for row in logged if row["split"] == "train"]
    tested = json.loads((tuned / "test.json").read_text())
    assert tested["front_loss_at_end"] == pytest.approx(sum(fronts) / len(fronts))
    assert "not below 0.005: the front head is not exact yet" in capsys.readouterr().out
    assert "front_loss_at_end" not in json.loads((tmp_path / "run" / "test.json").read_text())
    for flags, message in ((("--front-weight", "0.1", "--wave-speed", "0"), "--front-weight needs --wave-speed"),
                           (("--front-weight", "-1"), "--front-weight must be >= 0"),
                           (("--front-speed", "1"), "--front-speed needs --front-weight > 0"),
                           (("--front-weight", "0.1", "--front-speed", "0"), "--front-speed needs")):
        with pytest.raises(SystemExit):
            train.main(tiny_run_args(tmp_path, "maze5", *flags))
        assert message in capsys.readouterr().err


def test_front_loss_at_end_averages_the_training_lines_of_the_last_window_of_steps(tmp_path, capsys):
    rows = [{"step": 16, "split": "train", "front": 0.5}, {"step": 900, "split": "train", "front": 0.1},
            {"step": 950, "split": "train", "front": 0.002}, {"step": 1000, "split": "val", "front": 9.0},
            {"step": 1000, "split": "train", "front": 0.004}]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert train.front_loss_at_end(str(tmp_path)) == pytest.approx(0.003)  # steps 950 and 1000: after 1000 - 100
    assert train.front_loss_at_end(str(tmp_path), window=101) == pytest.approx((0.1 + 0.002 + 0.004) / 3)
    log.write_text(json.dumps({"step": 2, "split": "train", "loss": 1.0}) + "\n")
    assert train.front_loss_at_end(str(tmp_path)) is None  # no front head
    train.report_front(0.003, "runs/x")
    out = capsys.readouterr().out
    assert "below 0.005: no sign of an inexact front head" in out and "--init-from" not in out
    train.report_front(0.005, "runs/x")
    assert "--init-from runs/x/ckpt.pt" in capsys.readouterr().out


def test_front_every_targets_each_inner_step_and_scores_the_head_at_each_with_a_gradient(tmp_path):
    """--front-every: the carried target is (R, B, N), step t's the front by the end of inner step t, the last the
    segment's; the model's front term is the mean over the steps of the head's cross-entropy at each, and a target
    at an early step alone moves the head's gradient."""
    args = train.resolve_args(tiny_run_args(tmp_path, "maze5", "--wave-speed", "1", "--front-weight", "0.2",
                                            "--front-speed", "0.5", "--front-every", "--batch-size", "6",
                                            "--grad-steps", "2", "--segments", "3", "--batching", "rolling"))
    task = data.make_task("maze5", n_train=60, n_val=0, n_test=0, cache_dir=str(tmp_path / "cache"), progress=False)
    model, carry = PoHModel(train.model_config(args, task), verbose=False), train.Carry(args, task, torch.Generator())
    x, y, state = carry.next(model, 0, "cpu")
    dist, fronts = data.goal_distance(x, (5, 5)), carry.front()
    assert fronts.shape == (2, *x.shape) and carry.age.unique().numel() > 1  # R = 2; slots of different ages
    for t in range(2):  # 0.5 cells per inner step, counted over the segments this slot has run
        reach = 0.5 * (2 * carry.age + t + 1)
        assert torch.equal(fronts[t] == 1, (dist >= 0) & (dist <= reach[:, None])), t
        assert torch.equal(fronts[t] == -1, dist < 0), t
    carry.args.front_every = False
    assert torch.equal(carry.front(), fronts[-1])
    out = model(x, carry.reached(y), state=state, grid=(5, 5), front=fronts)
    # the per-step reads of the eval path (the last one the segment's "reached"); the loss is their mean BCE (the
    # gradient runs through both inner steps here, --grad-steps 2)
    model.eval()
    reads = model(x, state=state, grid=(5, 5), front_steps=True)["reached_steps"]
    assert reads.shape == (x.shape[0], 2, 25)
    torch.testing.assert_close(reads[:, -1], model(x, state=state, grid=(5, 5))["reached"])
    expected = torch.stack([F.binary_cross_entropy(reads[:, t][fronts[t] >= 0], fronts[t][fronts[t] >= 0].float())
                            for t in range(2)]).mean()
    model.train()
    torch.testing.assert_close(out["parts"]["front"], expected, rtol=1e-5, atol=1e-6)
    # a target that differs only at inner step 0 changes the gradient: step 0 is scored, not just the last
    grads = []
    for first in (fronts[0], 1 - fronts[0].clamp(min=0)):
        model.zero_grad()
        model(x, carry.reached(y), state=state, grid=(5, 5), front=torch.stack([first, fronts[1]]))["loss"].backward()
        grads.append(model.front_head.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs 2 of them"):
        model(x, carry.reached(y), state=state, grid=(5, 5), front=fronts[:1])


def test_arrival_walks_toward_the_neighbour_reached_first_whatever_the_model_says():
    """arrival_logits on the loop maze: the model points along the rival route (4 moves); with arrivals in the order
    of the distances the walk takes the 2-move route; a cell with no reached neighbour keeps the model's move; where
    two neighbours arrived at once the model's own scores choose; the goal keeps its class; walls never win."""
    o, start, goal = loop_maze()
    rival = [(1, 0), (1, 1), (1, 2), (0, 2), (0, 1)]
    x = torch.from_numpy(data.encode(o, start, goal))[None]
    logits = torch.from_numpy(scores_along(rival, 3))[None] * 5
    dist = torch.from_numpy(data.bfs_distances(o, goal)).flatten().float()[None]
    arrival = torch.where(dist >= 0, dist + 7, torch.inf)  # any start: only the order counts
    read = evaluate.arrival_logits(logits, x, arrival, (3, 3))
    shortest = [(1, 0), (0, 0), (0, 1)]
    assert data.rollout(read[0].numpy(), o, start, goal) == shortest
    assert data.rollout(logits[0].numpy(), o, start, goal) == rival
    assert read[0, 1].argmax().item() == data.GOAL_CLASS
    assert read[0, 4].argmax().item() == data.MOVES.index((0, 1))  # (1, 1): (1, 0) and (1, 2) tie; the model says E
    tie = logits.clone()
    tie[0, 4] = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0])  # now the model says W at (1, 1): the tie goes W
    assert evaluate.arrival_logits(tie, x, arrival, (3, 3))[0, 4].argmax().item() == data.MOVES.index((0, -1))
    # only the goal and its two neighbours reached: (1, 0) goes north to (0, 0); (1, 1) keeps the model's E
    partial = torch.where(dist <= 1, arrival, torch.inf)
    read = evaluate.arrival_logits(logits, x, partial, (3, 3))
    assert read[0, 3].argmax().item() == data.MOVES.index((-1, 0))
    torch.testing.assert_close(read[0, 4], logits[0, 4].log_softmax(-1))
    # (2, 0), below the unreached (1, 0), has a wall east of it: an arrival behind the wall, at (2, 1), does not count
    behind = partial.clone()
    behind[0, 7] = 0.0
    torch.testing.assert_close(evaluate.arrival_logits(logits, x, behind, (3, 3))[0, 6],
                               logits[0, 6].log_softmax(-1))


def test_segments_auto_with_arrival_waits_until_the_front_reaches_the_start():
    """A maze read by arrival is pending until the front reaches its start: with a model whose moves never change,
    --segments auto runs on until the start arrives and the answer then holds (patience 2): the start 2 moves away
    arrives at segment 5 and stops at 7, not 3; beside it in the batch a start 3 moves away arrives at 7, stops at 9."""
    o, start, goal = loop_maze()
    x = torch.from_numpy(np.stack([data.encode(o, start, goal), data.encode(o, (1, 1), goal)]))
    logits = torch.from_numpy(scores_along([(1, 0), (1, 1), (1, 2), (0, 2), (0, 1)], 3))[None] * 5
    dist = torch.from_numpy(data.bfs_distances(o, goal)).flatten()

    class Front(nn.Module):  # one inner step per segment; the front reaches distance d at segment 2d + 1
        cfg, front_head = None, nn.Identity()

        def forward(self, x, state=None, **kw):
            s = 1 if state is None else int(state["h"][0]) + 1
            reads = ((dist >= 0) & (2 * dist + 1 <= s)).float()
            return {"logits": logits.expand(len(x), -1, -1), "reached_steps": reads.expand(len(x), 1, -1),
                    "state": {"h": torch.full((len(x),), float(s))}}

    task = type("T", (), {"grid": (3, 3)})
    kw = dict(n_steps=1, temperature=1.0, cap=20, patience=2)
    answer, used = evaluate.run_adaptive(evaluate.Arrival(Front()), task, x, **kw)
    assert used.tolist() == [7, 9]  # each start's arrival, then 2 segments that repeat the answer
    assert data.rollout(answer[0].numpy(), o, start, goal) == [(1, 0), (0, 0), (0, 1)]
    assert len(data.rollout(answer[1].numpy(), o, (1, 1), goal)) == 4  # 3 moves: either way round is shortest
    # sample_maze.py waits for the batch's last start, so for both answers to hold 2 segments from then on
    _, steps = sample_maze.run_traced(evaluate.Arrival(Front()), x, (3, 3), 20, 1, 1.0, patience=2, trace=False,
                                      reads=True)
    assert [s["seg"] for s in steps] == list(range(1, 10)) and steps[-1]["logits"].shape == (1, 9, 5)


def test_arrival_keeps_each_cells_first_reached_inner_step_over_segments(maze_run, tmp_path):
    """Arrival counts inner steps over the segments: a cell read as reached from inner step t of segment s to the
    segment's end arrives at s * R + t + 1 and keeps it when later reads fall; a read that falls within its segment
    is no arrival; a model without a front head and --arrival with
    --latch or views are refused before any maze is made."""
    reads = [torch.tensor([[[0.9, 0.1, 0.1, 0.9], [0.9, 0.6, 0.1, 0.1]]]),  # segment 1, inner steps 1-2, 4 cells
             torch.tensor([[[0.2, 0.7, 0.1, 0.6], [0.2, 0.7, 0.8, 0.7]]])]
    # cell 0 arrives at 1 and keeps it when its reads fall; 1 at 2; 2 at 4; 3's read at step 1 falls within its
    # segment (no arrival), then it holds from step 3

    class Scripted(nn.Module):
        cfg, front_head = None, nn.Identity()

        def forward(self, x, state=None, front_steps=False, **kw):
            s = 0 if state is None else int(state["h"][0]) + 1
            assert front_steps
            return {"logits": torch.zeros(len(x), 4, 5), "reached_steps": reads[s],
                    "state": {"h": torch.full((len(x),), float(s))}}

    read, state = evaluate.Arrival(Scripted()), None
    for _ in reads:
        out = read(torch.zeros(1, 4, dtype=torch.long), state=state, grid=(2, 2))
        state = out["state"]
    assert state["arrival_time"].tolist() == [[1.0, 2.0, 4.0, 3.0]] and state["arrival_clock"].tolist() == [4.0]
    with pytest.raises(ValueError, match="no front head|has none"):
        evaluate.Arrival(tiny_maze_model("hrm", R=2))
    for extra, message in ((["--arrival"], "not trained with --front-every"),
                           (["--arrival", "--latch"], "not with --latch")):
        with pytest.raises(SystemExit, match=message):
            evaluate.main([str(maze_run), "--n-test", "8", "--task", "maze8", "--data-dir", str(tmp_path), *extra])
        assert not any(tmp_path.iterdir())  # refused before any maze was made
