"""caffe_alex.pycaffe.net_spec against pycaffe's rules.

Each expected text is what BVLC pycaffe's net_spec writes for the same script (worked out from
its rules, since pycaffe cannot run here), printed by this protobuf library: ``str()`` of a
message prints fields by field number, not in the order the script gives them, and a float32
with 6 significant digits when they read back as the same float32, else with 9 (so 0.0001
stays 0.0001 but 1/255 prints 0.00392156886; the notebook's output, from an old protobuf under
Python 2, shows the double 0.00392156862745). Float printing is protobuf's, not net_spec's.
"""

from __future__ import annotations

import copy
import pickle

import pytest
from google.protobuf import text_format

from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from caffe_alex.pycaffe import net_spec
from caffe_alex.pycaffe.net_spec import NetSpec, to_proto
from caffe_alex.pycaffe.net_spec import layers as L
from caffe_alex.pycaffe.net_spec import params as P

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def layer_names(net_param):
    return [layer.name for layer in net_param.layer]


# -- LeNet, as examples/01-learning-lenet.ipynb builds it -------------------------------------


def notebook_lenet(lmdb, batch_size):
    n = NetSpec()
    n.data, n.label = L.Data(
        batch_size=batch_size,
        backend=P.Data.LMDB,
        source=lmdb,
        transform_param=dict(scale=1.0 / 255),
        ntop=2,
    )
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(
        n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier")
    )
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


# The notebook's own `!cat mnist/lenet_auto_train.prototxt` output, but for the float (see top).
# The Data layer is named after its first top; ReLU keeps writing "fc1" (in place) under its
# own name "relu1"; "score" reads "fc1", the blob the in-place ReLU wrote.
LENET_TRAIN = """\
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  transform_param {
    scale: 0.00392156886
  }
  data_param {
    source: "mnist/mnist_train_lmdb"
    batch_size: 64
    backend: LMDB
  }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  convolution_param {
    num_output: 20
    kernel_size: 5
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1"
  top: "pool1"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "conv2"
  type: "Convolution"
  bottom: "pool1"
  top: "conv2"
  convolution_param {
    num_output: 50
    kernel_size: 5
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "pool2"
  type: "Pooling"
  bottom: "conv2"
  top: "pool2"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "fc1"
  type: "InnerProduct"
  bottom: "pool2"
  top: "fc1"
  inner_product_param {
    num_output: 500
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "fc1"
  top: "fc1"
}
layer {
  name: "score"
  type: "InnerProduct"
  bottom: "fc1"
  top: "score"
  inner_product_param {
    num_output: 10
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "score"
  bottom: "label"
  top: "loss"
}
"""


def test_lenet_as_the_notebook_builds_it():
    assert str(notebook_lenet("mnist/mnist_train_lmdb", 64)) == LENET_TRAIN


def test_lenet_test_net_differs_only_in_source_and_batch():
    expected = LENET_TRAIN.replace("mnist_train_lmdb", "mnist_test_lmdb").replace(
        "batch_size: 64", "batch_size: 100"
    )
    assert str(notebook_lenet("mnist/mnist_test_lmdb", 100)) == expected


def test_lenet_builds_with_declared_input_shapes():
    # The lmdb does not exist here, so the Data tops get their shapes from input_shapes.
    net = Net(
        notebook_lenet("mnist/mnist_train_lmdb", 64),
        "TRAIN",
        input_shapes={"data": (64, 1, 28, 28), "label": (64,)},
    )
    assert net.layer_names == [
        "data",
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "fc1",
        "relu1",
        "score",
        "loss",
    ]
    assert net.blob_shapes["conv1"] == (64, 20, 24, 24)
    assert net.blob_shapes["pool2"] == (64, 50, 4, 4)
    assert net.blob_shapes["fc1"] == (64, 500)
    assert net.blob_shapes["score"] == (64, 10)
    assert net.input_names == ["data", "label"] and net.output_names == ["loss"]


# -- CaffeNet, as examples/pycaffe/caffenet.py builds it (no NetSpec: every name automatic) ---


def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1):
    conv = L.Convolution(
        bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad, group=group
    )
    return conv, L.ReLU(conv, in_place=True)


def fc_relu(bottom, nout):
    fc = L.InnerProduct(bottom, num_output=nout)
    return fc, L.ReLU(fc, in_place=True)


def max_pool(bottom, ks, stride=1):
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)


def example_caffenet(lmdb, batch_size=256, include_acc=False):
    data, label = L.Data(
        source=lmdb,
        backend=P.Data.LMDB,
        batch_size=batch_size,
        ntop=2,
        transform_param=dict(crop_size=227, mean_value=[104, 117, 123], mirror=True),
    )
    conv1, relu1 = conv_relu(data, 11, 96, stride=4)
    pool1 = max_pool(relu1, 3, stride=2)
    norm1 = L.LRN(pool1, local_size=5, alpha=1e-4, beta=0.75)
    conv2, relu2 = conv_relu(norm1, 5, 256, pad=2, group=2)
    pool2 = max_pool(relu2, 3, stride=2)
    norm2 = L.LRN(pool2, local_size=5, alpha=1e-4, beta=0.75)
    conv3, relu3 = conv_relu(norm2, 3, 384, pad=1)
    conv4, relu4 = conv_relu(relu3, 3, 384, pad=1, group=2)
    conv5, relu5 = conv_relu(relu4, 3, 256, pad=1, group=2)
    pool5 = max_pool(relu5, 3, stride=2)
    fc6, relu6 = fc_relu(pool5, 4096)
    drop6 = L.Dropout(relu6, in_place=True)
    fc7, relu7 = fc_relu(drop6, 4096)
    drop7 = L.Dropout(relu7, in_place=True)
    fc8 = L.InnerProduct(drop7, num_output=1000)
    loss = L.SoftmaxWithLoss(fc8, label)
    if include_acc:
        acc = L.Accuracy(fc8, label)
        return to_proto(loss, acc)
    return to_proto(loss)


