"""CLIP base scores on Ray Data: a tiny, seeded, randomly initialised open_clip model (no weights download).

The numbers are meaningless, the pipeline is real: the matrix is checked against a naive reference
computed in this process with open_clip's own preprocessing, one image and one caption at a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLIP = ["clip.model=mask-test-tiny", "clip.pretrained=null", f"clip.architecture={json.dumps(TINY)}",
        "clip.batch_size=3"]


def _clip_cfg(**update):
    from mask.config import ClipConfig

    return ClipConfig(**{"model": "mask-test-tiny", "pretrained": None, "architecture": TINY, **update})


def _reference(clip, seed, uris, texts):
    """Naive reference: open_clip's own transform and towers, one input at a time, cosine matrix."""
    import torch
    from PIL import Image

    from mask.pipeline.base_scores import load_clip

    model, preprocess, tok = load_clip(clip, seed, {})
    with torch.no_grad():
        img = [model.encode_image(preprocess(Image.open(u).convert("RGB"))[None])[0] for u in uris]
        txt = [model.encode_text(tok([t]))[0] for t in texts]
    img = torch.stack(img).numpy()
    txt = torch.stack(txt).numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img @ txt.T


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_local):
    from jobs import base_scores

    root = tmp_path_factory.mktemp("base_scores")
    args = [f"storage.root={root}", "gallery.limit=8", *CLIP]
    return root, args, base_scores.main(args)


def test_matrix_shape_order_and_values(demo):
    from mask.pipeline.rerank import read_base_scores_artifact
    from mask.storage import Store

    root, _, s = demo
    bs = s["base_scores"]
    assert bs["reused"] is False and bs["errors"] == 0
    assert bs["gpus_per_actor"] == 0 and bs["actors"] == [1, 1]  # CPU path; the demo pool is 1..1 actors
    store = Store(str(root))
    images = store.read_table("datasets/demo_gallery/images")
    caps = store.read_table("datasets/demo_gallery/captions")
    assert images.num_rows == 8
    rel = bs["uri"][len(str(root)) + 1:]
    assert rel.startswith("base_scores/demo_gallery/mask-test-tiny-random-")
    got = read_base_scores_artifact(store, rel)
    image_ids = images.column("image_id").to_pylist()
    assert got.image_ids == image_ids
    # columns: captions sorted by (image position, original order) — evaluate.py's order, naively
    cap_img = caps.column("image_id").to_pylist()
    cap_ids = caps.column("caption_id").to_pylist()
    expect = [cap_ids[j] for i in image_ids for j in range(len(cap_ids)) if cap_img[j] == i]
    assert got.caption_ids == expect and len(expect) == caps.num_rows
    assert got.caption_image.tolist() == [image_ids.index(cap_img[cap_ids.index(c)]) for c in expect]
    assert got.scores.dtype == np.float32 and got.scores.shape == (8, len(expect)) == tuple(bs["shape"])
    assert got.excluded_image_ids == [] and got.excluded_caption_ids == []
    # values: the same seeded model, open_clip's own preprocessing, one input at a time
    uris = dict(zip(image_ids, images.column("uri").to_pylist(), strict=True))
    texts = dict(zip(cap_ids, caps.column("text").to_pylist(), strict=True))
    ref = _reference(_clip_cfg(), 0, [uris[i] for i in image_ids], [texts[c] for c in expect])
    np.testing.assert_allclose(got.scores, ref, atol=2e-5)
    assert np.all(np.abs(got.scores) <= 1.0 + 1e-5)
    assert store.read_table(rel + "/_errors").num_rows == 0


def test_rerun_reuses_committed_artifact(demo):
    from jobs import base_scores
    from mask.storage import Store

    root, args, first = demo
    rel = first["base_scores"]["uri"][len(str(root)) + 1:]
    before = Store(str(root)).manifest(rel)
    again = base_scores.main(args)
    assert again["base_scores"]["reused"] is True
    assert again["base_scores"]["uri"] == first["base_scores"]["uri"]
    assert again["base_scores"]["shape"] == first["base_scores"]["shape"]
    assert Store(str(root)).manifest(rel) == before  # nothing rewritten
    # execution settings are not part of the identity: another batch size / actor count reuses too
    other = base_scores.main([*args, "clip.batch_size=5", "clip.num_actors=1"])
    assert other["base_scores"]["reused"] is True


