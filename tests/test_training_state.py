"""Resumable training: a run stopped at any iteration and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, EnsureTyped, RandGaussianNoised, RandScaleIntensityd
from monai.utils import set_determinism

from medgen_common.training_state import (
    TrainingStateHandler,
    capture_random_state,
    data_transforms,
    restore_random_state,
)

EPOCHS, ITEMS, BATCH = 3, 10, 3  # 4 iterations per epoch (the last batch is short)


class Killed(Exception):
    """Stands for SIGKILL: the run stops between two iterations, after whatever the handlers wrote."""


def make_trainer(state_file, save_interval: int, resume: bool, kill_at: int | None = None, epoch_length: int = 4):
    set_determinism(seed=0)
    network = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    data = [{"image": torch.full((4,), float(i)), "label": torch.tensor([float(i % 3)])} for i in range(ITEMS)]
    transform = Compose([
        EnsureTyped(keys=["image", "label"]),
        RandGaussianNoised(keys="image", prob=0.8, std=0.5),
        RandScaleIntensityd(keys="image", factors=0.3, prob=0.5),
    ])  # fmt: skip
    loader = DataLoader(Dataset(data, transform), batch_size=BATCH, shuffle=True, num_workers=0)
    handler = TrainingStateHandler(state_file, {"network": network, "optimizer": optimizer, "schedule": schedule},
                                   save_interval=save_interval, resume=resume)  # fmt: skip
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=EPOCHS, epoch_length=epoch_length, train_data_loader=loader, network=network,
        optimizer=optimizer, loss_function=torch.nn.MSELoss(), train_handlers=[handler],
    )  # fmt: skip
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: schedule.step())
    if kill_at is not None:

        @trainer.on(Events.ITERATION_COMPLETED(once=kill_at))
        def _kill(_):
            raise Killed

    return trainer, network


def final_weights(trainer, network) -> torch.Tensor:
    trainer.run()
    return torch.cat([p.detach().flatten() for p in network.parameters()])


@pytest.mark.parametrize(
    "save_interval, kill_at, epoch_length",
    # epochs of one pass over the data; epochs shorter than a pass (3 of 4 batches), so passes straddle epochs
    [(0, 6, 4), (3, 7, 4), (2, 9, 4), (3, 12, 4), (0, 5, 3), (2, 7, 3), (1, 5, 3)],
)
def test_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, save_interval, kill_at, epoch_length):
    expected = final_weights(*make_trainer(tmp_path / "reference.pt", save_interval, False, epoch_length=epoch_length))
    state_file = tmp_path / "state.pt"
    trainer, _ = make_trainer(state_file, save_interval, resume=False, kill_at=kill_at, epoch_length=epoch_length)
    with pytest.raises(Killed):
        trainer.run()
    saved_at = torch.load(state_file, weights_only=True)["engine"]["iteration"]
    assert 0 < saved_at < kill_at  # the kill lost work after the last save
    trainer, network = make_trainer(state_file, save_interval, resume=True, epoch_length=epoch_length)
    started_at = []
    trainer.add_event_handler(
        Events.ITERATION_STARTED(once=saved_at + 1), lambda e: started_at.append(e.state.iteration)
    )
    resumed = final_weights(trainer, network)
    assert started_at == [saved_at + 1]  # it did not start over
    assert (resumed - expected).abs().max() < 1e-5
    assert trainer.state.iteration == EPOCHS * epoch_length


def test_resume_without_a_state_file_starts_from_scratch_and_says_so(tmp_path, caplog):
    expected = final_weights(*make_trainer(tmp_path / "reference.pt", 0, resume=False))
    with caplog.at_level("WARNING"):
        trainer, network = make_trainer(tmp_path / "missing.pt", 0, resume=True)
        assert torch.equal(final_weights(trainer, network), expected)
    assert "starting from scratch" in caplog.text


def test_a_state_from_another_pipeline_is_refused(tmp_path):
    state_file = tmp_path / "state.pt"
    trainer, _ = make_trainer(state_file, 0, resume=False, kill_at=5)
    with pytest.raises(Killed):
        trainer.run()
    trainer, network = make_trainer(state_file, 0, resume=True)
    trainer.data_loader.dataset.transform = Compose([EnsureTyped(keys=["image", "label"])])
    with pytest.raises(ValueError, match="data pipeline changed"):
        trainer.run()


def test_objects_without_state_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="'loss'"):
        TrainingStateHandler(tmp_path / "s.pt", {"loss": lambda x: x})


def test_random_state_round_trips_through_weights_only_loading(tmp_path):
    transform = RandGaussianNoised(keys="image", prob=1.0)
    transform.set_random_state(3)
    state = capture_random_state([transform])
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), transform.R.rand(2).tolist())
    restore_random_state(torch.load(tmp_path / "rng.pt", weights_only=True), [transform])
    assert torch.equal(torch.rand(3), expected[0]) and transform.R.rand(2).tolist() == expected[1]


def test_finding_the_data_transforms_leaves_their_random_streams_alone(tmp_path):
    """Regression: Compose.flatten() builds a new Compose, which re-seeds every child transform, so augmentations
    repeated from each save on."""
    trainer, _ = make_trainer(tmp_path / "state.pt", 0, resume=False)
    transforms = data_transforms(trainer)
    names = [type(t).__name__ for t in transforms]
    assert names == ["Compose", "RandGaussianNoised", "RandGaussianNoise", "RandScaleIntensityd", "RandScaleIntensity"]
    before = [t.R.get_state()[1].copy() for t in transforms]
    transforms[1].R.rand(5)  # advance one stream, as training does
    advanced = transforms[1].R.get_state()[1].copy()
    data_transforms(trainer)
    capture_random_state(data_transforms(trainer))
    assert (transforms[1].R.get_state()[1] == advanced).all() and not (advanced == before[1]).all()
    assert all((t.R.get_state()[1] == b).all() for t, b in zip(transforms[2:], before[2:]))
