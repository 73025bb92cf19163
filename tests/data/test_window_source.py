"""WindowData through the feed, against a loop-by-loop NumPy transcription of Caffe's
WindowDataLayer::load_batch (its window arithmetic in float32, the pixel copy, the mean
indexing), with the window choice forced by files holding one foreground and one background
window. The warp is cv2.resize, what Caffe calls (resize_linear calls it too); one case is also
checked end to end against OpenCV's own imread and resize, exactly."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from caffe_alex.data.loader import make_feed
from caffe_alex.data.window_source import caffe_round, read_window_file, window_geometry
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.blobs import array_to_blob_proto
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.reference import parse_net

f32 = np.float32
RNG = np.random.default_rng(0)
IMAGES = [RNG.integers(0, 256, (3, 20, 24)).astype(np.uint8) for _ in range(3)]
CROP = 10


@pytest.fixture
def log(caplog):
    """caplog wired straight to the "caffe_alex" logger (the CLI's set-up stops propagation)."""
    logger = logging.getLogger("caffe_alex")
    old = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old[0])
    logger.propagate = old[1]


def cv_resize(chw, height, width):
    """cv::resize(INTER_LINEAR) of a C x H x W window, as Caffe warps it."""
    hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
    return cv2.resize(hwc, (width, height), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)


# -- the transcription ---------------------------------------------------------------------
def c_round(v) -> int:
    """C's round() of a float: halves away from zero."""
    v = np.float64(v)
    return int(np.floor(v + 0.5)) if v >= 0 else -int(np.floor(-v + 0.5))


def caffe_geometry(box, rows, cols, crop, context_pad, square, mirror, trace=None):
    """load_batch's box arithmetic, statement by statement (Dtype = float); ``trace`` counts
    the trims of the warped size."""
    x1, y1, x2, y2 = box
    pad_w = pad_h = 0
    size_w = size_h = crop
    if context_pad > 0 or square:
        context_scale = f32(crop) / f32(crop - 2 * context_pad)
        half_height = f32(np.float64(y2 - y1 + 1) / 2.0)
        half_width = f32(np.float64(x2 - x1 + 1) / 2.0)
        center_x = f32(x1) + half_width
        center_y = f32(y1) + half_height
        if square:
            if half_height > half_width:
                half_width = half_height
            else:
                half_height = half_width
        x1 = c_round(center_x - half_width * context_scale)
        x2 = c_round(center_x + half_width * context_scale)
        y1 = c_round(center_y - half_height * context_scale)
        y2 = c_round(center_y + half_height * context_scale)
        unclipped_height, unclipped_width = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        clipped_height, clipped_width = y2 - y1 + 1, x2 - x1 + 1
        scale_x = f32(crop) / f32(unclipped_width)
        scale_y = f32(crop) / f32(unclipped_height)
        size_w = c_round(f32(clipped_width) * scale_x)
        size_h = c_round(f32(clipped_height) * scale_y)
        pad_x1, pad_x2 = c_round(f32(pad_x1) * scale_x), c_round(f32(pad_x2) * scale_x)
        pad_y1 = c_round(f32(pad_y1) * scale_y)
        pad_h = pad_y1
        pad_w = pad_x2 if mirror else pad_x1
        if pad_h + size_h > crop:
            size_h = crop - pad_h
            trace is not None and trace.append("h")
        if pad_w + size_w > crop:
            size_w = crop - pad_w
            trace is not None and trace.append("w")
    return (x1, y1, x2, y2), (size_h, size_w), pad_h, pad_w


def caffe_window(
    image,
    box,
    crop,
    pad=0,
    square=False,
    mirror=False,
    scale=1.0,
    mean=None,
    mean_values=None,
    resize=cv_resize,
):
    """One item of Caffe's batch; ``mean`` is the mean blob as Caffe holds it (4-D)."""
    channels, rows, cols = image.shape
    (x1, y1, x2, y2), (size_h, size_w), pad_h, pad_w = caffe_geometry(
        box, rows, cols, crop, pad, square, mirror
    )
    warped = resize(image[:, y1 : y2 + 1, x1 : x2 + 1], size_h, size_w)
    if mirror:
        warped = warped[:, :, ::-1]
    out = np.zeros(channels * crop * crop, np.float32)
    if mean is not None:
        flat, mean_height, mean_width = mean.ravel(), mean.shape[2], mean.shape[3]
        mean_off = int((mean_width - crop) / 2)
    values = list(mean_values or [])
    if len(values) == 1:
        values *= channels
    for h in range(size_h):
        for w in range(size_w):
            for c in range(channels):
                top_index = (c * crop + h + pad_h) * crop + w + pad_w
                pixel = f32(warped[c, h, w])
                if mean is not None:
                    mean_index = (c * mean_height + h + mean_off + pad_h) * mean_width
                    mean_index += w + mean_off + pad_w
                    out[top_index] = (pixel - flat[mean_index]) * f32(scale)
                elif values:
                    out[top_index] = (pixel - f32(values[c])) * f32(scale)
                else:
                    out[top_index] = pixel * f32(scale)
    return out.reshape(channels, crop, crop), (pad_h, pad_w, size_h, size_w)


