"""The runs tests/test_distributed.py compares between one process and two (torchrun)."""

import depthlab as dl

STEPS = 4
BASE = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=2, vocab_size=16, max_len=12)
# SGD: its step is linear in the gradient, so float round-off in the ranks' summed gradients
# stays round-off. (Adam divides by |g| + eps: for the nearly-zero entries of a gradient that
# turns a 1e-9 difference into a visible one, although both runs compute the same step.)
TRAIN = dl.TrainConfig(steps=STEPS, lr=0.1, optimizer="sgd", seed=0, progress=False)
CASES = {
    # no BatchNorm: two processes must take exactly the single-process step on the whole batch
    "layer norm": (BASE, dl.SequenceTask("sort", n=6, batch_size=8, seed=0), TRAIN),
    # a batch of 7 splits 4 + 3, and variable lengths give the ranks different label counts
    "uneven shares": (BASE.replace(vocab_size=17),
                      dl.SequenceTask("sort", n=6, batch_size=7, seed=1, min_n=2), TRAIN),
    # BatchNorm normalises each rank's share alone: not the single-process step
    "batch norm": (BASE.replace(norm_kind="batch"),
                   dl.SequenceTask("sort", n=6, batch_size=8, seed=0), TRAIN),
}


def sweep_points():
    return [(s, lr) for s in (0, 1, 2) for lr in (1e-3, 3e-3)]


def sweep_fn(point):
    """One independent short run per point: its final loss (a sweep inside torchrun trains
    every point alone, on one rank)."""
    seed, lr = point
    model = dl.SequenceModel(BASE, seed=seed)
    task = dl.SequenceTask("sort", n=6, batch_size=8, seed=seed)
    return dl.train(model, task, TRAIN.replace(lr=lr, seed=seed)).loss
