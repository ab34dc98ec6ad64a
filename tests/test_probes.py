import math

import numpy as np
import pytest
import torch

import depthlab as dl


def test_product_of_jacobians_prediction_matches_measurement():
    from depthlab.probes import predicted_gradient_factors

    x, y = dl.Digits(batch_size=256).batch(0)
    for act, init in (("sigmoid", "xavier"), ("tanh", "kaiming"), ("relu", "normal")):
        model = dl.DeepMLP(dl.MLPConfig(depth=12, activation=act, init=init))
        measured = dl.gradient_profile(model, [(x, y)]).measured_factors()
        predicted = predicted_gradient_factors(model, x)
        assert predicted.shape == measured.shape == (11,)
        # the mean-field prediction is good to about 10 % per layer at width 64
        assert np.median(np.abs(np.log10(predicted / measured))) < 0.1, (act, init)


def test_prediction_refuses_models_it_does_not_describe():
    import pytest

    from depthlab.probes import predicted_gradient_factors

    with pytest.raises(ValueError, match="plain"):
        predicted_gradient_factors(dl.DeepMLP(dl.MLPConfig(residual=True)), torch.randn(4, 64))


def test_softmax_jacobian_norms():
    from depthlab.probes import softmax_jacobian_norms

    T = 8
    uniform = torch.full((T,), 1 / T)
    one_hot = torch.eye(T)[0]
    pair = torch.tensor([0.5, 0.5] + [0.0] * (T - 2))
    norms = softmax_jacobian_norms(torch.stack([uniform, one_hot, pair]))
    assert torch.allclose(norms, torch.tensor([1 / T, 0.0, 0.5], dtype=torch.float64),
                          atol=1e-9)


def test_attention_maps_are_what_the_fused_kernel_computes():
    from depthlab.probes import attention_maps

    model = dl.SequenceModel(dl.TransformerConfig(d_model=32, n_layers=3))
    x, _ = dl.SequenceTask(n=5).batch(0)
    maps = attention_maps(model, x)
    assert len(maps) == 3 and maps[0].shape == (32, 4, 10, 10)
    assert torch.allclose(maps[0].sum(-1), torch.ones(32, 4, 10), atol=1e-5)
    assert maps[0][..., 0, 1:].abs().max() == 0            # causal: token 0 sees only itself
    attn = model.layers[0].attn
    h = torch.randn(2, 10, 32)
    a = attn.attention_weights(h)                           # (B, H, T, T)
    v = attn.qkv(h)[..., 64:].view(2, 10, 4, 8).transpose(1, 2)
    manual = attn.proj((a @ v).transpose(1, 2).reshape(2, 10, 32))
    assert (manual - attn(h)).abs().max() < 1e-5


def test_jacobian_singular_values():
    from depthlab.probes import jacobian_singular_values

    w = torch.randn(5, 5)
    sv = jacobian_singular_values(lambda v: w @ v, torch.randn(5))
    assert torch.allclose(sv, torch.linalg.svdvals(w.double()), atol=1e-5)
    ident = jacobian_singular_values(lambda v: v * 1.0, torch.randn(2, 3))
    assert torch.allclose(ident, torch.ones(6, dtype=torch.float64))


def test_compare_times_returns_every_function_and_can_include_backward():
    from depthlab.timing import compare_times

    w = torch.ones(3, requires_grad=True)
    calls = []
    seconds = compare_times({"a": lambda: calls.append(1), "b": lambda: None}, repeats=2,
                            rounds=3)
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    assert len(calls) == 1 + 2 * 3                            # warm-up, then rounds x repeats
    compare_times({"grad": lambda: 2 * w}, repeats=2, rounds=1, backward=True)
    assert torch.equal(w.grad, torch.full((3,), 2.0 * 3))     # 3 backward passes of d(2w)/dw


def test_compare_times_keeps_the_fastest_round_on_one_thread():
    """Load only slows a round down, so each function's fastest round is its time; and the
    timing runs on one torch thread, leaving the setting as it found it."""
    import time

    from depthlab.timing import compare_times

    calls, threads = [], []

    def slow_then_fast():
        calls.append(1)
        threads.append(torch.get_num_threads())
        time.sleep(0.05 if len(calls) == 2 else 0.002)         # the first timed round is slow

    before = torch.get_num_threads()
    seconds = compare_times({"f": slow_then_fast}, repeats=1, rounds=2)
    assert seconds["f"] < 0.02                                 # median (0.026 s) would not be
    assert set(threads) == {1} and torch.get_num_threads() == before


def test_running_mean_stream_follows_the_moving_average_formula():
    from depthlab.probes import running_mean_stream

    spread, trace = running_mean_stream(0.1, 4, mean=3.0, sd=2.0, steps=200, seed=0)
    predicted = 2.0 * math.sqrt(0.1 / ((2 - 0.1) * 4))         # σ √(m / ((2 − m) B))
    assert 0.8 < spread / predicted < 1.2
    assert trace.shape == (200,) and trace[0] == pytest.approx(0.3, abs=0.2)  # 0.9·0 + 0.1·x̄
    assert abs(trace[-50:].mean() - 3.0) < 0.5


