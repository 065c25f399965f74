"""mask/report/evidence.py: the query evidence picture (boxes labelled word + score), PNG and HTML."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _panels():
    from mask.report.evidence import Match, Panel

    img = np.full((120, 160, 3), 235, np.uint8)
    img[20:70, 30:90] = (200, 30, 30)  # a red block
    img[60:110, 100:150] = (30, 30, 200)  # a blue block
    return [Panel("1. img-a  eq.10 0.512", img, [Match("red", (30, 20, 90, 70), 0.61),
                                                  Match("car", (30, 20, 90, 70), 0.42),
                                                  Match("blue", (100, 60, 150, 110), 0.55)]),
            Panel("2. img-b", None, [], note="cannot read /x/b.jpg: FileNotFoundError")]


def test_png_has_the_boxes_in_the_word_colours(tmp_path):
    from mask.report.evidence import PALETTE, render_evidence

    path = render_evidence(_panels(), str(tmp_path / "why.png"), "text 'red car': top 2 images")
    with Image.open(path) as im:
        assert im.format == "PNG"
        rgb = np.asarray(im.convert("RGB"))
    # each of the first two words' colours is drawn (its box edge / label)
    for hex_ in PALETTE[:2]:
        c = np.array([int(hex_[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb.astype(int) - c).sum(axis=2) < 30).sum() > 50, hex_


def test_html_embeds_the_png_and_lists_the_matches(tmp_path):
    from mask.report.evidence import render_evidence

    path = render_evidence(_panels(), str(tmp_path / "why.html"), "heading <x>")
    body = open(path, encoding="utf-8").read()
    assert "data:image/png;base64," in body and "heading &lt;x&gt;" in body
    assert "red 0.610 at (30, 20, 90, 70)" in body and "cannot read /x/b.jpg" in body


def test_other_extensions_and_unwritable_paths_are_named(tmp_path):
    from mask.report.evidence import EvidenceError, render_evidence

    with pytest.raises(EvidenceError, match=r"why\.jpg: expected a \.png or \.html"):
        render_evidence(_panels(), str(tmp_path / "why.jpg"), "h")
    with pytest.raises(EvidenceError, match="cannot write"):
        render_evidence(_panels(), str(tmp_path / "no-dir" / "why.png"), "h")
