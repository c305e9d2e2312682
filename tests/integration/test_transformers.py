"""``ewc.adapters.transformers`` inside the real ``transformers.Trainer``, on tiny models built
from configs (random weights, never downloaded)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from ewc import EWC  # noqa: E402
from ewc.adapters.transformers import EWCCallback, EWCTrainer  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- tiny problems
class TinyClassifier(nn.Module):
    """A model as ``Trainer`` expects one: keyword inputs, ``{"loss", "logits"}`` out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class DictDataset(Dataset):  # type: ignore[type-arg]
    def __init__(self, **columns: Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.columns.items()}


def classification_task(seed: int, size: int = 24) -> DictDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (size,), generator=generator)
    x = (
        torch.randn(size, 6, generator=generator)
        + 1.5 * (seed + 1) * nn.functional.one_hot(labels, 6).float()
    )
    return DictDataset(x=x, labels=labels)


def classifier_forward(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return model(x=batch["x"])["logits"], batch["labels"]


def args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    defaults: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 0.05,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**defaults, **overrides})


def sgd(model: nn.Module, lr: float) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class CountingEWC(EWC):
    """An EWC that counts how often its penalty gradient is applied."""

    calls = 0

    def penalty_grad_(self, model: nn.Module, **kwargs: Any) -> Tensor | None:  # type: ignore[override]
        self.calls += 1
        return super().penalty_grad_(model, **kwargs)


def quadratic(reg: EWC, model: nn.Module) -> float:
    """``sum F (theta - a)^2`` of the consolidated state (the penalty without lambda)."""
    with torch.no_grad():
        return float(reg.penalty(model)) / reg.ewc_lambda


# ---------------------------------------------------------------------- tests
def test_consolidates_at_the_end_of_train_on_the_trainers_data(tmp_path: Path) -> None:
    model, data = TinyClassifier(), classification_task(0, size=22)
    reg = EWC(10.0)
    callback = EWCCallback(reg, forward=classifier_forward, criterion=nn.CrossEntropyLoss())
    EWCTrainer(model=model, args=args(tmp_path), train_dataset=data, callbacks=[callback]).train()

    assert reg.tasks == 1
    assert callback.last_report is not None and callback.last_report.examples == 22
    reference = EWC(10.0)  # the same weights, the same data in another order and batching
    reference.consolidate(
        model, DataLoader(data, batch_size=5), nn.CrossEntropyLoss(), forward=classifier_forward
    )
    assert reg.state.importance.keys() == {
        "net.0.weight",
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
    }
    for name, importance in reference.state.importance.items():
        torch.testing.assert_close(reg.state.importance[name], importance, msg=name)
        torch.testing.assert_close(reg.state.centre[name], reference.state.centre[name])


@pytest.mark.parametrize("trainer_class", [EWCTrainer, Trainer], ids=["mixin", "plain-trainer"])
def test_the_penalty_holds_task_a_weights_and_is_logged(
    tmp_path: Path, trainer_class: type[Trainer]
) -> None:
    class Reporter(transformers.TrainerCallback):  # type: ignore[misc]
        """What a reporting integration added after the EWC callback sees."""

        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            self.logs.append(dict(logs))

    def run(ewc_lambda: float) -> tuple[EWC, nn.Module, list[dict[str, float]]]:
        model, reg = TinyClassifier(), EWC(ewc_lambda)
        callback = EWCCallback(reg, forward=classifier_forward, criterion=nn.CrossEntropyLoss())
        for task in range(2):
            reporter = Reporter()
            trainer = trainer_class(
                model=model,
                args=args(tmp_path, num_train_epochs=3, learning_rate=0.01),
                train_dataset=classification_task(task),
                callbacks=[callback, reporter],
            )
            trainer.train()
            if task == 0:
                anchor = EWC(1.0)
                anchor.consolidate(
                    model,
                    DataLoader(classification_task(0), batch_size=8),
                    nn.CrossEntropyLoss(),
                    forward=classifier_forward,
                )
        # with the mixin through Trainer.log (log_history and every reporter); without it the
        # callbacks after EWCCallback see it
        return (
            anchor,
            model,
            trainer.state.log_history if trainer_class is EWCTrainer else reporter.logs,
        )

    held, held_model, logs = run(1000.0)
    free, free_model, _ = run(0.0)
    # sum F_A (theta - a)^2 after task B: at a large lambda, much lower than without EWC
    assert quadratic(held, held_model) < 0.05 * quadratic(free, free_model)
    train_logs = [entry for entry in logs if "loss" in entry]
    assert len(train_logs) > 2 and all("ewc_penalty" in entry for entry in train_logs)
    # at task B's first step the weights are still the anchor; from then on the penalty grows
    assert all(entry["ewc_penalty"] > 0 for entry in train_logs[1:])