def test_tracked_in_mlflow(demo):
    import mlflow

    _, _, s = demo
    client = mlflow.MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    run = client.get_run(s["mlflow"]["run_id"])
    assert run.data.metrics["base_scores.scored_images"] == 8.0
    assert run.data.tags["base_scores.uri"] == s["base_scores"]["uri"]
    assert run.data.params["clip.model"] == "mask-test-tiny"


def _karpathy_gallery(tmp_path):
    """Three images (one good, one truncated, one not an image), two captions each, Karpathy format."""
    from PIL import Image
    from skimage import data

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.fromarray(data.astronaut()).resize((64, 48)).save(img_dir / "good.jpg")
    good = (img_dir / "good.jpg").read_bytes()
    (img_dir / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (img_dir / "text.jpg").write_text("not an image")
    Image.fromarray(data.coffee()).resize((40, 56)).save(img_dir / "cup.png")
    images, sid = [], 0
    for k, name in enumerate(["text.jpg", "good.jpg", "trunc.jpg", "cup.png"]):
        sents = []
        for t in (f"caption one of {name}", f"a second caption of {name}"):
            sents.append({"raw": t, "tokens": t.split(), "imgid": k, "sentid": sid})
            sid += 1
        images.append({"filename": name, "imgid": k, "split": "test", "sentids": [x["sentid"] for x in sents],
                       "sentences": sents})
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path, img_dir


def test_bad_images_excluded_and_recorded(tmp_path, ray_local):
    from jobs import base_scores
    from mask.pipeline.rerank import read_base_scores_artifact
    from mask.storage import Store

    path, img_dir = _karpathy_gallery(tmp_path)
    root = tmp_path / "art"
    s = base_scores.main([f"storage.root={root}", "gallery.kind=karpathy", f"gallery.path={path}",
                          f"gallery.image_root={img_dir}", "gallery.name=mini", "tracking.enabled=false", *CLIP])
    bs = s["base_scores"]
    assert bs["images"] == 4 and bs["scored_images"] == 2 and bs["errors"] == 2
    assert bs["excluded_captions"] == 4 and bs["shape"] == [2, 4]
    store = Store(str(root))
    rel = bs["uri"][len(str(root)) + 1:]
    errs = {e["image_id"]: e for e in store.read_table(rel + "/_errors").to_pylist()}
    assert set(errs) == {"trunc", "text"}
    assert all(e["stage"] and e["error"] and e["message"] and e["uri"].endswith(".jpg") for e in errs.values())
    assert errs["trunc"]["error"] == "TruncatedImage"
    got = read_base_scores_artifact(store, rel)
    assert got.image_ids == ["good", "cup"]  # gallery order, failed images left out
    caps = store.read_table("datasets/mini/captions")
    owner = dict(zip(caps.column("caption_id").to_pylist(), caps.column("image_id").to_pylist(), strict=True))
    assert [owner[c] for c in got.caption_ids] == ["good", "good", "cup", "cup"]
    assert got.caption_image.tolist() == [0, 0, 1, 1]
    assert sorted(got.excluded_image_ids) == ["text", "trunc"]
    assert sorted(owner[c] for c in got.excluded_caption_ids) == ["text", "text", "trunc", "trunc"]
    texts = dict(zip(caps.column("caption_id").to_pylist(), caps.column("text").to_pylist(), strict=True))
    ref = _reference(_clip_cfg(), 0, [str(img_dir / "good.jpg"), str(img_dir / "cup.png")],
                     [texts[c] for c in got.caption_ids])
    np.testing.assert_allclose(got.scores, ref, atol=2e-5)


def test_all_images_bad_is_an_error_after_recording_them(tmp_path, ray_local):
    from jobs import base_scores
    from mask.pipeline.base_scores import BaseScoresError

    path, img_dir = _karpathy_gallery(tmp_path)
    for f in img_dir.iterdir():
        f.write_bytes(b"")
    from mask.pipeline.identity import base_scores_rel
    from mask.storage import Store

    root = tmp_path / "art"
    with pytest.raises(BaseScoresError, match="none of its 4 images"):
        base_scores.main([f"storage.root={root}", "gallery.kind=karpathy", f"gallery.path={path}",
                          f"gallery.image_root={img_dir}", "gallery.name=mini", "tracking.enabled=false", *CLIP])
    rel = base_scores_rel("mini", _clip_cfg(batch_size=3))
    store = Store(str(root))
    assert store.read_table(rel + "/_errors").num_rows == 4  # every failure recorded, with its reason
    assert store.manifest(rel) is None  # no empty matrix committed: a rerun tries again


# ---------------------------------------------------------------- library pieces, no Ray


def test_model_tag_identity():
    from mask.pipeline.identity import base_scores_rel, model_tag

    a = _clip_cfg()
    assert model_tag(a) == model_tag(_clip_cfg(batch_size=7, num_actors=3))  # execution only
    assert model_tag(a) != model_tag(_clip_cfg(precision="fp16"))
    assert model_tag(_clip_cfg(pretrained="s3://b/models/my clip.safetensors")).startswith("mask-test-tiny-my-clip-")
    from mask.config import ClipConfig

    assert model_tag(ClipConfig()).startswith("ViT-B-32-openai-")
    assert base_scores_rel("g", a) == f"base_scores/g/{model_tag(a)}"


def test_architecture_registration_rules():
    from mask.config import ClipConfig
    from mask.pipeline.base_scores import BaseScoresError, register_architecture

    assert register_architecture(_clip_cfg()) == "mask-test-tiny"
    assert register_architecture(_clip_cfg()) == "mask-test-tiny"  # idempotent
    with pytest.raises(BaseScoresError, match="built-in open_clip model"):
        register_architecture(ClipConfig(model="ViT-B-32", pretrained=None, architecture=TINY))
    with pytest.raises(BaseScoresError, match="missing key"):
        register_architecture(ClipConfig(model="x-tiny", pretrained=None, architecture={"embed_dim": 8}))


def test_clip_config_validation():
    from mask.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="clip.precision"):
        load_config(None, ["clip.precision=fp8"])
    with pytest.raises(ConfigError, match="clip.batch_size"):
        load_config(None, ["clip.batch_size=0"])