# Automatic names are <Type><count>, one count per type. The two-top Data layer takes Data1
# and Data2 for its tops and is named after the first. An in-place layer names no top, but its
# name still takes a count (ReLU1, Dropout1) and its top is its bottom's name. Explicit
# defaults (pad=0, group=1, stride=1) are printed: proto2 keeps every field that was set.
# Fields print by number, so in convolution_param pad (3) comes before kernel_size (4) and
# group (5) before stride (6). The third pooling layer (pool5) is Pooling3, its fc is
# InnerProduct1. Layers come in a depth-first walk from loss; then acc adds only Accuracy1.
CAFFENET_TEST = """\
layer {
  name: "Data1"
  type: "Data"
  top: "Data1"
  top: "Data2"
  transform_param {
    mirror: true
    crop_size: 227
    mean_value: 104
    mean_value: 117
    mean_value: 123
  }
  data_param {
    source: "/path/to/caffe-val-lmdb"
    batch_size: 50
    backend: LMDB
  }
}
layer {
  name: "Convolution1"
  type: "Convolution"
  bottom: "Data1"
  top: "Convolution1"
  convolution_param {
    num_output: 96
    pad: 0
    kernel_size: 11
    group: 1
    stride: 4
  }
}
layer {
  name: "ReLU1"
  type: "ReLU"
  bottom: "Convolution1"
  top: "Convolution1"
}
layer {
  name: "Pooling1"
  type: "Pooling"
  bottom: "Convolution1"
  top: "Pooling1"
  pooling_param {
    pool: MAX
    kernel_size: 3
    stride: 2
  }
}
layer {
  name: "LRN1"
  type: "LRN"
  bottom: "Pooling1"
  top: "LRN1"
  lrn_param {
    local_size: 5
    alpha: 0.0001
    beta: 0.75
  }
}
layer {
  name: "Convolution2"
  type: "Convolution"
  bottom: "LRN1"
  top: "Convolution2"
  convolution_param {
    num_output: 256
    pad: 2
    kernel_size: 5
    group: 2
    stride: 1
  }
}
layer {
  name: "ReLU2"
  type: "ReLU"
  bottom: "Convolution2"
  top: "Convolution2"
}
layer {
  name: "Pooling2"
  type: "Pooling"
  bottom: "Convolution2"
  top: "Pooling2"
  pooling_param {
    pool: MAX
    kernel_size: 3
    stride: 2
  }
}
layer {
  name: "LRN2"
  type: "LRN"
  bottom: "Pooling2"
  top: "LRN2"
  lrn_param {
    local_size: 5
    alpha: 0.0001
    beta: 0.75
  }
}
layer {
  name: "Convolution3"
  type: "Convolution"
  bottom: "LRN2"
  top: "Convolution3"
  convolution_param {
    num_output: 384
    pad: 1
    kernel_size: 3
    group: 1
    stride: 1
  }
}
layer {
  name: "ReLU3"
  type: "ReLU"
  bottom: "Convolution3"
  top: "Convolution3"
}
layer {
  name: "Convolution4"
  type: "Convolution"
  bottom: "Convolution3"
  top: "Convolution4"
  convolution_param {
    num_output: 384
    pad: 1
    kernel_size: 3
    group: 2
    stride: 1
  }
}
layer {
  name: "ReLU4"
  type: "ReLU"
  bottom: "Convolution4"
  top: "Convolution4"
}
layer {
  name: "Convolution5"
  type: "Convolution"
  bottom: "Convolution4"
  top: "Convolution5"
  convolution_param {
    num_output: 256
    pad: 1
    kernel_size: 3
    group: 2
    stride: 1
  }
}
layer {
  name: "ReLU5"
  type: "ReLU"
  bottom: "Convolution5"
  top: "Convolution5"
}
layer {
  name: "Pooling3"
  type: "Pooling"
  bottom: "Convolution5"
  top: "Pooling3"
  pooling_param {
    pool: MAX
    kernel_size: 3
    stride: 2
  }
}
layer {
  name: "InnerProduct1"
  type: "InnerProduct"
  bottom: "Pooling3"
  top: "InnerProduct1"
  inner_product_param {
    num_output: 4096
  }
}
layer {
  name: "ReLU6"
  type: "ReLU"
  bottom: "InnerProduct1"
  top: "InnerProduct1"
}
layer {
  name: "Dropout1"
  type: "Dropout"
  bottom: "InnerProduct1"
  top: "InnerProduct1"
}
layer {
  name: "InnerProduct2"
  type: "InnerProduct"
  bottom: "InnerProduct1"
  top: "InnerProduct2"
  inner_product_param {
    num_output: 4096
  }
}
layer {
  name: "ReLU7"
  type: "ReLU"
  bottom: "InnerProduct2"
  top: "InnerProduct2"
}
layer {
  name: "Dropout2"
  type: "Dropout"
  bottom: "InnerProduct2"
  top: "InnerProduct2"
}
layer {
  name: "InnerProduct3"
  type: "InnerProduct"
  bottom: "InnerProduct2"
  top: "InnerProduct3"
  inner_product_param {
    num_output: 1000
  }
}
layer {
  name: "SoftmaxWithLoss1"
  type: "SoftmaxWithLoss"
  bottom: "InnerProduct3"
  bottom: "Data2"
  top: "SoftmaxWithLoss1"
}
layer {
  name: "Accuracy1"
  type: "Accuracy"
  bottom: "InnerProduct3"
  bottom: "Data2"
  top: "Accuracy1"
}
"""


def test_caffenet_example_with_accuracy():
    net = example_caffenet("/path/to/caffe-val-lmdb", batch_size=50, include_acc=True)
    assert str(net) == CAFFENET_TEST


def test_caffenet_example_train_net():
    # Without acc the walk is the same, so the text is the test net's minus its last layer.
    net = example_caffenet("/path/to/caffe-train-lmdb")
    head, _, _ = CAFFENET_TEST.rpartition('layer {\n  name: "Accuracy1"')
    expected = head.replace("caffe-val-lmdb", "caffe-train-lmdb").replace(
        "batch_size: 50", "batch_size: 256"
    )
    assert str(net) == expected


