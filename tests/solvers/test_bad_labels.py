"""A label no class has, met while training or testing, is one error naming the layer, the
value and the record it came from (the layer knows the item, the feed the record)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import text_format

from caffe_alex.cli import main
from caffe_alex.data.datum import array_to_datum
from caffe_alex.data.db import open_db
from caffe_alex.errors import CaffeAlexError
from caffe_alex.proto import caffe_pb2
from caffe_alex.solvers import Solver


@pytest.fixture
def problem(tmp_path):
    with open_db(str(tmp_path / "db"), "lmdb", "new") as db:
        txn = db.transaction()
        for i in range(6):
            label = 2147483647 if i == 3 else i % 2
            txn.put(f"{i:08d}", array_to_datum(np.full((1, 2, 2), i, np.uint8), label)
                    .SerializeToString())  # fmt: skip
        txn.commit()
    net = tmp_path / "net.prototxt"
    net.write_text(
        f'layer {{ name: "d" type: "Data" top: "data" top: "label" data_param {{ source: '
        f'"{tmp_path}/db" backend: LMDB batch_size: 2 }} }}\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        "inner_product_param { num_output: 2 } }\n"
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }'
    )
    return tmp_path, net


def test_training_names_the_record_with_the_bad_label(problem):
    root, net = problem
    text = f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" max_iter: 3 solver_mode: CPU'
    param = text_format.Parse(text, caffe_pb2.SolverParameter())
    solver = Solver(param)
    solver.step(1)  # records 0 and 1
    with pytest.raises(CaffeAlexError) as info:
        solver.step(1)  # records 2 and 3: the second has label 2147483647
    message = str(info.value)
    # the label blob is float32, as Caffe's: 2147483647 arrives as 2147483648
    assert "layer 'loss' (SoftmaxWithLoss)" in message and "label 2147483648" in message
    assert f"record '00000003' of '{root}/db'" in message
    assert info.value.item == 1


def test_caffe_alex_test_names_the_record_too(problem, tmp_path):
    _, net = problem
    from caffe_alex.net import Net

    Net.from_prototxt(str(net), "TEST").save_weights(tmp_path / "w.caffemodel")
    weights = str(tmp_path / "w.caffemodel")
    args = ["test", "--model", str(net), "--weights", weights, "--iterations", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("caffe-alex: error:") and "record '00000003'" in last
