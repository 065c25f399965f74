"""detectron2 backend: imported only when chosen; tests that need detectron2 skip without it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from mask.config import DetectorConfig

HAS_D2 = importlib.util.find_spec("detectron2") is not None
needs_d2 = pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed (no PyPI wheel; build it from source)")


def test_importing_mask_features_does_not_import_detectron2():
    # A fresh interpreter: other tests (e.g. the one walking every module for its errors) import the backend.
    code = ("import sys, mask.features.extractor; "
            "print(int('mask.features.detectron2_backend' in sys.modules), int('detectron2' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "0" or HAS_D2
    if not HAS_D2:
        assert out[1] == "0"


@pytest.mark.skipif(HAS_D2, reason="checks the error shown when detectron2 is missing")
def test_missing_detectron2_error_says_how_to_install():
    from mask.features.extractor import RegionExtractor

    with pytest.raises(ImportError, match="pip install 'git\\+https://github.com/facebookresearch/detectron2"):
        RegionExtractor.from_config(DetectorConfig(backend="detectron2", d2_config="x.yaml"))


@pytest.mark.detectron2
@needs_d2
def test_detectron2_c4_model_given_and_fixed(tmp_path):
    """A randomly initialised detectron2 C4 model: same output contract as the BUTD extractor."""
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from mask.features.extractor import RegionExtractor

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 200
    model = build_model(cfg)
    weights = tmp_path / "w.pth"
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("w")
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(cfg.dump())
    img = np.random.default_rng(0).integers(0, 255, (150, 180, 3)).astype(np.uint8)
    det = DetectorConfig(backend="detectron2", d2_config=str(yaml_path), weights=str(weights), device="cpu",
                         mode="given")
    ext = RegionExtractor.from_config(det)
    o = ext([img], [np.array([[10, 10, 100, 100], [500, 500, 600, 600]], np.float32)])[0]
    assert o["features"].shape == (1, 2048) and o["dropped_boxes"].tolist() == [1]
    ext.det = det.model_copy(update={"mode": "fixed", "num_boxes": 5})
    o = ext([img])[0]
    assert o["num_boxes"] == 5 and o["features"].dtype == np.float16
