"""Recipes, TOML overrides and validation."""

import pytest

from cnnlab.config import RECIPES, resolve
from cnnlab.core.errors import UserError


def test_seed_recipe_is_the_assignment():
    cfg = resolve("seed")
    assert (cfg.model, cfg.image_size, cfg.epochs, cfg.batch_size) == ("resnet18-seed", 224, 40, 64)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.01, 0.9, 5e-4)
    assert (cfg.schedule, cfg.augment, cfg.mean, cfg.std) == ("constant", "none", (0.5,) * 3, (0.5,) * 3)


def test_precedence_recipe_then_toml_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('recipe = "fast"\nepochs = 3\nlr = 1\nmean = [0.1, 0.2, 0.3]\n')
    cfg = resolve(toml_path=toml, overrides={"epochs": 5})
    assert cfg.recipe == "fast" and cfg.model == RECIPES["fast"]["model"]
    assert cfg.epochs == 5 and cfg.lr == 1.0 and cfg.mean == (0.1, 0.2, 0.3)


@pytest.mark.parametrize("overrides, words", [
    ({"batch_size": 0}, "--batch-size"), ({"lr": -0.1}, "--lr"), ({"epochs": 0}, "--epochs"),
    ({"lr": float("nan")}, "--lr"), ({"model": "vgg"}, "resnet18-cifar"), ({"recipe": "x"}, "paper"),
    ({"dataset": "imagenet"}, "folder:PATH"), ({"schedule": "step"}, "onecycle"), ({"width": 0}, "--width"),
])
def test_invalid_values_name_the_flag_and_valid_choices(overrides, words):
    with pytest.raises(UserError, match=words):
        resolve(overrides=overrides)


def test_toml_errors_are_user_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        resolve(toml_path=bad)
    bad.write_text("epoks = 3")
    with pytest.raises(UserError, match="unknown key 'epoks'"):
        resolve(toml_path=bad)
    bad.write_text('epochs = "three"')
    with pytest.raises(UserError, match="whole number"):
        resolve(toml_path=bad)
    with pytest.raises(UserError, match="does not exist"):
        resolve(toml_path=tmp_path / "missing.toml")