@pytest.mark.parametrize("beta", [0.1, 0.3])
def test_a_down_weighted_branch_is_a_smaller_learning_rate(beta):
    """He & Hofmann's appendix A: β on the branch = β²·lr for SGD, β·lr for Adam (ε = 0); the
    other scaling of the learning rate does not match."""
    from depthlab.probes import branch_after_one_step

    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) / 4
    for opt, right, wrong in (("sgd", beta ** 2, beta), ("adam", beta, beta ** 2)):
        down = branch_after_one_step(w, beta, 0.01, opt)
        assert (down - branch_after_one_step(beta * w, 1.0, 0.01 * right, opt)).abs().max() < 1e-5
        assert (down - branch_after_one_step(beta * w, 1.0, 0.01 * wrong, opt)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="optimizer"):
        branch_after_one_step(w, beta, 0.01, "lbfgs")


def test_attention_logit_gradients_match_a_block_written_out_and_vanish_when_attention_collapses():
    """∂L/∂z of the attention logits, against the same one-block model written out here with
    its logits as a leaf of the graph; then the query and key weights ×30 make every row of
    attention (nearly) one-hot, and the softmax passes back decades less (chapter 8)."""
    from depthlab.losses import loss_and_accuracy
    from depthlab.probes import attention_logit_gradients

    cfg = dl.TransformerConfig(d_model=8, n_heads=2, n_layers=1, vocab_size=5, max_len=6,
                               bias=False, mlp_ratio=2.0, init="fan_in")
    model = dl.SequenceModel(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 5, (3, 6), generator=g), torch.randint(0, 5, (3, 6), generator=g)
    block, attn = model.layers[0], model.layers[0].attn

    def heads(t):                                           # (B, T, D) -> (B, H, T, Dh)
        return t.view(3, 6, 2, 4).transpose(1, 2)

    h0 = model.tok_emb(x) + model.pos_emb(torch.arange(6))
    q, k, v = attn.qkv(block.norm1(h0)).split(8, dim=-1)
    z = (heads(q) @ heads(k).transpose(-1, -2) / 2.0).masked_fill(
        torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))      # √Dh = 2
    z.retain_grad()
    mixed = (z.softmax(-1) @ heads(v)).transpose(1, 2).reshape(3, 6, 8)
    h1 = h0 + attn.proj(mixed)
    h2 = h1 + block.mlp(block.norm2(h1))
    loss_and_accuracy(model.head(model.encoder.final_norm(h2)), y)[0].backward()
    want = float(z.grad[torch.isfinite(z)].double().pow(2).mean().sqrt())
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]

    got = attention_logit_gradients(model, (x, y))
    assert got.shape == (1,) and got[0] == pytest.approx(want, rel=1e-4)
    assert attn.logit_taps is None and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with torch.no_grad():
        attn.qkv.weight[:16].mul_(30.0)                     # queries and keys: logits ×900
    assert attention_logit_gradients(model, (x, y))[0] < 1e-2 * got[0]


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_residual_dependence_is_the_branch_share_of_each_sum_written_out(placement):
    """Var(β·F) / Var(α·x + β·F) for every sub-layer, against the blocks written out by hand
    (β = 0.5 so that a missing β, or Var(F)/Var(x), shows)."""
    from depthlab.probes import residual_dependence

    cfg = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=3, vocab_size=16, max_len=12,
                               init="xavier", norm_placement=placement, beta_sa=0.5,
                               beta_ff=0.5)
    model = dl.SequenceModel(cfg, seed=1)
    x, _ = dl.SequenceTask("sort", n=5, batch_size=8, seed=1).batch(0)
    got = residual_dependence(model, x)

    def share(branch, total):
        return float(branch.double().var() / total.double().var())

    want = []
    with torch.no_grad():
        h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1]))
        for b in model.layers:
            if placement == "post":
                f1 = 0.5 * b.attn(h)
                s1 = h + f1
                f2 = 0.5 * b.mlp(b.norm1(s1))
                s2 = b.norm1(s1) + f2
                h = b.norm2(s2)
            else:
                f1 = 0.5 * b.attn(b.norm1(h))
                s1 = h + f1
                f2 = 0.5 * b.mlp(b.norm2(s1))
                s2 = s1 + f2
                h = s2
            want.append([share(f1, s1), share(f2, s2)])
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert ((got > 0) & (got < 1)).all()
    with pytest.raises(ValueError, match="sequential Pre-LN or Post-LN"):
        residual_dependence(dl.SequenceModel(cfg.replace(norm_placement="none",
                                                         norm_kind="none")), x)