@pytest.mark.parametrize("trainer_class", [EWCTrainer, Trainer], ids=["mixin", "plain-trainer"])
def test_once_per_optimizer_step_under_accumulation_and_inside_clipping_with_the_mixin(
    tmp_path: Path, trainer_class: type[Trainer]
) -> None:
    # every example the same, so each micro-batch gives the same gradient whatever the shuffle
    x, y = torch.randn(1, 6).repeat(12, 1), torch.tensor([2]).repeat(12)
    data = DictDataset(x=x, labels=y)
    model = TinyClassifier()
    reg = CountingEWC(5000.0)
    reg.consolidate(
        model,
        [(x[:4], y[:4])],
        nn.CrossEntropyLoss(),
        forward=lambda m, b: (m(x=b[0])["logits"], b[1]),
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    lr, max_norm = 0.1, 0.5
    callback = EWCCallback(reg, forward=classifier_forward, consolidate_on_train_end=False)
    trainer = trainer_class(
        model=model,
        args=args(
            tmp_path,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=3,
            max_grad_norm=max_norm,
        ),
        train_dataset=data,
        callbacks=[callback],
        optimizers=sgd(model, lr),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == 2
    assert reg.calls == 2  # 6 micro-batches, 2 optimizer steps, one penalty each

    # the same two steps by hand: penalty inside clipping (mixin) or after it (plain Trainer)
    reference = TinyClassifier()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(start[name])
    reg.calls = 0
    for _ in range(2):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[:2])["logits"], y[:2]).backward()
        if trainer_class is EWCTrainer:
            reg.penalty_grad_(reference)
            torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
            reg.penalty_grad_(reference)
        with torch.no_grad():
            for param in reference.parameters():
                param -= lr * param.grad
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, dict(reference.named_parameters())[name], msg=name)
    clipped_warning = [w for w in caught if "after gradient clipping" in str(w.message)]
    assert bool(clipped_warning) == (trainer_class is Trainer)


def resume_scenario(out: str, phase: str) -> dict[str, int]:
    """Task 0, then task 1 with checkpoints every 3 steps (``phase="first"``); or, in a fresh
    process with a fresh EWC, task 1 resumed from its first checkpoint (``phase="resume"``)."""
    model, reg = TinyClassifier(), EWC(100.0)
    seen: dict[str, Any] = {}

    class Probe(transformers.TrainerCallback):  # type: ignore[misc]
        """Runs after EWCCallback: what the EWC holds when training starts."""

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            seen["tasks"], seen["state"] = reg.tasks, reg.state_dict()

    callback = EWCCallback(reg, forward=classifier_forward, criterion=nn.CrossEntropyLoss())

    def trainer(task: int, **overrides: Any) -> Trainer:
        return EWCTrainer(
            model=model,
            args=args(Path(out) / f"task{task}", **overrides),
            train_dataset=classification_task(task),
            callbacks=[callback, Probe()],
            optimizers=sgd(model, 0.1),
        )

    checkpoints = {"save_strategy": "steps", "save_steps": 3, "max_steps": 6}
    if phase == "first":
        trainer(0).train()
        trainer(1, **checkpoints).train()
    else:
        trainer(1, **checkpoints).train(resume_from_checkpoint=f"{out}/task1/checkpoint-3")
        torch.save(seen["state"], f"{out}/restored.pt")
    torch.save(reg.state_dict(), f"{out}/{phase}_state.pt")
    torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{out}/{phase}_weights.pt")
    return {"tasks_at_begin": seen["tasks"], "tasks": reg.tasks}


RESUME = (
    "import sys, json\n"
    "from tests import torchvision_shim; torchvision_shim.apply()\n"
    "from tests.integration.test_transformers import resume_scenario\n"
    "print(json.dumps(resume_scenario(sys.argv[1], 'resume')))\n"
)