# -- files ---------------------------------------------------------------------------------
def save_png(path, array):
    Image.fromarray(np.ascontiguousarray(array[::-1].transpose(1, 2, 0))).save(path)


def write_windows(tmp_path, records, name="windows.txt"):
    """records: (image number, [(class, overlap, x1, y1, x2, y2), ...]); paths are relative
    to tmp_path (the net's root_folder)."""
    lines = []
    for n, (image, windows) in enumerate(records):
        save_png(tmp_path / f"im{image}.png", IMAGES[image])
        lines += [f"# {n}", f"im{image}.png", "3", "20", "24", str(len(windows))]
        lines += [" ".join(str(v) for v in w) for w in windows]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def window_net(path, batch=4, params="", transform=f"crop_size: {CROP}", phase="TRAIN"):
    text = f"""
    layer {{ name: "win" type: "WindowData" top: "data" top: "label"
             transform_param {{ {transform} }}
             window_data_param {{ source: "{path}" root_folder: "{path.parent}/"
                                  batch_size: {batch} {params} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
             inner_product_param {{ num_output: 4 }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
    """
    return Net(parse_net(text), phase)


def mirror_coins(seed, positions, mirror, windows=1):
    """The loader's draws per item: the window, then (with mirror) the coin."""
    coins = []
    for p in positions:
        rng = np.random.default_rng((seed, 0, p))
        rng.integers(windows)
        coins.append(bool(mirror and rng.integers(2)))
    return coins


def write_mean(tmp_path, shape):
    mean = np.random.default_rng(3).uniform(0, 255, shape).astype(np.float32)
    path = tmp_path / "mean.binaryproto"
    proto = caffe_pb2.BlobProto(num=shape[0], channels=shape[1], height=shape[2], width=shape[3])
    proto.data.extend(mean.ravel().tolist())
    path.write_bytes(proto.SerializeToString())
    return path, mean


# -- pixels --------------------------------------------------------------------------------
FG_BOX, BG_BOX = (5, 4, 14, 11), (0, 0, 23, 19)
CASES = {
    # name: (fg box, params, transform extras, expect padding)
    "warp": ((3, 2, 15, 17), "", "mean_value: [10, 20, 30]", False),
    "warp_context_border": ((0, 1, 9, 12), "context_pad: 2", "mirror: true MEAN", True),
    "square_border": ((17, 3, 23, 18), "crop_mode: 'square'", "mirror: true", True),
    "square_context": (
        (12, 10, 22, 19),
        "crop_mode: 'square' context_pad: 1 scale: 0.5",
        "mean_value: 7 mirror: true",
        True,
    ),
    "warp_context_inside": ((6, 5, 16, 13), "context_pad: 1 scale: 0.25", "MEAN", False),
}


