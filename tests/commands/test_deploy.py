"""``caffe-alex deploy`` on detectors and segmentation nets: what it prints (table, JSON, CSV),
the PNGs it writes, and its one-line errors. The expected values are worked out here from the
images (segmentation) or from the raw DetectionOutput blob (detection), not by the command's
own code."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from caffe_alex.cli import main
from caffe_alex.net import Net
from caffe_alex.tools.deploy import Classifier
from tests.corpus import CORPUS
from tests.reference import parse_net, randomize
from tests.tools.test_deploy import ref_preprocess
from tests.tools.test_segmentation import ref_label_map, ref_voc_colormap

# ---- segmentation: a net whose class is known -----------------------------------------------
# score k (k < 3) = channel k of the BGR input minus the mean; score 3 = 0. So a pixel is
# labelled with its strongest channel above the mean, or 3 where every channel is below it.
SEG_NET = """
name: "colours"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 8 dim: 10 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
        convolution_param { num_output: 4 kernel_size: 1 } }
"""
MEAN = np.array([104.0, 117.0, 123.0], np.float32)
SEG_LABELS = "blue\ngreen\nred\ndark\n"


def seg_scores(rgb: np.ndarray) -> np.ndarray:
    """The 4 x 8 x 10 scores the net gives for an 8-bit RGB image, from pycaffe's steps."""
    x = ref_preprocess((rgb / 255.0).astype(np.float32), (8, 10), (2, 0, 1), [2, 1, 0], 255.0,
                       MEAN[:, None, None], None)  # fmt: skip
    return np.concatenate([x, np.zeros((1, 8, 10), np.float32)])


