"""Runs spread over processes and seed ensembles give the runs a plain loop gives."""

import os

import pytest
import torch

import depthlab as dl
from depthlab.ensemble import train_seeds
from depthlab.parallel import sweep

SMALL = dl.TransformerConfig(d_model=32, n_layers=2, vocab_size=16, max_len=16)
CFG = dl.TrainConfig(steps=12, lr=3e-3)


def _loss_after(seed):
    model = dl.SequenceModel(SMALL, seed=seed)
    hist = dl.train(model, dl.SequenceTask("sort", n=4, batch_size=16, seed=seed),
                    CFG.replace(seed=seed))
    return hist.loss, [p.detach().clone() for p in model.parameters()]


def test_a_sweep_over_processes_equals_a_plain_loop():
    points = [3, 1, 2, 0]
    parallel = sweep(_loss_after, points, workers=2)
    plain = sweep(_loss_after, points, workers=1)
    for (la, pa), (lb, pb) in zip(parallel, plain):
        assert la == lb                                       # bit for bit
        assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert sweep(lambda p: (p, os.getpid()), [0, 1], workers=2)[1][0] == 1   # order kept


def test_a_failing_point_raises_here_with_the_workers_traceback():
    def fail(p):
        if p == 2:
            raise ZeroDivisionError("point two")
        return p

    with pytest.raises(RuntimeError, match="(?s)point 2.*ZeroDivisionError: point two"):
        sweep(fail, [0, 1, 2, 3], workers=2)


def test_train_seeds_in_processes_equals_sequential_runs():
    def build(s):
        return dl.SequenceModel(SMALL, seed=s)

    def data(s):
        return dl.SequenceTask("sort", n=4, batch_size=16, seed=s)

    a = train_seeds(build, data, CFG, [0, 1, 2], method="processes", workers=2)
    b = train_seeds(build, data, CFG, [0, 1, 2], method="sequential")
    assert [r.seed for r in a] == [0, 1, 2]
    for ra, rb in zip(a, b):
        assert ra.history.loss == rb.history.loss
        assert all(torch.equal(x, y) for x, y in zip(ra.model.parameters(),
                                                     rb.model.parameters()))


@pytest.mark.parametrize("kind", ["transformer", "batchnorm mlp"])
def test_each_ensemble_member_equals_the_model_trained_alone(kind):
    if kind == "transformer":
        def build(s):
            return dl.SequenceModel(SMALL, seed=s)

        def data(s):
            return dl.SequenceTask("sort", n=4, batch_size=16, seed=s)
        cfg = CFG.replace(clip_norm=0.5, warmup_steps=3)
    else:
        def build(s):
            return dl.DeepMLP(dl.MLPConfig(depth=3, width=16, norm_kind="batch"), seed=s)

        def data(s):
            return dl.Digits(batch_size=16, seed=s)
        cfg = dl.TrainConfig(steps=12, lr=0.05, optimizer="sgd", clip_norm=1.0)
    ensemble = train_seeds(build, data, cfg, [0, 1, 2], method="vmap")
    alone = train_seeds(build, data, cfg, [0, 1, 2], method="sequential")
    for e, a in zip(ensemble, alone):
        assert e.history.steps_run == a.history.steps_run == 12
        diffs = [abs(x - y) for x, y in zip(e.history.loss, a.history.loss)]
        assert max(diffs) < 1e-4, diffs
        assert max(abs(x - y) / y for x, y in zip(e.history.grad_norm, a.history.grad_norm)) \
            < 1e-3
        for (name, p), q in zip(e.model.state_dict().items(), a.model.state_dict().values()):
            if name.endswith("attn.qkv.bias"):
                # The key bias adds the same q·b_k to every score of a row: softmax ignores it,
                # so its gradient is 0 up to round-off, and Adam turns round-off into steps of
                # size lr (it divides by the gradient's own scale). Those steps are noise and
                # differ between any two implementations; compare query and value biases only.
                d = p.shape[0] // 3
                p, q = torch.cat([p[:d], p[2 * d:]]), torch.cat([q[:d], q[2 * d:]])
            assert torch.allclose(p.float(), q.float(), atol=1e-4), name


def test_a_diverging_member_stops_alone():
    def build(s):
        return dl.DeepMLP(dl.MLPConfig(depth=3, width=16, init="normal",
                                       init_gain=30.0 if s == 1 else 0.3), seed=s)

    cfg = dl.TrainConfig(steps=15, lr=0.2, optimizer="sgd", momentum=0.0)
    runs = train_seeds(build, lambda s: dl.Digits(batch_size=16, seed=s), cfg, [0, 1, 2],
                       method="vmap")
    alone = train_seeds(build, lambda s: dl.Digits(batch_size=16, seed=s), cfg, [0, 1, 2],
                        method="sequential")
    assert [r.history.status for r in runs] == [r.history.status for r in alone]
    assert runs[1].history.status == "diverged"
    assert runs[1].history.diverged_at == alone[1].history.diverged_at
    assert runs[0].history.status != "diverged"
    assert all(torch.isfinite(p).all() for p in runs[1].model.parameters())


def test_vmap_says_why_it_cannot_run():
    def noisy(s):
        return dl.DeepMLP(dl.MLPConfig(depth=2, norm_kind="batch", norm_noise=0.1), seed=s)

    with pytest.raises(ValueError, match="random numbers"):
        train_seeds(noisy, lambda s: dl.Digits(seed=s), CFG, [0, 1, 2], method="vmap")
    runs = train_seeds(noisy, lambda s: dl.Digits(seed=s), CFG.replace(steps=2), [0, 1, 2])
    assert len(runs) == 3                                     # "auto" falls back