def test_caffenet_example_builds():
    net = Net(
        example_caffenet("/path/to/caffe-val-lmdb", batch_size=2, include_acc=True),
        "TEST",
        input_shapes={"Data1": (2, 3, 227, 227), "Data2": (2,)},
    )
    assert net.blob_shapes["Pooling3"] == (2, 256, 6, 6)
    assert net.blob_shapes["InnerProduct3"] == (2, 1000)
    assert net.output_names == ["Accuracy1", "SoftmaxWithLoss1"]


# -- CaffeNet with NetSpec names, as examples/02-fine-tuning.ipynb builds style_net ------------

weight_param = dict(lr_mult=1, decay_mult=1)
bias_param = dict(lr_mult=2, decay_mult=0)
learned_param = [weight_param, bias_param]
frozen_param = [dict(lr_mult=0)] * 2
# The notebook's filler defaults (dict literals in its signatures), named for the linter.
conv_weight_filler = dict(type="gaussian", std=0.01)
fc_weight_filler = dict(type="gaussian", std=0.005)
bias_filler_01 = dict(type="constant", value=0.1)


def ft_conv_relu(
    bottom,
    ks,
    nout,
    stride=1,
    pad=0,
    group=1,
    param=learned_param,
    weight_filler=conv_weight_filler,
    bias_filler=bias_filler_01,
):
    conv = L.Convolution(
        bottom,
        kernel_size=ks,
        stride=stride,
        num_output=nout,
        pad=pad,
        group=group,
        param=param,
        weight_filler=weight_filler,
        bias_filler=bias_filler,
    )
    return conv, L.ReLU(conv, in_place=True)


def ft_fc_relu(
    bottom,
    nout,
    param=learned_param,
    weight_filler=fc_weight_filler,
    bias_filler=bias_filler_01,
):
    fc = L.InnerProduct(
        bottom, num_output=nout, param=param, weight_filler=weight_filler, bias_filler=bias_filler
    )
    return fc, L.ReLU(fc, in_place=True)


def ft_caffenet(
    data, label=None, train=True, num_classes=1000, classifier_name="fc8", learn_all=False
):
    n = NetSpec()
    n.data = data
    param = learned_param if learn_all else frozen_param
    n.conv1, n.relu1 = ft_conv_relu(n.data, 11, 96, stride=4, param=param)
    n.pool1 = max_pool(n.relu1, 3, stride=2)
    n.norm1 = L.LRN(n.pool1, local_size=5, alpha=1e-4, beta=0.75)
    n.conv2, n.relu2 = ft_conv_relu(n.norm1, 5, 256, pad=2, group=2, param=param)
    n.pool2 = max_pool(n.relu2, 3, stride=2)
    n.norm2 = L.LRN(n.pool2, local_size=5, alpha=1e-4, beta=0.75)
    n.conv3, n.relu3 = ft_conv_relu(n.norm2, 3, 384, pad=1, param=param)
    n.conv4, n.relu4 = ft_conv_relu(n.relu3, 3, 384, pad=1, group=2, param=param)
    n.conv5, n.relu5 = ft_conv_relu(n.relu4, 3, 256, pad=1, group=2, param=param)
    n.pool5 = max_pool(n.relu5, 3, stride=2)
    n.fc6, n.relu6 = ft_fc_relu(n.pool5, 4096, param=param)
    if train:
        n.drop6 = fc7input = L.Dropout(n.relu6, in_place=True)
    else:
        fc7input = n.relu6
    n.fc7, n.relu7 = ft_fc_relu(fc7input, 4096, param=param)
    if train:
        n.drop7 = fc8input = L.Dropout(n.relu7, in_place=True)
    else:
        fc8input = n.relu7
    fc8 = L.InnerProduct(fc8input, num_output=num_classes, param=learned_param)
    n.__setattr__(classifier_name, fc8)
    if not train:
        n.probs = L.Softmax(fc8)
    if label is not None:
        n.label = label
        n.loss = L.SoftmaxWithLoss(fc8, n.label)
        n.acc = L.Accuracy(fc8, n.label)
    return n.to_proto()


def style_net(train=True, learn_all=False):
    transform_param = dict(
        mirror=train, crop_size=227, mean_file="data/ilsvrc12/imagenet_mean.binaryproto"
    )
    style_data, style_label = L.ImageData(
        transform_param=transform_param,
        source="data/flickr_style/train.txt",
        batch_size=50,
        new_height=256,
        new_width=256,
        ntop=2,
    )
    return ft_caffenet(
        data=style_data,
        label=style_label,
        train=train,
        num_classes=5,
        classifier_name="fc8_flickr",
        learn_all=learn_all,
    )


# Names come from NetSpec attributes: "label" is assigned after fc8_flickr, yet the ImageData
# layer (written first, as everything depends on it) already names its second top "label",
# because all assigned names are known before the walk starts. frozen_param is one dict listed
# twice: two param blocks. fc7 and fc8_flickr read fc6 and fc7, the blobs that the in-place
# ReLU and Dropout layers rewrote. A field set to its default (mirror: true, decay_mult: 0)
# is printed all the same.
STYLE_NET_HEAD = """\
layer {
  name: "data"
  type: "ImageData"
  top: "data"
  top: "label"
  transform_param {
    mirror: true
    crop_size: 227
    mean_file: "data/ilsvrc12/imagenet_mean.binaryproto"
  }
  image_data_param {
    source: "data/flickr_style/train.txt"
    batch_size: 50
    new_height: 256
    new_width: 256
  }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  param {
    lr_mult: 0
  }
  param {
    lr_mult: 0
  }
  convolution_param {
    num_output: 96
    pad: 0
    kernel_size: 11
    group: 1
    stride: 4
    weight_filler {
      type: "gaussian"
      std: 0.01
    }
    bias_filler {
      type: "constant"
      value: 0.1
    }
  }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "conv1"
  top: "conv1"
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1"
  top: "pool1"
  pooling_param {
    pool: MAX
    kernel_size: 3
    stride: 2
  }
}
layer {
  name: "norm1"
  type: "LRN"
  bottom: "pool1"
  top: "norm1"
  lrn_param {
    local_size: 5
    alpha: 0.0001
    beta: 0.75
  }
}
"""

