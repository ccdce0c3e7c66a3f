import pytest
import torch
from segment_anything import sam_model_registry

from medfm.errors import MedfmError
from medfm.seg.export import export_run, export_sam_checkpoint, official_name
from medfm.seg.models import SEG_MODELS, build_model, save_pretrained
from medfm.seg.tiny import build_medfm_tiny

from .conftest import TINY_SPEC, tiny_sam


def test_export_is_a_plain_state_dict(tmp_path):
    model = tiny_sam(TINY_SPEC, seed=1)
    path = export_sam_checkpoint(model, tmp_path / "out" / "sam_tiny.pth")
    assert [p.name for p in path.parent.iterdir()] == ["sam_tiny.pth"]  # no temporary left
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert type(state) is dict and state.keys() == own.keys()
    assert all(torch.equal(state[k], v) for k, v in own.items())
    # and medfm reads its own export back
    again = build_model("vit_b", path, spec=TINY_SPEC)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in own.items())


def test_full_size_vit_b_loads_in_segment_anything(tmp_path):
    # the real layout, filled cheaply (random init of 90 M parameters is not what is tested)
    with torch.device("meta"):
        model = SEG_MODELS["vit_b"]()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            t.fill_(i / 1000)
        model.image_encoder.patch_embed.proj.weight.copy_(
            torch.linspace(-1, 1, 768 * 3 * 16 * 16).reshape(768, 3, 16, 16)
        )
    path = export_sam_checkpoint(model, tmp_path / "sam_vit_b.pth")
    assert official_name(model) == "vit_b"
    sam = sam_model_registry["vit_b"](checkpoint=path)  # segment-anything's own loader
    theirs, ours = sam.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for k in ("image_encoder.patch_embed.proj.weight", "image_encoder.blocks.11.attn.rel_pos_h"):
        assert torch.equal(theirs[k], ours[k])
    assert torch.equal(
        theirs["mask_decoder.iou_token.weight"], ours["mask_decoder.iou_token.weight"]
    )


def test_medfm_tiny_does_not_export(tmp_path):
    with pytest.raises(MedfmError, match="no builder for medfm-tiny"):
        export_sam_checkpoint(build_medfm_tiny(), tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_export_to_a_folder_is_refused(tmp_path):
    with pytest.raises(MedfmError, match="is a folder"):
        export_sam_checkpoint(tiny_sam(), tmp_path)


def test_export_run(tmp_path):
    model = tiny_sam(TINY_SPEC, seed=2)
    run = save_pretrained(model, tmp_path / "run" / "model", name="medsam")
    path = export_run(run, tmp_path / "sam_decoder.pth")
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert official_name(model) is None  # a tiny spec: no sam_model_registry entry

    tiny = save_pretrained(build_medfm_tiny(), tmp_path / "tiny", name="medfm-tiny")
    with pytest.raises(MedfmError, match="holds a medfm-tiny model"):
        export_run(tiny, tmp_path / "tiny.pth")
    with pytest.raises(MedfmError, match="does not exist"):
        export_run(tmp_path / "nope", tmp_path / "x.pth")


def test_cli_export_notes_what_the_pth_cannot_carry(tmp_path):
    from typer.testing import CliRunner

    from medfm.cli.main import app

    extra = {"mask_thresholds": {"box": -2.0}, "box_crop": True}
    save_pretrained(tiny_sam(TINY_SPEC, seed=2), tmp_path / "run" / "model", name="vit_b",
                    extra=extra)  # fmt: skip
    r = CliRunner().invoke(app, ["seg", "export", str(tmp_path / "run"), "-o",
                                 str(tmp_path / "x.pth")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "x.pth")
    notes = r.stderr.strip().splitlines()
    assert len(notes) == 3 and all(
        n.startswith("note: the .pth holds the weights only") for n in notes
    )
    assert "{'box': -2.0}" in notes[1] and "cropped" in notes[2]
