"""Data source layers: top shapes as Caffe's DataLayerSetUp declares them.

Small databases, image lists and HDF5 files are made in tmp_path; tests that need lmdb, Pillow
or h5py skip when the package is missing.
"""

from __future__ import annotations

import io
import sys

import pytest

from caffe_alex.data.db import open_db
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.reference import parse_net


def source_net(type_line: str, params: str, tops=("data", "label"), extra: str = "") -> str:
    """A one-layer net; ``type_line`` is the layer's literal `type: "..."` line."""
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return f"""name: "src"
layer {{ name: "src" {type_line} {top_lines} {params} {extra} }}
"""


def build(text: str, **kwargs) -> Net:
    return Net(parse_net(text), "TRAIN", **kwargs)


def shapes(net: Net) -> dict:
    return {n: net.blob_shapes[n] for n in net.input_names}


def test_memory_data_is_fully_declared():
    net = build(
        source_net(
            'type: "MemoryData"',
            "memory_data_param { batch_size: 5 channels: 3 height: 7 width: 9 }",
        )
    )
    assert shapes(net) == {"data": (5, 3, 7, 9), "label": (5,)}
    with pytest.raises(CaffeAlexError, match="layer 'src'.*must be positive"):
        build(source_net('type: "MemoryData"', "memory_data_param { batch_size: 5 channels: 3 }"))


def test_window_data_uses_the_crop():
    params = "window_data_param { source: 'missing.txt' batch_size: 4 fg_threshold: 0.6 }"
    net = build(
        source_net('type: "WindowData"', params, extra="transform_param { crop_size: 227 }")
    )
    assert shapes(net) == {"data": (4, 3, 227, 227), "label": (4,)}
    with pytest.raises(CaffeAlexError, match="crop_size > 0"):
        build(source_net('type: "WindowData"', params))


@pytest.mark.parametrize(
    "params,extra,want",
    [
        ("new_height: 32 new_width: 48", "", (2, 3, 32, 48)),
        ("new_height: 32 new_width: 48 is_color: false", "", (2, 1, 32, 48)),
        ("new_height: 32 new_width: 48", "transform_param { crop_size: 28 }", (2, 3, 28, 28)),
        ("crop_size: 20", "", (2, 3, 20, 20)),  # legacy field, before the upgrade moves it
    ],
)
def test_image_data_declared_sizes(params, extra, want):
    text = source_net(
        'type: "ImageData"',
        f"image_data_param {{ source: 'nope.txt' batch_size: 2 {params} }}",
        extra=extra,
    )
    assert shapes(build(text)) == {"data": want, "label": (2,)}


def test_image_data_reads_the_first_listed_image(tmp_path):
    image_mod = pytest.importorskip("PIL.Image")
    folder = tmp_path / "my images"
    folder.mkdir()
    image_mod.new("RGB", (13, 11)).save(folder / "first one.png")
    image_mod.new("RGB", (5, 5)).save(folder / "b.png")
    listing = tmp_path / "list.txt"
    listing.write_text("first one.png 3\nb.png 1\n")  # the path has a space: split at the last
    params = f"image_data_param {{ source: '{listing}' root_folder: '{folder}/' batch_size: 4 }}"
    assert shapes(build(source_net('type: "ImageData"', params)))["data"] == (4, 3, 11, 13)
    gray = params.replace("batch_size", "is_color: false batch_size")
    assert shapes(build(source_net('type: "ImageData"', gray)))["data"] == (4, 1, 11, 13)


def test_image_data_missing_list_gives_the_clear_error():
    text = source_net(
        'type: "ImageData"', "image_data_param { source: 'no/list.txt' batch_size: 2 }"
    )
    with pytest.raises(
        CaffeAlexError,
        match=r"layer 'src' \(ImageData\).*image_data_param.source 'no/list.txt' "
        r"does not exist.*input_shapes=\{'data': \(N, C, H, W\), 'label': \(N,\)\}",
    ):
        build(text)
    net = build(text, input_shapes={"data": (2, 3, 8, 8), "label": (2,)})
    assert shapes(net) == {"data": (2, 3, 8, 8), "label": (2,)}


def datum_bytes(channels=3, height=6, width=10, encoded_png=None) -> bytes:
    datum = caffe_pb2.Datum(channels=channels, height=height, width=width, label=1)
    if encoded_png is not None:
        datum.encoded, datum.data = True, encoded_png
    else:
        datum.data = bytes(channels * height * width)
    return datum.SerializeToString()


def make_lmdb(path, values):
    with open_db(str(path), "lmdb", mode="new") as db:
        txn = db.transaction()
        for i, value in enumerate(values):
            txn.put(f"{i:08d}", value)
        txn.commit()
    return str(path)


def data_layer(source, extra="", tops=("data", "label"), backend="LMDB"):
    params = f"data_param {{ source: '{source}' backend: {backend} batch_size: 8 }}"
    return source_net('type: "Data"', params, tops=tops, extra=extra)


