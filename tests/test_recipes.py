"""Every recipe shipped in recipes/ validates (pydantic, extra keys forbidden)."""

from pathlib import Path

import pytest

from medfm.errors import MedfmError
from medfm.recipe import AverageStep, DiffusionTrainStep, TrainStep, load_recipe, run_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    trains = (TrainStep, DiffusionTrainStep)
    assert recipe.steps and any(isinstance(s, trains) for s in recipe.steps)


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


def test_a_new_step_kind_runs_without_touching_run_recipe(tmp_path, monkeypatch):
    from pydantic import BaseModel, ConfigDict

    from medfm.recipe import STEP_KINDS, StepContext, register_step, run_recipe, step_kind

    class EchoArgs(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        text: str

    seen: list[tuple[str, int, int]] = []

    def run_echo(a: EchoArgs, ctx: StepContext) -> None:
        ctx.header(f"echo {a.text}")
        ctx.note("done")
        seen.append((a.text, ctx.index, ctx.total))

    monkeypatch.setattr("medfm.recipe.STEP_KINDS", dict(STEP_KINDS))
    EchoStep = register_step("echo", EchoArgs, run_echo)
    assert EchoStep.__name__ == "EchoStep"
    with pytest.raises(ValueError, match="registered already"):
        register_step("echo", EchoArgs, run_echo)
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nsteps:\n  - echo: {text: a}\n  - echo: {text: b}\n")
    recipe = load_recipe(path)
    assert [step_kind(s) for s in recipe.steps] == ["echo", "echo"]
    assert isinstance(recipe.steps[1], EchoStep) and recipe.steps[1].echo.text == "b"
    lines: list[str] = []
    run_recipe(recipe, log=lines.append)
    assert seen == [("a", 1, 2), ("b", 2, 2)]
    assert lines == ["[1/2] echo a", "    done", "[2/2] echo b", "    done"]
    path.write_text("name: x\nsteps:\n  - echo: {text: a, extra: 1}\n")
    with pytest.raises(MedfmError, match=r"steps\.0\.echo\.extra: Extra inputs"):
        load_recipe(path)


def test_unknown_step_kind_names_the_known_ones(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nsteps:\n  - sinth: {out: a}\n")
    with pytest.raises(MedfmError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "steps.0: a step is one of synth, monai_shapes, train" in msg and "\n" not in msg


def test_a_recipe_round_trips_through_json():
    from medfm.recipe import Recipe

    recipe = load_recipe(RECIPES[0])
    dumped = recipe.model_dump(mode="json")
    assert all(len(s) == 1 for s in dumped["steps"])
    assert Recipe.model_validate(dumped) == recipe
    assert Recipe.model_validate_json(recipe.model_dump_json()) == recipe


def test_an_evaluate_steps_data_must_be_a_dataset_before_anything_is_read(tmp_path):
    from medfm.errors import MedfmError
    from medfm.recipe import load_recipe, run_recipe

    notds = tmp_path / "notds"
    (notds / "sub").mkdir(parents=True)
    (notds / "sub" / "big.bin").write_bytes(b"0" * 1000)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: t\nsteps:\n  - evaluate: {{model: box-fill, data: {notds}, prompt: box, "
        f"out: {tmp_path / 'r.json'}}}\n"
    )
    with pytest.raises(MedfmError, match=r"notds/dataset.json does not exist"):
        run_recipe(load_recipe(recipe), log=lambda m: None)
    assert not (tmp_path / "r.json").exists()


def _nifti(path, value):
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.linspace(0, value, 12 * 10 * 20, dtype=np.float32).reshape(12, 10, 20)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_volumes_and_diffusion_train_steps_build_a_split_and_train(tmp_path):
    """A volumes step links the chosen cases (include, then the last N, then the first N,
    each name with its prefix); a diffusion_train step trains on them and resumes."""
    for i in range(6):
        _nifti(tmp_path / "a" / f"case_{i}.nii.gz", i + 1)
    _nifti(tmp_path / "b" / "t1.nii.gz", 9)
    _nifti(tmp_path / "b" / "t1_seg.nii.gz", 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: split
steps:
  - volumes:
      out: {tmp_path}/train
      sources:
        - {{data: {tmp_path}/a, first: 2}}
        - {{data: {tmp_path}/b, include: [t1.nii.gz], prefix: b_}}
  - volumes:
      out: {tmp_path}/tune
      sources: [{{data: {tmp_path}/a, last: 3, first: 1}}]
  - diffusion_train:
      data: [{tmp_path}/train]
      out: {tmp_path}/run
      steps: 2
      batch: 1
      checkpoint_every: 1
      model:
        patch: [8, 8, 8]
        unet: {{channels: [8, 16], attention_levels: [false, true], norm_num_groups: 8,
                num_head_channels: 8, pos_frequencies: 2}}
""")
    lines: list[str] = []
    run_recipe(load_recipe(recipe), log=lines.append)
    train = tmp_path / "train"
    assert sorted(p.name for p in train.iterdir()) == [
        "b_t1.nii.gz", "case_0.nii.gz", "case_1.nii.gz",
    ]  # fmt: skip
    assert (train / "b_t1.nii.gz").resolve() == (tmp_path / "b" / "t1.nii.gz").resolve()
    assert [p.name for p in (tmp_path / "tune").iterdir()] == ["case_3.nii.gz"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    lines.clear()
    run_recipe(load_recipe(recipe), log=lines.append)  # again: everything is there already
    assert sum("already, skipped" in x for x in lines) == 2
    assert any("finished training earlier" in x for x in lines)


def test_a_volumes_step_that_chooses_nothing_says_so(tmp_path):
    _nifti(tmp_path / "a" / "x.nii.gz", 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: none
steps:
  - volumes: {{out: {tmp_path}/o, sources: [{{data: {tmp_path}/a, include: ["y*"]}}]}}
""")
    with pytest.raises(MedfmError, match="nothing of .* is chosen"):
        run_recipe(load_recipe(recipe), log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_labelled_volumes_and_slices_steps_make_nnunet_sets(tmp_path, nnunet_verify):
    """volumes with labels: an nnU-Net set of links (images and labels); slices: its labelled
    slices along the last axis as a 2D PNG set that seg training reads."""
    import json

    import nibabel as nib
    import numpy as np

    src = tmp_path / "set"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    for i in range(3):
        _nifti(src / "imagesTr" / f"c{i}_0000.nii.gz", i + 1)
        lab = np.zeros((12, 10, 20), np.uint8)
        lab[3:8, 2:6, 4 + i : 9] = 1
        lab[3:8, 2:6, 9:12] = 2
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(src / "labelsTr" / f"c{i}.nii.gz"))
    (src / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "head": 1, "body": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: split
steps:
  - volumes:
      out: {tmp_path}/train
      labels: true
      sources: [{{data: {src}, last: 2, prefix: x_}}]
  - slices: {{data: {tmp_path}/train, out: {tmp_path}/slices}}
""")
    run_recipe(load_recipe(recipe), log=lambda m: None)
    train = tmp_path / "train"
    assert sorted(p.name for p in (train / "labelsTr").iterdir()) == ["x_c1.nii.gz", "x_c2.nii.gz"]
    assert json.loads((train / "dataset.json").read_text())["numTraining"] == 2
    nnunet_verify(train)
    slices = tmp_path / "slices"
    names = sorted(p.name for p in (slices / "labelsTr").iterdir())
    assert names[0] == "x_c1_k005.png" and len(names) == 7 + 6  # c1: k 5..11, c2: k 6..11
    ds = json.loads((slices / "dataset.json").read_text())
    assert ds["file_ending"] == ".png" and ds["numTraining"] == 13
    assert ds["labels"] == {"background": 0, "head": 1, "body": 2}
    nnunet_verify(slices)
    lines: list[str] = []
    run_recipe(load_recipe(recipe), log=lines.append)  # again: both skipped
    assert sum("skipped" in x or "already" in x for x in lines) == 2
