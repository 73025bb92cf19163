"""convert-annoset (SSD's tools/convert_annoset with io.cpp's annotation readers): VOC XML, the
fork's JSON and txt annotations into AnnotatedDatum records, read back with the protobuf
messages and OpenCV; and its one-line errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.data.annoset import convert_annoset, read_label_map
from caffe_alex.data.db import open_db
from caffe_alex.errors import CaffeAlexError
from caffe_alex.proto import caffe_pb2
from tests.data.voc import IMAGES, normalized, write_voc, xml_text


def records(path):
    with open_db(path) as db:
        return [(k.decode(), caffe_pb2.AnnotatedDatum.FromString(v)) for k, v in db]


def rows_of(record):
    rows = [[g.group_label, a.instance_id, a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax,
             a.bbox.difficult] for g in record.annotation_group for a in g.annotation]  # fmt: skip
    return np.array(rows, np.float32).reshape(-1, 7)


def test_cli_converts_voc_xml_into_annotated_datums(tmp_path):
    voc = write_voc(tmp_path / "voc")
    out = str(tmp_path / "lmdb")
    result = CliRunner().invoke(main, [
        "convert-annoset", "--anno_type", "detection", "-label_map_file", voc["labelmap"],
        "--encoded", "--encode_type", "png", voc["root"], voc["list"], out,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    got = records(out)
    assert [k for k, _ in got] == [f"{i:08d}_JPEGImages/{i:06d}.png" for i in range(len(IMAGES))]
    for i, (_, record) in enumerate(got):
        assert record.type == caffe_pb2.AnnotatedDatum.BBOX
        d = record.datum
        assert d.encoded and d.label == -1
        with open(voc["root"] + f"JPEGImages/{i:06d}.png", "rb") as f:
            assert d.data == f.read()  # the file's own bytes: nothing resized, same encoding
        assert (d.channels, d.height, d.width) == (3, IMAGES[i][1], IMAGES[i][0])
        np.testing.assert_array_equal(rows_of(record), normalized(i))


def test_resized_raw_records_keep_the_normalized_boxes(tmp_path):
    voc = write_voc(tmp_path / "voc")
    out = str(tmp_path / "lmdb")
    convert_annoset(voc["root"], voc["list"], out, anno_type="detection",
                    label_map_file=voc["labelmap"], resize_height=20, resize_width=30)  # fmt: skip
    for i, (_, record) in enumerate(records(out)):
        d = record.datum
        assert not d.encoded and (d.channels, d.height, d.width) == (3, 20, 30)
        expected = cv2.resize(voc["pixels"][i], (30, 20), interpolation=cv2.INTER_LINEAR)
        pixels = np.frombuffer(d.data, np.uint8).reshape(3, 20, 30).transpose(1, 2, 0)
        np.testing.assert_array_equal(pixels, expected)
        np.testing.assert_array_equal(rows_of(record), normalized(i))


def test_min_dim_scales_the_short_side_up(tmp_path):
    voc = write_voc(tmp_path / "voc", images=IMAGES[:1])  # 60 x 40
    out = str(tmp_path / "lmdb")
    convert_annoset(voc["root"], voc["list"], out, anno_type="detection",
                    label_map_file=voc["labelmap"], min_dim=60, max_dim=80)  # fmt: skip
    d = records(out)[0][1].datum
    # 40 -> 60 would make the long side 90 > 80, so the long side is scaled to 80 instead
    assert (d.height, d.width) == (round(40 * 80 / 60), 80)


def test_json_and_txt_annotations(tmp_path):
    voc = write_voc(tmp_path / "voc", images=IMAGES[:1])
    root = voc["root"]
    (tmp_path / "voc" / "a.json").write_text(json.dumps({
        "image": {"width": 60, "height": 40},
        "annotation": [{"category_id": "bus", "bbox": [6, 4, 20.5, 10], "iscrowd": 1},
                       {"category_id": "car", "bbox": [0, 0, 30, 40]}],
    }))  # fmt: skip
    (tmp_path / "voc" / "a.txt").write_text("2 6 4 26.5 14\n1 0 0 30 40\n2 1 1 5 5\n")
    for kind, name in (("json", "a.json"), ("txt", "a.txt")):
        (tmp_path / "voc" / "l.txt").write_text(f"JPEGImages/000000.png {name}\n")
        out = str(tmp_path / f"db_{kind}")
        convert_annoset(root, str(tmp_path / "voc" / "l.txt"), out, anno_type="detection",
                        label_type=kind, label_map_file=voc["labelmap"])  # fmt: skip
        rows = rows_of(records(out)[0][1])
        assert rows[0].tolist() == pytest.approx([2, 0, 6 / 60, 4 / 40, 26.5 / 60, 14 / 40,
                                                  float(kind == "json")])  # fmt: skip
        assert rows[-1, :2].tolist() == [1, 0]
    assert rows[1, :2].tolist() == [2, 1]  # txt: the second bus joins the bus group


def test_classification_lists_store_the_label(tmp_path):
    voc = write_voc(tmp_path / "voc", images=IMAGES[:2])
    listing = tmp_path / "cls.txt"
    listing.write_text("JPEGImages/000000.png 7\nJPEGImages/000001.png 3\n")
    out = str(tmp_path / "lmdb")
    assert convert_annoset(voc["root"], str(listing), out) == 2
    got = records(out)
    assert [r.datum.label for _, r in got] == [7, 3]
    assert not got[0][1].HasField("type") and not got[0][1].annotation_group


def test_guessed_encoding_reencodes_as_the_fork_does(tmp_path):
    voc = write_voc(tmp_path / "voc", images=IMAGES[:1], ext="jpg")
    out = str(tmp_path / "lmdb")
    convert_annoset(voc["root"], voc["list"], out, anno_type="detection",
                    label_map_file=voc["labelmap"], encoded=True)  # fmt: skip
    d = records(out)[0][1].datum
    with open(voc["root"] + "JPEGImages/000000.jpg", "rb") as f:
        raw = f.read()
    # the fork's guess keeps the extension's dot, which never matches: re-encoded as JPEG
    assert d.encoded and d.data[:3] == b"\xff\xd8\xff" and d.data != raw
    expected = cv2.imdecode(np.frombuffer(encode_jpg(voc["pixels"][0]), np.uint8), 1)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(d.data, np.uint8), 1), expected)
    convert_annoset(voc["root"], voc["list"], out + "2", anno_type="detection",
                    label_map_file=voc["labelmap"], encode_type="jpg")  # fmt: skip
    assert records(out + "2")[0][1].datum.data == raw  # named: the file's own bytes


def encode_jpg(image):
    return cv2.imencode(".jpg", image)[1].tobytes()


def test_label_map(tmp_path):
    path = tmp_path / "m.prototxt"
    path.write_text('item { name: "a" label: 1 } item { name: "a" label: 2 }')
    assert [i.label for i in read_label_map(str(path)).item] == [1, 2]
    voc = write_voc(tmp_path / "voc", images=[(20, 20, [("a", 1, 1, 5, 5, 0)])])
    out = tmp_path / "db"
    convert_annoset(voc["root"], voc["list"], str(out), anno_type="detection",
                    label_map_file=str(path))  # fmt: skip
    assert records(str(out))[0][1].annotation_group[0].group_label == 2  # the later one wins
    with pytest.raises(CaffeAlexError, match=r"names 'a' more than once"):
        convert_annoset(voc["root"], voc["list"], str(tmp_path / "db2"), anno_type="detection",
                        label_map_file=str(path), check_label=True)  # fmt: skip


def _cli_error(args):
    result = CliRunner().invoke(main, ["convert-annoset", "--anno_type", "detection", *args])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("caffe-alex:")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output
    return errors[0]


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    voc = write_voc(tmp_path / "voc", images=IMAGES[:2])
    base = ["--label_map_file", voc["labelmap"], voc["root"], voc["list"]]
    # a missing annotation file
    (tmp_path / "voc" / "Annotations" / "000001.xml").unlink()
    line = _cli_error([*base, str(tmp_path / "a")])
    assert "Annotations/000001.xml" in line and "does not exist" in line
    # a name the label map lacks
    (tmp_path / "voc" / "Annotations" / "000001.xml").write_text(
        xml_text(48, 48, [("cat", 1, 1, 9, 9, 0)])
    )
    line = _cli_error([*base, str(tmp_path / "b")])
    assert "000001.xml" in line and "unknown name 'cat'" in line
    # a coordinate that is not an integer
    (tmp_path / "voc" / "Annotations" / "000001.xml").write_text(
        xml_text(48, 48, [("dog", 1.5, 1, 9, 9, 0)])
    )
    line = _cli_error([*base, str(tmp_path / "c")])
    assert "000001.xml" in line and "<xmin> '1.5' is not an integer" in line
    # no label map
    line = _cli_error([voc["root"], voc["list"], str(tmp_path / "d")])
    assert "needs --label_map_file" in line
    # nothing was left behind under the names
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_unreadable_images_are_skipped(tmp_path, caplog):
    voc = write_voc(tmp_path / "voc", images=IMAGES[:2])
    (tmp_path / "voc" / "JPEGImages" / "000000.png").write_bytes(b"not an image")
    out = str(tmp_path / "lmdb")
    n = convert_annoset(voc["root"], voc["list"], out, anno_type="detection",
                        label_map_file=voc["labelmap"])  # fmt: skip
    assert n == 1 and records(out)[0][0] == "00000001_JPEGImages/000001.png"
