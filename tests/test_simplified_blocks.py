"""He & Hofmann's simplified blocks as members of the TransformerConfig family: shaped attention,
value-SkipInit, identity values and projections, parallel sub-blocks."""

import numpy as np
import pytest
import torch

import depthlab as dl
from depthlab.models import SelfAttention, uniform_attention

BASE = dl.TransformerConfig(d_model=32, n_heads=4, n_layers=3, vocab_size=16, max_len=12)
SAS = BASE.replace(attention="shaped", identity_values=True, alpha_sa=0.0)
SAS_P = SAS.replace(parallel=True, beta_ff=0.1)


def _x(seed=0, T=10):
    return torch.randn(4, T, BASE.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("causal", [True, False])
def test_uniform_attention_is_the_softmax_of_zero_scores(causal):
    attn = SelfAttention(32, 4, causal)
    q = k = torch.zeros(2, 4, 7, 8)
    assert torch.allclose(attn._softmax(q, k), uniform_attention(7, causal).expand(2, 4, 7, 7))
    c = uniform_attention(7, causal)
    assert torch.allclose(c.sum(-1), torch.ones(7))
    assert causal == bool((c.triu(1) == 0).all())


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_shaped_attention_is_alpha_times_the_identity_at_initialisation(alpha):
    model = dl.SequenceModel(SAS.replace(attn_alpha=alpha), seed=3)
    x = _x()
    for block in model.layers:
        a = block.attn.attention_weights(x)
        eye = alpha * torch.eye(x.shape[1]).expand_as(a)
        assert torch.allclose(a, eye, atol=1e-6)
        # values and projection are the identity too: the attention branch returns α·X
        assert torch.allclose(block.attn(x), alpha * x, atol=1e-5)
    # ... and only at initialisation: the queries are trainable
    assert model.layers[0].attn.qkv.weight.requires_grad


def test_shaped_attention_moves_away_from_the_identity_when_queries_do():
    model = dl.SequenceModel(SAS, seed=0)
    with torch.no_grad():
        model.layers[0].attn.qkv.weight[:32].normal_(0, 1, generator=torch.Generator()
                                                     .manual_seed(1))
    a = model.layers[0].attn.attention_weights(_x())
    assert (a - torch.eye(10)).abs().max() > 0.05
    assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)  # rows sum to α


def test_value_skipinit_is_alpha_identity_plus_beta_softmax():
    plain = dl.SequenceModel(BASE, seed=1)
    skip = dl.SequenceModel(BASE.replace(attention="value_skipinit", attn_alpha=1.0,
                                         attn_beta=0.3), seed=1)
    x = _x()
    for p_block, s_block in zip(plain.layers, skip.layers):
        a = p_block.attn.attention_weights(x)
        assert torch.allclose(s_block.attn.attention_weights(x), torch.eye(10) + 0.3 * a,
                              atol=1e-6)


def test_the_softmax_member_still_uses_the_fused_kernel_and_matches_written_out():
    model = dl.SequenceModel(BASE, seed=2)
    attn = model.layers[0].attn
    assert attn.sdpa and not hasattr(attn, "alpha")
    x = _x()
    fused = attn(x)
    attn.sdpa = False
    assert torch.allclose(fused, attn(x), atol=1e-5)


def test_parallel_block_matches_its_formula():
    cfg = BASE.replace(parallel=True, alpha_sa=0.7, beta_sa=0.9, beta_ff=0.2)
    block = dl.Encoder(cfg, seed=4).layers[0]
    x = _x(5)
    h = block.norm1(x)
    expected = 0.7 * x + 0.9 * block.attn(h) + 0.2 * block.mlp(h)
    assert torch.allclose(block(x), expected, atol=1e-5)
    no_skip = dl.Encoder(cfg.replace(residual=False), seed=4).layers[0]
    assert torch.allclose(no_skip(x), 0.9 * no_skip.attn(no_skip.norm1(x))
                          + 0.2 * no_skip.mlp(no_skip.norm1(x)), atol=1e-5)