STYLE_NET_MIDDLE = """\
layer {
  name: "conv2"
  type: "Convolution"
  bottom: "norm1"
  top: "conv2"
  param {
    lr_mult: 0
  }
  param {
    lr_mult: 0
  }
  convolution_param {
    num_output: 256
    pad: 2
    kernel_size: 5
    group: 2
    stride: 1
    weight_filler {
      type: "gaussian"
      std: 0.01
    }
    bias_filler {
      type: "constant"
      value: 0.1
    }
  }
}
layer {
  name: "relu2"
  type: "ReLU"
  bottom: "conv2"
  top: "conv2"
}
layer {
  name: "pool2"
  type: "Pooling"
  bottom: "conv2"
  top: "pool2"
  pooling_param {
    pool: MAX
    kernel_size: 3
    stride: 2
  }
}
layer {
  name: "norm2"
  type: "LRN"
  bottom: "pool2"
  top: "norm2"
  lrn_param {
    local_size: 5
    alpha: 0.0001
    beta: 0.75
  }
}
layer {
  name: "conv3"
  type: "Convolution"
  bottom: "norm2"
  top: "conv3"
  param {
    lr_mult: 0
  }
  param {
    lr_mult: 0
  }
  convolution_param {
    num_output: 384
    pad: 1
    kernel_size: 3
    group: 1
    stride: 1
    weight_filler {
      type: "gaussian"
      std: 0.01
    }
    bias_filler {
      type: "constant"
      value: 0.1
    }
  }
}
layer {
  name: "relu3"
  type: "ReLU"
  bottom: "conv3"
  top: "conv3"
}
layer {
  name: "conv4"
  type: "Convolution"
  bottom: "conv3"
  top: "conv4"
  param {
    lr_mult: 0
  }
  param {
    lr_mult: 0
  }
  convolution_param {
    num_output: 384
    pad: 1
    kernel_size: 3
    group: 2
    stride: 1
    weight_filler {
      type: "gaussian"
      std: 0.01
    }
    bias_filler {
      type: "constant"
      value: 0.1
    }
  }
}
layer {
  name: "relu4"
  type: "ReLU"
  bottom: "conv4"
  top: "conv4"
}
layer {
  name: "conv5"
  type: "Convolution"
  bottom: "conv4"
  top: "conv5"
  param {
    lr_mult: 0
  }
  param {
    lr_mult: 0
  }
  convolution_param {
    num_output: 256
    pad: 1
    kernel_size: 3
    group: 2
    stride: 1
    weight_filler {
      type: "gaussian"
      std: 0.01
    }
    bias_filler {
      type: "constant"
      value: 0.1
    }
  }
}
layer {
  name: "relu5"
  type: "ReLU"
  bottom: "conv5"
  top: "conv5"
}
layer {
  name: "pool5"
  type: "Pooling"
  bottom: "conv5"
  top: "pool5"
  pooling_param {
    pool: MAX
    kernel_size: 3
    stride: 2
  }
}
"""

STYLE_NET_TAIL = """\
layer {
  name: "fc6"
  type: "InnerProduct"
  bottom: "pool5"
  top: "fc6"
  param {
    lr_mult: 0
  }
  param {
    lr_mult: 0
  }
  inner_product_param {
    num_output: 4096
    weight_filler {
      type: "gaussian"
      std: 0.005
    }
    bias_filler {
      type: "constant"
      value: 0.1
    }
  }
}
layer {
  name: "relu6"
  type: "ReLU"
  bottom: "fc6"
  top: "fc6"
}
layer {
  name: "drop6"
  type: "Dropout"
  bottom: "fc6"
  top: "fc6"
}
layer {
  name: "fc7"
  type: "InnerProduct"
  bottom: "fc6"
  top: "fc7"
  param {
    lr_mult: 0
  }
  param {
    lr_mult: 0
  }
  inner_product_param {
    num_output: 4096
    weight_filler {
      type: "gaussian"
      std: 0.005
    }
    bias_filler {
      type: "constant"
      value: 0.1
    }
  }
}
layer {
  name: "relu7"
  type: "ReLU"
  bottom: "fc7"
  top: "fc7"
}
layer {
  name: "drop7"
  type: "Dropout"
  bottom: "fc7"
  top: "fc7"
}
layer {
  name: "fc8_flickr"
  type: "InnerProduct"
  bottom: "fc7"
  top: "fc8_flickr"
  param {
    lr_mult: 1
    decay_mult: 1
  }
  param {
    lr_mult: 2
    decay_mult: 0
  }
  inner_product_param {
    num_output: 5
  }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "fc8_flickr"
  bottom: "label"
  top: "loss"
}
layer {
  name: "acc"
  type: "Accuracy"
  bottom: "fc8_flickr"
  bottom: "label"
  top: "acc"
}
"""


def test_fine_tuning_style_net():
    proto = style_net()
    assert str(proto) == STYLE_NET_HEAD + STYLE_NET_MIDDLE + STYLE_NET_TAIL
    assert layer_names(proto) == [
        "data",
        "conv1",
        "relu1",
        "pool1",
        "norm1",
        "conv2",
        "relu2",
        "pool2",
        "norm2",
        "conv3",
        "relu3",
        "conv4",
        "relu4",
        "conv5",
        "relu5",
        "pool5",
        "fc6",
        "relu6",
        "drop6",
        "fc7",
        "relu7",
        "drop7",
        "fc8_flickr",
        "loss",
        "acc",
    ]


def test_fine_tuning_deploy_net_without_dropout():
    # train=False: no Dropout; probs reads fc8 (the classifier keeps its default name).
    proto = ft_caffenet(data=L.DummyData(shape=dict(dim=[1, 3, 227, 227])), train=False)
    names = layer_names(proto)
    assert names[0] == "data" and names[-2:] == ["fc8", "probs"]
    assert "drop6" not in names
    assert str(proto.layer[0]) == (
        'name: "data"\ntype: "DummyData"\ntop: "data"\n'
        "dummy_data_param {\n  shape {\n    dim: 1\n    dim: 3\n    dim: 227\n    dim: 227\n"
        "  }\n}\n"
    )
    by_name = {layer.name: layer for layer in proto.layer}
    assert list(by_name["fc7"].bottom) == ["fc6"]  # relu6's in-place output
    assert list(by_name["probs"].bottom) == ["fc8"]


