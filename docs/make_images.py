"""Regenerate the preview images in docs/img (python docs/make_images.py)."""

import tempfile
from pathlib import Path

from medfm.synth.dataset import generate_dataset
from medfm.synth.preview import write_preview

IMG = Path(__file__).parent / "img"


def main() -> None:
    IMG.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for m in ("ct", "mri", "us"):
            generate_dataset(f"{tmp}/{m}", modalities=m, dim=2, n=6, size=256, seed=0)
            write_preview(f"{tmp}/{m}", IMG / f"synth_{m}.png")
        generate_dataset(f"{tmp}/d3", modalities="ct,mri,us", dim=3, n=3, size="96,112,80")
        write_preview(f"{tmp}/d3", IMG / "synth_3d.png")


if __name__ == "__main__":
    main()
