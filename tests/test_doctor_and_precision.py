
import numpy as np
import pytest
import torch
from torch import nn

import depthlab as dl


def _broken_transformer(depth=8, **changes):
    cfg = dl.TransformerConfig(d_model=32, n_layers=depth, max_len=12, norm_placement="none",
                               norm_kind="none", residual=False).replace(**changes)
    return dl.SequenceModel(cfg, seed=0)


def test_diagnose_names_vanishing_and_rank_collapse_and_clears_a_healthy_model():
    from depthlab.doctor import diagnose

    batch = dl.SequenceTask("sort", n=6, batch_size=16).batch(0)
    broken = _broken_transformer()
    before = [p.detach().clone() for p in broken.parameters()]
    d = diagnose(broken, batch)
    assert d.ratio < 1e-4 and d.update_log10.shape == (8,)
    text = d.report()
    assert "vanish" in text and "rank collapse" in text and "barely moves" in text
    assert all(torch.equal(a, b) for a, b in zip(before, broken.parameters()))  # unchanged
    healthy = diagnose(_broken_transformer(norm_placement="pre", norm_kind="layer",
                                           residual=True), batch)
    assert "no problem found" in healthy.report()
    assert "**Diagnosis**" in healthy._repr_markdown_()


def test_diagnose_works_on_a_foreign_encoder():
    from depthlab.doctor import diagnose

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                          batch_first=True),
                                num_layers=3, enable_nested_tensor=False)
    x = torch.randn(4, 5, 16)
    y = torch.randint(0, 16, (4, 5))                # the 16 output features act as classes
    d = diagnose(enc, (x, y))
    assert d.profile.n_layers == 3 and np.isfinite(d.update_log10).all()
    assert np.isnan(d.saturation).all()             # PyTorch's layer calls F.relu: unseen
    assert d.findings and "ratio" in d.findings[0]


def test_checkpointing_keeps_gradients_and_cuts_activation_memory():
    from depthlab.measure import activation_memory
    from depthlab.models import gradient_checkpointing

    model = _broken_transformer(depth=6, norm_placement="pre", norm_kind="layer",
                                residual=True)
    x, y = dl.SequenceTask("sort", n=6, batch_size=8).batch(0)

    def grads():
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1),
                                                 ignore_index=dl.IGNORE)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    full = activation_memory(model, (x, y))
    with gradient_checkpointing(model):
        assert model.encoder.checkpoint
        checked = grads()
        small = activation_memory(model, (x, y))
    assert not model.encoder.checkpoint
    assert max((a - b).abs().max().item() for a, b in zip(plain, checked)) < 1e-6
    assert small < full / 3
    with pytest.raises(ValueError, match="Encoder"):
        with gradient_checkpointing(nn.Linear(2, 2)):
            pass


def test_float16_gradients_underflow_where_bfloat16_do_not():
    from depthlab.precision import gradient_precision

    model = _broken_transformer(depth=8)
    x, y = dl.SequenceTask("sort", n=6, batch_size=16).batch(0)
    bf16 = gradient_precision(model, (x, y), torch.bfloat16)
    fp16 = gradient_precision(model, (x, y), torch.float16)
    scaled = gradient_precision(model, (x, y), torch.float16, loss_scale=2.0 ** 16)
    assert bf16.underflow.max() < 0.01
    assert fp16.underflow[0] > 0.9 and fp16.ratio == 0.0       # the first layer flushed to 0
    assert scaled.underflow[0] < fp16.underflow[0]
    assert 0 < scaled.ratio < 1e-4                             # back in range, still vanishing


def test_diagnose_measures_adam_updates_against_lr_over_weight_rms():
    from depthlab.doctor import diagnose

    batch = dl.SequenceTask("sort", n=6, batch_size=16).batch(0)
    healthy = _broken_transformer(norm_placement="pre", norm_kind="layer", residual=True)
    d = diagnose(healthy, batch, dl.TrainConfig(lr=3e-3))
    # Adam's first step moves every entry by about lr: the ratio is lr / RMS(W) (10^-1.5 here),
    # far above SGD's rule of thumb 10^-3, and that is healthy
    assert np.abs(d.update_log10 - d.expected_update_log10).max() < 0.5
    assert "no problem found" in d.report() and "overwritten" not in d.report()
    broken = _broken_transformer(depth=12)
    lagging = diagnose(broken, batch, dl.TrainConfig(lr=3e-3))
    assert lagging.expected_update_log10[0] - lagging.update_log10[0] > 2   # gradient < eps
    assert "decades less than" in lagging.report()
    tiny_eps = diagnose(broken, batch, dl.TrainConfig(lr=3e-3, eps=1e-16))
    assert np.abs(tiny_eps.update_log10 - tiny_eps.expected_update_log10).max() < 0.5
    sgd = diagnose(broken, batch, dl.TrainConfig(lr=0.1, optimizer="sgd"))
    assert np.isnan(sgd.expected_update_log10).all()                     # SGD has no such scale
    assert "barely moves" in sgd.report() or "does not move at all" in sgd.report()


def test_lost_updates_follow_the_significand_of_each_dtype():
    from depthlab.precision import lost_updates

    w = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) + 0.5   # in [0.5, 1.5)
    for rel, lost_bf16, lost_fp32 in ((1e-1, 0.0, 0.0), (1e-4, 1.0, 0.0), (1e-9, 1.0, 1.0)):
        u = rel * w
        assert lost_updates(w, u, torch.bfloat16) == lost_bf16, rel
        assert lost_updates(w, u, torch.float32) == lost_fp32, rel
    assert lost_updates(w, 1e-10 * w, torch.float16) == 1.0    # underflows to 0 in float16
    with pytest.raises(ValueError, match="nonzero"):
        lost_updates(w, torch.zeros_like(w), torch.float32)
