"""Every recipe shipped in recipes/ validates (pydantic, extra keys forbidden)."""

from pathlib import Path

import pytest

from medfm.errors import MedfmError
from medfm.recipe import TrainStep, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.steps and any(isinstance(s, TrainStep) for s in recipe.steps)


def test_unknown_keys_are_refused(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nsteps:\n  - train: {data: [a], out: b, stepz: 3}\n")
    with pytest.raises(MedfmError, match="stepz|Extra|extra"):
        load_recipe(bad)


def test_the_ablation_trains_exactly_like_medfm_tiny():
    def train_step(name):
        recipe = load_recipe(RECIPES[0].parent / name)
        cfg = next(s.train for s in recipe.steps if isinstance(s, TrainStep))
        return cfg.model_dump(exclude={"data", "out"})

    assert train_step("medfm_tiny.yaml") == train_step("medfm_tiny_ablation_monai.yaml")
