"""manifest.jsonl: written and read back line for line; a line replays its case."""

import json

import pytest
import torch

from medfm.errors import MedfmError
from medfm.synth import read_manifest, replay, sample_case
from medfm.synth.case import SynthConfig, render_cases, to_output
from medfm.synth.manifest import MANIFEST_NAME, manifest_line, write_manifest


def test_round_trip_and_replay(tmp_path):
    cfg = SynthConfig()
    params = [sample_case(cfg, m, (32, 40), 5, i) for i, m in enumerate(("ct", "us"))]
    path = write_manifest(tmp_path, [("a", params[0]), ("b", params[1])], run_seed=5)
    assert path == tmp_path / MANIFEST_NAME
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 2
    assert text.splitlines()[1] == manifest_line("b", 1, 5, params[1])
    recs = read_manifest(tmp_path)
    assert [(r["case"], r["index"], r["run_seed"], r["modality"]) for r in recs] == [
        ("a", 0, 5, "ct"),
        ("b", 1, 5, "us"),
    ]
    assert recs[1]["seed"] == params[1].seed
    assert recs == [json.loads(x) for x in text.splitlines()]
    r = render_cases([params[1]], "cpu")
    image, label = replay(text.splitlines()[1])  # a line as text or as a dict
    assert torch.equal(image, to_output([params[1]], r.image)[0]) and torch.equal(label, r.label[0])
    image2, _ = replay(recs[1])
    assert torch.equal(image, image2)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(MedfmError, match="manifest.jsonl not found"):
        read_manifest(tmp_path)