def blocks(height, width, seed) -> np.ndarray:
    """An 8-bit RGB image of red, green, blue and dark blocks."""
    rng = np.random.default_rng(seed)
    colours = np.array([(240, 30, 20), (20, 230, 40), (10, 40, 250), (20, 20, 30)], np.uint8)
    cells = rng.integers(0, 4, (3, 4))
    rows = np.minimum(np.arange(height) * 3 // height, 2)
    cols = np.minimum(np.arange(width) * 4 // width, 3)
    return colours[cells[rows][:, cols]]


@pytest.fixture
def seg_files(tmp_path):
    net = Net(parse_net(SEG_NET), "TEST")
    weight, bias = net.params["score"]
    with torch.no_grad():
        weight.zero_()
        weight[:3, :, 0, 0] = torch.eye(3)
        bias.zero_()
    (tmp_path / "seg.prototxt").write_text(SEG_NET)
    net.save_weights(tmp_path / "seg.caffemodel")
    (tmp_path / "labels.txt").write_text(SEG_LABELS)
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(blocks(13, 17, 0)).save(images / "a.png")
    Image.fromarray(blocks(6, 21, 1)).save(images / "b.png")
    (images / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def run(*args):
    return CliRunner().invoke(main, ["deploy", *map(str, args)])


def run_seg(folder, *args):
    model, weights = folder / "seg.prototxt", folder / "seg.caffemodel"
    return run("--model", model, "--weights", weights, "--mean-values", "104,117,123",
               "--labels", folder / "labels.txt", *args)  # fmt: skip


def test_segment_writes_label_maps_and_overlays(seg_files):
    out = seg_files / "out" / "maps"  # made with its parents
    result = run_seg(seg_files, "--label-maps", out, "--format", "json", seg_files / "imgs")
    assert result.exit_code == 0, result.output
    assert "skipped '" in result.stderr and "c.png" in result.stderr
    assert "1 input(s) skipped, 2 segmented" in result.stderr
    doc = json.loads(result.stdout)
    assert [os.path.basename(d["image"]) for d in doc] == ["a.png", "b.png"]
    assert sorted(os.listdir(out)) == ["a_labels.png", "a_overlay.png", "b_labels.png",
                                       "b_overlay.png"]  # fmt: skip
    names = SEG_LABELS.split()
    for entry in doc:
        rgb = np.asarray(Image.open(entry["image"]))
        want = ref_label_map(seg_scores(rgb), *rgb.shape[:2])
        assert (entry["height"], entry["width"]) == rgb.shape[:2]
        saved = Image.open(entry["label_map"])
        assert saved.mode == "P"  # class numbers, with VOC's colours for viewers
        np.testing.assert_array_equal(np.asarray(saved), want)
        assert saved.getpalette()[:12] == ref_voc_colormap(4).reshape(-1).tolist()
        blend = np.asarray(Image.open(entry["overlay"])).astype(np.float64)
        expected = (rgb + ref_voc_colormap(4)[want].astype(np.float64)) / 2
        assert np.abs(blend - expected).max() <= 0.5
        counts = {c: int((want == c).sum()) for c in np.unique(want)}
        assert {c["label"]: c["pixels"] for c in entry["classes"]} == counts
        assert [c["name"] for c in entry["classes"]] == [names[c["label"]] for c in
                                                         entry["classes"]]  # fmt: skip
        shares = [c["share"] for c in entry["classes"]]
        assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0)
        assert len(counts) >= 2


def test_segment_table_and_csv(seg_files):
    image = seg_files / "imgs" / "a.png"
    rgb = np.asarray(Image.open(image))
    want = ref_label_map(seg_scores(rgb), *rgb.shape[:2])
    table = run_seg(seg_files, image)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0] == f"{image}  (17 x 13): {len(np.unique(want))} class(es)"
    for line in lines[1:]:
        label, name, share, pixels, _ = line.split()
        assert name == SEG_LABELS.split()[int(label)]
        assert int(pixels) == (want == int(label)).sum()
        assert float(share.rstrip("%")) == pytest.approx(100 * int(pixels) / want.size, abs=0.01)
    csv_out = run_seg(seg_files, "--format", "csv", image).stdout.splitlines()
    assert csv_out[0] == "image,label,name,pixels,share"
    assert len(csv_out) == len(lines)


def test_segment_errors(seg_files):
    blocker = seg_files / "file"
    blocker.write_text("a file where the folder's parent should be")
    result = run_seg(seg_files, "--label-maps", blocker / "maps", seg_files / "imgs" / "a.png")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("caffe-alex: error: cannot write to ")
    assert len(result.stderr.splitlines()) == 1
    assert sorted(os.listdir(seg_files)) == ["file", "imgs", "labels.txt", "seg.caffemodel",
                                             "seg.prototxt"]  # fmt: skip
    wrong = run_seg(seg_files, "--draw-boxes", seg_files / "x", seg_files / "imgs" / "a.png")
    assert wrong.exit_code == 1
    assert wrong.stderr == ("caffe-alex: error: --draw-boxes does not apply to this net's "
                            "output (segment; --task sets it)\n")  # fmt: skip
    assert not (seg_files / "x").exists()
    bad = run_seg(seg_files, "--label-maps", seg_files / "m", seg_files / "imgs" / "c.png")
    assert bad.exit_code == 1
    assert bad.stderr.splitlines()[-1] == "caffe-alex: error: no image could be segmented"
    assert os.listdir(seg_files / "m") == []
    forced = run_seg(seg_files, "--task", "classify", "--image-dims", "8,10", "--top", "1",
                     seg_files / "imgs" / "a.png")  # fmt: skip
    assert forced.exit_code == 0, forced.output  # the scores flattened, as a classifier's
    assert len(forced.stdout.splitlines()) == 2


# ---- detection: MobileNet-SSD (the corpus deploy net) with random weights ---------------------
MOBILENET_SSD = CORPUS / "chuanqi305__MobileNet-SSD" / "deploy.prototxt"
VOC = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
       "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
       "sheep", "sofa", "train", "tvmonitor"]  # fmt: skip
SSD_OPTIONS = ["--mean-values", "127.5", "--input-scale", "0.007843"]  # MobileNet-SSD's demo.py


@pytest.fixture(scope="module")
def ssd_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ssd")
    net = Net.from_prototxt(str(MOBILENET_SSD), "TEST")
    randomize(net, 0, 0.2)  # enough spread for the softmax to pass its 0.25 threshold
    net.save_weights(folder / "ssd.caffemodel")
    (folder / "voc.txt").write_text("\n".join(VOC) + "\n")
    images = folder / "imgs"
    images.mkdir()
    Image.fromarray(blocks(150, 200, 2)).save(images / "street.png")
    Image.fromarray(blocks(97, 131, 3)).save(images / "room.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 truncated")
    return folder


def run_ssd(folder, *args):
    return run("--model", MOBILENET_SSD, "--weights", folder / "ssd.caffemodel", *SSD_OPTIONS,
               "--labels", folder / "voc.txt", *args)  # fmt: skip


