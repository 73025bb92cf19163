"""``caffe-alex deploy`` on detectors and segmentation nets: what it prints (table, JSON, CSV),
the PNGs it writes, and its one-line errors. The expected values are worked out here from the
images (segmentation) or from the raw DetectionOutput blob (detection), not by the command's
own code."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from caffe_alex.cli import main
from caffe_alex.net import Net
from tests.reference import parse_net
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
