
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
    from depthlab.remedies import diagnose

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
    from depthlab.remedies import diagnose

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
    from depthlab.hooks import activation_memory
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
    full = activation_memory(model, x, y)
    with gradient_checkpointing(model):
        assert model.encoder.checkpoint
        checked = grads()
        small = activation_memory(model, x, y)
    assert not model.encoder.checkpoint
    assert max((a - b).abs().max().item() for a, b in zip(plain, checked)) < 1e-6
    assert small < full / 3
    with pytest.raises(ValueError, match="Encoder"):
        with gradient_checkpointing(nn.Linear(2, 2)):
            pass


def test_float16_gradients_underflow_where_bfloat16_do_not():
    from depthlab.remedies import gradient_precision

    model = _broken_transformer(depth=8)
    x, y = dl.SequenceTask("sort", n=6, batch_size=16).batch(0)
    bf16 = gradient_precision(model, x, y, torch.bfloat16)
    fp16 = gradient_precision(model, x, y, torch.float16)
    scaled = gradient_precision(model, x, y, torch.float16, loss_scale=2.0 ** 16)
    assert bf16.underflow.max() < 0.01
    assert fp16.underflow[0] > 0.9 and fp16.ratio == 0.0       # the first layer flushed to 0
    assert scaled.underflow[0] < fp16.underflow[0]
    assert 0 < scaled.ratio < 1e-4                             # back in range, still vanishing
