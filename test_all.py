"""
All tests, on tiny CPU shapes: python -m pytest -q test_all.py   (well under 5 minutes on 2 CPU cores)

Each test checks values, shapes or gradients against a reference (PyTorch's own attention, hand-computed numbers,
a naive re-computation), so it fails when the code it covers breaks.
"""

import torch
import torch.nn as nn
import pytest

from hrm_controller import Controller, ControllerConfig, route, routing_entropy, temperature_at
from model import ModelConfig, PoHModel, halting_distribution, supervised_steps
from poh_block import BlockConfig, PoHAttention, PoHBlock, local_mask


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


def test_learned_h_gate_updates_slow_state_every_step_by_a_gate_in_0_1():
    m = tiny_model(controller="hrm", R=4, T=3, h_gate="learned")
    x, _ = tiny_batch()
    steps = m(x, trace=True)["trace"]
    for t in range(1, 4):
        assert not torch.equal(steps[t]["z_H"], steps[t - 1]["z_H"])
        assert 0.0 < float(steps[t]["h_update"]) < 1.0


def test_topk_keeps_at_most_k_heads_summing_to_one():
    logits = torch.randn(5, 7, 6)
    for k in (1, 2, 3, 6):
        alpha, p = route(logits, 1.0, k, hard=False)
        assert ((alpha > 0).sum(-1) <= k).all()
        assert torch.allclose(alpha.sum(-1), torch.ones(5, 7), atol=1e-6)
        # the kept heads are the k largest of p
        assert torch.equal(alpha.topk(k, -1).indices.sort(-1).values, p.topk(k, -1).indices.sort(-1).values)


def test_lower_temperature_gives_sharper_routing():
    logits = torch.randn(4, 9, 4)
    _, p_hot = route(logits, 2.0, 4, hard=False)
    _, p_cold = route(logits, 0.5, 4, hard=False)
    assert routing_entropy(p_cold) < routing_entropy(p_hot)
    assert (p_cold.max(-1).values >= p_hot.max(-1).values - 1e-7).all()
    assert temperature_at(0.0, 2.0, 1.0) == 2.0 and temperature_at(1.0, 2.0, 1.0) == 1.0
    assert temperature_at(0.5, 2.0, 0.5, floor=0.7) == pytest.approx(1.25)
    assert temperature_at(1.0, 2.0, 0.5, floor=0.7) == pytest.approx(0.7)


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


def test_entropy_weight_sign_positive_penalises_entropy():
    m = tiny_model(controller="hrm")
    x, y = tiny_batch()
    plain = m(x, y)["loss"]
    out = m(x, y, entropy_weight=0.5)
    assert torch.allclose(out["loss"], plain + 0.5 * out["parts"]["entropy"])


def test_uniform_alpha_block_equals_torch_multihead_attention():
    torch.manual_seed(0)
    D, H = 16, 4
    attn = PoHAttention(BlockConfig(d_model=D, n_heads=H, pos="none"))
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


def test_rope2d_attention_depends_on_relative_position_only():
    # shifting every token's content by one column on a wider grid leaves interior outputs unchanged
    torch.manual_seed(0)
    block = PoHBlock(BlockConfig(d_model=16, n_heads=4, attn="local"))
    from poh_block import rope_tables
    x = torch.randn(1, 3 * 5, 16)
    rope_a = rope_tables((3, 5), 4)
    out = block(x, rope=rope_a, mask=local_mask((3, 5)))
    grid_b = torch.zeros(1, 3, 6, 16)
    grid_b[:, :, 1:] = x.view(1, 3, 5, 16)
    out_b = block(grid_b.view(1, 18, 16), rope=rope_tables((3, 6), 4), mask=local_mask((3, 6)))
    inner_a = out.view(1, 3, 5, 16)[:, :, 1:4]
    inner_b = out_b.view(1, 3, 6, 16)[:, :, 2:5]
    assert torch.allclose(inner_a, inner_b, atol=1e-5)


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


def saved_bytes(model, x, y):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)["loss"].backward()
    return total


def test_tbptt_graph_is_flat_in_R_and_bptt_grows():
    x, y = tiny_batch(B=2, N=16)
    sizes = {}
    for grad in ("bptt", "tbptt"):
        for R in (2, 8):
            sizes[grad, R] = saved_bytes(tiny_model(controller="hrm", R=R, grad=grad, grad_steps=2), x, y)
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
    used = []
    for bias in (-4.0, 0.0, 4.0):
        with torch.no_grad():
            m.halt.bias.fill_(bias)
            out = m(x, y)
        p = out["parts"]["halt_p"]
        assert (p >= 0).all() and (p.sum(1) <= 1 + 1e-6).all()
        used.append(float(out["parts"]["steps_used"]))
    assert used[0] > used[1] > used[2] == 1.0, used


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
            assert g["lr"] == (5e-4 if id(p) in ctrl_ids else 1e-3)
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