# -- include rules, loss weights, Python layers --------------------------------------------------


# include is a repeated NetStateRule: a dict becomes one rule, the phase prints as the enum
# name. Fields print by number: include (8) follows param (6) and precedes every *_param.
RULES = """\
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  include {
    phase: TRAIN
  }
  transform_param {
    mirror: true
    crop_size: 227
  }
  data_param {
    source: "train_lmdb"
    batch_size: 256
    backend: LMDB
  }
}
layer {
  name: "fc"
  type: "InnerProduct"
  bottom: "data"
  top: "fc"
  param {
    lr_mult: 1
    decay_mult: 1
  }
  param {
    lr_mult: 2
    decay_mult: 0
  }
  inner_product_param {
    num_output: 10
  }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "fc"
  bottom: "label"
  top: "loss"
  loss_weight: 2
  exclude {
    stage: "deploy"
  }
  loss_param {
    ignore_label: 255
  }
}
layer {
  name: "accuracy"
  type: "Accuracy"
  bottom: "fc"
  bottom: "label"
  top: "accuracy"
  include {
    phase: TEST
  }
  include {
    phase: TEST
    stage: "val"
  }
  accuracy_param {
    top_k: 5
  }
}
"""


def test_include_exclude_loss_weight_and_generic_params():
    n = NetSpec()
    n.data, n.label = L.Data(
        source="train_lmdb",
        backend=P.Data.LMDB,
        batch_size=256,
        ntop=2,
        include=dict(phase=TRAIN),
        transform_param=dict(mirror=True, crop_size=227),
    )
    n.fc = L.InnerProduct(
        n.data, num_output=10, param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
    )
    # SoftmaxWithLoss has no SoftmaxWithLossParameter: loss_weight (a scalar given to a
    # repeated field) lands on the layer, loss_param is a *_param key and goes there as is.
    n.loss = L.SoftmaxWithLoss(
        n.fc,
        n.label,
        loss_weight=2,
        exclude=dict(stage="deploy"),
        loss_param=dict(ignore_label=255),
    )
    # top_k goes to accuracy_param; the phase may also be given by its name.
    n.accuracy = L.Accuracy(
        n.fc, n.label, top_k=5, include=[dict(phase=TEST), dict(phase="TEST", stage="val")]
    )
    assert str(n.to_proto()) == RULES


# A list loss_weight gives one weight per top; module, layer and param_str go to python_param.
# text_format escapes the single quotes of param_str (str(dict) of the pascal notebook).
PYTHON_LOSSES = """\
layer {
  name: "data"
  type: "Python"
  top: "data"
  top: "label"
  python_param {
    module: "pascal_multilabel_datalayers"
    layer: "PascalMultilabelDataLayerSync"
    param_str: "{\\'batch_size\\': 128}"
  }
}
layer {
  name: "l1"
  type: "Python"
  bottom: "data"
  bottom: "label"
  top: "l1"
  top: "l2"
  loss_weight: 1
  loss_weight: 0.5
  python_param {
    module: "losses"
    layer: "TwoLosses"
  }
}
"""


def test_python_layers_and_loss_weight_list():
    n = NetSpec()
    n.data, n.label = L.Python(
        module="pascal_multilabel_datalayers",
        layer="PascalMultilabelDataLayerSync",
        ntop=2,
        param_str=str(dict(batch_size=128)),
    )
    n.l1, n.l2 = L.Python(
        n.data, n.label, module="losses", layer="TwoLosses", ntop=2, loss_weight=[1, 0.5]
    )
    assert str(n.to_proto()) == PYTHON_LOSSES


LINREG_PROTOTXT = """
layer { type: 'DummyData' name: 'x' top: 'x'
  dummy_data_param { shape: { dim: 10 dim: 3 dim: 2 } data_filler: { type: 'gaussian' } } }
layer { type: 'DummyData' name: 'y' top: 'y'
  dummy_data_param { shape: { dim: 10 dim: 3 dim: 2 } data_filler: { type: 'gaussian' } } }
layer { type: 'InnerProduct' name: 'ipx' top: 'ipx' bottom: 'x'
  inner_product_param { num_output: 10 weight_filler { type: 'xavier' } } }
layer { type: 'InnerProduct' name: 'ipy' top: 'ipy' bottom: 'y'
  inner_product_param { num_output: 10 weight_filler { type: 'xavier' } } }
layer { type: 'Python' name: 'loss' top: 'loss' bottom: 'ipx' bottom: 'ipy'
  python_param { module: 'pyloss' layer: 'EuclideanLossLayer' } loss_weight: 1 }
"""


def test_python_loss_layer_matches_the_linreg_example():
    # examples/pycaffe/linreg.prototxt (without its net name), written with NetSpec.
    n = NetSpec()
    n.x = L.DummyData(shape=dict(dim=[10, 3, 2]), data_filler=dict(type="gaussian"))
    n.y = L.DummyData(shape=dict(dim=[10, 3, 2]), data_filler=dict(type="gaussian"))
    n.ipx = L.InnerProduct(n.x, num_output=10, weight_filler=dict(type="xavier"))
    n.ipy = L.InnerProduct(n.y, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.Python(n.ipx, n.ipy, module="pyloss", layer="EuclideanLossLayer", loss_weight=1)
    expected = text_format.Parse(LINREG_PROTOTXT, caffe_pb2.NetParameter())
    assert n.to_proto() == expected
    assert str(n.to_proto().layer[4]) == (
        'name: "loss"\ntype: "Python"\nbottom: "ipx"\nbottom: "ipy"\ntop: "loss"\n'
        'loss_weight: 1\npython_param {\n  module: "pyloss"\n  layer: "EuclideanLossLayer"\n}\n'
    )


# -- several tops, automatic names, order ------------------------------------------------------


# Slice prints slice_point (field 2) before axis (field 3). The second Slice has only its
# second top named: its first top gets the automatic name Slice1 and the layer takes it.
MULTI_TOP = """\
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param {
    shape {
      dim: 2
      dim: 6
    }
  }
}
layer {
  name: "a"
  type: "Slice"
  bottom: "data"
  top: "a"
  top: "b"
  top: "c"
  slice_param {
    slice_point: 2
    slice_point: 4
    axis: 1
  }
}
layer {
  name: "Slice1"
  type: "Slice"
  bottom: "a"
  top: "Slice1"
  top: "second"
}
layer {
  name: "cat"
  type: "Concat"
  bottom: "Slice1"
  bottom: "b"
  bottom: "c"
  top: "cat"
}
"""


def test_multi_top_layers_named_and_partly_named():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6]))
    n.a, n.b, n.c = L.Slice(n.data, axis=1, slice_point=[2, 4], ntop=3)
    first, n.second = L.Slice(n.a, ntop=2)
    n.cat = L.Concat(first, n.b, n.c)
    assert str(n.to_proto()) == MULTI_TOP
    net = Net(n.to_proto(), "TEST")
    assert net.blob_shapes["Slice1"] == net.blob_shapes["second"] == (2, 1)
    assert net.blob_shapes["cat"] == (2, 5)


