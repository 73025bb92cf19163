"""caffe_alex.features.extract_features and ``caffe-alex extract-features``: round trips to .npy,
.h5 and LMDB Datums (Caffe's keys and legacy shapes), features checked against NumPy."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from caffe_alex.cli import main
from caffe_alex.data.datum import array_to_datum, datum_to_array, parse_datum
from caffe_alex.data.db import open_db
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from caffe_alex.tools.features import (
    extract_features,
    legacy_chw,
    output_plan,
    write_features,
)
from tests.data.full_disk import entries, small_file_system
from tests.reference import parse_net

NET = """
name: "feat"
layer {{ name: "data" type: "Data" top: "data" top: "label"
        data_param {{ source: "{source}" backend: LMDB batch_size: 2 }}
        transform_param {{ scale: 0.5 }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: 2 kernel_size: 3 }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param {{ num_output: 4 }} }}
"""
RECORDS = 5


def conv_relu(x, w, b):
    """Valid 3x3 convolution + bias + ReLU of C x H x W with loops (the reference)."""
    out = np.zeros((w.shape[0], x.shape[1] - 2, x.shape[2] - 2))
    for o in range(w.shape[0]):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                out[o, i, j] = (x[:, i : i + 3, j : j + 3] * w[o]).sum() + b[o]
    return np.maximum(out, 0)


@pytest.fixture
def setup(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (RECORDS, 3, 6, 6), dtype=np.uint8)
    with open_db(str(tmp_path / "in_lmdb"), "lmdb", mode="new") as db:
        txn = db.transaction()
        for i, image in enumerate(images):
            txn.put(f"{i:08d}", array_to_datum(image, label=i).SerializeToString())
        txn.commit()
    text = NET.format(source=tmp_path / "in_lmdb")
    (tmp_path / "net.prototxt").write_text(text)
    net = Net(parse_net(text), "TEST")
    gen = torch.Generator().manual_seed(0)
    for blob in (b for blobs in net.params.values() for b in blobs):
        blob.data.copy_(torch.randn(blob.shape, generator=gen) * 0.1)
    net.save_weights(tmp_path / "w.caffemodel")
    params = {k: [b.detach().numpy().astype(np.float64) for b in v] for k, v in net.params.items()}
    conv = np.stack([conv_relu(im * 0.5, *params["conv"]) for im in images.astype(np.float64)])
    ip = conv.reshape(RECORDS, -1) @ params["ip"][0].T + params["ip"][1]
    return tmp_path, net, {"conv": conv, "ip": ip}


def test_one_pass_over_the_data_layer_matches_numpy(setup):
    _, net, want = setup
    got = extract_features(net, ["conv", "ip"])
    assert got["conv"].shape == (RECORDS, 2, 4, 4) and got["ip"].shape == (RECORDS, 4)
    np.testing.assert_allclose(got["conv"], want["conv"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["ip"], want["ip"], rtol=1e-4, atol=1e-5)
    wrapped = extract_features(net, "ip", num_batches=4)  # Caffe: whole batches, wrapping round
    assert wrapped["ip"].shape == (8, 4)
    np.testing.assert_allclose(wrapped["ip"][5:], want["ip"][:3], rtol=1e-4, atol=1e-5)


def test_lmdb_and_npy_round_trip(setup):
    folder, net, want = setup
    out = f"{folder / 'conv.lmdb'},{folder / 'ip.npy'}"
    extract_features(net, ["conv", "ip"], out)
    np.testing.assert_allclose(np.load(folder / "ip.npy"), want["ip"], rtol=1e-4, atol=1e-5)
    with open_db(str(folder / "conv.lmdb")) as db:
        records = list(db)
    assert [k for k, _ in records] == [f"{i:010d}".encode() for i in range(RECORDS)]
    datum = parse_datum(records[0][1])
    assert (datum.channels, datum.height, datum.width) == (2, 4, 4) and not datum.data
    back = np.stack([datum_to_array(v) for _, v in records])
    np.testing.assert_allclose(back, want["conv"], rtol=1e-4, atol=1e-5)
    with pytest.raises(CaffeAlexError, match="already exists"):
        extract_features(net, ["conv"], str(folder / "conv.lmdb"))


@pytest.mark.parametrize("name", ["f.lmdb", "f.npy", "f.npz", "f.h5"])
def test_outputs_onto_a_full_disk(tmp_path, name):
    features = {"ip": np.ones((3000, 200), np.float32)}  # 2.4 MB for a 2 MB file system
    with small_file_system(tmp_path / "full") as folder:
        (folder / "old.npy").write_bytes(b"kept")
        with pytest.raises(CaffeAlexError) as info:
            write_features(features, str(folder / name))
        assert str(info.value) == f"cannot write {folder / name}: No space left on device"
        assert entries(folder) == ["old.npy"]  # no partial output left behind
        assert (folder / "old.npy").read_bytes() == b"kept"


def test_output_plans_and_legacy_shapes(tmp_path):
    plan = output_plan(str(tmp_path / "f.npy"), ["fc7", "prob"])
    assert plan == {str(tmp_path / "f_fc7.npy"): ("npy", ["fc7"]),
                    str(tmp_path / "f_prob.npy"): ("npy", ["prob"])}  # fmt: skip
    assert output_plan("f.h5", ["a", "b"]) == {"f.h5": ("h5", ["a", "b"])}
    with pytest.raises(CaffeAlexError, match="output format"):
        output_plan("f.bin", ["a"])
    with pytest.raises(CaffeAlexError, match="3 output paths for 2 blobs"):
        output_plan("a.npy,b.npy,c.npy", ["a", "b"])
    assert legacy_chw((10, 4096)) == (4096, 1, 1) and legacy_chw((2, 3, 4, 5)) == (3, 4, 5)


def cli(*args):
    return CliRunner().invoke(main, ["extract-features", *args])


def test_cli_with_the_data_layer_and_another_database(setup):
    folder, _, want = setup
    base = ["--model", str(folder / "net.prototxt"), "--weights", str(folder / "w.caffemodel")]
    result = cli(*base, "--blobs", "ip,conv", "--out", str(folder / "f.h5"))
    assert result.exit_code == 0, result.output
    with h5py.File(folder / "f.h5") as f:
        np.testing.assert_allclose(f["ip"][:], want["ip"], rtol=1e-4, atol=1e-5)
        assert f["conv"].shape == (RECORDS, 2, 4, 4)
    shutil.copytree(folder / "in_lmdb", folder / "moved_lmdb")
    (folder / "in_lmdb" / "data.mdb").unlink()  # the copy is read, not the prototxt's source
    result = cli(*base, "--blobs", "ip", "--source", str(folder / "moved_lmdb"), "--num-batches",
                 "1", "-out", str(folder / "g.npy"))  # fmt: skip
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(folder / "g.npy"), want["ip"][:2], rtol=1e-4, atol=1e-5)
    result = cli(*base, "--blobs", "nope", "--source", str(folder / "moved_lmdb"), "--out",
                 str(folder / "h.npy"))  # fmt: skip
    assert result.exit_code == 1 and "unknown feature blob(s) ['nope']" in result.stderr


DEPLOY = """
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
"""


def test_cli_with_images_list_and_bad_file(tmp_path):
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    Net(parse_net(DEPLOY), "TEST").save_weights(tmp_path / "w.caffemodel")
    colours = [(200, 10, 30), (5, 100, 250), (60, 60, 60)]
    for i, rgb in enumerate(colours):
        Image.new("RGB", (7, 5), rgb).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "list.txt").write_text("".join(f"{tmp_path / n} 0\n" for n in
                                               ["0.png", "bad.png", "1.png", "2.png"]))  # fmt: skip
    model = [
        "--model",
        str(tmp_path / "deploy.prototxt"),
        "-weights",
        str(tmp_path / "w.caffemodel"),
    ]
    result = cli(*model, "--blobs", "pool", "--mean-values", "10", "--source",
                 str(tmp_path / "list.txt"), "--out", str(tmp_path / "p.npy"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bad.png" in result.stderr
    got = np.load(tmp_path / "p.npy")
    assert got.shape == (3, 3, 1, 1)
    want = np.array(colours, np.float32)[:, ::-1] - 10  # BGR, raw scale 255, mean 10
    np.testing.assert_allclose(got[:, :, 0, 0], want, rtol=1e-5)
