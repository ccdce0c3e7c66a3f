"""Label maps: structures, labels, sizes, nesting, determinism, replay of parameters."""

import hashlib
import json

import torch

from medfm.synth.anatomy import (
    TISSUES,
    AnatomyConfig,
    anatomy_noise_shape,
    is_split_part,
    render_anatomy,
)
from medfm.synth.case import CaseParams, SynthConfig, render_cases, sample_case


def test_labels_are_consecutive_and_within_the_declared_range():
    cfg = SynthConfig()
    for mod in ("ct", "mri", "us"):
        cases = [sample_case(cfg, mod, (64, 72), 7, i) for i in range(8)]
        r = render_cases(cases)
        for i in range(8):
            vals = sorted(r.label[i].unique().tolist())
            assert vals[0] == 0 or len(vals) == 1
            present = [v for v in vals if v > 0]
            assert present == list(range(1, len(present) + 1))
            assert max(vals) <= cfg.anatomy.n_labels[1]


def test_structure_sizes_range_from_tiny_to_large():
    cfg = SynthConfig()
    cases = [sample_case(cfg, "ct", (96, 96), 11, i) for i in range(24)]
    r = render_cases(cases)
    fractions = []
    for i in range(24):
        counts = torch.bincount(r.label[i].flatten().long())
        fractions += (counts[1:][counts[1:] > 0].float() / r.label[i].numel()).tolist()
    assert min(fractions) < 0.01 and max(fractions) > 0.1


def test_nested_structure_lies_inside_its_parent():
    cfg = SynthConfig(
        anatomy=AnatomyConfig(
            n_labels=(2, 2), p_nested=1.0, p_tube=0.0, p_rim=0.0, p_touch=0.0, p_split=0.0
        )
    )
    case = sample_case(cfg, "mri", (96, 96), 0, 0)
    s = case.anatomy.structures
    parent = next(k for k, x in enumerate(s) if x.label == 1)
    child = next(k for k, x in enumerate(s) if x.label == 2)
    assert s[child].container == parent
    noise = torch.randn(1, *anatomy_noise_shape(2), generator=torch.Generator().manual_seed(0))
    slots, _ = render_anatomy([case.anatomy], (96, 96), noise)
    inner = slots[0] == child + 1
    assert inner.any()
    # around the child, the parent is there (the child never touches the body background)
    ring = torch.nn.functional.max_pool2d(inner[None, None].float(), 3, 1, 1)[0, 0].bool() & ~inner
    assert bool((slots[0][ring] == parent + 1).float().mean() > 0.9)


def test_3d_label_maps_have_structures():
    cfg = SynthConfig()
    cases = [sample_case(cfg, "ct", (40, 48, 32), 2, i) for i in range(2)]
    r = render_cases(cases)
    assert r.label.shape == (2, 1, 40, 48, 32)
    assert all(int(r.label[i].max()) >= 1 for i in range(2))


def test_case_params_are_json_and_replay_exactly():
    cfg = SynthConfig()
    case = sample_case(cfg, "us", (64, 64), 9, 4)
    again = CaseParams.model_validate(json.loads(case.model_dump_json()))
    assert again == case
    a, b = render_cases([case]), render_cases([again])
    assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)


def test_case_depends_only_on_seed_and_index():
    cfg = SynthConfig()
    assert sample_case(cfg, "ct", (64, 64), 1, 5) == sample_case(cfg, "ct", (64, 64), 1, 5)
    assert sample_case(cfg, "ct", (64, 64), 1, 5) != sample_case(cfg, "ct", (64, 64), 1, 6)
    assert sample_case(cfg, "ct", (64, 64), 1, 5) != sample_case(cfg, "ct", (64, 64), 2, 5)


def test_difficulty_lowers_contrast_to_the_touching_neighbour():
    from medfm.synth.texture import TextureConfig

    gaps = {}
    for d in (0.0, 1.0):
        cfg = SynthConfig(
            anatomy=AnatomyConfig(p_touch=1.0, p_tube=0, p_nested=0, p_rim=0, p_split=0),
            texture=TextureConfig(difficulty=(d, d), p_random_contrast=0.0),
        )
        g = []
        for i in range(20):
            c = sample_case(cfg, "ct", (64, 64), 0, i)
            for k, s in enumerate(c.anatomy.structures):
                if s.touches >= 0:
                    g.append(abs(c.texture.means[k + 1] - c.texture.means[s.touches + 1]))
        gaps[d] = sum(g) / len(g)
    assert gaps[1.0] < 0.5 * gaps[0.0]


