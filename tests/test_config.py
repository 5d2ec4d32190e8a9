"""Config loading: YAML + overrides -> dataclasses, every problem listed at once."""

from dataclasses import dataclass, field

import pytest

from cpt.shared.config import ConfigError, load_config


@dataclass
class Optim:
    lr: float = 1.0e-4
    weight_decay: float = 0.01
    max_steps: int = 100

    def problems(self) -> list[str]:
        return ["weight_decay: must be >= 0"] if self.weight_decay < 0 else []


@dataclass
class Run:
    name: str = "run"
    optim: Optim = field(default_factory=Optim)


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads 2e-5 and 1e3 as strings (YAML 1.1); a user writing them means numbers.
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 2e-5\n  max_steps: 1e3\n")
    run = load_config(Run, path)
    assert (run.optim.lr, run.optim.max_steps) == (2e-5, 1000)


def test_every_problem_is_listed_and_a_wrong_type_never_crashes_the_checks():
    with pytest.raises(ConfigError) as err:
        load_config(Run, data={"optim": {"weight_decay": "lots", "lr": [1]}, "nmae": "x"})
    assert err.value.problems == [
        "optim.weight_decay: expected a number, got 'lots'",
        "optim.lr: expected a number, got [1]",
        "nmae: unknown key (did you mean 'name'?)",
    ]


def test_overrides_win_over_the_file_and_are_checked_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 0.1}\n")
    assert load_config(Run, path, ["optim.lr=0.5"]).optim.lr == 0.5
    with pytest.raises(ConfigError, match="optim.weight_decay: must be >= 0"):
        load_config(Run, path, ["optim.weight_decay=-1"])


def test_dist_timeout_defaults_to_an_hour_and_must_be_positive():
    from cpt.trainer.config import TrainConfig

    assert load_config(TrainConfig, data={"max_steps": 1}).dist_timeout_s == 3600
    with pytest.raises(ConfigError, match="dist_timeout_s: must be a positive number of seconds, got 0"):
        load_config(TrainConfig, data={"max_steps": 1, "dist_timeout_s": 0})