def test_multi_top_call_returns_tops_in_order():
    tops = L.Slice(L.Input(shape=dict(dim=[4])), ntop=3)
    assert isinstance(tops, tuple) and [t.n for t in tops] == [0, 1, 2]
    assert all(t.fn is tops[0].fn for t in tops)


def test_one_count_per_type_shared_by_tops_and_layers():
    data = L.Input(shape=dict(dim=[2, 4]))
    s1, s2 = L.Slice(data, ntop=2)
    s3, s4 = L.Slice(s2, ntop=2)  # the count is at 2 after the first Slice's two tops
    net = to_proto(L.Concat(s1, s3, s4))
    assert [(lay.name, list(lay.top)) for lay in net.layer] == [
        ("Input1", ["Input1"]),
        ("Slice1", ["Slice1", "Slice2"]),
        ("Slice3", ["Slice3", "Slice4"]),
        ("Concat1", ["Concat1"]),
    ]


def test_automatic_names_ignore_assigned_names():
    # The count does not skip a name the script assigned: two layers end up "Convolution1".
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 5, 5]))
    hidden = L.Convolution(n.data, num_output=1, kernel_size=1)
    n.Convolution1 = L.Convolution(hidden, num_output=1, kernel_size=1)
    net = n.to_proto()
    assert [(lay.name, list(lay.bottom), list(lay.top)) for lay in net.layer] == [
        ("data", [], ["data"]),
        ("Convolution1", ["data"], ["Convolution1"]),
        ("Convolution1", ["Convolution1"], ["Convolution1"]),
    ]


def test_names_are_known_before_the_walk_and_order_is_depth_first():
    n = NetSpec()
    x = L.Input(shape=dict(dim=[1, 3]))
    n.out = L.Eltwise(L.ReLU(x), L.TanH(x))
    n.x = x  # assigned after its consumer, still named "x"
    n.other = L.Sigmoid(L.AbsVal(x))
    net = n.to_proto()
    # The walk from "out" writes Input, then Eltwise's bottoms in argument order, then Eltwise;
    # "x" adds nothing; "other" adds its own unwritten layers after.
    assert [(lay.name, list(lay.bottom), list(lay.top)) for lay in net.layer] == [
        ("x", [], ["x"]),
        ("ReLU1", ["x"], ["ReLU1"]),
        ("TanH1", ["x"], ["TanH1"]),
        ("out", ["ReLU1", "TanH1"], ["out"]),
        ("AbsVal1", ["x"], ["AbsVal1"]),
        ("other", ["AbsVal1"], ["other"]),
    ]


def test_one_top_under_two_names_takes_the_later_one():
    n = NetSpec()
    top = L.Input(shape=dict(dim=[1]))
    n.first = top
    n.second = top
    assert [(lay.name, list(lay.top)) for lay in n.to_proto().layer] == [("second", ["second"])]


def test_reassigning_a_name_keeps_its_position():
    n = NetSpec()
    n.a = L.Input(shape=dict(dim=[1]))
    n.b = L.Input(shape=dict(dim=[2]))
    n.a = L.Input(shape=dict(dim=[3]))
    assert n.keys() == ["a", "b"]
    assert [(lay.name, lay.input_param.shape[0].dim[0]) for lay in n.to_proto().layer] == [
        ("a", 3),
        ("b", 2),
    ]


def test_in_place_chain_without_names():
    conv = L.Convolution(L.Input(shape=dict(dim=[1, 1, 3, 3])), num_output=1, kernel_size=1)
    out = L.Dropout(L.ReLU(conv, in_place=True), in_place=True)
    net = out.to_proto()
    # ReLU1 and Dropout1 are counted names for the layers; both rewrite Convolution1.
    assert [(lay.name, list(lay.bottom), list(lay.top)) for lay in net.layer][2:] == [
        ("ReLU1", ["Convolution1"], ["Convolution1"]),
        ("Dropout1", ["Convolution1"], ["Convolution1"]),
    ]


def test_top_to_proto_is_the_single_output_net():
    top = L.InnerProduct(L.Input(shape=dict(dim=[2, 3])), num_output=4)
    assert top.to_proto() == to_proto(top)
    assert layer_names(top.to_proto()) == ["Input1", "InnerProduct1"]


def test_to_proto_of_several_tops_writes_shared_layers_once():
    data = L.Input(shape=dict(dim=[2, 3]))
    a, b = L.ReLU(data), L.TanH(data)
    assert layer_names(to_proto(a, b)) == ["Input1", "ReLU1", "TanH1"]
    assert layer_names(to_proto(b, a)) == ["Input1", "TanH1", "ReLU1"]


# -- field assignment ------------------------------------------------------------------------


