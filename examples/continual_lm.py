"""Continual fine-tuning of a tiny GPT-2 through ``transformers.Trainer``, with and without EWC.

Two synthetic token "tasks" that disagree: in task A every token is followed by ``token + 1``,
in task B by ``token + 3`` (modulo the vocabulary), from random starting tokens. A GPT-2 built
from a config (random weights, nothing downloaded) is fine-tuned on A, then on B. Plain
fine-tuning forgets A; with :class:`ewc.adapters.transformers.EWCCallback` the weights that
mattered for A are held, so A's loss stays lower, at some cost on B.

Run:
    pip install -e ".[transformers]" && python examples/continual_lm.py  # about 10 s on 2 CPU cores
    python examples/continual_lm.py --lambda 1e4 --steps 150
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

try:
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging
except ModuleNotFoundError as error:  # pragma: no cover
    raise SystemExit(
        f'this example needs transformers: pip install "ewc[transformers]" ({error})'
    ) from None

from ewc import EWC
from ewc.adapters.transformers import EWCCallback, EWCTrainer

VOCAB, LENGTH = 32, 16


class TokenTask(Dataset):  # type: ignore[type-arg]
    """Sequences ``s, s + step, s + 2 step, ...`` (mod ``VOCAB``); labels are the inputs (the
    model shifts them), with the first token masked (``-100``): it cannot be predicted."""

    def __init__(self, step: int, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (size, 1), generator=generator)
        self.input_ids = (start + step * torch.arange(LENGTH)) % VOCAB
        self.labels = self.input_ids.clone()
        self.labels[:, 0] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class Progress(TrainerCallback):  # type: ignore[misc]
    """One line every ``every`` steps: what the loop is doing and how fast."""

    def __init__(self, label: str, every: int) -> None:
        self.label, self.every, self.started = label, every, time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs and state.global_step % self.every == 0:
            penalty = f", ewc_penalty {logs['ewc_penalty']:.3f}" if "ewc_penalty" in logs else ""
            print(
                f"  {self.label}: step {state.global_step:>3}/{state.max_steps}, "
                f"loss {logs['loss']:.3f}{penalty} ({time.perf_counter() - self.started:.0f} s)",
                flush=True,
            )


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


@torch.no_grad()
def task_loss(model: GPT2LMHeadModel, task: TokenTask) -> float:
    model.eval()
    loss = model(input_ids=task.input_ids, labels=task.labels).loss
    model.train()
    return float(loss)


def run(
    reg: EWC | None, tasks: dict[str, tuple[TokenTask, TokenTask]], options: Any
) -> dict[str, dict[str, float]]:
    """Fine-tune on A then B; task-A and task-B test loss after each."""
    model = tiny_gpt2(options.seed)
    callbacks: list[Any] = [] if reg is None else [EWCCallback(reg)]
    label = "plain" if reg is None else "EWC"
    losses: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for name, (train, _) in tasks.items():
            args = TrainingArguments(
                output_dir=output_dir, max_steps=options.steps, per_device_train_batch_size=32,
                learning_rate=3e-3, warmup_steps=0, logging_steps=10, save_strategy="no",
                report_to=[], use_cpu=True, disable_tqdm=True, seed=options.seed,
            )  # fmt: skip
            progress = Progress(f"{label}, task {name}", every=max(options.steps // 4, 10))
            trainer = EWCTrainer(
                model=model, args=args, train_dataset=train, callbacks=[*callbacks, progress]
            )
            trainer.remove_callback(PrinterCallback)  # Progress prints instead
            trainer.train()  # with EWCCallback: consolidated at the end of train()
            losses[name] = {other: task_loss(model, test) for other, (_, test) in tasks.items()}
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lambda", dest="ewc_lambda", type=float, default=3e3)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1),
        help="torch threads (default: 2; more than the free cores slows a busy machine down)",
    )  # fmt: skip
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    hf_logging.set_verbosity_error()
    tasks = {
        "A": (TokenTask(1, 1024, seed=1), TokenTask(1, 256, seed=2)),
        "B": (TokenTask(3, 1024, seed=3), TokenTask(3, 256, seed=4)),
    }
    started = time.perf_counter()
    print(f"tiny GPT-2, {options.steps} steps per task, {options.threads} threads", flush=True)
    plain = run(None, tasks, options)
    # "sample": the true Fisher, one sampled label per position (cheaper than "exact", which
    # needs one backward signal per token of the vocabulary)
    ewc = run(EWC(ewc_lambda=options.ewc_lambda, fisher="sample", max_samples=128), tasks, options)

    print("\ntest loss (perplexity)      task A after A   task A after B   task B after B")
    for label, losses in (("fine-tuning", plain), ("EWC", ewc)):
        cells = [losses["A"]["A"], losses["B"]["A"], losses["B"]["B"]]
        print(f"{label:<26}" + "".join(f"{c:>9.3f} ({math.exp(c):>5.2f})" for c in cells))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
