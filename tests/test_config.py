"""Recipes, TOML overrides and validation."""

import pytest

from cnnlab.cli import build_parser, main
from cnnlab.config import FIELDS, RECIPES, TrainConfig, choices, coerce, kinds, resolve, validate
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
    ({"batch_size": 0}, "`batch_size`"), ({"lr": -0.1}, "`lr`"), ({"epochs": 0}, "`epochs`"),
    ({"lr": float("nan")}, "`lr`"), ({"model": "vgg"}, "resnet18-cifar"), ({"recipe": "x"}, "paper"),
    ({"dataset": "imagenet"}, "folder:PATH"), ({"schedule": "step"}, "onecycle"), ({"width": 0}, "`width`"),
])
def test_invalid_values_name_the_parameter_and_valid_choices(overrides, words):
    with pytest.raises(UserError, match=words):
        resolve(overrides=overrides)


def _outside(name):
    """A value just outside setting ``name``'s declared range, or None when it has none."""
    m = FIELDS[name].metadata
    step = 1 if int in kinds(name) else 1e-3
    if m["least"] is not None:
        return m["least"] - step
    if m["above"] is not None:
        return m["above"]
    if m["below"] is not None:
        return m["below"]
    return None


BOUNDED = [name for name in FIELDS if _outside(name) is not None]


@pytest.mark.parametrize("name", BOUNDED)
def test_each_declared_range_is_checked_by_the_library_and_named_as_a_flag_by_the_cli(name, capsys):
    value = _outside(name)
    with pytest.raises(UserError, match=f"`{name}` must be"):
        resolve("fast", overrides={name: value})
    flag = "--" + name.replace("_", "-")
    assert main(["train", "--recipe", "fast", flag, str(value), "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be" in err and "`" not in err and len(err.strip().splitlines()) == 1


def test_every_setting_is_a_flag_and_a_toml_key_of_its_own_type(tmp_path):
    """The flags and the TOML keys are derived from the declarations: each setting is declared once."""
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # argparse keeps sub-parsers here
    flags = {o for a in train._actions for o in a.option_strings}
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        assert (flag in flags) == f.metadata["flag"], name
        if bool in kinds(name):
            assert f.metadata["flag"] is False or "--no-" + flag[2:] in flags
    toml = tmp_path / "c.toml"
    toml.write_text("tta = true\nbatch-size = 32\nschedule = \"cosine\"\nlimit-test = 7\n")
    cfg = resolve("fast", toml_path=toml)
    assert (cfg.tta, cfg.batch_size, cfg.schedule, cfg.limit_test) == (True, 32, "cosine", 7)
    assert choices("schedule") == ("constant", "cosine", "onecycle", "triangle") and choices("amp") == ("force",)
    assert choices("tta") == ("translate",)


def test_types_come_from_the_annotations():
    assert coerce("lr", 1) == 1.0 and isinstance(coerce("lr", 1), float)
    assert coerce("mean", [0, 1, 0.5]) == (0.0, 1.0, 0.5)
    assert coerce("amp", "force") == "force" and coerce("amp", None) is None and coerce("amp", False) is False
    assert coerce("tta", "translate") == "translate" and coerce("tta", True) is True
    for name, value, words in [("epochs", 2.5, "whole number"), ("nesterov", 1, "true or false"),
                               ("tta", "yes", 'true, false or "translate"'),
                               ("amp", "yes", 'true, false or "force"'), ("width", None, None),
                               ("epochs", None, "must be set"), ("mean", ["a"], "list of numbers"),
                               ("augment", "flip", "choose one of: none, flip-crop")]:
        if words is None:
            assert coerce(name, value) is None
            continue
        with pytest.raises(UserError, match=words):
            coerce(name, value)


def test_a_config_built_in_python_is_checked_too():
    with pytest.raises(UserError, match="`epochs` must be a whole number"):
        validate(TrainConfig(epochs="3"))


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
