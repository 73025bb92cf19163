"""The "AnnotatedData" layer and its feed: VOC-style images and XML made in tmp_path, converted
with convert-annoset, read back as batches; pixels and boxes checked with OpenCV and arithmetic
written here. (The transform of one record with scripted draws: tests/data/test_annotated.py.)"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from caffe_alex.data.annoset import convert_annoset
from caffe_alex.data.loader import make_feed
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.data.voc import IMAGES, normalized, write_voc
from tests.reference import parse_net

MEAN = (104.0, 117.0, 123.0)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voc")
    made = write_voc(folder)
    made["lmdb"] = str(folder / "lmdb")
    convert_annoset(made["root"], made["list"], made["lmdb"], anno_type="detection",
                    label_map_file=made["labelmap"], encoded=True, encode_type="png")  # fmt: skip
    return made


def layer(source, transform="", sampler="", batch=4, tops=("data", "label"), extra=""):
    top = " ".join(f'top: "{t}"' for t in tops)
    return (
        f'layer {{ name: "data" type: "AnnotatedData" {top} {extra} '
        f"transform_param {{ {transform} }} "
        f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} '
        f"annotated_data_param {{ {sampler} }} }}"
    )


WARP = "resize_param { resize_mode: WARP height: 24 width: 36 }"
MEANS = " ".join(f"mean_value: {m}" for m in MEAN)


def batches(text, n, phase="TRAIN", **feed):
    net = Net(parse_net(text), phase)
    f = make_feed(net, **{"seed": 5, **feed})
    try:
        return net, [next(f) for _ in range(n)]
    finally:
        f.close()


def test_top_shapes_come_from_the_first_record(voc):
    net = Net(parse_net(layer(voc["lmdb"], WARP)), "TRAIN")
    assert net.blob_shapes == {"data": (4, 3, 24, 36), "label": (1, 1, 3, 8)}
    net = Net(parse_net(layer(voc["lmdb"], "crop_size: 16", tops=("data",))), "TRAIN")
    assert net.blob_shapes == {"data": (4, 3, 16, 16)}


def test_batches_hold_the_warped_images_and_every_box(voc):
    _, got = batches(layer(voc["lmdb"], f"{WARP} {MEANS} scale: 0.5"), 2, "TEST")
    for b, batch in enumerate(got):
        rows = []
        for i in range(4):
            image = voc["pixels"][(4 * b + i) % len(IMAGES)]
            expected = cv2.resize(image, (36, 24)).transpose(2, 0, 1).astype(np.float32)
            expected = (expected - np.array(MEAN, np.float32)[:, None, None]) * np.float32(0.5)
            np.testing.assert_array_equal(batch["data"][i].numpy(), expected)
            r = normalized((4 * b + i) % len(IMAGES))
            rows.append(np.concatenate([np.full((len(r), 1), i), r], 1))
        np.testing.assert_allclose(batch["label"].numpy()[0, 0], np.concatenate(rows), atol=1e-6)


def test_the_mirror_flips_pixels_and_boxes_together(voc):
    _, got = batches(layer(voc["lmdb"], f"{WARP} mirror: true"), 3)
    flips = 0
    for batch in got:
        label = batch["label"].numpy()[0, 0]
        for i in range(4):
            image = voc["pixels"][i]
            plain = cv2.resize(image, (36, 24)).transpose(2, 0, 1).astype(np.float32)
            data = batch["data"][i].numpy()
            flipped = np.array_equal(data, plain[:, :, ::-1])
            assert flipped or np.array_equal(data, plain)
            expected = normalized(i)
            if flipped:
                expected[:, [2, 4]] = 1 - expected[:, [4, 2]]
                flips += 1
            np.testing.assert_allclose(label[label[:, 0] == i, 1:], expected, atol=1e-6)
    assert 0 < flips < 12


def test_a_batch_without_boxes_gets_the_row_of_minus_ones(tmp_path):
    empty = [(w, h, []) for w, h, _ in IMAGES[:2]]
    made = write_voc(tmp_path / "voc", images=empty)
    db = str(tmp_path / "lmdb")
    convert_annoset(made["root"], made["list"], db, anno_type="detection",
                    label_map_file=made["labelmap"], encoded=True, encode_type="png")  # fmt: skip
    net, got = batches(layer(db, WARP, batch=2), 1)
    assert net.blob_shapes["label"] == (1, 1, 1, 8)
    assert got[0]["label"].shape == (1, 1, 1, 8) and (got[0]["label"] == -1).all()


SSD_TRANSFORM = f"""mirror: true {MEANS} scale: 0.007843
  resize_param {{ resize_mode: WARP height: 24 width: 24 interp_mode: LINEAR interp_mode: AREA
    interp_mode: NEAREST interp_mode: CUBIC interp_mode: LANCZOS4 }}
  emit_constraint {{ emit_type: CENTER }}
  distort_param {{ brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5
    contrast_lower: 0.5 contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 saturation_prob: 0.5
    saturation_lower: 0.5 saturation_upper: 1.5 random_order_prob: 0.0 }}
  expand_param {{ prob: 0.5 max_expand_ratio: 4.0 }}"""
SSD_SAMPLERS = "batch_sampler { max_sample: 1 max_trials: 1 }" + "".join(
    f"batch_sampler {{ sampler {{ min_scale: 0.3 max_scale: 1.0 min_aspect_ratio: 0.5 "
    f"max_aspect_ratio: 2.0 }} sample_constraint {{ min_jaccard_overlap: {j} }} max_sample: 1 "
    "max_trials: 50 }"
    for j in (0.1, 0.3, 0.5, 0.7, 0.9)
)


@pytest.mark.slow
def test_ssd_augmentation_is_repeatable_and_keeps_boxes_valid(voc):
    text = layer(voc["lmdb"], SSD_TRANSFORM, SSD_SAMPLERS)
    _, a = batches(text, 4)
    _, b = batches(text, 4, workers=1)
    _, c = batches(text, 4, seed=6)
    for x, y in zip(a, b):
        assert torch.equal(x["data"], y["data"]) and torch.equal(x["label"], y["label"])
    assert any(not torch.equal(x["data"], z["data"]) for x, z in zip(a, c))
    for batch in a:
        assert batch["data"].shape == (4, 3, 24, 24) and torch.isfinite(batch["data"]).all()
        assert batch["data"].max() <= (255 - 104) * 0.007843 + 1e-5  # (0..255 - mean) * scale
        assert batch["data"].min() >= -123 * 0.007843 - 1e-5
        rows = batch["label"][0, 0].numpy()
        if (rows == -1).all():
            continue
        assert set(rows[:, 0]) <= {0, 1, 2, 3} and set(rows[:, 1]) <= {1, 2, 3}
        boxes = rows[:, 3:7]
        assert (boxes >= 0).all() and (boxes <= 1).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_classification_records_give_one_label_per_image(tmp_path):
    made = write_voc(tmp_path / "voc", images=IMAGES[:2])
    listing = tmp_path / "cls.txt"
    listing.write_text("JPEGImages/000000.png 5\nJPEGImages/000001.png 9\n")
    db = str(tmp_path / "lmdb")
    convert_annoset(made["root"], str(listing), db, encoded=True, encode_type="png")
    net, got = batches(layer(db, WARP, batch=2), 1)
    assert net.blob_shapes["label"] == (2, 1, 1, 1)
    assert got[0]["label"].flatten().tolist() == [5, 9]


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and "layer 'data' (AnnotatedData)" in text
    return text


@pytest.mark.parametrize(
    "transform, message",
    [
        ("resize_param { resize_mode: FIT_SMALL_SIZE height: 8 width: 8 }",
         "FIT_SMALL_SIZE is not supported"),
        ("noise_param { decolorize: true }", "noise_param is not supported by this layer"),
        ("expand_param { max_expand_ratio: 0.5 }", "max_expand_ratio must be > 1"),
        ("crop_size: 64", r"crop 64x64 is larger than the 40x60 image"),
    ],
)  # fmt: skip
def test_configuration_errors_name_the_layer(voc, transform, message):
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(layer(voc["lmdb"], transform)), "TRAIN")
    _one_line(info)


def test_a_missing_source_says_how_to_make_one(tmp_path):
    with pytest.raises(CaffeAlexError, match="convert-annoset") as info:
        Net(parse_net(layer(str(tmp_path / "nope"), WARP)), "TRAIN")
    _one_line(info)


def test_records_that_do_not_fit_the_batch_are_named(voc):
    # without resize_param the images keep their sizes; the second differs from the first
    net = Net(parse_net(layer(voc["lmdb"], "", batch=2)), "TRAIN")
    with pytest.raises(CaffeAlexError, match="record '00000001_JPEGImages/000001.png'") as info:
        next(make_feed(net, seed=0))
    _one_line(info)


def test_raw_records_cannot_be_resized(tmp_path):
    made = write_voc(tmp_path / "voc", images=IMAGES[:1])
    db = str(tmp_path / "lmdb")
    convert_annoset(made["root"], made["list"], db, anno_type="detection",
                    label_map_file=made["labelmap"])  # fmt: skip
    with pytest.raises(CaffeAlexError, match="raw .* the fork resizes only encoded") as info:
        Net(parse_net(layer(db, WARP, batch=1)), "TRAIN")
    _one_line(info)
    net, got = batches(layer(db, "crop_size: 30", batch=1), 1, "TEST")  # no resize: fine
    assert got[0]["data"].shape == (1, 3, 30, 30)


def test_a_mean_value_count_that_fits_no_channel_count_is_one_line(voc):
    text = layer(voc["lmdb"], f"{WARP} mean_value: 1 mean_value: 2", batch=1)
    with pytest.raises(CaffeAlexError, match="mean_value") as info:
        batches(text, 1)
    assert "\n" not in str(info.value)