@pytest.mark.parametrize("case", CASES)
def test_items_are_caffes_windows(tmp_path, case):
    box, params, transform, padded = CASES[case]
    mean = None
    if "MEAN" in transform:  # wider than tall: Caffe's row offset comes from the width
        path, mean = write_mean(tmp_path, (1, 3, 13, 16))
        transform = transform.replace("MEAN", f"mean_file: '{path}'")
    path = write_windows(tmp_path, [(0, [(2, 0.9, *box)]), (1, [(5, 0.1, *BG_BOX)])])
    net = window_net(path, 4, f"fg_fraction: 0.5 {params}", f"crop_size: {CROP} {transform}")
    p = net.net_param.layer[0]
    mirror = p.transform_param.mirror
    batch = next(make_feed(net, seed=11, workers=0))
    assert batch["label"].tolist() == [0, 0, 2, 2]
    coins = mirror_coins(11, range(4), mirror)
    for i, coin in enumerate(coins):
        image, window = (IMAGES[1], BG_BOX) if i < 2 else (IMAGES[0], box)
        want, (pad_h, pad_w, h, w) = caffe_window(
            image,
            window,
            CROP,
            p.window_data_param.context_pad,
            p.window_data_param.crop_mode == "square",
            coin,
            p.window_data_param.scale,
            mean,
            list(p.transform_param.mean_value),
        )
        np.testing.assert_array_equal(batch["data"][i].numpy(), want, err_msg=f"item {i}")
        if i >= 2:  # the foreground window crosses the border where the case says so
            assert (pad_h > 0 or pad_w > 0 or h < CROP or w < CROP) == padded
    if mirror:  # the pixels above saw a plain and a mirrored foreground item
        assert coins[2] != coins[3]
        more = mirror_coins(11, range(4, 40), True)
        assert any(more) and not all(more)
    net(**batch)
    assert torch.isfinite(net.loss)


def test_warp_matches_opencv(tmp_path):
    path = write_windows(tmp_path, [(0, [(1, 0.9, 1, 2, 9, 16)]), (1, [(0, 0.0, *BG_BOX)])])
    net = window_net(path, 2, "fg_fraction: 0.5 context_pad: 2")
    item = next(make_feed(net, seed=0, workers=0))["data"][1].numpy()
    decoded = cv2.imread(str(tmp_path / "im0.png"), cv2.IMREAD_COLOR).transpose(2, 0, 1)
    want, _ = caffe_window(decoded, (1, 2, 9, 16), CROP, pad=2, resize=cv_resize)
    np.testing.assert_array_equal(item, want)


def test_geometry_matches_the_transcription_on_random_boxes():
    rng = np.random.default_rng(1)
    trims, clipped = [], 0
    for _ in range(3000):
        rows, cols = rng.integers(5, 60, 2)
        x1, y1 = rng.integers(-5, cols), rng.integers(-5, rows)
        box = (x1, y1, x1 + rng.integers(0, 40), y1 + rng.integers(0, 40))
        crop, pad = int(rng.integers(7, 40)), int(rng.integers(0, 4))
        square, mirror = bool(rng.integers(2)), bool(rng.integers(2))
        if not (pad or square):
            continue
        args = (box, int(rows), int(cols), crop, pad, square, mirror)
        want = caffe_geometry(*args, trims)
        assert window_geometry(*args) == want, args
        clipped += want[2] > 0 or want[3] > 0
    assert clipped > 100 and {"h", "w"} <= set(trims)


def test_c_rounding():
    assert [caffe_round(v) for v in (2.5, -2.5, 0.5, -0.5, 1.4999999)] == [3, -3, 1, -1, 1]
    assert caffe_round(f32(0.49999997)) == 0


# -- batches -------------------------------------------------------------------------------
def many_windows(tmp_path):
    return write_windows(
        tmp_path,
        [
            (0, [(1, 0.8, 0, 0, 9, 9), (3, 0.1, 2, 2, 12, 12), (9, 0.5, 1, 1, 5, 5)]),
            (1, [(2, 0.7, 4, 4, 20, 15), (0, 0.0, 0, 0, 23, 19), (3, 0.65, 3, 3, 8, 8)]),
            (2, [(7, 0.2, 5, 5, 9, 9)]),
        ],
    )


@pytest.mark.parametrize(
    "batch,fraction,num_fg", [(8, 0.25, 2), (7, 0.5, 3), (10, 0.3, 3), (5, 0.0, 0), (4, 1.0, 4)]
)
def test_background_first_then_foreground(tmp_path, batch, fraction, num_fg):
    path = many_windows(tmp_path)
    params = f"fg_fraction: {fraction} fg_threshold: 0.6 bg_threshold: 0.4"
    net = window_net(path, batch, params, f"crop_size: {CROP} mirror: true")
    feed = make_feed(net, seed=2, workers=0)
    seen = set()
    for _ in range(12):
        labels = next(feed)["label"].long().tolist()
        assert labels[: batch - num_fg] == [0] * (batch - num_fg)
        assert all(label in (1, 2, 3) for label in labels[batch - num_fg :])
        seen.update(labels)
    # class 9 (overlap 0.5) is in neither list; class 3 at overlap 0.1 is background
    assert seen == {0, 1, 2, 3} - ({0} if num_fg == batch else set()) - (
        {1, 2, 3} if not num_fg else set()
    )
    ranks = [make_feed(net, seed=2, workers=0, rank=r, world_size=2) for r in (0, 1)]
    for feed in ranks:  # each rank's batch is laid out as Caffe's solver on that GPU fills it
        labels = next(feed)["label"].long().tolist()
        assert labels.count(0) == batch - num_fg and labels[: batch - num_fg] == [0] * (
            batch - num_fg
        )