def test_repeated_fields_from_scalars_or_lists():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.c1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1, stride=[2])
    n.c2 = L.Convolution(n.data, num_output=4, kernel_size=[3], pad=[1], stride=2)
    # Bare keywords and the explicit *_param dict fill the same message.
    n.c3 = L.Convolution(
        n.data, num_output=4, convolution_param=dict(kernel_size=3, pad=[1]), stride=2
    )
    net = n.to_proto()
    for layer in net.layer[1:]:
        assert str(layer.convolution_param) == "num_output: 4\npad: 1\nkernel_size: 3\nstride: 2\n"
    # A single dict for a repeated message field is a one-element list.
    assert L.Input(shape=[dict(dim=[1, 3, 8, 8])]).to_proto() == n.data.to_proto()


def test_repeated_kernel_size_pairs():
    top = L.Convolution(
        L.Input(shape=dict(dim=[1, 1, 9, 9])), num_output=2, kernel_size=[3, 5], dilation=2
    )
    param = top.to_proto().layer[1].convolution_param
    assert list(param.kernel_size) == [3, 5] and list(param.dilation) == [2]


def test_enums_by_constant_number_or_name():
    texts = set()
    for pool in (P.Pooling.AVE, 1, "AVE"):
        top = L.Pooling(L.Input(shape=dict(dim=[1, 1, 4, 4])), pool=pool, kernel_size=2)
        texts.add(str(top.to_proto().layer[1]))
    assert texts == {
        'name: "Pooling1"\ntype: "Pooling"\nbottom: "Input1"\ntop: "Pooling1"\n'
        "pooling_param {\n  pool: AVE\n  kernel_size: 2\n}\n"
    }
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX == 0
    assert P.Data.LMDB == caffe_pb2.DataParameter.LMDB == 1
    assert P.Eltwise.SUM == caffe_pb2.EltwiseParameter.SUM


def test_input_layers():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 224, 224]))
    assert str(n.to_proto()) == (
        'layer {\n  name: "data"\n  type: "Input"\n  top: "data"\n  input_param {\n'
        "    shape {\n      dim: 1\n      dim: 3\n      dim: 224\n      dim: 224\n    }\n"
        "  }\n}\n"
    )
    m = NetSpec()
    m.data, m.im_info = L.Input(shape=[dict(dim=[1, 3, 4, 4]), dict(dim=[1, 3])], ntop=2)
    layer = m.to_proto().layer[0]
    assert list(layer.top) == ["data", "im_info"]
    assert [list(s.dim) for s in layer.input_param.shape] == [[1, 3, 4, 4], [1, 3]]
    assert Net(m.to_proto(), "TEST").blob_shapes == {"data": (1, 3, 4, 4), "im_info": (1, 3)}


def test_keyword_name_overrides_the_derived_name():
    # Keywords are set after the derived name and tops, so name= wins (top stays "c").
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 2, 2]))
    n.c = L.Convolution(n.data, name="conv_custom", num_output=1, kernel_size=1)
    layer = n.to_proto().layer[1]
    assert layer.name == "conv_custom" and list(layer.top) == ["c"]


def test_empty_dict_leaves_the_message_out():
    top = L.Convolution(L.Input(shape=dict(dim=[1])), num_output=1, weight_filler=dict())
    param = top.to_proto().layer[1].convolution_param
    assert not param.HasField("weight_filler") and param.num_output == 1
    assert not L.ReLU(L.Input(shape=dict(dim=[1]))).to_proto().layer[1].HasField("relu_param")


def test_deconvolution_keywords_go_to_convolution_param():
    # Beyond pycaffe (where bare keywords fail here): the explicit form is pycaffe's way.
    data = L.Input(shape=dict(dim=[1, 2, 4, 4]))
    bare = L.Deconvolution(data, num_output=3, kernel_size=4, stride=2)
    explicit = L.Deconvolution(data, convolution_param=dict(num_output=3, kernel_size=4, stride=2))
    assert bare.to_proto().layer[1] == explicit.to_proto().layer[1]
    assert list(bare.to_proto().layer[1].convolution_param.kernel_size) == [4]


# -- pycaffe's python/caffe/test/test_net_spec.py, re-expressed --------------------------------