def test_no_gallery_is_a_clear_error(tmp_path):
    from mask.config import load_config
    from mask.pipeline.base_scores import BaseScoresError, base_scores_job

    with pytest.raises(BaseScoresError, match="names no gallery"):
        base_scores_job(load_config(None, [f"storage.root={tmp_path}"]))


def test_local_weights_file_and_missing_file(tmp_path, rng):
    """``pretrained=<path>``: open_clip loads the file (safetensors); a missing file is named."""
    import torch
    from safetensors.torch import save_file

    from mask.pipeline.base_scores import BaseScoresError, load_clip, resolve_weights, weights_fingerprint

    src, _, tok = load_clip(_clip_cfg(), 123, {})
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded, _, _ = load_clip(_clip_cfg(pretrained=str(path)), 0, {})
    x = torch.as_tensor(rng.standard_normal((2, 3, 32, 32)), dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.encode_image(x).numpy(), src.encode_image(x).numpy(), atol=1e-6)
        t = tok(["a red ball"])
        np.testing.assert_allclose(loaded.encode_text(t).numpy(), src.encode_text(t).numpy(), atol=1e-6)
    assert resolve_weights(f"file://{path}", {}) == str(path)
    fp = weights_fingerprint(str(path), {})
    assert fp != "openai" and weights_fingerprint("openai", {}) == "openai"
    with pytest.raises(BaseScoresError, match="no such weights file"):
        resolve_weights(str(tmp_path / "nope.safetensors"), {})
    with pytest.raises(BaseScoresError, match="nope.pt"):
        weights_fingerprint(str(tmp_path / "nope.pt"), {})


def test_weights_from_object_storage(tmp_path, s3_bucket, s3_server):
    """``pretrained=s3://…``: fetched once to a local file with the same bytes."""
    import fsspec

    from mask.pipeline.base_scores import resolve_weights

    opts = {"client_kwargs": {"endpoint_url": s3_server}}
    payload = np.random.default_rng(1).bytes(3 << 20)
    uri = f"{s3_bucket}/models/clip.safetensors"
    with fsspec.open(uri, "wb", **opts) as f:
        f.write(payload)
    local = resolve_weights(uri, opts)
    assert Path(local).read_bytes() == payload and local.endswith("clip.safetensors")
    assert resolve_weights(uri, opts) == local  # cached by the object's fingerprint
