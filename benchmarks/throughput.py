"""Training-step throughput: depthlab vs nn.TransformerEncoder, and the cost of diagnostics.

Measured side by side in one run, interleaved (A, B, A, B, ...) so that machine noise hits both
alike; prints ratios, the numbers the budgets are stated in:

- depthlab tokens/s ÷ nn.TransformerEncoder tokens/s at the same configuration (budget ≥ 1.0);
- training step time with the LayerGradNorms hooks ÷ without (budget ≤ 1.10).

Run from the repository root: .venv/bin/python benchmarks/throughput.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import depthlab as dl
from depthlab.train import loss_and_accuracy, make_optimizer

D, H, L, B, T, V = 64, 4, 6, 64, 17, 16
REPEATS, STEPS = 7, 20


class TorchSequenceModel(nn.Module):
    """The same sequence model around PyTorch's encoder (Pre-LN, causal mask, final norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(V, D)
        self.pos_emb = nn.Embedding(T, D)
        layer = nn.TransformerEncoderLayer(D, H, 4 * D, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, L, norm=nn.LayerNorm(D),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(D, V)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        return self.head(self.encoder(x, mask=self.mask, is_causal=True))


def step_timer(model: nn.Module, callbacks=()):
    opt = make_optimizer(model.parameters(), dl.TrainConfig(lr=1e-3))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V - 1, (B, T), generator=g)
    y = torch.randint(0, V - 1, (B, T), generator=g)
    for cb in callbacks:
        cb.on_train_start(model)

    def run(n: int) -> float:
        start = time.perf_counter()
        for step in range(n):
            loss, _ = loss_and_accuracy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for cb in callbacks:
                cb.after_step(step, model)
        return (time.perf_counter() - start) / n

    run(3)                                                    # warm-up
    return run


def interleaved(a, b) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(REPEATS):
        ta.append(a(STEPS))
        tb.append(b(STEPS))
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    torch.manual_seed(0)
    cfg = dl.TransformerConfig(d_model=D, n_heads=H, n_layers=L, norm_placement="pre",
                               vocab_size=V, max_len=T)
    ours = dl.SequenceModel(cfg)
    theirs = TorchSequenceModel()
    print(f"config: width {D}, {L} layers, {H} heads, batch {B}x{T} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    t_ours, t_theirs = interleaved(step_timer(ours), step_timer(theirs))
    print(f"depthlab          : {t_ours * 1e3:6.1f} ms/step  {B * T / t_ours:8.0f} tokens/s")
    print(f"nn.TransformerEnc.: {t_theirs * 1e3:6.1f} ms/step  {B * T / t_theirs:8.0f} tokens/s")
    print(f"throughput ratio depthlab / PyTorch = {t_theirs / t_ours:.2f}  (budget >= 1.0)")

    hooked = dl.SequenceModel(cfg)
    plain = dl.SequenceModel(cfg)
    t_hooked, t_plain = interleaved(step_timer(hooked, [dl.LayerGradNorms()]),
                                    step_timer(plain))
    print(f"diagnostics hooks: step time ratio with / without = {t_hooked / t_plain:.3f}  "
          f"(budget <= 1.10)")


if __name__ == "__main__":
    main()