def test_parts_and_filled_cavities_carry_their_objects_label():
    """A label covers a heterogeneous object: parts of other tissues inside it, or the cavity
    its wall encloses, are painted over the object but keep its label."""
    cfg = SynthConfig(
        anatomy=AnatomyConfig(
            n_labels=(1, 1),
            p_tube=0.0,
            p_nested=0.0,
            p_rim=0.5,
            p_touch=0.0,
            p_parts=1.0,
            p_filled=1.0,
        )
    )
    kinds, ring_labels = set(), []
    for i in range(12):
        case = sample_case(cfg, "ct", (96, 96), 5, i)
        s = case.anatomy.structures
        labelled = [k for k, x in enumerate(s) if x.label == 1]
        assert len(labelled) >= 2  # the object and its parts (or its wall and cavity)
        parts = [k for k in labelled if s[k].container in labelled]
        assert parts and all(s[k].tissue in TISSUES for k in parts)
        kinds.add(any(s[k].shell > 0 for k in labelled))
        noise = torch.randn(1, *anatomy_noise_shape(2), generator=torch.Generator().manual_seed(i))
        slots, lut = render_anatomy([case.anatomy], (96, 96), noise)
        label = lut[0][slots[0]]
        for k in parts:
            inside = slots[0] == k + 1
            if inside.any():  # a part lies inside its parent: the label map there is 1
                assert bool((label[inside] == 1).all())
                grown = torch.nn.functional.max_pool2d(inside[None, None].float(), 3, 1, 1)
                ring_labels.append(label[grown[0, 0].bool() & ~inside])
    # around the parts lies their object (a part can stray a pixel where its parent is small)
    assert float((torch.cat(ring_labels) == 1).float().mean()) > 0.95
    assert kinds == {True, False}  # both filled walls and plain objects with parts were drawn
    # without them, no structure shares a label
    plain = SynthConfig(anatomy=AnatomyConfig(p_parts=0.0, p_filled=0.0))
    for i in range(12):
        labels = [x.label for x in sample_case(plain, "mri", (96, 96), 5, i).anatomy.structures]
        labels = [lab for lab in labels if lab > 0]
        assert len(labels) == len(set(labels))


def _label_one_fractions(cfg: SynthConfig, modality: str, n: int) -> list[float]:
    r = render_cases([sample_case(cfg, modality, (64, 64), 3, i) for i in range(n)])
    return [float((r.label[i] == 1).float().mean()) for i in range(n)]


def test_dominant_structures_span_much_of_the_field():
    """p_large = 1: every case's first label is a dominant structure near the middle (HC18's
    fetal heads cover up to ~45% of the image); p_large = 0: structures of ``size`` only."""
    big = SynthConfig(anatomy=AnatomyConfig(p_large=1.0))
    small = SynthConfig(anatomy=AnatomyConfig(p_large=0.0))
    for modality in ("us", "ct"):
        large = sorted(_label_one_fractions(big, modality, 12))
        usual = sorted(_label_one_fractions(small, modality, 12))
        assert large[6] > 0.12 and large[-1] > 0.3, (modality, large)
        assert usual[6] < 0.06, (modality, usual)
    for i in range(6):  # centred within 0.3 of the room around the middle of the field
        s = next(x for x in sample_case(big, "us", (64, 64), 3, i).anatomy.structures if x.label)
        assert max(abs(c) for c in s.center) <= 0.3 + 1e-6


def test_p_large_zero_gives_the_cases_of_the_generator_before_it():
    """p_large = 0 and p_split = 0 draw nothing extra: the parameters of cases (seed 9, cases
    0..3) are those the generator gave before either existed (hashes taken at commit 9e66027),
    so recipes that pin them reproduce the data their models were trained on."""
    cfg = SynthConfig(anatomy=AnatomyConfig(p_large=0.0, p_split=0.0))
    before = {"ct": "2888cadfe415ce76", "mri": "cfde7b4030e036d7", "us": "5a82d225a9ad8909"}
    for modality, digest in before.items():
        cases = [sample_case(cfg, modality, (64, 64), 9, i).model_dump() for i in range(4)]
        text = json.dumps(cases, sort_keys=True)
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, modality


