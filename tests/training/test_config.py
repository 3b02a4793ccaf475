"""Training config: defaults < YAML < flags, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellinspect.training.config import ConfigError, TrainConfig, resolve_config
from cellinspect.training.networks import Arch


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("data: d\nout: o\narch: resnet18\nepochs: 7\nlr: 0.01\n")
    cfg = resolve_config(yaml_path=path, overrides={"epochs": 3, "lr": None})
    assert cfg.arch is Arch.RESNET18  # from YAML
    assert cfg.epochs == 3  # flag beats YAML
    assert cfg.lr == 0.01  # a flag left unset does not erase the YAML value
    assert cfg.batch_size == TrainConfig.model_fields["batch_size"].default  # default


@pytest.mark.parametrize(
    ("raw", "expected"), [(96, (96, 96)), ("128x256", (128, 256)), ("64", (64, 64))]
)
def test_img_size_accepts_side_or_height_by_width(raw, expected) -> None:
    assert resolve_config(overrides={"data": "d", "out": "o", "img_size": raw}).img_size == expected


def test_unknown_key_in_yaml_names_file_and_key(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data: d\nout: o\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*epoch"):
        resolve_config(yaml_path=path)


def test_bad_arch_lists_choices() -> None:
    with pytest.raises(ConfigError, match="arch.*mobilenet_v3_small"):
        resolve_config(overrides={"data": "d", "out": "o", "arch": "vgg"})


def test_confidence_needs_a_criterion_it_can_hold(tmp_path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text("data: d\nout: o\ncost_ratio: 1.0\nconfidence: 0.95\n")
    with pytest.raises(ConfigError, match=r"conf\.yaml.*confidence bounds max_escape"):
        resolve_config(yaml_path=path)
    path.write_text("data: d\nout: o\nmax_escape: 0.05\nconfidence: 0.95\n")
    assert resolve_config(yaml_path=path).confidence == 0.95


def test_fit_on_train_and_val_exports_the_last_checkpoint(tmp_path) -> None:
    path = tmp_path / "refit.yaml"
    path.write_text("data: d\nout: o\nfit_on: train+val\n")
    assert resolve_config(yaml_path=path).export_checkpoint == "last"  # the only one kept
    assert resolve_config(overrides={"data": "d", "out": "o"}).export_checkpoint == "best"
    path.write_text("data: d\nout: o\nfit_on: train+val\nexport_checkpoint: best\n")
    with pytest.raises(ConfigError, match=r"refit\.yaml.*export_checkpoint: last"):
        resolve_config(yaml_path=path)
    with pytest.raises(ConfigError, match="fit_on"):
        resolve_config(overrides={"data": "d", "out": "o", "fit_on": "val"})


def test_missing_and_malformed_yaml_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        resolve_config(yaml_path=tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        resolve_config(yaml_path=broken)


def test_optimizer_from_yaml_builds_nesterov_sgd_and_bad_names_list_choices(tmp_path) -> None:
    from torch import nn

    from cellinspect.training.fit import make_optimizer

    path = tmp_path / "sgd.yaml"
    path.write_text("data: d\nout: o\noptimizer: sgd\nlr: 0.05\nweight_decay: 5.0e-4\n")
    model = nn.Linear(3, 2)
    sgd = make_optimizer(model, resolve_config(yaml_path=path))
    assert type(sgd).__name__ == "SGD"
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.05, 0.9, True)
    assert group["weight_decay"] == 5.0e-4
    default = make_optimizer(model, resolve_config(overrides={"data": "d", "out": "o"}))
    assert type(default).__name__ == "AdamW"
    with pytest.raises(ConfigError, match="optimizer.*adamw.*sgd"):
        resolve_config(overrides={"data": "d", "out": "o", "optimizer": "adam"})


@pytest.mark.parametrize(
    "recipe", sorted((Path(__file__).parents[2] / "training" / "recipes").glob("*.yaml"))
)
def test_every_shipped_recipe_is_a_valid_config(recipe: Path) -> None:
    cfg = resolve_config(yaml_path=recipe, overrides={"data": "d", "out": "o"})
    assert cfg.epochs >= 1
