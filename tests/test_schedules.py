"""A schedule is a function of run progress, computed where it is used: the server sends the
run config unchanged every round, each client computes its round's learning rate from it,
and the centralized baseline computes the same schedule per epoch."""
from __future__ import annotations

import dataclasses

import pytest

from fedssl.client import app as client_module
from fedssl.simulations import centralized
from fedssl.client.app import app as client_app
from fedssl.common.schedules import cosine, round_lr
from fedssl.common.training import StepSettings
from fedssl.server.app import run_federation
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config


def test_round_lr_is_a_cosine_over_rounds_from_the_base_rate():
    assert round_lr(1, 4, 0.08) == 0.08
    assert round_lr(3, 4, 0.08) == pytest.approx(0.04)
    # the last round still learns: the cosine reaches 0 only after it
    assert 0.0 < round_lr(4, 4, 0.08) < round_lr(3, 4, 0.08)
    assert [round_lr(r, 5, 0.3) for r in range(1, 6)] == [cosine((r - 1) / 5, 0.3, 0.0) for r in range(1, 6)]


def test_step_settings_are_the_run_configs_with_the_rate_given():
    cfg = fast_config("x", "y", lr=0.07, momentum=0.8, weight_decay=1e-3, amp=False, predictor_lr_scale=4.0)
    settings = StepSettings.from_config(cfg)
    assert settings == StepSettings(batch_size=cfg.batch_size, lr=0.07, momentum=0.8, weight_decay=1e-3,
                                    amp=False, predictor_lr=4.0 * 0.07)
    # the predictor's default schedule keeps it at the multiple of the base rate
    assert StepSettings.from_config(cfg, lr=0.01) == dataclasses.replace(settings, lr=0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0


def _recording_rates(monkeypatch, module) -> list[float]:
    """The learning rate of each train_epochs call `module` makes (the real one still runs)."""
    rates, real = [], module.train_epochs

    def recording(*args, **kwargs):
        rates.append(kwargs["settings"].lr)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "train_epochs", recording)
    return rates


def test_the_run_config_travels_unchanged_and_each_client_trains_at_its_rounds_rate(
        small_image_folder, tmp_path, monkeypatch):
    rates = _recording_rates(monkeypatch, client_module)
    cfg = fast_config(small_image_folder, tmp_path / "run", num_rounds=3, lr=0.08)
    grid = InProcessGrid(client_app, num_nodes=2)
    run_federation(grid, cfg)

    sent_rounds = []
    for message in grid.sent:
        config = dict(message.content["config"])
        sent_rounds.append(config.pop("server-round"))
        assert config == cfg.to_mapping()
    assert sent_rounds == [1, 1, 2, 2, 3, 3]
    # the cosine over rounds from the base rate, computed by each client from the round number
    assert rates == [round_lr(r, 3, 0.08) for r in sent_rounds]
    assert rates[0] == 0.08 and rates[-1] < rates[2] < rates[0]


def test_the_centralized_baseline_reads_an_epoch_as_a_round(small_image_folder, tmp_path, monkeypatch):
    rates = _recording_rates(monkeypatch, centralized)
    cfg = fast_config(small_image_folder, tmp_path / "run", num_rounds=3, fraction_train=1.0, lr=0.08)
    centralized.run_centralized(cfg)
    epochs = centralized.pooled_epochs(cfg)
    assert epochs == 3 and rates == [round_lr(e, epochs, 0.08) for e in range(1, epochs + 1)]
