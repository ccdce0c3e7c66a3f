"""Every recipe shipped in recipes/ validates (pydantic, extra keys forbidden)."""

from pathlib import Path

import pytest

from medfm.errors import MedfmError
from medfm.recipe import AverageStep, TrainStep, load_recipe

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
        # each stage starts from the previous stage's model; stage 8's two fine-tunings
        # (averaged by the recipe's average step) both from stage 7's
        starts = [f"{c.out}/model" for c in cfgs[:7]] + [f"{cfgs[6].out}/model"]
        assert [c.checkpoint for c in cfgs[1:]] == starts
        averages = [s.average for s in recipe.steps if isinstance(s, AverageStep)]
        assert [a.models for a in averages] == [tuple(f"{c.out}/model" for c in cfgs[7:])]
        return [c.model_dump(exclude={"data", "out", "checkpoint"}) for c in cfgs]

    tiny = train_steps("medfm_tiny.yaml")
    assert len(tiny) == 9 and tiny == train_steps("medfm_tiny_ablation_monai.yaml")