def test_repeatable_for_a_seed_with_any_worker_count(tmp_path):
    path = many_windows(tmp_path)
    net = window_net(path, 6, "fg_fraction: 0.5 context_pad: 1", f"crop_size: {CROP} mirror: true")
    one = make_feed(net, seed=5, workers=0)
    reference = [next(one) for _ in range(4)]
    two = make_feed(net, seed=5, workers=2)
    for want in reference:
        got = next(two)
        assert all(torch.equal(got[k], want[k]) for k in want)
    two.close()
    other = next(make_feed(net, seed=6, workers=0))
    assert not torch.equal(other["data"], reference[0]["data"])
    cached = window_net(
        path,
        6,
        "fg_fraction: 0.5 context_pad: 1 cache_images: true",
        f"crop_size: {CROP} mirror: true",
    )
    assert torch.equal(next(make_feed(cached, seed=5, workers=0))["data"], reference[0]["data"])


def test_setup_logs_and_transform_scale_is_not_read(tmp_path, log):
    path = many_windows(tmp_path)
    net = window_net(path, 2, "fg_fraction: 0.5", f"crop_size: {CROP} scale: 0.5")
    feed = make_feed(net, seed=0, workers=0)
    for line in ("class 0 has 3 samples", "class 1 has 1 samples", "class 3 has 1 samples"):
        assert line in log.text
    assert "Caffe does not read transform_param.scale" in log.text
    data = next(feed)["data"].numpy()
    assert data.max() > 128 and np.array_equal(data, np.round(data))  # raw pixels, unscaled


def test_window_data_crop_size_alone_is_refused():
    text = """layer { name: "win" type: "WindowData" top: "data" top: "label"
      window_data_param { source: "w.txt" batch_size: 2 crop_size: 8 } }"""
    with pytest.raises(CaffeAlexError, match="layer 'win'.*transform_param.crop_size > 0"):
        Net(parse_net(text), "TRAIN")


# -- errors --------------------------------------------------------------------------------
def one_line_error(net, match, **kwargs):
    with pytest.raises(CaffeAlexError, match=match) as info:
        next(make_feed(net, seed=0, workers=0, **kwargs))
    message = str(info.value)
    assert "\n" not in message and "layer 'win' (WindowData)" in message
    return message


GOOD = "# 0\nim0.png 3 20 24 2\n1 0.9 0 0 9 9\n0 0.1 1 1 5 5\n"


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "window file '.*windows.txt' is empty"),
        (GOOD + "# 1\nim0.png 3 20 24 1\n1 0.9 0 x 9 9\n", r"windows.txt:7: expected a window coo"),
        (GOOD + "1\nim0.png 3 20 24 0\n", r"windows.txt:5: expected '#' to start an image record"),
        (GOOD + "# 1\nim0.png 3 20 24 2\n1 0.9 0 0 9 9\n", r"windows.txt:7: the file ends where"),
        (GOOD + "# 1\nim0.png 3 20 24 1\n0 0.7 0 0 9 9\n", r"windows.txt:7: a foreground window"),
        (GOOD.replace("# 0", "# 4"), r"windows.txt:1: image index 4 is out of range"),
        (GOOD.replace("3 20", "1 20"), r"windows.txt:2: the last image record gives 1 channels"),
        (GOOD.replace("0 0.1", "2 0.7"), r"no background window \(overlap < bg_threshold 0.5\)"),
        (GOOD.replace("im0.png", "gone.png"), r"windows.txt:2: image '.*gone.png' does not exist"),
        (GOOD.replace("1 1 5 5", "20 1 30 5"), r"windows.txt:4: window \(20, 1, 30, 5\) cut to"),
    ],
)
def test_bad_window_files_name_file_and_line(tmp_path, text, match):
    save_png(tmp_path / "im0.png", IMAGES[0])
    path = tmp_path / "windows.txt"
    path.write_text(text)
    one_line_error(window_net(path, 2, "fg_fraction: 0.5"), match)