@pytest.mark.parametrize(
    "extra,tops,want",
    [
        ("", ("data", "label"), {"data": (8, 3, 6, 10), "label": (8,)}),
        ("", ("data",), {"data": (8, 3, 6, 10)}),
        (
            "transform_param { crop_size: 5 mirror: true mean_value: 104 }",
            ("data", "label"),
            {"data": (8, 3, 5, 5), "label": (8,)},
        ),
    ],
)
def test_data_infers_chw_from_the_first_datum(tmp_path, extra, tops, want):
    source = make_lmdb(tmp_path / "db", [datum_bytes(), datum_bytes(1, 2, 2)])
    assert shapes(build(data_layer(source, extra, tops))) == want


def test_data_crop_larger_than_the_images_is_an_error(tmp_path):
    source = make_lmdb(tmp_path / "db", [datum_bytes()])
    with pytest.raises(CaffeAlexError, match="crop_size 7 is larger than the 6x10 images"):
        build(data_layer(source, "transform_param { crop_size: 7 }"))


@pytest.mark.parametrize(
    "mode,force,channels",
    [
        ("L", "", 1),
        ("RGB", "", 3),
        ("RGBA", "", 4),
        ("L", "force_color: true", 3),
        ("RGB", "force_gray: true", 1),
    ],
)
def test_data_decodes_encoded_datums(tmp_path, mode, force, channels):
    image_mod = pytest.importorskip("PIL.Image")
    png = io.BytesIO()
    image_mod.new(mode, (7, 4)).save(png, format="PNG")
    source = make_lmdb(tmp_path / "db", [datum_bytes(encoded_png=png.getvalue())])
    net = build(data_layer(source, f"transform_param {{ {force} }}"))
    assert net.blob_shapes["data"] == (8, channels, 4, 7)


def test_data_missing_source_names_layer_and_path():
    with pytest.raises(
        CaffeAlexError,
        match=r"layer 'src' \(Data\): cannot infer the shape of top 'data' because "
        r"data_param.source 'missing_lmdb' does not exist \(build it with caffe-alex "
        r"convert-imageset or convert-mnist: docs/data.md; the ImageNet LMDBs of "
        r"models/bvlc_alexnet: docs/imagenet.md\); where only shapes are needed, "
        r"declare it with "
        r"input_shapes=\{'data': \(N, C, H, W\), 'label': \(N,\)\} in Net\(...\) or "
        r"--input-shape data=N,C,H,W \(time, draw, summary, export\)",
    ):
        build(data_layer("missing_lmdb"))
    net = build(data_layer("missing_lmdb"), input_shapes={"data": (8, 3, 4, 4), "label": (8,)})
    assert shapes(net) == {"data": (8, 3, 4, 4), "label": (8,)}


def test_data_leveldb_without_binding_says_so(tmp_path, monkeypatch):
    # the test extras install plyvel: hide it, as on a machine without the leveldb extra
    monkeypatch.setitem(sys.modules, "plyvel", None)  # `import plyvel` now raises ImportError
    (tmp_path / "ldb").mkdir()
    with pytest.raises(CaffeAlexError, match="LEVELDB source needs the plyvel package"):
        build(data_layer(tmp_path / "ldb", backend="LEVELDB"))


def test_data_rejects_an_empty_batch():
    with pytest.raises(CaffeAlexError, match="batch_size must be positive"):
        build(source_net('type: "Data"', "data_param { source: 'x' }"))


def test_hdf5_data_shapes_from_the_first_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    np = pytest.importorskip("numpy")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"] = np.zeros((10, 3, 4, 5), np.float32)
        f["label"] = np.zeros((10,), np.float32)
        f["extra"] = np.zeros((10, 2), np.float32)
    listing = tmp_path / "files.txt"
    listing.write_text(f"{tmp_path / 'a.h5'}\n{tmp_path / 'b.h5'}\n")
    params = f"hdf5_data_param {{ source: '{listing}' batch_size: 6 shuffle: true }}"
    net = build(source_net('type: "HDF5Data"', params, tops=("data", "label", "extra")))
    assert shapes(net) == {"data": (6, 3, 4, 5), "label": (6,), "extra": (6, 2)}
    with pytest.raises(CaffeAlexError, match="has no dataset 'nothing'"):
        build(source_net('type: "HDF5Data"', params, tops=("data", "nothing")))


def test_hdf5_data_errors():
    params = "hdf5_data_param { source: 'no_list.txt' batch_size: 2 }"
    with pytest.raises(
        CaffeAlexError,
        match=r"source 'no_list.txt' does not exist.*"
        r"input_shapes=\{'data': \(N, ...\)\}",
    ):
        build(source_net('type: "HDF5Data"', params, tops=("data",)))
    with pytest.raises(CaffeAlexError, match="does not transform data"):
        build(source_net('type: "HDF5Data"', params, extra="transform_param { scale: 2 }"))


def test_data_unreadable_lmdb_is_a_clear_error(tmp_path):
    pytest.importorskip("lmdb")
    (tmp_path / "not_a_db").mkdir()
    with pytest.raises(CaffeAlexError, match="layer 'src'.*cannot read LMDB source"):
        build(data_layer(tmp_path / "not_a_db"))
    empty = make_lmdb(tmp_path / "empty", [])
    with pytest.raises(CaffeAlexError, match="holds no record"):
        build(data_layer(empty))
