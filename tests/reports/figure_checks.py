"""Shared checks of the figure tests: write a run file, check a saved figure."""
from pathlib import Path

import matplotlib.image

ALIGNMENT = ("otdd", [12.5, 7.25, 3.5])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def assert_figures(written: list[Path], stem: Path) -> None:
    assert written == [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    png, pdf = written
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    height, width = matplotlib.image.imread(png).shape[:2]
    assert height > 100 and width > 100
    assert pdf.stat().st_size > 1000
    assert not [p for p in stem.parent.iterdir() if p.name.endswith(".tmp")]