def raw_detections(folder, image_path) -> np.ndarray:
    """detection_out for one image, from a net built here on the input the deploy steps make
    (checked against pycaffe's preprocessing, transcribed: resize to 300 x 300, no crop)."""
    net = Net.from_prototxt(str(MOBILENET_SSD), "TEST")
    net.load_weights(str(folder / "ssd.caffemodel"))
    rgb = np.asarray(Image.open(image_path))
    clf = Classifier(net, image_dims=(300, 300), mean=np.full(3, 127.5, np.float32),
                     raw_scale=255.0, input_scale=0.007843, channel_swap=(2, 1, 0))  # fmt: skip
    x = clf.prepare([(rgb / 255.0).astype(np.float32)], oversample=False)
    want = ref_preprocess((rgb / 255.0).astype(np.float32), (300, 300), (2, 0, 1), [2, 1, 0],
                          255.0, np.full((3, 1, 1), 127.5, np.float32), 0.007843)  # fmt: skip
    np.testing.assert_allclose(x[0], want, atol=1e-5)
    with torch.inference_mode():
        return net(torch.from_numpy(x))["detection_out"].numpy()


def expected_boxes(rows, height, width, threshold):
    """(label, score, xmin, ymin, xmax, ymax) in pixels, best first: the blob's corners times
    the image's width and height."""
    boxes = [(int(r[1]), float(r[2]), float(r[3]) * width, float(r[4]) * height,
              float(r[5]) * width, float(r[6]) * height)
             for r in rows.reshape(-1, 7) if r[1] >= 0 and r[2] >= threshold]  # fmt: skip
    return sorted(boxes, key=lambda b: -b[1])


@pytest.mark.slow
@pytest.mark.skipif(not MOBILENET_SSD.is_file(), reason="../shared/corpus not present")
def test_detector_boxes_json_table_csv(ssd_files):
    street = ssd_files / "imgs" / "street.png"
    rows = raw_detections(ssd_files, street)
    scores = np.sort(rows[0, 0, :, 2])[::-1]
    assert rows.shape[-1] == 7 and len(scores) > 5
    # the five best boxes, or as many more as tie with the fifth (the flat-coloured image
    # gives boxes equal scores, and which ones tie depends on the CPU's kernels)
    best = next(k for k in range(5, len(scores)) if scores[k - 1] > scores[k])
    threshold = float(scores[best - 1] + scores[best]) / 2
    want = expected_boxes(rows, 150, 200, threshold)
    assert len(want) == best
    result = run_ssd(ssd_files, "--threshold", threshold, "--format", "json", street)
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.stdout)
    assert (entry["image"], entry["height"], entry["width"]) == (str(street), 150, 200)
    got = [(b["label"], b["score"], b["xmin"], b["ymin"], b["xmax"], b["ymax"])
           for b in entry["boxes"]]  # fmt: skip
    assert got == want  # the same blob: equal to the last bit, through the JSON text
    assert [b["name"] for b in entry["boxes"]] == [VOC[b[0]] for b in want]
    table = run_ssd(ssd_files, "--threshold", threshold, street).stdout.splitlines()
    assert table[0] == f"{street}  (200 x 150): {best} box(es)"
    assert table[1].split() == ["label", "name", "score", "xmin", "ymin", "xmax", "ymax"]
    for line, box in zip(table[2:], want):
        label, name, score, *corners = line.split()
        assert (int(label), name) == (box[0], VOC[box[0]])
        assert float(score) == pytest.approx(box[1], abs=5e-5)
        assert [float(c) for c in corners] == pytest.approx(box[2:], abs=0.05 + 1e-6)
    csv_lines = run_ssd(ssd_files, "--threshold", threshold, "--format", "csv",
                        street).stdout.splitlines()  # fmt: skip
    assert csv_lines[0] == "image,label,name,score,xmin,ymin,xmax,ymax"
    assert [line.split(",")[1] for line in csv_lines[1:]] == [str(b[0]) for b in want]


@pytest.mark.slow
@pytest.mark.skipif(not MOBILENET_SSD.is_file(), reason="../shared/corpus not present")
def test_detector_batches_split_by_image_id_and_channels_last(ssd_files):
    folder = ssd_files / "imgs"
    one = run_ssd(ssd_files, "--threshold", 0, "--format", "json", folder)
    # two images per forward: the same boxes (to float rounding: oneDNN's convolution order
    # depends on the batch)
    two = run_ssd(ssd_files, "--threshold", 0, "--format", "json", "--batch-size", 2, folder)
    # the net in NHWC memory order rounds differently
    nhwc = run_ssd(ssd_files, "--threshold", 0, "--format", "json", "--channels-last", folder)
    assert one.exit_code == two.exit_code == nhwc.exit_code == 0, one.output + two.output
    assert "skipped '" in one.stderr and "broken.png" in one.stderr
    assert "1 input(s) skipped, 2 searched" in one.stderr
    first, second, third = (json.loads(r.stdout) for r in (one, two, nhwc))
    assert [os.path.basename(e["image"]) for e in first] == ["room.png", "street.png"]
    for a, b, c in zip(first, second, third):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        assert _twins(a["boxes"], b["boxes"]) == len(a["boxes"])
        # NHWC: the flat-coloured test images give many priors exactly equal scores, and
        # NHWC's rounding reorders those ties, so NMS keeps other boxes of the same score: the
        # count and the best score are compared (NHWC's numbers: tests/test_devices.py)
        assert len(c["boxes"]) == len(a["boxes"])
        best = max(box["score"] for box in a["boxes"])
        assert abs(max(box["score"] for box in c["boxes"]) - best) < 1e-5
    rows = raw_detections(ssd_files, folder / "room.png")
    assert len(first[0]["boxes"]) == int((rows[0, 0, :, 1] >= 0).sum())  # all but placeholders


