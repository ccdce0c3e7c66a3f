"""Rendered bytes pinned: the generator's speed-ups give the images and labels they gave
before (CPU), so datasets made earlier can be resumed and replayed."""

import hashlib

import pytest

from medfm.synth import SynthConfig, render_cases, sample_case
from medfm.synth.case import to_output

# sha1 of the output image's bytes then the label's, taken before the speed-ups (run seed 3)
PINNED = {
    ("ct", (64, 96)): ["6e30e0909a57", "68cc90729907", "f3372fd24b56"],
    ("mri", (64, 96)): ["e33d14f39978", "0906be157812", "46fa6c41b917"],
    ("us", (64, 96)): ["75ec0a3a1a63", "3d90d58e8dab", "8ade5db48208"],
    ("ct", (40, 40, 40)): ["8fe517648669"],
    ("mri", (40, 40, 40)): ["43bb061ce61b"],
    ("us", (40, 40, 40)): ["7aa3329e1a6a"],
}


@pytest.mark.parametrize("modality,shape", list(PINNED))
def test_rendered_bytes_unchanged(modality, shape):
    cases = [sample_case(SynthConfig(), modality, shape, 3, i) for i in range(8)]
    r = render_cases(cases)
    out = to_output(cases, r.image)
    for i, digest in enumerate(PINNED[modality, shape]):
        data = out[i].numpy().tobytes() + r.label[i].numpy().tobytes()
        assert hashlib.sha1(data).hexdigest()[:12] == digest, (modality, shape, i)