def pycaffe_lenet(batch_size):
    n = NetSpec()
    n.data, n.label = L.DummyData(
        shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
        transform_param=dict(scale=1.0 / 255),
        ntop=2,
    )
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(
        n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier")
    )
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def pycaffe_anon_lenet(batch_size):
    data, label = L.DummyData(
        shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
        transform_param=dict(scale=1.0 / 255),
        ntop=2,
    )
    conv1 = L.Convolution(data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    pool1 = L.Pooling(conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    conv2 = L.Convolution(pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    pool2 = L.Pooling(conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    ip1 = L.InnerProduct(pool2, num_output=500, weight_filler=dict(type="xavier"))
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10, weight_filler=dict(type="xavier"))
    loss = L.SoftmaxWithLoss(ip2, label)
    return loss.to_proto()


# Each shape dict adds one BlobShape; dims are printed one per line.
ANON_LENET = """\
layer {
  name: "DummyData1"
  type: "DummyData"
  top: "DummyData1"
  top: "DummyData2"
  transform_param {
    scale: 0.00392156886
  }
  dummy_data_param {
    shape {
      dim: 50
      dim: 1
      dim: 28
      dim: 28
    }
    shape {
      dim: 50
      dim: 1
      dim: 1
      dim: 1
    }
  }
}
layer {
  name: "Convolution1"
  type: "Convolution"
  bottom: "DummyData1"
  top: "Convolution1"
  convolution_param {
    num_output: 20
    kernel_size: 5
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "Pooling1"
  type: "Pooling"
  bottom: "Convolution1"
  top: "Pooling1"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "Convolution2"
  type: "Convolution"
  bottom: "Pooling1"
  top: "Convolution2"
  convolution_param {
    num_output: 50
    kernel_size: 5
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "Pooling2"
  type: "Pooling"
  bottom: "Convolution2"
  top: "Pooling2"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "InnerProduct1"
  type: "InnerProduct"
  bottom: "Pooling2"
  top: "InnerProduct1"
  inner_product_param {
    num_output: 500
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "ReLU1"
  type: "ReLU"
  bottom: "InnerProduct1"
  top: "InnerProduct1"
}
layer {
  name: "InnerProduct2"
  type: "InnerProduct"
  bottom: "InnerProduct1"
  top: "InnerProduct2"
  inner_product_param {
    num_output: 10
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "SoftmaxWithLoss1"
  type: "SoftmaxWithLoss"
  bottom: "InnerProduct2"
  bottom: "DummyData2"
  top: "SoftmaxWithLoss1"
}
"""


def test_pycaffe_lenet():
    named = pycaffe_lenet(50)
    assert named.layer[6].bottom == named.layer[6].top  # relu is in place
    assert layer_names(named) == [
        "data",
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "ip1",
        "relu1",
        "ip2",
        "loss",
    ]
    assert len(Net(named, "TEST").layer_names) == 9
    anon = pycaffe_anon_lenet(50)
    assert str(anon) == ANON_LENET
    assert anon.layer[6].bottom == anon.layer[6].top
    assert len(Net(anon, "TEST").layer_names) == 9


def silent_net():
    n = NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    return n.to_proto()


# A top-less layer is the Function itself; assigned to the NetSpec it takes that name.
# dim=3 is a scalar for a repeated field: one dim.
SILENT = """\
layer {
  name: "data"
  type: "DummyData"
  top: "data"
  top: "data2"
  dummy_data_param {
    shape {
      dim: 3
    }
  }
}
layer {
  name: "silence_data"
  type: "Silence"
  bottom: "data"
}
layer {
  name: "silence_data2"
  type: "Silence"
  bottom: "data2"
}
"""


def test_pycaffe_zero_tops():
    proto = silent_net()
    assert str(proto) == SILENT
    net = Net(proto, "TEST")
    assert len(net()) == 0


def test_pycaffe_type_error():
    data = L.DummyData(ntop=2)  # a tuple of two tops
    message = r"^Silence input 0 is not a Top \(type is <(type|class) 'tuple'>\)$"
    with pytest.raises(TypeError, match=message):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)


def test_zero_top_function_in_module_to_proto():
    # Beyond pycaffe (whose to_proto wants .fn): an unnamed top-less layer gets its own count.
    silence = L.Silence(L.Input(shape=dict(dim=[1])), ntop=0)
    assert isinstance(silence, net_spec.Function)
    assert [(lay.name, list(lay.top)) for lay in to_proto(silence).layer] == [
        ("Input1", ["Input1"]),
        ("Silence1", []),
    ]


# -- NetSpec as a container ------------------------------------------------------------------


def test_netspec_attribute_and_item_access():
    n = NetSpec()
    data = L.Input(shape=dict(dim=[1]))
    n.data = data
    n["relu"] = L.ReLU(n["data"])
    assert n.data is data and n["data"] is data and n.relu is n["relu"]
    assert n.keys() == ["data", "relu"]
    assert list(n.tops) == ["data", "relu"]  # pycaffe's public OrderedDict
    assert "relu" in n and "nope" not in n
    del n["relu"]
    assert n.keys() == ["data"]
    n.relu = L.ReLU(n.data)
    del n.relu
    assert layer_names(n.to_proto()) == ["data"]


def test_netspec_missing_name():
    n = NetSpec()
    with pytest.raises(KeyError):
        n.missing  # noqa: B018 (pycaffe raises KeyError)
    with pytest.raises(AttributeError):
        n["missing"]
    with pytest.raises(KeyError):
        del n["missing"]
    assert not hasattr(n, "missing") and getattr(n, "missing", 7) == 7


def test_netspec_copy_and_pickle():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.out = L.ReLU(n.data)
    assert copy.deepcopy(n).to_proto() == n.to_proto()
    assert pickle.loads(pickle.dumps(n)).to_proto() == n.to_proto()


def test_netspec_rejects_a_tuple_of_tops():
    n = NetSpec()
    n.pair = L.Slice(L.Input(shape=dict(dim=[2])), ntop=2)
    with pytest.raises(TypeError, match="several tops"):
        n.to_proto()


# -- errors and the schema map ---------------------------------------------------------------


def test_unknown_keyword_is_an_attribute_error():
    top = L.Convolution(L.Input(shape=dict(dim=[1])), num_output=1, kernel_sise=3)
    with pytest.raises(AttributeError, match="kernel_sise"):
        top.to_proto()
    top = L.Convolution(L.Input(shape=dict(dim=[1])), weight_filler=dict(tipe="xavier"))
    with pytest.raises(AttributeError, match="tipe"):
        top.to_proto()


def test_wrongly_shaped_values():
    with pytest.raises(TypeError, match="not a repeated field"):
        L.Convolution(L.Input(shape=dict(dim=[1])), num_output=[1, 2]).to_proto()
    with pytest.raises(TypeError, match="not a message field"):
        L.Convolution(L.Input(shape=dict(dim=[1])), num_output=dict(a=1)).to_proto()
    with pytest.raises(TypeError):  # a tuple is one value, as in pycaffe
        L.Convolution(L.Input(shape=dict(dim=[1])), kernel_size=(3, 3)).to_proto()


def test_param_name_dict_follows_the_schema():
    names = net_spec.param_name_dict()
    assert names["Convolution"] == "convolution"
    assert names["InnerProduct"] == "inner_product"
    assert names["HDF5Data"] == "hdf5_data"
    assert names["TanH"] == "tanh" and names["PReLU"] == "prelu" and names["LRN"] == "lrn"
    assert names["Input"] == "input" and names["Python"] == "python"
    # The map keys on message names, so transform_param's entry is "Transformation", and
    # types without a message of their own are absent.
    assert names["Transformation"] == "transform"
    assert "Deconvolution" not in names and "SoftmaxWithLoss" not in names


def test_params_and_layers_namespaces():
    with pytest.raises(AttributeError):
        P.NoSuchLayer.VALUE  # noqa: B018
    with pytest.raises(AttributeError):
        L.__wrapped__  # noqa: B018 (dunder lookups are not layer types)
    assert L.AnyType.__name__ == "AnyType"
    fn = L.Convolution(L.Input(shape=dict(dim=[1])), num_output=2, ntop=1, in_place=False).fn
    assert fn.type_name == "Convolution" and fn.params == {"num_output": 2}
    assert fn.ntop == 1 and fn.in_place is False and len(fn.inputs) == 1