def test_parameter_counts_are_exact():
    D, H, L = 32, 4, 3
    full = dl.models.count_parameters(dl.Encoder(BASE, seed=0))
    per_block_v_proj = (D * D + D) * 2                  # value rows of qkv, output projection
    per_block_norm = 2 * D                              # LayerNorm weight and bias
    assert dl.models.count_parameters(dl.Encoder(BASE.replace(identity_values=True), seed=0)) \
        == full - L * per_block_v_proj
    assert dl.models.count_parameters(dl.Encoder(BASE.replace(parallel=True), seed=0)) \
        == full - L * per_block_norm
    trainable = BASE.replace(attention="shaped", trainable_gains=True)
    # α, β and γ (the weight on −C, its own parameter as in He & Hofmann's code), per head
    assert dl.models.count_parameters(dl.Encoder(trainable, seed=0)) == full + L * 3 * H
    # α_V·I + β_V·W̃: a D×D matrix each for values and projection, no biases (their code)
    reparam = BASE.replace(value_gain=0.2)
    assert dl.models.count_parameters(dl.Encoder(reparam, seed=0)) == full - L * 2 * D
    both = reparam.replace(attention="shaped", trainable_gains=True)
    assert dl.models.count_parameters(dl.Encoder(both, seed=0)) \
        == full - L * 2 * D + L * 3 * H + L * 2 * 2


def test_trainable_gains_learn_and_fixed_gains_stay():
    for trainable in (True, False):
        cfg = SAS.replace(trainable_gains=trainable)
        model = dl.SequenceModel(cfg, seed=0)
        dl.train(model, dl.SequenceTask("sort", n=4, batch_size=16, seed=0),
                 dl.TrainConfig(steps=5, lr=1e-2))
        alpha = model.layers[0].attn.alpha
        assert isinstance(alpha, torch.nn.Parameter) == trainable
        assert (not torch.equal(alpha, torch.ones(4))) == trainable


def test_a_group_of_shaped_blocks_equals_the_runs_alone():
    cfg = dl.TrainConfig(steps=6, lr=3e-3)

    def build(s):
        return dl.SequenceModel(SAS_P.replace(trainable_gains=True), seed=s)

    def data(s):
        return dl.SequenceTask("sort", n=4, batch_size=16, seed=s)

    grouped = dl.train_group([build(s) for s in (0, 1)], [data(s) for s in (0, 1)], cfg)
    alone = [dl.train(build(s), data(s), cfg) for s in (0, 1)]
    for g, a in zip(grouped, alone):
        assert max(abs(x - y) for x, y in zip(g.loss, a.loss)) < 1e-4


@pytest.mark.parametrize("change, field", [
    (dict(attention="gated"), "attention"),
    (dict(attn_alpha=0.5), "attn_alpha"),
    (dict(attention="shaped", attn_beta=-1.0), "attn_beta"),
    (dict(parallel=True, norm_placement="post"), "parallel"),
    (dict(parallel=True, alpha_ff=0.5), "alpha_ff"),
    (dict(identity_values="yes"), "identity_values"),
    (dict(value_gain=0.2, identity_values=True), "value_gain"),
    (dict(value_gain=-0.1), "value_gain"),
    (dict(input_norm=True), "input_norm"),
    (dict(trainable_gains=True), "trainable_gains"),
])
def test_invalid_block_settings_name_the_field(change, field):
    with pytest.raises(dl.ConfigError, match=field):
        BASE.replace(**change)


# --- He & Hofmann's reparametrised values (their Eq. 6) and their norm-free model's two norms


def test_reparametrised_values_start_at_the_identity():
    model = dl.SequenceModel(SAS.replace(identity_values=False, value_gain=0.2), seed=3)
    x = _x()
    for block in model.layers:
        assert torch.equal(block.attn.value.matrix(), torch.eye(32))
        assert torch.allclose(block.attn(x), x, atol=1e-5)      # shaped + identity: returns X


@pytest.mark.parametrize("beta", [0.2, 1.0])
def test_a_skip_linear_moves_like_a_matrix_at_the_identity_trained_at_beta_times_the_rate(beta):
    """Their appendix A under Adam (ε = 0): α·I + β·W̃ trained at η is I + V trained at βη."""
    lr, x = 0.01, torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    skip = dl.models.SkipLinear(8, beta)
    plain = torch.nn.Parameter(torch.eye(8))
    for params, rate, fn in (([skip.weight], lr, skip),
                             ([plain], beta * lr, lambda t: t @ plain.T)):
        opt = torch.optim.Adam(params, lr=rate, eps=0.0)
        for _ in range(3):
            opt.zero_grad()
            (fn(x) - target).pow(2).mean().backward()
            opt.step()
    assert torch.allclose(skip.matrix(), plain.detach(), atol=1e-6)
    assert (plain.detach() - torch.eye(8)).abs().max() > 1e-3   # it did move


