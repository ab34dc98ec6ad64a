"""How long the doctor takes on a GPT-2-sized configuration on the CPU (chapter 9).

A Hugging Face GPT-2 with 12 blocks of width 256 (4 heads, GPT-2's own vocabulary of 50,257
tokens and 1,024 positions), random weights, nothing downloaded; one batch of 8 sequences of
64 tokens (the previous-token task). Prints the seconds of ``dl.doctor(model, batch)`` (the
median of ``--repeats`` calls, after one warm-up call) and of one forward and backward pass,
for scale. The issue's budget is 10 s. Run from .venv on an idle machine:

    .venv/bin/python benchmarks/doctor_time.py
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import depthlab as dl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_embd=256,
                                                                 n_head=4))
    batch = dl.data.PreviousToken(vocab=model.config.vocab_size, length=64, batch_size=8,
                                  seed=0).batch(0)
    start = time.perf_counter()
    loss, _ = dl.losses.loss_and_accuracy(model(batch[0]).logits, batch[1])
    loss.backward()
    model.zero_grad(set_to_none=True)
    pass_time = time.perf_counter() - start
    dl.doctor(model, batch)                                       # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        report = dl.doctor(model, batch)
        times.append(time.perf_counter() - start)
    print(f"GPT-2 config, 12 blocks x 256, vocabulary {model.config.vocab_size}, batch 8 x 64, "
          f"{torch.get_num_threads()} threads")
    print(f"one forward + backward pass: {pass_time:.2f} s")
    print(f"dl.doctor: {statistics.median(times):.2f} s (median of {args.repeats}; budget 10 s); "
          f"{'no problem' if report.ok else 'problems: ' + str([f.name for f in report.problems])}")


if __name__ == "__main__":
    main()