def test_resume_from_a_checkpoint_restores_the_state_in_a_fresh_process(tmp_path: Path) -> None:
    assert resume_scenario(str(tmp_path), "first") == {"tasks_at_begin": 1, "tasks": 2}
    saved = torch.load(tmp_path / "task1" / "checkpoint-3" / "ewc_state.pt")
    assert saved["state"]["tasks"] == 1

    result = subprocess.run(
        [sys.executable, "-c", RESUME, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # restored into the fresh EWC before the first step
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"tasks_at_begin": 1, "tasks": 2}
    restored = torch.load(tmp_path / "restored.pt")
    for key in ("importance", "centre"):
        for name, tensor in saved["state"][key].items():
            assert torch.equal(restored["state"][key][name], tensor)
    # the resumed run trained under the restored penalty: the same weights and final state
    for what in ("weights", "state"):
        want = torch.load(tmp_path / f"first_{what}.pt")
        got = torch.load(tmp_path / f"resume_{what}.pt")
        if what == "state":
            want, got = want["state"]["importance"], got["state"]["importance"]
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)


# ---------------------------------------------------------------------- language models
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=16,
        n_positions=12,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_task(seed: int, size: int = 8, length: int = 10) -> DictDataset:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 16, (size, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100  # the prompt half is not trained on
    return DictDataset(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels
    )


def lm_forward_flat(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Causal shift by hand, ``(n, L-1, V)`` logits against ``(n, L-1)`` labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1], batch["labels"][:, 1:]


def lm_forward(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Causal shift, class dimension second for ``nn.CrossEntropyLoss`` on ``(n, C, S)``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:]


def test_causal_lm_with_ignored_labels_consolidates_on_the_trainers_batches(tmp_path: Path) -> None:
    model, data = tiny_gpt2(), lm_task(0)
    reg = EWC(10.0, fisher="exact")
    callback = EWCCallback(reg)  # the core's Hugging Face forward and criterion
    EWCTrainer(
        model=model,
        args=args(tmp_path, per_device_train_batch_size=8),
        train_dataset=data,
        callbacks=[callback],
    ).train()
    assert reg.tasks == 1
    # by hand: the causal shift, the -100 positions left out, each sequence one example
    reference = EWC(10.0, fisher="exact")
    reference.consolidate(
        model, DataLoader(data, batch_size=3), nn.CrossEntropyLoss(), forward=lm_forward_flat
    )
    assert reg.state.importance.keys() == reference.state.importance.keys()
    for name, importance in reference.state.importance.items():
        torch.testing.assert_close(reg.state.importance[name], importance, msg=name)
    assert float(reg.state.importance["transformer.wte.weight"].sum()) > 0


def test_peft_lora_only_the_adapter_parameters_are_regularised(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0)
    )
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    reg = EWC(10.0, fisher="batched")
    callback = EWCCallback(reg, forward=lm_forward, criterion=nn.CrossEntropyLoss())
    for task in range(2):
        EWCTrainer(
            model=model,
            args=args(tmp_path, per_device_train_batch_size=4),
            train_dataset=lm_task(task),
            callbacks=[callback],
        ).train()
    assert reg.tasks == 2
    assert reg.state.importance.keys() == trainable
    assert trainable and all("lora_" in name for name in trainable)
    assert quadratic(reg, model) >= 0


def test_import_without_transformers_gives_the_install_hint() -> None:
    script = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import ewc, ewc.adapters.loop\n"
        "try:\n"
        "    import ewc.adapters.transformers\n"
        "except ModuleNotFoundError as error:\n"
        "    assert 'pip install \"ewc[transformers]\"' in str(error), error\n"
        "    print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_under_fp16_loss_scaling_the_penalty_gradient_is_scaled_with_the_task_gradient() -> None:
    # what EWCTrainerMixin adds before Accelerate's GradScaler unscales (no CPU fp16 scaler to run)
    from ewc.adapters.transformers import _penalty_grad

    model, reg = TinyClassifier(), EWC(7.0)
    reg.consolidate(
        model,
        DataLoader(classification_task(0), batch_size=8),
        nn.CrossEntropyLoss(),
        forward=classifier_forward,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1)
    plain = _penalty_grad(reg, model, 1.0, True)
    unscaled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    scaled = _penalty_grad(reg, model, 2.0**16, True)
    assert reg.ewc_lambda == 7.0  # restored
    assert plain is not None and scaled is not None and float(plain) > 0
    torch.testing.assert_close(scaled, plain)  # the logged value is the unscaled penalty
    for param, want in zip(model.parameters(), unscaled):
        assert torch.equal(param.grad / 2.0**16, want)  # power-of-two scale: exact


needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None or shutil.which("ninja") is None,
    reason="ewc.optim builds a C++ kernel: needs a C++ compiler and ninja",
)


@needs_compiler
@pytest.mark.parametrize("trainer_class", [EWCTrainer, Trainer], ids=["mixin", "plain-trainer"])
def test_ewc_optim_adamw_trains_like_the_callback_and_the_callback_defers_to_it(
    tmp_path: Path, trainer_class: type[Trainer]
) -> None:
    """``Trainer(optimizers=(ewc.optim.AdamW(...), scheduler))``: Accelerate wraps it and steps
    it once per real step, and the weights equal those of ``EWCTrainer`` + ``EWCCallback`` +
    ``torch.optim.AdamW`` (no clipping, so both see the same gradient), in float64. With the
    callback of the same regulariser as well, the callback adds nothing (the weights are the
    same again), still logs the penalty and consolidates at the end, and warns that clipping
    sees the task gradient only."""
    import ewc.optim

    task_a = classification_task(0)
    task_b = DictDataset(**{k: v.double() if v.is_floating_point() else v
                            for k, v in classification_task(1).columns.items()})  # fmt: skip

    def after_task_a() -> tuple[nn.Module, EWC]:
        model = TinyClassifier().double()
        reg = EWC(50.0)
        batches = [(batch["x"].double(), batch["labels"]) for batch in DataLoader(task_a, 8)]
        reg.consolidate(model, batches, nn.CrossEntropyLoss())
        return model, reg

    def ours(name: str, callbacks: list[Any], **extra: Any) -> tuple[nn.Module, Any, Trainer]:
        model, reg = after_task_a()
        for callback in callbacks:
            callback.reg = reg
        optimizer = ewc.optim.AdamW(model.parameters(), lr=0.01, reg=reg, model=model)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        trainer = trainer_class(
            model=model,
            args=args(tmp_path / name, **{**settings, **extra}),
            train_dataset=task_b,
            callbacks=callbacks,
            optimizers=(optimizer, schedule),
        )
        trainer.train()
        return model, optimizer, trainer

    settings = {"max_grad_norm": 0.0, "num_train_epochs": 2, "gradient_accumulation_steps": 2}
    alone, optimizer, _ = ours("alone", [])
    assert optimizer.state[alone.net[0].weight]["step"] == 6  # 24 examples, 4 x 2 per step

    reference, reference_reg = after_task_a()
    torch_adamw = torch.optim.AdamW(reference.parameters(), lr=0.01, foreach=False)
    callback = EWCCallback(
        reference_reg, forward=classifier_forward, criterion=nn.CrossEntropyLoss()
    )
    reference_trainer = EWCTrainer(
        model=reference,
        args=args(tmp_path / "reference", **settings),
        train_dataset=task_b,
        callbacks=[callback],
        optimizers=(torch_adamw, torch.optim.lr_scheduler.LambdaLR(torch_adamw, lambda _: 1.0)),
    )
    reference_trainer.train()
    for (name, mine), expected in zip(alone.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12, msg=name)

    deferring = EWCCallback(EWC(1.0), forward=classifier_forward, criterion=nn.CrossEntropyLoss())
    with pytest.warns(UserWarning, match=r"applies the penalty inside its step.*clipping"):
        both, _, trainer = ours("both", [deferring], max_grad_norm=1e9)  # clips nothing
    for (name, mine), expected in zip(both.named_parameters(), alone.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12, msg=name)
    assert deferring.reg.tasks == 2 and not deferring.penalty_in_optimizer  # reset after train
    if trainer_class is EWCTrainer:  # the plain Trainer's logs reach only later callbacks
        # the penalty before each step, as the callback logs it from penalty_grad_'s pass
        def logged(history: list[dict[str, float]]) -> list[float]:
            return [entry["ewc_penalty"] for entry in history if "loss" in entry]

        expected = logged(reference_trainer.state.log_history)
        assert len(expected) == 6 and expected[0] == 0.0 < expected[1]
        assert logged(trainer.state.log_history) == pytest.approx(expected, rel=1e-9, abs=1e-15)