def test_split_structures_are_two_abutting_labels_of_one_texture():
    """p_split: a structure cut in two. Both parts are labelled, abut along the cut, are of one
    tissue, and the slot table gives them the same intensity field (no edge in the image)."""
    from medfm.synth.texture import slot_table

    cfg = SynthConfig(anatomy=AnatomyConfig(n_labels=(2, 2), p_split=1.0, p_large=0.0))
    abutting = 0
    for modality in ("ct", "mri", "us"):
        for i in range(4):
            case = sample_case(cfg, modality, (96, 96), 2, i)
            s = case.anatomy.structures
            k2 = next(k for k, x in enumerate(s) if x.label == 2)
            k1 = s[k2].container
            assert s[k2].touches == k1 and s[k1].label == 1 and s[k1].tissue == s[k2].tissue
            tab = slot_table([case.texture], [case.anatomy], "cpu")[0]
            torch.testing.assert_close(tab[k1 + 1], tab[k2 + 1])
            noise = torch.randn(
                1, *anatomy_noise_shape(2), generator=torch.Generator().manual_seed(i)
            )
            slots, _ = render_anatomy([case.anatomy], (96, 96), noise)
            one, two = slots[0] == k1 + 1, slots[0] == k2 + 1
            grown = torch.nn.functional.max_pool2d(one[None, None].float(), 3, 1, 1)[0, 0] > 0
            abutting += int(bool((grown & two).any()))
    assert abutting >= 10
    # a case's other draws are unchanged by the split's: p_split 0 gives single labels only
    plain = SynthConfig(anatomy=AnatomyConfig(n_labels=(2, 2), p_split=0.0))
    for i in range(4):
        assert all(
            x.touches < 0 or x.touches != x.container
            for x in sample_case(plain, "ct", (96, 96), 2, i).anatomy.structures
        )


def test_ct_artifacts_come_from_real_bones_not_split_parts():
    """A bone cut in two: its second part is a large sphere far outside the field, confined to
    the bone; CT's streaks and beam hardening start at bones in the image, never at it."""
    cfg = SynthConfig(anatomy=AnatomyConfig(n_labels=(2, 5), p_split=1.0, p_large=0.0))
    checked = 0
    for i in range(60):
        case = sample_case(cfg, "ct", (64, 64), 6, i)
        s = case.anatomy.structures
        if not any(x.tissue == "bone" and is_split_part(x) for x in s):
            continue
        centers = [tuple(x.center[:2]) for x in s if x.tissue == "bone" and not is_split_part(x)]
        assert tuple(case.physics.bone_center) in centers
        beam = case.physics.beam
        assert not beam or (tuple(beam[:2]) in centers and tuple(beam[2:4]) in centers)
        checked += 1
    assert checked >= 3


def test_walls_take_their_tissues_and_thickness_from_the_rim_knobs():
    """A skull-like wall: its tissue from rim_wall_tissues, its cavity's from
    rim_cavity_tissues, its thickness within rim_shell; the label covers wall and cavity."""
    import pytest
    from pydantic import ValidationError

    cfg = SynthConfig(
        anatomy=AnatomyConfig(
            n_labels=(1, 1), p_tube=0.0, p_nested=0.0, p_rim=1.0, p_filled=1.0, p_parts=0.0,
            p_large=0.0, p_split=0.0, rim_cavity_tissues=("soft",), rim_shell=(0.04, 0.06),
            rim_wall_tissues=("enhanced",),
        )
    )  # fmt: skip
    shown = 0
    for i in range(6):
        case = sample_case(cfg, "us", (96, 96), 3, i)
        s = case.anatomy.structures
        walls = [x for x in s if x.label == 1 and x.shell > 0]
        cavities = [x for x in s if x.label == 1 and x.shell == 0]
        assert len(walls) == len(cavities) == 1
        assert walls[0].tissue == "enhanced" and cavities[0].tissue == "soft"
        assert 0.04 <= walls[0].shell <= 0.06
        assert walls[0].center == cavities[0].center and walls[0].radii == cavities[0].radii
        shown += int((render_cases([case]).label[0] == 1).any())
    assert shown >= 4  # (an object can fall outside the ultrasound sector)
    # without the knobs, the wall is of the label's tissue and the cavity as it always was
    plain = AnatomyConfig(n_labels=(1, 1), p_tube=0.0, p_nested=0.0, p_rim=1.0, p_split=0.0)
    cavity = {x.tissue for i in range(12)
              for x in sample_case(SynthConfig(anatomy=plain), "ct", (64, 64), 4, i)
              .anatomy.structures if x.label == 1 and x.shell == 0}  # fmt: skip
    assert cavity <= {"fluid", "organ", "enhanced"}
    for bad in ({"rim_cavity_tissues": ()}, {"rim_wall_tissues": ("skull",)},
                {"rim_shell": (0.3, 0.1)}, {"rim_shell": (0.0, 0.2)}):  # fmt: skip
        with pytest.raises(ValidationError):
            AnatomyConfig(**bad)