def test_skip_gains_are_recorded_and_move_only_when_trainable():
    for trainable in (True, False):
        cfg = SAS.replace(identity_values=False, value_gain=0.2, trainable_gains=trainable)
        model = dl.SequenceModel(cfg, seed=0)
        gains = dl.callbacks.SkipGains(every=2)
        dl.train(model, dl.SequenceTask("sort", n=4, batch_size=16, seed=0),
                 dl.TrainConfig(steps=6, lr=1e-2), [gains])
        ratio = gains.as_array()                               # (records, 2 per block)
        assert ratio.shape == (4, 2 * SAS.n_layers) and gains.steps == [0, 1, 3, 5]
        assert gains.names[:2] == ["encoder.layers.0.attn.value", "encoder.layers.0.attn.proj"]
        assert np.allclose(ratio[0], 0.2)
        assert (not np.allclose(ratio[-1], 0.2)) == trainable


def test_trainable_shaped_attention_has_its_own_gamma():
    model = dl.SequenceModel(SAS.replace(trainable_gains=True), seed=0)
    attn = model.layers[0].attn
    assert isinstance(attn.gamma, torch.nn.Parameter) and torch.equal(attn.gamma, attn.beta)
    dl.train(model, dl.SequenceTask("sort", n=4, batch_size=16, seed=0),
             dl.TrainConfig(steps=5, lr=1e-2))
    assert not torch.equal(attn.gamma, attn.beta)
    # and the matrix uses it: with zero queries A = C, so the matrix is αI + (β − γ)C
    fresh = dl.SequenceModel(SAS.replace(trainable_gains=True), seed=0).layers[0].attn
    with torch.no_grad():
        fresh.gamma.fill_(0.5)
    want = torch.eye(10) + 0.5 * uniform_attention(10, True)
    assert torch.allclose(fresh.attention_weights(_x()), want.expand(4, 4, 10, 10), atol=1e-6)


def test_norm_free_stack_keeps_a_layernorm_in_the_first_block_and_at_the_end():
    free = SAS_P.replace(norm_placement="none", norm_kind="none")
    coded = free.replace(input_norm=True, final_norm=True)
    enc = dl.Encoder(coded, seed=0)
    assert isinstance(enc.layers[0].norm1, dl.models.LayerNorm)
    assert all(isinstance(b.norm1, torch.nn.Identity) for b in enc.layers[1:])
    assert isinstance(enc.final_norm, dl.models.LayerNorm)
    x = _x()
    # the input's scale no longer matters: block 1 normalises it (without: it does)
    assert torch.allclose(enc(50.0 * x), enc(x), atol=1e-4)
    bare = dl.Encoder(free, seed=0)
    assert not torch.allclose(bare(50.0 * x), bare(x), atol=1e-2)
    # and the last LayerNorm gives every token mean 0 and variance 1
    out = enc(x)
    assert out.mean(-1).abs().max() < 1e-4 and (out.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    # the sequential norm-free block (SAS, β_FF = 0.1) normalises block 1's attention input
    seq = dl.Encoder(SAS.replace(norm_placement="none", norm_kind="none", input_norm=True,
                                 beta_ff=0.1), seed=0)
    block = seq.layers[0]
    a = block.attn(torch.nn.functional.layer_norm(x, (32,)))
    assert torch.allclose(block(x), a + 0.1 * block.mlp(a), atol=1e-5)


def test_a_group_of_reparametrised_blocks_equals_the_runs_alone():
    cfg = dl.TrainConfig(steps=6, lr=3e-3)
    model_cfg = SAS_P.replace(identity_values=False, value_gain=0.2, trainable_gains=True)

    def data(s):
        return dl.SequenceTask("sort", n=4, batch_size=16, seed=s)

    grouped = dl.train_group([dl.SequenceModel(model_cfg, seed=s) for s in (0, 1)],
                             [data(s) for s in (0, 1)], cfg)
    alone = [dl.train(dl.SequenceModel(model_cfg, seed=s), data(s), cfg) for s in (0, 1)]
    for g, a in zip(grouped, alone):
        assert max(abs(x - y) for x, y in zip(g.loss, a.loss)) < 1e-4
