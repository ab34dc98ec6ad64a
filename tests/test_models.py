import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab import models

TOL = 1e-5  # float32 round-off accumulated over one block; a wiring error gives O(1)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_block_matches_torch_encoder_layer(norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, activation=activation)
    diffs = dl.torch_parity(layer, torch.randn(4, 17, 64))
    assert diffs["output"] <= TOL and diffs["input_grad"] <= TOL, diffs


def test_parity_detects_a_wiring_error():
    """The parity check must be able to fail: swap the placement and the outputs differ."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    block = dl.load_torch_encoder_layer(
        dl.Block(dl.config_from_torch_layer(layer)), layer)
    wrong = dl.Block(block.cfg.replace(norm_placement="pre"))
    wrong.load_state_dict(block.state_dict())
    x = torch.randn(2, 5, 32)
    assert (layer(x) - block(x)).abs().max() <= TOL
    assert (layer(x) - wrong(x)).abs().max() > 1e-2


def test_stacked_encoder_matches_torch_encoder():
    torch.manual_seed(1)
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, batch_first=True, norm_first=True),
        num_layers=3, enable_nested_tensor=False)
    for layer in ref.layers:  # make the layers differ, unlike the deepcopy PyTorch does
        for p in layer.parameters():
            p.data.normal_(0, 0.1)
    cfg = dl.config_from_torch_layer(ref.layers[0]).replace(n_layers=3)
    ours = dl.Encoder(cfg)
    for block, layer in zip(ours.layers, ref.layers):
        dl.load_torch_encoder_layer(block, layer)
    x = torch.randn(2, 9, 32)
    assert (ours(x) - ref(x)).abs().max() <= TOL


def test_attention_matches_a_manual_softmax():
    torch.manual_seed(0)
    for causal in (False, True):
        attn = models.SelfAttention(32, 4, causal=causal)
        x = torch.randn(2, 7, 32)
        q, k, v = attn.qkv(x).split(32, dim=-1)
        q, k, v = (t.view(2, 7, 4, 8).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        if causal:
            scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
        manual = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
        assert (attn(x) - manual).abs().max() <= TOL


def test_norms_match_pytorch():
    torch.manual_seed(0)
    x = torch.randn(6, 5, 16) * 3 + 1
    ln_ref = nn.LayerNorm(16)
    rms_ref = nn.RMSNorm(16, eps=1e-5)
    for fused in (True, False):
        assert (models.LayerNorm(16, fused=fused)(x) - ln_ref(x)).abs().max() <= TOL
        assert (models.RMSNorm(16, fused=fused)(x) - rms_ref(x)).abs().max() <= TOL


@pytest.mark.parametrize("fused", [True, False])
def test_batchnorm_matches_pytorch_in_train_and_eval(fused):
    torch.manual_seed(0)
    ours, ref = models.BatchNorm(8, fused=fused), nn.BatchNorm1d(8)
    for _ in range(3):                                    # running statistics over steps
        x = torch.randn(4, 6, 8) * 2 + 0.5                # (B, T, D): stats over all B*T tokens
        y_ours = ours(x)
        y_ref = ref(x.reshape(-1, 8)).reshape(x.shape)
        assert (y_ours - y_ref).abs().max() <= TOL
    assert (ours.running_mean - ref.running_mean).abs().max() <= TOL
    assert (ours.running_var - ref.running_var).abs().max() <= TOL
    ours.eval()
    ref.eval()
    x = torch.randn(3, 8)
    assert (ours(x) - ref(x)).abs().max() <= TOL


def test_batchnorm_rejects_a_single_value_in_training():
    with pytest.raises(ValueError, match="batch size 1"):
        models.BatchNorm(4)(torch.randn(1, 4))


@pytest.mark.parametrize("placement, kind", [("pre", "layer"), ("post", "rms"),
                                             ("none", "none"), ("pre", "batch")])
def test_sequence_model_shapes(placement, kind):
    cfg = dl.TransformerConfig(d_model=32, n_layers=2, norm_placement=placement, norm_kind=kind)
    model = dl.SequenceModel(cfg)
    idx = torch.randint(0, 16, (3, 12))
    assert model(idx).shape == (3, 12, 16)


def test_causal_model_ignores_the_future():
    model = dl.SequenceModel(dl.TransformerConfig(d_model=32, n_layers=2))
    a = torch.randint(0, 15, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 15
    assert (model(a)[0, :7] - model(b)[0, :7]).abs().max() <= TOL
    assert (model(a)[0, 7:] - model(b)[0, 7:]).abs().max() > 1e-3


def test_gains_and_residual_switch():
    cfg = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=1, norm_placement="pre",
                               final_norm=False)
    block = dl.Block(cfg)
    x = torch.randn(2, 4, 16)
    # alpha = 0 and residual=False are the same block
    no_skip = dl.Block(cfg.replace(residual=False))
    zero_alpha = dl.Block(cfg.replace(alpha_sa=0.0, alpha_ff=0.0))
    no_skip.load_state_dict(block.state_dict())
    zero_alpha.load_state_dict(block.state_dict())
    assert (no_skip(x) - zero_alpha(x)).abs().max() <= TOL
    # beta = 0 turns the block into the identity
    identity = dl.Block(cfg.replace(beta_sa=0.0, beta_ff=0.0))
    assert (identity(x) - x).abs().max() == 0


def test_layers_are_initialised_independently_and_reproducibly():
    cfg = dl.TransformerConfig(d_model=32, n_layers=4)
    a, b = dl.SequenceModel(cfg, seed=3), dl.SequenceModel(cfg, seed=3)
    w = [blk.mlp.fc1.weight for blk in a.layers]
    assert min((w[i] - w[0]).abs().max().item() for i in range(1, 4)) > 1e-2
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = dl.SequenceModel(cfg, seed=4)
    assert not torch.equal(a.layers[0].mlp.fc1.weight, c.layers[0].mlp.fc1.weight)


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dl.SequenceModel(dl.TransformerConfig(d_model=32, n_layers=2))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("scheme, expected_std", [
    ("kaiming", math.sqrt(2 / 256)),
    ("normal", 1.0),
    ("torch", 1 / math.sqrt(3 * 256)),
    ("xavier", math.sqrt(2 / (256 + 256))),
])
def test_init_schemes_have_their_scale(scheme, expected_std):
    model = dl.DeepMLP(dl.MLPConfig(d_in=256, width=256, depth=3, init=scheme))
    std = model.layers[1].linear.weight.std().item()
    assert abs(std / expected_std - 1) < 0.05


def test_kaiming_puts_the_relu_gain_only_before_an_activation():
    model = dl.SequenceModel(dl.TransformerConfig(d_model=128, n_heads=4, n_layers=2,
                                                  init="kaiming"), seed=0)
    block = model.layers[0]
    stds = {"fc1": (block.mlp.fc1.weight, 2 / 128), "fc2": (block.mlp.fc2.weight, 1 / 512),
            "qkv": (block.attn.qkv.weight, 1 / 128), "proj": (block.attn.proj.weight, 1 / 128),
            "head": (model.head.weight, 1 / 128)}
    for name, (w, var) in stds.items():
        assert abs(w.std().item() / math.sqrt(var) - 1) < 0.1, name


def test_gpt2_init_scales_residual_outputs():
    cfg = dl.TransformerConfig(d_model=64, n_layers=8, init="gpt2")
    model = dl.SequenceModel(cfg)
    std_in = model.layers[0].mlp.fc1.weight.std().item()
    std_out = model.layers[0].mlp.fc2.weight.std().item()
    assert abs(std_in / 0.02 - 1) < 0.05
    assert abs(std_out / (0.02 / math.sqrt(16)) - 1) < 0.05


def test_init_gain_multiplies_weights():
    base = dl.DeepMLP(dl.MLPConfig(init="kaiming"), seed=0)
    big = dl.DeepMLP(dl.MLPConfig(init="kaiming", init_gain=3.0), seed=0)
    assert torch.allclose(big.layers[2].linear.weight, 3 * base.layers[2].linear.weight)


def test_deep_mlp_shapes_and_residual():
    cfg = dl.MLPConfig(depth=5, width=32, residual=True, norm_kind="layer")
    model = dl.DeepMLP(cfg)
    assert model(torch.randn(7, 64)).shape == (7, 10)
    assert not model.layers[0].residual and all(layer.residual for layer in model.layers[1:])


def test_explicit_norm_formulas_match_fused_kernels():
    x = torch.randn(4, 3, 8)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    assert (models.layer_norm(x, w, b) - F.layer_norm(x, (8,), w, b)).abs().max() <= TOL
    flat = x.reshape(-1, 8)
    ref = F.batch_norm(flat, None, None, w, b, training=True).reshape(x.shape)
    assert (models.batch_norm(x, w, b) - ref).abs().max() <= TOL


def test_tutorial_bert_layer_equals_a_post_ln_block():
    from depthlab.reference import TutorialEncoderLayer, tutorial_parity

    torch.manual_seed(0)
    layer = TutorialEncoderLayer(64, 4, 256, dropout=0.1)
    assert tutorial_parity(layer, torch.randn(3, 9, 64)) <= TOL
    assert layer.training                                   # mode restored


def test_written_out_norms_match_pytorch_layers_on_btd_tensors():
    from depthlab.reference import norm_parity

    torch.manual_seed(0)
    x = torch.randn(4, 6, 16) * 2 + 0.5
    diffs = norm_parity(x)
    assert set(diffs) == {"LayerNorm", "RMSNorm", "BatchNorm"}
    assert max(diffs.values()) <= TOL, diffs
    # the transpose matters: BatchNorm1d on (B, T, D) normalises over the wrong axis
    wrong = nn.BatchNorm1d(6)(x)                          # treats T=6 as the feature axis
    assert (models.batch_norm(x, torch.ones(16), torch.zeros(16)) - wrong).abs().max() > 0.1


def test_noisy_batchnorm_moves_the_distribution_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    noisy, clean = models.BatchNorm(8, noise=0.5), models.BatchNorm(8)
    a, b = noisy(x), clean(x)
    # per feature the noise is one scale and one shift for the whole batch
    assert (a.mean(0) - b.mean(0)).abs().max() > 0.05
    assert not torch.allclose(noisy(x), a)                 # redrawn at every call
    clean(x)                                               # same running-statistics updates
    noisy.eval()
    clean.eval()
    assert torch.allclose(noisy(x), clean(x))              # eval mode: no noise
    mlp = dl.DeepMLP(dl.MLPConfig(depth=2, norm_kind="batch", norm_noise=0.2))
    assert mlp.layers[0].norm.noise == 0.2


def test_qk_layernorm_bounds_the_attention_logits_whatever_the_weight_scale():
    """With qk_norm every head's query and key have norm √Dh (LayerNorm at unit gain), so
    |q·k|/√Dh ≤ √Dh; without it the logits grow with the square of the weights' scale."""
    import math

    cfg = dl.TransformerConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=16, max_len=12)
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0))
    biggest = {}
    for qk_norm in (False, True):
        block = dl.Encoder(cfg.replace(qk_norm=qk_norm), seed=0).layers[0]
        with torch.no_grad():
            block.attn.qkv.weight.mul_(30.0)
            logits = block.attn.attention_logits(x)
        assert logits.shape == (3, 4, 10, 10)
        assert torch.isinf(logits[..., 0, 1:]).all()                   # the future is masked
        biggest[qk_norm] = float(logits[torch.isfinite(logits)].abs().max())
    assert biggest[True] <= math.sqrt(8) + 1e-4
    assert biggest[False] > 10 * math.sqrt(8)
    # the logits are the ones the softmax uses: they reproduce the attention matrix
    block = dl.Encoder(cfg.replace(qk_norm=True), seed=1).layers[0]
    with torch.no_grad():
        assert torch.allclose(block.attn.attention_logits(x).softmax(-1),
                              block.attn.attention_weights(x), atol=1e-6)
        block.attn.sdpa = False
        written = block.attn(x)
        block.attn.sdpa = True
        assert torch.allclose(written, block.attn(x), atol=1e-5)   # fused path normalises too
