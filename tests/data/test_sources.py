"""Data layers at run time: sources read through make_feed into a net, in TRAIN and TEST."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from caffe_alex.data.datum import array_to_datum, encode_image, encoded_datum
from caffe_alex.data.db import open_db
from caffe_alex.data.loader import make_feed
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.data.test_transformer import caffe_transform
from tests.reference import parse_net

IMAGES = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 9)).astype(np.uint8)
TRANSFORM = "transform_param { crop_size: 5 mirror: true scale: 0.5 mean_value: [10, 20, 30] }"


def write_db(path, backend, values):
    with open_db(str(path), backend, mode="new") as db:
        txn = db.transaction()
        for i, value in enumerate(values):
            txn.put(f"{i:08d}", value)
        txn.commit()
    return str(path)


def datum_db(tmp_path, backend="lmdb", images=IMAGES):
    values = [array_to_datum(a, i).SerializeToString() for i, a in enumerate(images)]
    return write_db(tmp_path / backend, backend, values)


def data_net(source, phase, backend="LMDB", batch=4, transform=TRANSFORM, extra=""):
    text = f"""
    layer {{ name: "d" type: "Data" top: "data" top: "label" {transform}
             data_param {{ source: "{source}" backend: {backend} batch_size: {batch} {extra} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
             inner_product_param {{ num_output: 10 }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
    """
    return Net(parse_net(text), phase)


def expected(net, seed, positions, images=IMAGES):
    """The batch by the NumPy transcription of Caffe's transformer, with the loader's draws."""
    param = net.net_param.layer[0].transform_param
    out = [
        caffe_transform(
            images[p % len(images)], param, net.phase, np.random.default_rng((seed, 0, p))
        )
        for p in positions
    ]
    return np.stack(out)


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_data_layer_through_the_feed(tmp_path, backend, phase):
    if backend == "leveldb":
        pytest.importorskip("plyvel")
    net = data_net(datum_db(tmp_path, backend), phase, backend.upper())
    feed = make_feed(net, seed=7, workers=0)
    for b in range(4):  # 10 records, batches of 4: the third batch wraps round
        batch = next(feed)
        positions = range(4 * b, 4 * b + 4)
        assert batch["label"].tolist() == [p % 10 for p in positions]
        np.testing.assert_array_equal(batch["data"].numpy(), expected(net, 7, positions))
        net(**batch)
        assert torch.isfinite(net.loss)


def test_workers_ranks_and_resume_give_the_same_records(tmp_path):
    net = data_net(datum_db(tmp_path), "TRAIN")
    one = make_feed(net, seed=3, workers=0)
    reference = [next(one) for _ in range(6)]
    two = make_feed(net, seed=3, workers=2)
    for want in reference:
        got = next(two)
        assert all(torch.equal(got[k], want[k]) for k in want)
    two.close()
    resumed = make_feed(net, seed=3, workers=0)
    resumed.load_state({**one.state(), "position": 4})
    assert torch.equal(next(resumed)["data"], reference[4]["data"])
    ranks = [make_feed(net, seed=3, workers=0, rank=r, world_size=2) for r in (0, 1)]
    labels = [next(f)["label"].tolist() for f in ranks]
    assert labels == [[0, 2, 4, 6], [1, 3, 5, 7]]  # Caffe's Skip: offset % world == rank
    np.testing.assert_array_equal(next(ranks[1])["data"].numpy(), expected(net, 3, [9, 11, 13, 15]))


def test_rand_skip_and_shuffle(tmp_path):
    net = data_net(datum_db(tmp_path), "TEST", transform="", batch=5, extra="rand_skip: 10")
    labels = next(make_feed(net, seed=1, workers=0))["label"].tolist()
    skip = labels[0]
    assert labels == [(skip + i) % 10 for i in range(5)]
    (tmp_path / "s").mkdir()
    net = data_net(datum_db(tmp_path / "s"), "TEST", transform="", batch=10)
    feed = make_feed(net, seed=1, workers=0, shuffle_db=True)
    epochs = [next(feed)["label"].tolist() for _ in range(2)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and epochs[0] != epochs[1]


def test_encoded_datums_are_decoded(tmp_path):
    values = [
        encoded_datum(encode_image(a, "png"), i).SerializeToString() for i, a in enumerate(IMAGES)
    ]
    net = data_net(write_db(tmp_path / "enc", "lmdb", values), "TEST")
    np.testing.assert_array_equal(
        next(make_feed(net, seed=2, workers=0))["data"].numpy(), expected(net, 2, range(4))
    )


def save_png(path, array):
    from PIL import Image

    Image.fromarray(array[::-1].transpose(1, 2, 0)).save(path)  # BGR planes -> RGB file


def image_net(listing, phase="TRAIN", params="", batch=3, transform=""):
    text = f"""layer {{ name: "img" type: "ImageData" top: "data" top: "label" {transform}
      image_data_param {{ source: "{listing}" batch_size: {batch} {params} }} }}"""
    return Net(parse_net(text), phase)


@pytest.fixture
def image_list(tmp_path):
    folder = tmp_path / "my pics"
    folder.mkdir()
    lines = []
    for i, array in enumerate(IMAGES[:6]):
        save_png(folder / f"image {i}.png", array)
        lines.append(f"image {i}.png {i}")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing, f"{folder}/"


def test_image_data_reads_resizes_and_shuffles(image_list):
    listing, root = image_list
    net = image_net(listing, "TEST", f"root_folder: '{root}'")
    batch = next(make_feed(net, seed=0, workers=0))
    assert batch["label"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(batch["data"].numpy(), IMAGES[:3].astype(np.float32))
    resized = image_net(listing, "TEST", f"root_folder: '{root}' new_height: 5 new_width: 4")
    batch = next(make_feed(resized, seed=0, workers=0))
    # Caffe's ReadImageToCVMat: cv::imread, then cv::resize (bilinear) to new_width x new_height
    read = [cv2.imread(f"{root}image {i}.png", cv2.IMREAD_COLOR) for i in range(3)]
    want = np.stack([cv2.resize(a, (4, 5)).transpose(2, 0, 1) for a in read]).astype(np.float32)
    np.testing.assert_array_equal(batch["data"].numpy(), want)
    shuffled = image_net(listing, "TRAIN", f"root_folder: '{root}' shuffle: true", batch=6)
    feed = make_feed(shuffled, seed=4, workers=2)
    epochs = [next(feed) for _ in range(3)]
    orders = [e["label"].long().tolist() for e in epochs]
    assert all(sorted(o) == list(range(6)) for o in orders) and len({tuple(o) for o in orders}) > 1
    for epoch, order in zip(epochs, orders):
        np.testing.assert_array_equal(epoch["data"].numpy(), IMAGES[order].astype(np.float32))


def write_h5(path, data, label):
    import h5py

    with h5py.File(path, "w") as h5:
        h5["data"], h5["label"] = data, label
    return str(path)


def test_hdf5_data_with_several_files(tmp_path):
    rows = np.arange(7 * 2 * 3, dtype=np.float64).reshape(7, 2, 3)
    files = [
        write_h5(tmp_path / "a.h5", rows[:3], np.arange(3.0)),
        write_h5(tmp_path / "b.h5", rows[3:], np.arange(3.0, 7.0)),
    ]
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    for shuffle in ("", "shuffle: true"):
        text = f"""layer {{ name: "h" type: "HDF5Data" top: "data" top: "label"
          hdf5_data_param {{ source: "{tmp_path / "list.txt"}" batch_size: 7 {shuffle} }} }}"""
        net = Net(parse_net(text), "TRAIN")
        feed = make_feed(net, seed=0, workers=0)
        for _ in range(2):
            batch = next(feed)
            order = batch["label"].long().tolist()
            assert sorted(order) == list(range(7))
            assert (order == list(range(7))) == (not shuffle)
            np.testing.assert_array_equal(batch["data"].numpy(), rows[order].astype(np.float32))


def test_take_gives_the_next_batches_stacked_as_next_gives_them(tmp_path):
    """DataFeed.take(n) (the captured step's chunk) hands out what n calls of next would,
    stacked: across the ends of what was read ahead, from any position, and next carries on
    after it; where it cannot (more than is read ahead, the buffer's path) it takes nothing."""
    rng = np.random.default_rng(0)
    path = write_h5(tmp_path / "a.h5", rng.normal(size=(50, 2, 3)), np.arange(50.0))
    (tmp_path / "list.txt").write_text(path + "\n")
    text = f"""layer {{ name: "h" type: "HDF5Data" top: "data" top: "label"
      hdf5_data_param {{ source: "{tmp_path / "list.txt"}" batch_size: 4 }} }}"""
    net = Net(parse_net(text), "TRAIN")
    taking, reference = make_feed(net, seed=0, workers=0), make_feed(net, seed=0, workers=0)
    taking._ahead_count = reference._ahead_count = 7  # (64 batches of these fit in 1 MiB)
    for count in (3, 5, 1, 7, 2, 6, 4, 7, 7):  # 42 batches: the 50 rows wrap round
        if count == 1:
            batch = next(taking)
            assert torch.equal(batch["label"], next(reference)["label"])
            continue
        taken = taking.take(count)
        assert taken["data"].shape == (count, 4, 2, 3) and taken["label"].shape == (count, 4)
        for k in range(count):
            batch = next(reference)
            for top in ("data", "label"):
                assert torch.equal(taken[top][k], batch[top])
        assert taking.position == reference.position
    assert taking.take(8) is None and taking.position == reference.position
    assert torch.equal(next(taking)["data"], next(reference)["data"])
    buffered = make_feed(net, seed=0, workers=1)  # (through the workers' buffer)
    assert buffered.take(2) is None and buffered.position == 0
    buffered.close()


def test_memory_data_set_input_arrays():
    text = """layer { name: "m" type: "MemoryData" top: "data" top: "label"
      memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }"""
    net = Net(parse_net(text), "TEST")
    data = np.arange(4 * 6, dtype=np.float32).reshape(4, 1, 2, 3)
    net.set_input_arrays(data, np.arange(4))
    feed = make_feed(net, seed=0)
    got = [next(feed) for _ in range(3)]
    assert [g["label"].tolist() for g in got] == [[0, 1], [2, 3], [0, 1]]
    np.testing.assert_array_equal(got[1]["data"].numpy(), data[2:])
    net.set_input_arrays(data[::-1].copy(), np.arange(4)[::-1].copy())
    assert next(feed)["label"].tolist() == [3, 2]  # new arrays start from their first row
    with pytest.raises(ValueError, match="multiple of batch_size 2"):
        net.set_input_arrays(data[:3], np.arange(3))
    with pytest.raises(ValueError, match=r"expects \(N, \*\(1, 2, 3\)\)"):
        net.set_input_arrays(data.reshape(4, 1, 3, 2), np.arange(4))


# -- bad input ---------------------------------------------------------------------------
def test_missing_source_names_layer_and_path(tmp_path):
    text = f"""layer {{ name: "d" type: "Data" top: "data" top: "label"
      data_param {{ source: "{tmp_path}/gone" backend: LMDB batch_size: 2 }} }}"""
    net = Net(parse_net(text), "TRAIN", input_shapes={"data": (2, 3, 4, 4), "label": (2,)})
    with pytest.raises(CaffeAlexError, match=rf"layer 'd' \(Data\): source '{tmp_path}/gone'"):
        make_feed(net)


def test_list_line_without_label_names_file_and_line(tmp_path, image_list):
    listing, root = image_list
    listing.write_text(listing.read_text() + "image 5.png\n")
    net = image_net(listing, "TEST", f"root_folder: '{root}' new_height: 4 new_width: 4")
    with pytest.raises(CaffeAlexError, match=rf"layer 'img'.*{listing}:7: expected '<image path>"):
        make_feed(net)


def test_undecodable_image_names_the_file(image_list):
    listing, root = image_list
    (listing.parent / "my pics" / "image 1.png").write_bytes(b"not a png")
    net = image_net(listing, "TEST", f"root_folder: '{root}'")
    with pytest.raises(CaffeAlexError, match=r"layer 'img'.*cannot decode image '.*image 1\.png'"):
        next(make_feed(net, workers=0))


def test_record_of_another_shape_names_both_shapes(tmp_path):
    images = list(IMAGES[:3]) + [np.zeros((3, 6, 9), np.uint8)]
    net = data_net(datum_db(tmp_path, images=images), "TEST", transform="")
    with pytest.raises(
        CaffeAlexError,
        match=r"layer 'd'.*record '00000003'.*shape \(3, 6, 9\), but the net declared \(3, 8, 9\)",
    ):
        next(make_feed(net, workers=0))


def test_unparsable_record_names_its_key(tmp_path):
    good = array_to_datum(IMAGES[0]).SerializeToString()
    net = data_net(write_db(tmp_path / "bad", "lmdb", [good, b"\xff\xff\xff"]), "TEST", batch=2)
    with pytest.raises(CaffeAlexError, match=r"layer 'd'.*record '00000001'"):
        next(make_feed(net, workers=0))