def test_missing_sources_and_bad_settings(tmp_path):
    one_line_error(window_net(tmp_path / "gone.txt"), r"source '.*gone.txt' does not exist")
    path = tmp_path / "windows.txt"
    path.write_text(GOOD.replace("im0.png", "gone.png"))
    one_line_error(window_net(path, params="cache_images: true"), r"windows.txt:2: image '.*gone")
    save_png(tmp_path / "im0.png", IMAGES[0])
    path.write_text(GOOD)
    one_line_error(window_net(path, params="fg_fraction: 1.5"), r"fg_fraction 1.5 is outside")
    one_line_error(window_net(path, params="context_pad: 5"), "context_pad 5 leaves no room")
    mean, _ = write_mean(tmp_path, (1, 3, 9, 9))
    net = window_net(path, transform=f"crop_size: {CROP} mean_file: '{mean}'")
    one_line_error(net, r"mean_file .* is too small for crop_size 10")
    net = window_net(path, transform=f"crop_size: {CROP} mean_value: [1, 2]")
    one_line_error(net, r"either 1 mean_value or as many as channels \(3\); got 2")


def test_blob_proto_mean_without_legacy_dims(tmp_path):
    """A mean saved with ``shape`` (1, 3, H, W) reads like the legacy fields."""
    mean = np.random.default_rng(4).uniform(0, 9, (1, 3, 12, 12)).astype(np.float32)
    (tmp_path / "m.binaryproto").write_bytes(array_to_blob_proto(mean).SerializeToString())
    path = write_windows(tmp_path, [(0, [(1, 0.9, *FG_BOX), (0, 0.0, *BG_BOX)])])
    net = window_net(
        path, 2, "fg_fraction: 0.5", f"crop_size: {CROP} mean_file: '{tmp_path / 'm.binaryproto'}'"
    )
    item = next(make_feed(net, seed=0, workers=0))["data"][1].numpy()
    np.testing.assert_array_equal(item, caffe_window(IMAGES[0], FG_BOX, CROP, mean=mean)[0])


def test_tokens_in_any_layout_and_caffes_image_index(tmp_path, log):
    one_a_line = (
        "# 0\nim0.png\n3\n20\n24\n2\n1 0.9 0 0 9 9\n0 0.1 1 1 5 5\n"
        "# 1\nim1.png 3 20 24 1\n2 0.8 2 2 8 8\n"
    )
    packed = (
        "# 0 im0.png 3 20 24 2 1 0.9 0 0 9 9\n0 0.1 1 1 5 5 # 1\nim1.png 3 20 24 1 2 0.8 2 2 8 8"
    )
    (tmp_path / "a.txt").write_text(one_a_line)
    (tmp_path / "b.txt").write_text(packed)
    a, b = (read_window_file(str(tmp_path / n), "r/", 0.5, 0.5) for n in ("a.txt", "b.txt"))
    assert a.images == [("r/im0.png", 3, 2), ("r/im1.png", 3, 10)]
    assert [i.path for i in b.images] == ["r/im0.png", "r/im1.png"]
    np.testing.assert_array_equal(a.fg[:, :6], b.fg[:, :6])
    np.testing.assert_array_equal(a.bg[:, :6], [[0, 0, 1, 1, 5, 5]])
    assert a.fg[:, 6].tolist() == [7, 11] and b.fg[:, 6].tolist() == [1, 3]
    assert a.histogram == b.histogram == {0: 1, 1: 1, 2: 1}
    # Caffe looks a window's image up by its record's '# index', not by the record's place
    (tmp_path / "c.txt").write_text(one_a_line.replace("# 0", "# 9").replace("# 1", "# 0"))
    with pytest.raises(CaffeAlexError, match="c.txt:1: image index 9 is out of range"):
        read_window_file(str(tmp_path / "c.txt"), "", 0.5, 0.5)
    (tmp_path / "c.txt").write_text(
        one_a_line.replace("# 0", "# 2").replace("# 1", "# 0").replace("# 2", "# 1")
    )
    swapped = read_window_file(str(tmp_path / "c.txt"), "", 0.5, 0.5)
    assert swapped.fg[:, 0].tolist() == [1, 0] and "do not count 0, 1, 2" in log.text
