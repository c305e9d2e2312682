"""Split Digits: an MLP learns five tasks one after another, with and without EWC.

scikit-learn's bundled 8x8 digits are cut into five two-class tasks (0/1, 2/3, 4/5, 6/7, 8/9).
The network has a shared body and one output head per task (task-incremental learning: the task
id picks the head). Trained on the tasks in sequence, plain fine-tuning forgets earlier tasks as
the shared body drifts; EWC anchors the weights that mattered for them.

Run:
    pip install -e ".[examples]" && python examples/split_digits.py
    python examples/split_digits.py --lambda 1e4 --fisher sample --threads 1

It prints a line per task as it goes. The work is small matrix products, which gain little from
more threads and lose a lot when the threads outnumber the free cores (a busy machine): one
thread by default. About 10 s on an idle 2-core machine; on a loaded one, proportionally more.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from ewc import EWC

PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
Task = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_test, y_test


class MultiHeadMLP(nn.Module):
    """A shared two-layer body and one linear head per task; ``forward(x, task)``."""

    def __init__(self, tasks: int, hidden: int = 100) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(tasks))

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](self.body(x))


def split_digits(seed: int = 0) -> list[Task]:
    """Five two-class tasks; labels are 0/1 within each task, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    tasks = []
    for first, second in PAIRS:
        keep = (y == first) | (y == second)
        x_tr, x_te, y_tr, y_te = train_test_split(
            x[keep] / 16.0,
            (y[keep] == second).astype("int64"),
            test_size=0.3,
            random_state=seed,
            stratify=y[keep],
        )
        as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
        tasks.append((as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)))
    return tasks


def accuracy(model: nn.Module, task: int, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x, task).argmax(-1) == y).float().mean().item()


def run(
    tasks: list[Task], reg: EWC | None, *, epochs: int, seed: int, label: str = ""
) -> list[list[float]]:
    """Train on each task in turn; returns ``acc[i][j]``: accuracy on task j after task i."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = MultiHeadMLP(len(tasks))
    criterion = nn.CrossEntropyLoss()
    history = []
    for t, (x, y, _, _) in enumerate(tasks):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True
        )
        for _ in range(epochs):
            for xb, yb in loader:
                loss = criterion(model(xb, t), yb)
                if reg is not None:
                    loss = loss + reg.penalty(model)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if reg is not None:
            # the task id is not in the batch, so tell consolidate how to run the model
            reg.consolidate(
                model, loader, criterion, forward=lambda m, batch, t=t: (m(batch[0], t), batch[1])
            )
        history.append([accuracy(model, j, xt, yt) for j, (_, _, xt, yt) in enumerate(tasks)])
        if label:
            seen = history[-1][: t + 1]
            print(
                f"  {label}: task {t + 1}/{len(tasks)} done, mean accuracy on tasks so far "
                f"{100 * sum(seen) / len(seen):5.1f}%  ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    return history


def show(name: str, history: list[list[float]]) -> None:
    print(f"\n{name}: accuracy (%) on each task after training on task ...")
    print("after  " + "  ".join(f"task{j + 1}" for j in range(len(history))) + "   mean so far")
    for i, row in enumerate(history):
        seen = row[: i + 1]
        cells = "  ".join(f"{100 * a:5.1f}" if j <= i else "    -" for j, a in enumerate(row))
        print(f"task{i + 1}  {cells}   {100 * sum(seen) / len(seen):6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lambda", dest="ewc_lambda", type=float, default=1e3)
    parser.add_argument(
        "--fisher", default="exact", choices=["exact", "sample", "empirical", "batched"]
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: this small model gains little from more, and a busy "
        "machine slows down when threads outnumber free cores)",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))

    tasks = split_digits(args.seed)
    start = time.perf_counter()
    print(f"{len(tasks)} tasks, {args.epochs} epochs each, {torch.get_num_threads()} thread(s)")
    plain = run(tasks, None, epochs=args.epochs, seed=args.seed, label="fine-tuning")
    reg = EWC(args.ewc_lambda, mode="online", decay_factor=1.0, fisher=args.fisher)
    with_ewc = run(tasks, reg, epochs=args.epochs, seed=args.seed, label="EWC")
    show("Fine-tuning (no EWC)", plain)
    show(f"Online EWC (lambda={args.ewc_lambda:g}, fisher={args.fisher!r})", with_ewc)

    def forgetting(h: list[list[float]]) -> float:
        """Mean drop from the accuracy just after learning a task to the end (earlier tasks)."""
        drops = [h[j][j] - h[-1][j] for j in range(len(h) - 1)]
        return round(100 * sum(drops) / len(drops), 1) + 0.0  # + 0.0 turns -0.0 into 0.0

    print(
        f"\nfinal mean accuracy: no EWC {100 * sum(plain[-1]) / len(tasks):.1f}%, "
        f"EWC {100 * sum(with_ewc[-1]) / len(tasks):.1f}%"
    )
    print(
        f"forgetting (mean drop on tasks 1-4): no EWC {forgetting(plain):.1f} points, "
        f"EWC {forgetting(with_ewc):.1f} points   [{time.perf_counter() - start:.1f} s]"
    )


if __name__ == "__main__":
    main()