def _twins(boxes, others) -> int:
    """How many of ``boxes`` have a box of ``others`` equal to 1e-3 (each used once)."""
    left, matched = [_key(box) for box in others], 0
    for box in boxes:
        twin = min(left, key=lambda other: np.abs(np.subtract(other, _key(box))).max())
        if np.abs(np.subtract(twin, _key(box))).max() < 1e-3:
            matched += 1
            left.remove(twin)
    return matched


def _key(box) -> tuple[float, ...]:
    return (box["label"], box["score"], box["xmin"], box["ymin"], box["xmax"], box["ymax"])


@pytest.mark.skipif(not MOBILENET_SSD.is_file(), reason="../shared/corpus not present")
def test_detector_draws_boxes_only_near_them(ssd_files, tmp_path):
    street = ssd_files / "imgs" / "street.png"
    out = tmp_path / "drawn"
    result = run_ssd(ssd_files, "--threshold", 0.5, "--format", "json", "--draw-boxes", out,
                     street)  # fmt: skip
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.stdout)
    assert entry["drawn"] == str(out / "street_boxes.png") and os.listdir(out) == [
        "street_boxes.png"]  # fmt: skip
    original = np.asarray(Image.open(street))
    drawn = np.asarray(Image.open(out / "street_boxes.png"))
    assert drawn.shape == original.shape and drawn.dtype == np.uint8
    changed = np.any(drawn != original, axis=2)
    near = np.zeros_like(changed)
    for box in entry["boxes"]:
        x0, y0 = int(round(max(box["xmin"], 0))), int(round(max(box["ymin"], 0)))
        x1, y1 = int(round(box["xmax"])), int(round(box["ymax"]))
        label = f"{box['name']} {box['score']:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        near[max(0, y0 - th - base - 1) : max(y1, y0 + th + base) + 2,
             max(0, x0 - 1) : max(x1, x0 + tw) + 2] = True  # fmt: skip
    assert entry["boxes"] and changed.any()
    assert not (changed & ~near).any()


@pytest.mark.slow
@pytest.mark.skipif(not MOBILENET_SSD.is_file(), reason="../shared/corpus not present")
def test_detector_errors_are_one_line_and_write_nothing(ssd_files, tmp_path):
    (tmp_path / "blocker").write_text("")
    result = run_ssd(ssd_files, "--draw-boxes", tmp_path / "blocker" / "out",
                     ssd_files / "imgs")  # fmt: skip
    assert result.exit_code == 1 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("caffe-alex:")]
    assert errors == [
        f"caffe-alex: error: cannot write to {tmp_path / 'blocker' / 'out'}: Not a directory"
    ]
    assert os.listdir(tmp_path) == ["blocker"]
    broken = run_ssd(ssd_files, "--draw-boxes", tmp_path / "d", ssd_files / "imgs" / "broken.png")
    assert broken.exit_code == 1
    assert broken.stderr.splitlines()[-1] == "caffe-alex: error: no image could be searched"
    assert os.listdir(tmp_path / "d") == []
    wrong = run_ssd(ssd_files, "--label-maps", tmp_path / "m", ssd_files / "imgs" / "room.png")
    assert wrong.stderr.splitlines()[-1] == (
        "caffe-alex: error: --label-maps does not apply to this net's output (detect; --task "
        "sets it)"
    )
    forced = run_ssd(ssd_files, "--task", "segment", ssd_files / "imgs" / "room.png")
    assert forced.exit_code == 1
    assert forced.stderr.splitlines()[-1] == ("caffe-alex: error: --task segment: output "
                                              "'detection_out' holds a DetectionOutput layer's "
                                              "boxes (--task detect)")  # fmt: skip
