"""The command line: help, upgrade of legacy nets and solvers, errors as one line."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from google.protobuf import text_format

from caffe_alex.cli import main
from caffe_alex.layers import layer_types
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.corpus import CORPUS

V1_NET = """name: "legacy"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers {
  name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 4 kernel_size: 3 }
}
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
"""


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_the_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("upgrade", "time", "layers"):
        assert command in result.output


def test_layers_lists_registered_types_with_their_family():
    lines = run("layers").output.splitlines()
    assert [line.split()[0] for line in lines] == layer_types()
    rows = dict(line.split() for line in lines)
    assert rows["Convolution"] == "conv" and rows["LRN"] == "lrn" and rows["ReLU"] == "activations"


def test_upgrade_v1_net_writes_current_format(tmp_path):
    source, target = tmp_path / "old.prototxt", tmp_path / "new.prototxt"
    source.write_text(V1_NET)
    result = run("upgrade", str(source), str(target))
    assert result.exit_code == 0, result.output
    assert "deprecated V1LayerParameter" in result.output
    text = target.read_text()
    assert "layers {" not in text and "input_dim" not in text
    assert "lr_mult: 2\n" in text and "decay_mult: 0\n" in text  # Caffe's number style
    upgraded = text_format.Parse(text, caffe_pb2.NetParameter())
    assert [layer.type for layer in upgraded.layer] == ["Input", "Convolution", "ReLU"]
    net = Net.from_prototxt(str(target))
    assert net.blob_shapes["conv"] == (1, 4, 6, 6)


def test_upgrade_legacy_solver_enum(tmp_path):
    source, target = tmp_path / "solver.prototxt", tmp_path / "new.prototxt"
    source.write_text('net: "n.prototxt"\nbase_lr: 0.01\nsolver_type: NESTEROV\n')
    assert run("upgrade", str(source), str(target)).exit_code == 0
    solver = text_format.Parse(target.read_text(), caffe_pb2.SolverParameter())
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")


@pytest.mark.corpus
def test_upgrade_of_every_legacy_corpus_net(tmp_path):
    # nets only: like Caffe's upgrade_solver_proto_text, a solver's inline net is left alone
    legacy = [
        p
        for p in sorted(CORPUS.rglob("*.prototxt"))
        if "layers {" in p.read_text() and "net_param" not in p.read_text()
    ]
    assert len(legacy) >= 5
    for path in legacy:
        result = run("upgrade", str(path), str(tmp_path / "out.prototxt"))
        if result.exit_code != 0:  # only the file mixing `layer` and `layers` is refused
            assert "both 'layer' and" in result.output, result.output
            continue
        assert "layers {" not in (tmp_path / "out.prototxt").read_text()


def test_upgrade_errors_are_one_line_and_write_nothing(tmp_path):
    target = tmp_path / "new.prototxt"
    result = run("upgrade", str(tmp_path / "missing.prototxt"), str(target))
    assert result.exit_code != 0 and "missing.prototxt" in result.output
    assert "Traceback" not in result.output
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "x" type: "ReLU" bottom: }\n')
    result = run("upgrade", str(bad), str(target))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"caffe-alex: error: {bad}:1:")
    assert not target.exists()


def test_unwritable_destination_and_folders_are_one_line(tmp_path):
    source = tmp_path / "old.prototxt"
    source.write_text(V1_NET)
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("upgrade", str(source), str(blocker / "new.prototxt"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"caffe-alex: error: cannot write {blocker / 'new.prototxt'}: Not a directory"
    )
    result = run("time", "--model", str(tmp_path))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"caffe-alex: error: is a folder, not a file: {tmp_path}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "old.prototxt"]


def test_upgrade_reports_the_solver_problem_not_a_net_parse_error(tmp_path):
    source = tmp_path / "solver.prototxt"
    source.write_text('net: "n.prototxt"\nsolver_type: ADAM\ntype: "SGD"\n')
    result = run("upgrade", str(source), str(tmp_path / "out.prototxt"))
    assert result.exit_code == 1
    assert "sets both the legacy 'solver_type' (enum) and 'type' (string)" in result.output


# -- one error form over every command ---------------------------------------------------------
# Each command given a file that is not there: the README's promise, one line
# "caffe-alex: error: ..." on stderr and exit code 1. A new command must add its row.
MISSING = "missing.prototxt"
BAD_INPUT = {
    "train": ["--solver", MISSING],
    "test": ["--model", MISSING, "--weights", "w.caffemodel"],
    "plot-log": ["missing.log", "curves.png"],
    "time": ["--model", MISSING],
    "upgrade": [MISSING, "new.prototxt"],
    "convert": ["missing.caffemodel", "w.pt"],
    "inspect": ["missing.caffemodel"],
    "export": ["--model", MISSING, "--weights", "w.caffemodel", "net.onnx"],
    "convert-imageset": ["images/", "missing.txt", "out_lmdb"],
    "convert-mnist": ["missing-images", "missing-labels", "out_lmdb"],
    "compute-image-mean": ["missing_lmdb", "mean.binaryproto"],
    "db-info": ["missing_lmdb"],
    "convert-annoset": ["images/", "missing.txt", "out_lmdb"],
    "draw": [MISSING, "net.png"],
    "summary": [MISSING],
    "deploy": ["--model", MISSING, "--weights", "w.caffemodel", "cat.jpg"],
    "extract-features": ["--model", MISSING, "--weights", "w.caffemodel", "--blobs", "fc7",
                         "--out", "f.npy", "--source", "cat.jpg"],
    "compare": ["--model", MISSING, "--weights", "w.caffemodel", "cat.jpg"],
}  # fmt: skip
NO_INPUT = {"layers"}  # reads nothing: no error path to reach


def test_every_command_has_a_bad_input_case():
    from caffe_alex.cli import COMMANDS

    assert set(BAD_INPUT) | NO_INPUT == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_every_command_reports_a_missing_file_in_one_line(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [command, *BAD_INPUT[command]])
    assert result.exit_code == 1, result.output
    assert result.stdout == "" or command in ("draw", "deploy"), result.stdout
    *logged, last = result.stderr.splitlines()  # Caffe's log lines may come first ("Use CPU.")
    assert last.startswith("caffe-alex: error: ") and "missing" in last, result.stderr
    assert all(re.match(r"[IWEF]\d{4} ", line) for line in logged), result.stderr


def test_a_malformed_command_line_is_clicks_usage_error():
    result = CliRunner().invoke(main, ["summary"])
    assert result.exit_code == 2 and "Missing argument 'NET'" in result.stderr
