"""The segmentation forks' data layers through the feed: caffe-segnet's "DenseImageData" and
DeepLab v2's "ImageSegData", on images and label PNGs written here.

The expected batches are made in the test with OpenCV's own operations (imread, resize,
flip, copyMakeBorder, slicing) in the order of the forks' C++ (dense_image_data_layer.cpp;
image_seg_data_layer.cpp with DataTransformer::TransformImgAndSeg), with the draws the loader
promises: a generator seeded (seed, layer index, stream position), drawn in the forks' order.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from caffe_alex.data.loader import make_feed
from caffe_alex.data.segmentation import c_atoi, read_pairs
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.blobs import array_to_blob_proto
from caffe_alex.net import Net
from tests.reference import parse_net

SEED = 5


def write_pairs(folder, sizes, classes=11, seed=0):
    """PNG images (BGR, random) and label PNGs (blocks of classes, so bilinear and nearest
    resizing differ) of the given (h, w) sizes; returns [(image name, label name)]."""
    rng = np.random.default_rng(seed)
    names = []
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, classes, ((h + 1) // 2, (w + 1) // 2), dtype=np.uint8)
        label = np.kron(label, np.ones((2, 2), np.uint8))[:h, :w]
        cv2.imwrite(str(folder / f"img{i}.png"), image)
        cv2.imwrite(str(folder / f"lab{i}.png"), label)
        names.append((f"img{i}.png", f"lab{i}.png"))
    return names


def one_layer_net(layer: str, phase: str = "TRAIN", **kwargs) -> Net:
    return Net(parse_net(f"layer {{ {layer} }}"), phase, **kwargs)


def batches(net: Net, n: int, **feed) -> list[dict[str, torch.Tensor]]:
    f = make_feed(net, **{"seed": SEED, "workers": 0, **feed})
    try:
        return [next(f) for _ in range(n)]
    finally:
        f.close()


def draws(position: int):
    return np.random.default_rng((SEED, 0, position))


def chw(image: np.ndarray) -> np.ndarray:
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)


# ---- DenseImageData ------------------------------------------------------------------------


def dense(source, batch=2, params="", transform="", root=""):
    root_field = f'root_folder: "{root}"' if root else ""
    return (
        f'name: "data" type: "DenseImageData" top: "data" top: "label" {transform} '
        f'dense_image_data_param {{ source: "{source}" batch_size: {batch} {root_field} '
        f"{params} }}"
    )


def dense_expected(folder, pair, position, *, color=True, new=None, crop=None, mirror=False,
                   mean=None, scale=1.0):  # fmt: skip
    """caffe-segnet's InternalThreadEntry for one record, with OpenCV."""
    image = cv2.imread(str(folder / pair[0]), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    label = cv2.imread(str(folder / pair[1]), cv2.IMREAD_GRAYSCALE)
    if new:
        image = cv2.resize(image, (new[1], new[0]), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (new[1], new[0]), interpolation=cv2.INTER_NEAREST)
    rng = draws(position)
    if mirror and rng.integers(2):
        image, label = cv2.flip(image, 1), cv2.flip(label, 1)
    if crop:
        h, w = label.shape
        h_off, w_off = int(rng.integers(h - crop[0] + 1)), int(rng.integers(w - crop[1] + 1))
        image = image[h_off : h_off + crop[0], w_off : w_off + crop[1]]
        label = label[h_off : h_off + crop[0], w_off : w_off + crop[1]]
    data = chw(image).astype(np.float32)
    if mean is not None:
        data = data - mean
    return data * np.float32(scale), chw(label).astype(np.float32)


def test_dense_image_data_reads_pairs_as_the_fork(tmp_path):
    pairs = write_pairs(tmp_path, [(12, 10)] * 3)
    (tmp_path / "list.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    net = one_layer_net(dense(tmp_path / "list.txt", root=f"{tmp_path}/"))
    assert net.blob_shapes == {"data": (2, 3, 12, 10), "label": (2, 1, 12, 10)}
    for b, batch in enumerate(batches(net, 2)):  # 3 pairs, batches of 2: the second wraps
        for i in range(2):
            position = 2 * b + i
            data, label = dense_expected(tmp_path, pairs[position % 3], position)
            assert np.array_equal(batch["data"][i].numpy(), data)
            assert np.array_equal(batch["label"][i].numpy(), label)


def test_dense_image_data_resize_crop_mirror_mean_and_scale(tmp_path):
    pairs = write_pairs(tmp_path, [(13, 11), (9, 17), (20, 8)], seed=1)
    (tmp_path / "list.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    params = "new_height: 14 new_width: 12 crop_height: 9 crop_width: 7 mirror: true"
    transform = "transform_param { mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5 }"
    net = one_layer_net(dense(tmp_path / "list.txt", 3, params, transform, f"{tmp_path}/"))
    assert net.blob_shapes == {"data": (3, 3, 9, 7), "label": (3, 1, 9, 7)}
    mean = np.array([10, 20, 30], np.float32)[:, None, None]
    mirrored = set()
    for b, batch in enumerate(batches(net, 3)):
        for i in range(3):
            position = 3 * b + i
            mirrored.add(bool(draws(position).integers(2)))
            data, label = dense_expected(
                tmp_path, pairs[i], position, new=(14, 12), crop=(9, 7), mirror=True,
                mean=mean, scale=0.5,
            )  # fmt: skip
            assert np.array_equal(batch["data"][i].numpy(), data)
            assert np.array_equal(batch["label"][i].numpy(), label)
    assert mirrored == {True, False}
    # the labels are resized nearest-neighbour: only classes of the label image appear, which a
    # bilinear resize would not keep
    image = cv2.imread(str(tmp_path / pairs[0][1]), cv2.IMREAD_GRAYSCALE)
    linear = cv2.resize(image, (12, 14), interpolation=cv2.INTER_LINEAR)
    nearest = cv2.resize(image, (12, 14), interpolation=cv2.INTER_NEAREST)
    assert not np.array_equal(linear, nearest)


def test_workers_give_the_same_batches(tmp_path):
    pairs = write_pairs(tmp_path, [(12, 10)] * 3, seed=12)
    (tmp_path / "list.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    params = "crop_height: 8 crop_width: 8 mirror: true shuffle: true"
    net = one_layer_net(dense(tmp_path / "list.txt", 2, params, root=f"{tmp_path}/"))
    (tmp_path / "seg.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    seg_net = one_layer_net(seg(tmp_path / "seg.txt", 2, "label_type: PIXEL",
                                SEG_TRANSFORM, root=f"{tmp_path}/"))  # fmt: skip
    for built in (net, seg_net):
        alone, workers = batches(built, 3), batches(built, 3, workers=2)
        for a, b in zip(alone, workers):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dense_image_data_grey_images_and_a_mean_file(tmp_path):
    pairs = write_pairs(tmp_path, [(6, 8)] * 2, seed=2)
    (tmp_path / "list.txt").write_text(
        "".join(f"{tmp_path}/{a} {tmp_path}/{b}\n" for a, b in pairs)
    )
    mean = np.random.default_rng(3).uniform(0, 255, (1, 1, 6, 8)).astype(np.float32)
    (tmp_path / "mean.binaryproto").write_bytes(array_to_blob_proto(mean).SerializeToString())
    transform = f'transform_param {{ mean_file: "{tmp_path}/mean.binaryproto" }}'
    net = one_layer_net(dense(tmp_path / "list.txt", 2, "is_color: false", transform))
    assert net.blob_shapes["data"] == (2, 1, 6, 8)
    (batch,) = batches(net, 1)
    for i in range(2):
        data, label = dense_expected(tmp_path, pairs[i], i, color=False, mean=mean[0])
        assert np.array_equal(batch["data"][i].numpy(), data)
        assert np.array_equal(batch["label"][i].numpy(), label)


def test_dense_image_data_list_is_words_in_pairs():
    # the fork reads `infile >> image >> label`: line breaks do not matter, a lone word is dropped
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("a.png\nb.png c.png d.png\n\ne.png\n")
    assert read_pairs(f.name) == [("a.png", "b.png", 1), ("c.png", "d.png", 2)]


def test_dense_image_data_shuffle_and_rand_skip(tmp_path):
    pairs = write_pairs(tmp_path, [(4, 4)] * 5, seed=4)
    # each image holds its index in its first pixel's blue value
    for i, (a, _) in enumerate(pairs):
        image = cv2.imread(str(tmp_path / a))
        image[0, 0, 0] = i
        cv2.imwrite(str(tmp_path / a), image)
    (tmp_path / "list.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    root = f"{tmp_path}/"
    net = one_layer_net(dense(tmp_path / "list.txt", 5, "shuffle: true", root=root))
    passes = [b["data"][:, 0, 0, 0].int().tolist() for b in batches(net, 3)]
    assert all(sorted(p) == list(range(5)) for p in passes) and len({*map(tuple, passes)}) > 1
    net = one_layer_net(dense(tmp_path / "list.txt", 5, "rand_skip: 5", root=root))
    (first,) = [b["data"][:, 0, 0, 0].int().tolist() for b in batches(net, 1)]
    assert first == [(first[0] + i) % 5 for i in range(5)]


def test_dense_image_data_shapes_without_the_list(tmp_path):
    text = dense("/no/such/list.txt", 4, "crop_height: 8 crop_width: 6 is_color: false")
    assert one_layer_net(text).blob_shapes == {"data": (4, 1, 8, 6), "label": (4, 1, 8, 6)}
    text = dense("/no/such/list.txt", 4, "new_height: 9 new_width: 7")
    assert one_layer_net(text).blob_shapes == {"data": (4, 3, 9, 7), "label": (4, 1, 9, 7)}
    with pytest.raises(CaffeAlexError, match=r"'data': \(N, C, H, W\), 'label': \(N, 1, H, W\)"):
        one_layer_net(dense("/no/such/list.txt"))
    shapes = {"data": (1, 3, 24, 32), "label": (1, 1, 24, 32)}
    assert one_layer_net(dense("/no/such/list.txt"), input_shapes=shapes).blob_shapes == shapes


@pytest.mark.parametrize(
    "params,transform,message",
    [
        ("new_height: 5", "", "set new_height and new_width together"),
        ("crop_width: 5", "", "set crop_height and crop_width together"),
        ("", "transform_param { crop_size: 4 }", "cannot take transform_param.crop_size or mir"),
        ("", "transform_param { mirror: true }", "cannot take transform_param.crop_size or mir"),
        ('mean_file: "m.binaryproto"', "", "dense_image_data_param.mean_file is not read"),
        ("", "transform_param { force_color: true }", "transform_param.force_color is not supp"),
    ],
)
def test_dense_image_data_configuration_errors(params, transform, message):
    with pytest.raises(CaffeAlexError, match=rf"layer 'data' \(DenseImageData\).*{message}"):
        one_layer_net(dense("/no/such/list.txt", 2, params, transform))


def test_dense_image_data_bad_records_name_their_list_line(tmp_path):
    pairs = write_pairs(tmp_path, [(6, 6), (6, 6), (5, 6)], seed=5)
    listing = tmp_path / "list.txt"
    root = f"{tmp_path}/"
    listing.write_text(f"{pairs[0][0]} {pairs[0][1]}\nmissing.png {pairs[1][1]}\n")
    with pytest.raises(CaffeAlexError) as caught:
        batches(one_layer_net(dense(listing, root=root)), 1)
    text = str(caught.value)
    assert "layer 'data' (DenseImageData)" in text and f"line 2 of '{listing}'" in text
    assert "missing.png" in text and "no such file" in text
    listing.write_text(f"{pairs[0][0]} {pairs[0][1]}\n{pairs[0][0]} {pairs[2][1]}\n")
    with pytest.raises(CaffeAlexError, match=r"line 2 of .*label image is 5x6 but the image 6x6"):
        batches(one_layer_net(dense(listing, root=root)), 1)
    listing.write_text(f"{pairs[0][0]} {pairs[0][1]}\n")
    text = dense(listing, 1, "crop_height: 7 crop_width: 6", root=root)
    with pytest.raises(CaffeAlexError, match=r"line 1 of .*crop 7x6 is larger than the 6x6 im"):
        batches(one_layer_net(text), 1)
    listing.write_text("")
    with pytest.raises(CaffeAlexError, match="names no image"):
        batches(one_layer_net(dense(listing, 1, "crop_height: 6 crop_width: 6")), 1)


# ---- ImageSegData --------------------------------------------------------------------------


def seg(source, batch=2, params="", transform="", tops=("data", "label", "dim"), root=""):
    root_field = f'root_folder: "{root}"' if root else ""
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return (
        f'name: "data" type: "ImageSegData" {top_lines} {transform} '
        f'image_data_param {{ source: "{source}" batch_size: {batch} {root_field} {params} }}'
    )


def seg_expected(folder, line, position, phase, *, crop=None, mirror=False, factors=(),
                 mean=(0.0, 0.0, 0.0), scale=1.0, ignore=255, label_type="PIXEL",
                 size=None, new=None):  # fmt: skip
    """DeepLab v2's load_batch and TransformImgAndSeg for one record, with OpenCV."""
    words = line.split()
    image = cv2.imread(str(folder / words[0]), cv2.IMREAD_COLOR)
    if new:
        image = cv2.resize(image, (new[1], new[0]), interpolation=cv2.INTER_LINEAR)
    rows, cols = image.shape[:2]
    if label_type == "PIXEL":
        label = cv2.imread(str(folder / words[1]), cv2.IMREAD_GRAYSCALE)
        if new:  # the fork reads label images with ReadImageToCVMat's bilinear resize
            label = cv2.resize(label, (new[1], new[0]), interpolation=cv2.INTER_LINEAR)
    else:
        value = c_atoi(words[1]) if label_type == "IMAGE" else ignore
        label = np.full((rows, cols), min(max(value, 0), 255), np.uint8)
    rng = draws(position)
    do_mirror = mirror and bool(rng.integers(2))
    h, w = rows, cols
    if factors:
        factor = np.float32(factors[int(rng.integers(len(factors)))])
        if factor != 1:
            h, w = int(np.float32(h) * factor), int(np.float32(w) * factor)
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    image = image.astype(np.float64)
    out_h, out_w = crop or size
    if crop:
        pad_h, pad_w = max(crop[0] - h, 0), max(crop[1] - w, 0)
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=mean)
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=ignore)
        h, w = label.shape
        if phase == "TRAIN":
            h_off, w_off = int(rng.integers(h - crop[0] + 1)), int(rng.integers(w - crop[1] + 1))
        else:
            h_off, w_off = (h - crop[0]) // 2, (w - crop[1]) // 2
    else:
        h_off = w_off = 0
    image = image[h_off : h_off + out_h, w_off : w_off + out_w]
    label = label[h_off : h_off + out_h, w_off : w_off + out_w]
    if do_mirror:
        image, label = cv2.flip(image, 1), cv2.flip(label, 1)
    data = (chw(image).astype(np.float32) - np.float32(mean)[:, None, None]) * np.float32(scale)
    dims = np.array([[[min(out_h, rows), min(out_w, cols)]]], np.float32)
    return data, chw(label).astype(np.float32), dims


SEG_TRANSFORM = (
    "transform_param { crop_size: 11 mirror: true mean_value: 104 mean_value: 117 "
    "mean_value: 123 scale: 0.5 }"
)


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_image_seg_data_pads_smaller_images_and_crops(tmp_path, phase):
    # 9 x 14 and 13 x 8 images under an 11 x 11 crop: padded at the bottom and right with the
    # mean (the image) and 255 (the labels), then cropped (random in TRAIN, centred in TEST)
    pairs = write_pairs(tmp_path, [(9, 14), (13, 8), (12, 12)], seed=6)
    lines = [f"{a} {b}" for a, b in pairs]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    net = one_layer_net(seg(tmp_path / "list.txt", 3, "label_type: PIXEL", SEG_TRANSFORM,
                            root=f"{tmp_path}/"), phase)  # fmt: skip
    assert net.blob_shapes == {"data": (3, 3, 11, 11), "label": (3, 1, 11, 11),
                               "dim": (3, 1, 1, 2)}  # fmt: skip
    padded = 0
    for b, batch in enumerate(batches(net, 2)):
        for i in range(3):
            position = 3 * b + i
            want = seg_expected(tmp_path, lines[i], position, phase, crop=(11, 11), mirror=True,
                                mean=(104.0, 117.0, 123.0), scale=0.5)  # fmt: skip
            for top, value in zip(("data", "label", "dim"), want):
                assert np.array_equal(batch[top][i].numpy(), value), (top, position)
            padded += int((batch["label"][i] == 255).sum())
    assert padded > 0  # the padding shows in the batches
    assert batches(net, 1)[0]["dim"][:, 0, 0].tolist() == [[9, 11], [11, 8], [11, 11]]


def test_image_seg_data_scale_factors_and_crop_height_width(tmp_path):
    pairs = write_pairs(tmp_path, [(16, 20), (18, 14)], seed=7)
    lines = [f"{a} {b}" for a, b in pairs]
    (tmp_path / "list.txt").write_text("\n".join(lines))  # no newline at the end
    transform = (
        "transform_param { crop_height: 9 crop_width: 7 mean_value: 10 scale_factors: 0.5 "
        "scale_factors: 0.75 scale_factors: 1.3 }"
    )
    net = one_layer_net(seg(tmp_path / "list.txt", 2, "label_type: PIXEL", transform,
                            tops=("data", "label"), root=f"{tmp_path}/"))  # fmt: skip
    assert net.blob_shapes == {"data": (2, 3, 9, 7), "label": (2, 1, 9, 7)}
    factors = (0.5, 0.75, 1.3)
    seen = set()
    for b, batch in enumerate(batches(net, 4)):
        for i in range(2):
            position = 2 * b + i
            seen.add(int(draws(position).integers(3)))
            want = seg_expected(tmp_path, lines[i], position, "TRAIN", crop=(9, 7),
                                factors=factors, mean=(10.0, 10.0, 10.0))  # fmt: skip
            assert np.array_equal(batch["data"][i].numpy(), want[0]), position
            assert np.array_equal(batch["label"][i].numpy(), want[1]), position
    assert len(seen) > 1


@pytest.mark.parametrize("label_type,second", [("IMAGE", "7"), ("IMAGE", "300x"), ("NONE", "")])
def test_image_seg_data_image_and_none_labels(tmp_path, label_type, second):
    pairs = write_pairs(tmp_path, [(6, 7)], seed=8)
    line = f"{pairs[0][0]} {second}".strip()
    (tmp_path / "list.txt").write_text(line + "\n")
    params = f"label_type: {label_type} ignore_label: 200"
    net = one_layer_net(seg(tmp_path / "list.txt", 1, params, root=f"{tmp_path}/"), "TEST")
    (batch,) = batches(net, 1)
    want = seg_expected(tmp_path, line + " x" * (not second), 0, "TEST", ignore=200,
                        label_type=label_type, size=(6, 7))  # fmt: skip
    for top, value in zip(("data", "label", "dim"), want):
        assert np.array_equal(batch[top][0].numpy(), value), top
    assert batch["label"].unique().tolist() == [{"7": 7, "300x": 255, "": 200}[second]]


def test_image_seg_data_without_a_crop_takes_the_top_left_of_larger_images(tmp_path):
    pairs = write_pairs(tmp_path, [(6, 7), (9, 8), (5, 7)], seed=9)
    lines = [f"{a} {b}" for a, b in pairs]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    net = one_layer_net(seg(tmp_path / "list.txt", 2, "label_type: PIXEL", root=f"{tmp_path}/"))
    assert net.blob_shapes["data"] == (2, 3, 6, 7)  # the first image's size
    (batch,) = batches(net, 1)
    for i in range(2):
        want = seg_expected(tmp_path, lines[i], i, "TRAIN", size=(6, 7))
        for top, value in zip(("data", "label", "dim"), want):
            assert np.array_equal(batch[top][i].numpy(), value), (top, i)
    with pytest.raises(CaffeAlexError, match=r"line 3 of .*5x7 image is smaller than the 6x7"):
        batches(net, 2)


def test_image_seg_data_resizes_label_images_bilinearly_as_the_fork(tmp_path):
    pairs = write_pairs(tmp_path, [(10, 9), (7, 12)], seed=11)
    lines = [f"{a} {b}" for a, b in pairs]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    params = "label_type: PIXEL new_height: 13 new_width: 11"
    net = one_layer_net(seg(tmp_path / "list.txt", 2, params, root=f"{tmp_path}/"), "TEST")
    assert net.blob_shapes["data"] == (2, 3, 13, 11)
    (batch,) = batches(net, 1)
    for i in range(2):
        want = seg_expected(tmp_path, lines[i], i, "TEST", size=(13, 11), new=(13, 11))
        for top, value in zip(("data", "label", "dim"), want):
            assert np.array_equal(batch[top][i].numpy(), value), (top, i)


@pytest.mark.parametrize(
    "params,transform,message",
    [
        ("", "transform_param { mean_file: 'm.binaryproto' }", "does not support transform_p"),
        ("new_width: 5", "", "set new_height and new_width together"),
        ("", "transform_param { crop_size: 5 crop_height: 5 crop_width: 5 }", "either crop_size"),
        ("", "transform_param { crop_height: 5 }", "either crop_size or both"),
        ("mirror: true", "", "image_data_param.mirror is not supported"),
        ("", "transform_param { force_gray: true }", "transform_param.force_gray is not supp"),
    ],
)
def test_image_seg_data_configuration_errors(params, transform, message):
    with pytest.raises(CaffeAlexError, match=rf"layer 'data' \(ImageSegData\).*{message}"):
        one_layer_net(seg("/no/such/list.txt", 2, params, transform))


def test_image_seg_data_shapes_and_bad_records(tmp_path):
    text = seg("/no/such/list.txt", 4, transform="transform_param { crop_size: 5 }")
    shapes = {"data": (4, 3, 5, 5), "label": (4, 1, 5, 5), "dim": (4, 1, 1, 2)}
    assert one_layer_net(text).blob_shapes == shapes
    with pytest.raises(CaffeAlexError, match=r"'label': \(N, 1, H, W\), 'dim': \(N, 1, 1, 2\)"):
        one_layer_net(seg("/no/such/list.txt"))
    pairs = write_pairs(tmp_path, [(6, 6)], seed=10)
    listing, root = tmp_path / "list.txt", f"{tmp_path}/"
    listing.write_text(f"{pairs[0][0]} {pairs[0][1]}\n{pairs[0][0]} gone.png\n")
    with pytest.raises(CaffeAlexError) as caught:
        batches(one_layer_net(seg(listing, 2, "label_type: PIXEL", root=root)), 1)
    text = str(caught.value)
    assert "layer 'data' (ImageSegData)" in text and f"line 2 of '{listing}'" in text
    assert "gone.png" in text and "no such file" in text
    listing.write_text(f"{pairs[0][0]} {pairs[0][1]}\n{pairs[0][0]}\n")
    with pytest.raises(CaffeAlexError, match=r"list.txt:2: no label image after 'img0.png'"):
        batches(one_layer_net(seg(listing, 2, "label_type: PIXEL", root=root)), 1)
    listing.write_text(f"{pairs[0][0]} {pairs[0][1]}\n")
    text = seg(listing, 1, "label_type: PIXEL", "transform_param { crop_size: 8 }", root=root)
    with pytest.raises(CaffeAlexError, match="pads it with mean_value, which is not set"):
        batches(one_layer_net(text), 1)


def test_c_atoi():
    assert [c_atoi(s) for s in ("12", " -3x", "+4", "x1", "", "-", "0007")] == [
        12, -3, 4, 0, 0, 0, 7,
    ]  # fmt: skip
