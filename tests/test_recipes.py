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
    def train_steps(name):
        recipe = load_recipe(RECIPES[0].parent / name)
        cfgs = [s.train for s in recipe.steps if isinstance(s, TrainStep)]
        # each stage starts from the previous stage's model
        assert [c.checkpoint for c in cfgs[1:]] == [f"{c.out}/model" for c in cfgs[:-1]]
        return [c.model_dump(exclude={"data", "out", "checkpoint"}) for c in cfgs]

    tiny = train_steps("medfm_tiny.yaml")
    assert len(tiny) == 7 and tiny == train_steps("medfm_tiny_ablation_monai.yaml")
