"""A NaN or infinite loss stops training with the iteration and the loss named, or the step is skipped and counted."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from medgen_common.handlers import NonFiniteLossGuard


class NanAtIteration(torch.nn.Module):
    """MSE whose value is NaN at the listed iterations (counted by calls)."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad_calls, self.calls = set(bad_calls), 0

    def forward(self, prediction, target):
        self.calls += 1
        loss = torch.nn.functional.mse_loss(prediction, target)
        return loss * float("nan") if self.calls in self.bad_calls else loss


def trainer_with(mode: str, bad_calls, snapshots: list | None = None):
    torch.manual_seed(0)
    network = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.1)
    data = [{"image": torch.randn(3), "label": torch.randn(1)} for _ in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=network, optimizer=optimizer,
        loss_function=NanAtIteration(bad_calls), train_handlers=[NonFiniteLossGuard(optimizer, mode, "diffusion")],
    )  # fmt: skip
    if snapshots is not None:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda _: snapshots.append(network.weight.detach().clone())
        )
    return trainer, network


def test_a_nan_loss_stops_training_naming_the_iteration_and_the_loss():
    trainer, _ = trainer_with("raise", bad_calls=[3])
    with pytest.raises(FloatingPointError, match=r"the diffusion loss is nan at iteration 3 \(epoch 1\)"):
        trainer.run()


def test_skip_mode_leaves_the_weights_alone_for_that_step_and_counts_it():
    snapshots: list = []
    trainer, network = trainer_with("skip", bad_calls=[3, 6], snapshots=snapshots)
    trainer.run()
    assert trainer.state.skipped_nonfinite_steps == 2
    assert torch.equal(snapshots[2], snapshots[1]) and torch.equal(snapshots[5], snapshots[4])  # steps 3 and 6
    assert not torch.equal(snapshots[3], snapshots[2])  # training went on
    assert torch.isfinite(network.weight).all()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'raise' or 'skip'"):
        NonFiniteLossGuard(None, "ignore")
