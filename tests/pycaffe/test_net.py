"""caffe.Net (caffe_alex.pycaffe.net) driven the way pycaffe code drives it: live blob arrays,
forward/backward over ranges, Caffe's Split layers, data layers pulling batches, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe
from caffe_alex.data.datum import array_to_datum
from caffe_alex.data.db import open_db
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net as Module
from tests.reference import parse_net

NET = """name: "small"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 3 kernel_size: 3
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

LMDB_NET = """name: "fed"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { source: "%(db)s" backend: LMDB batch_size: 4 }
        transform_param { scale: 0.01 } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
        data_param { source: "%(db)s" backend: LMDB batch_size: 2 }
        transform_param { scale: 0.01 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
        include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.prototxt"
    path.write_text(NET)
    return str(path)


@pytest.fixture
def lmdb_net(tmp_path):
    db_path = tmp_path / "db"
    rng = np.random.default_rng(0)
    with open_db(str(db_path), "lmdb", "new") as db:
        txn = db.transaction()
        for i in range(10):
            image = rng.integers(0, 256, (1, 6, 6), dtype=np.uint8)
            txn.put(f"{i:08d}", array_to_datum(image, i % 3).SerializeToString())
        txn.commit()
    path = tmp_path / "fed.prototxt"
    path.write_text(LMDB_NET % {"db": db_path})
    return str(path)


def test_constructor_forms_and_what_the_net_shows(small, tmp_path):
    net = caffe.Net(small, caffe.TEST)
    assert net._layer_names == ["data", "conv1", "relu1", "pool1", "ip", "prob"]
    assert list(net.blobs) == ["data", "conv1", "pool1", "ip", "prob"]
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert list(net.params) == ["conv1", "ip"] and net.params["conv1"][0].data.shape == (3, 2, 3, 3)
    assert [layer.type for layer in net.layers] == ["Input", "Convolution", "ReLU", "Pooling",
                                                     "InnerProduct", "Softmax"]  # fmt: skip
    assert net.layer_dict["ip"].blobs[1].data.tolist() == [pytest.approx(0.1)] * 5
    assert net.top_names["relu1"] == ["conv1"] and net.bottom_names["ip"] == ["pool1"]
    blob = net.blobs["data"]
    assert (blob.num, blob.channels, blob.height, blob.width, blob.count) == (4, 2, 6, 6, 288)
    net.save(str(tmp_path / "w.caffemodel"))
    weights = str(tmp_path / "w.caffemodel")
    for other in (caffe.Net(small, weights, caffe.TEST),
                  caffe.Net(small, caffe.TEST, weights=weights)):  # fmt: skip
        np.testing.assert_array_equal(other.params["ip"][0].data, net.params["ip"][0].data)
    with pytest.raises(TypeError):
        caffe.Net(small)
    with pytest.raises(CaffeAlexError):
        caffe.Net(small, 7)


def test_data_written_into_blobs_drives_forward_and_arrays_stay_live(small):
    net = caffe.Net(small, caffe.TEST)
    x = np.random.default_rng(1).normal(size=(4, 2, 6, 6)).astype(np.float32)
    prob = net.blobs["prob"].data  # held across forward passes, as pycaffe users do
    net.blobs["data"].data[...] = x
    out = net.forward()
    reference = Module(parse_net(NET), "TEST")
    reference.load_state_dict(net.module.state_dict())
    expected = reference(torch.from_numpy(x))["prob"].detach().numpy()
    np.testing.assert_allclose(out["prob"], expected, rtol=1e-6)
    np.testing.assert_allclose(prob, expected, rtol=1e-6)
    net.params["ip"][1].data[...] = 100.0 * np.arange(5)  # weights changed through .data
    net.forward()
    assert (prob.argmax(1) == 4).all()
    with pytest.raises(CaffeAlexError, match="Input is not batch sized"):
        net.forward(data=x[:2])


def test_forward_ranges_and_extra_blobs(small):
    net = caffe.Net(small, caffe.TEST)
    net.blobs["data"].data[...] = 1.0
    out = net.forward(end="pool1")
    assert set(out) == {"pool1"} and net.blobs["ip"].data.max() == 0  # ip not run yet
    net.forward(start="ip", blobs=["conv1"])
    assert net.blobs["prob"].data.sum() == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(CaffeAlexError, match="no layer named 'nope'"):
        net.forward(start="nope")


def test_diffs_written_into_blobs_drive_backward(small):
    text = "force_backward: true\n" + NET
    net = caffe.Net(_write(small, text), caffe.TEST)
    x = np.random.default_rng(2).normal(size=(4, 2, 6, 6)).astype(np.float32)
    g = np.random.default_rng(3).normal(size=(4, 5)).astype(np.float32)
    net.forward(data=x)
    diffs = net.backward(prob=g)
    module = Module(parse_net(NET), "TEST")
    module.load_state_dict(net.module.state_dict())
    xt = torch.from_numpy(x).requires_grad_()
    module(xt)["prob"].backward(torch.from_numpy(g))
    np.testing.assert_allclose(diffs["data"], xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    conv_grad = module.params["conv1"][0].grad.numpy()
    np.testing.assert_allclose(net.params["conv1"][0].diff, conv_grad, rtol=1e-4, atol=1e-6)
    net.backward(prob=g)  # parameter diffs accumulate until cleared, as in Caffe
    ip_grad = module.params["ip"][0].grad.numpy()
    np.testing.assert_allclose(net.params["ip"][0].diff, 2 * ip_grad, rtol=1e-4, atol=1e-6)
    net.clear_param_diffs()
    assert not net.params["ip"][0].diff.any()
    # backward over a range: from ip down to pool1, writing pool1's diff only
    net.blobs["pool1"].diff[...] = 0
    net.backward(start="ip", end="ip")
    assert net.blobs["pool1"].diff.any()


def test_without_force_backward_a_net_without_loss_runs_no_backward(small):
    # Caffe's Net::Init: no blob leads to a loss, so no layer runs backward (deep-dream code
    # sets force_backward for this reason); with a loss, the input still gets no diff
    net = caffe.Net(small, caffe.TEST)
    net.forward(data=np.random.default_rng(6).normal(size=(4, 2, 6, 6)).astype(np.float32))
    net.blobs["prob"].diff[...] = np.random.default_rng(5).normal(size=(4, 5))
    net.backward()
    assert not net.blobs["data"].diff.any() and not net.params["conv1"][0].diff.any()
    lossy = NET + 'layer { name: "l" type: "EuclideanLoss" bottom: "prob" bottom: "ip" top: "l" }'
    net = caffe.Net(_write(small, lossy), caffe.TEST)
    net.forward(data=np.random.default_rng(6).normal(size=(4, 2, 6, 6)).astype(np.float32))
    net.backward()
    assert not net.blobs["data"].diff.any() and net.params["conv1"][0].diff.any()


def test_loss_tops_start_with_their_weight_as_diff_and_splits_are_caffes(lmdb_net):
    net = caffe.Net(lmdb_net, caffe.TEST)
    # label and ip are read twice (Accuracy and the loss): Caffe's Split layers and names
    assert net._layer_names == ["mnist", "label_mnist_1_split", "conv1", "ip", "ip_ip_0_split",
                                "accuracy", "loss"]  # fmt: skip
    assert "label_mnist_1_split_0" in net.blobs and net.bottom_names["loss"] == [
        "ip_ip_0_split_1", "label_mnist_1_split_1"]  # fmt: skip
    assert (
        net.blob_loss_weights["loss"] == 1.0
        and net.blobs["loss"].diff.shape == ()
        and net.blobs["loss"].diff == 1.0
    )
    first = net.forward()
    assert set(first) == {"accuracy", "loss"}
    labels = net.blobs["label"].data.copy()
    net.forward()
    assert labels.tolist() == [0, 1] and net.blobs["label"].data.tolist() == [2, 0]
    net.forward(start="conv1")  # the data blobs keep the last batch
    assert net.blobs["label"].data.tolist() == [2, 0]
    net.backward()
    assert net.params["conv1"][0].diff.any()


def test_forward_all_pads_and_trims(small):
    net = caffe.Net(small, caffe.TEST)
    x = np.random.default_rng(4).normal(size=(6, 2, 6, 6)).astype(np.float32)
    out = net.forward_all(data=x)
    assert out["prob"].shape == (6, 5)
    np.testing.assert_allclose(out["prob"][4:], net.forward(data=np.concatenate(
        [x[4:], np.zeros((2, 2, 6, 6), np.float32)]))["prob"][:2], rtol=1e-6)  # fmt: skip
    blobs, diffs = caffe.Net(_write(small, "force_backward: true\n" + NET), caffe.TEST)\
        .forward_backward_all(data=x, prob=np.ones((6, 5), np.float32))  # fmt: skip
    assert blobs["prob"].shape == (6, 5) and diffs["data"].shape == (6, 2, 6, 6)


def test_reshape_follows_the_input_blob(small):
    net = caffe.Net(small, caffe.TEST)
    net.blobs["data"].reshape(1, 2, 6, 6)
    net.reshape()
    assert net.blobs["conv1"].shape == (1, 3, 4, 4) and net.blobs["ip"].shape == (1, 5)
    out = net.forward(data=np.ones((1, 2, 6, 6), np.float32))
    assert out["prob"].shape == (1, 5)


def test_hdf5_weights_and_share_with(small, tmp_path):
    net = caffe.Net(small, caffe.TEST)
    net.save_hdf5(str(tmp_path / "w.any"))
    other = caffe.Net(small, caffe.TEST)
    other.load_hdf5(str(tmp_path / "w.any"))
    np.testing.assert_array_equal(other.params["conv1"][0].data, net.params["conv1"][0].data)
    third = caffe.Net(small, caffe.TEST)
    third.share_with(net)
    net.params["ip"][0].data[...] = 7.0
    assert (third.params["ip"][0].data == 7.0).all()


def test_set_input_arrays_feeds_memory_data(tmp_path):
    text = """layer { name: "m" type: "MemoryData" top: "data" top: "label"
                memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }
              layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
                inner_product_param { num_output: 1 } }"""
    net = caffe.Net(_write(str(tmp_path / "m.prototxt"), text), caffe.TEST)
    data = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    net.set_input_arrays(data, np.arange(4, dtype=np.float32))
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[:2])
    net.forward()
    assert net.blobs["label"].data.tolist() == [2, 3]
    with pytest.raises(CaffeAlexError, match="multiple of batch_size"):
        net.set_input_arrays(data[:3], np.arange(3, dtype=np.float32))


def test_callbacks_see_layer_indices(small):
    net = caffe.Net(small, caffe.TEST)
    seen = []
    net.before_forward(lambda i: seen.append(("f", i)))
    net.after_backward(lambda i: seen.append(("b", i)))
    net.forward(start="ip")
    net.backward(start="prob", end="ip")
    assert seen == [("f", 4), ("f", 5), ("b", 5), ("b", 4)]


def test_module_functions():
    caffe.set_mode_cpu()
    caffe.set_random_seed(3)
    caffe.init_log()
    caffe.log("hello")
    assert caffe.has_nccl() and "Convolution" in caffe.layer_type_list()
    assert (caffe.TRAIN, caffe.TEST) == (0, 1) and caffe.__version__
    import caffe_alex.proto.caffe_pb2 as ours
    from caffe.proto import caffe_pb2

    assert caffe_pb2 is ours and caffe.io is __import__("caffe_alex.pycaffe.io").pycaffe.io
    assert (caffe.solver_count(), caffe.solver_rank()) == (1, 0)
    timer = caffe.Timer()
    timer.start()
    timer.stop()
    assert timer.ms >= 0
    with pytest.raises(CaffeAlexError, match=r"call caffe.set_solver_count\(n\)"):
        caffe.NCCL(None, caffe.NCCL.new_uid())  # one process: nothing to join


def _write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def test_blob_reshape_keeps_what_caffes_keeps(small):
    """Blob::Reshape: while the count fits in the memory the blob has had (its capacity), the
    values stay, read in the new shape; a larger count gets new memory (zeros here)."""
    blob = caffe.Net(small, caffe.TEST).blobs["ip"]  # 4 x 5
    blob.data[...] = np.arange(20).reshape(4, 5)
    blob.diff[...] = 1
    blob.reshape(2, 5)
    np.testing.assert_array_equal(blob.data, np.arange(10).reshape(2, 5))
    assert (blob.diff == 1).all()
    blob.reshape(20)  # back within the capacity: Caffe's memory still holds all 20 values
    np.testing.assert_array_equal(blob.data, np.arange(20))
    blob.reshape(3, 10)  # more than it ever held
    assert blob.shape == (3, 10) and not blob.data.any() and not blob.diff.any()
