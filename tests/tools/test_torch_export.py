"""caffe-alex export --torch (tools/torch_export.py): the net as plain PyTorch source and a
state dict; the written module gives the net's outputs and runs where caffe-alex cannot be
imported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.net import Net
from caffe_alex.tools.torch_export import export_torch
from tests.paths import ROOT
from tests.reference import parse_net, randomize
from tests.test_devices import MIXED_NET, inputs

SHUFFLENET = ROOT / "tests/fork_nets/farmingyard__ShuffleNet/shufflenet_1x_g3_deploy.prototxt"


def _load(path):
    spec = importlib.util.spec_from_file_location(f"exported_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_written_module_gives_the_nets_outputs(tmp_path):
    net = Net(parse_net(MIXED_NET), "TEST")
    randomize(net, seed=2)
    written = export_torch(net, tmp_path / "mixed.py")
    assert written.outputs == net.output_names and written.inputs == ["data", "label"]
    module = _load(tmp_path / "mixed.py")
    model = module.Net()
    model.load_state_dict(torch.load(tmp_path / "mixed.pt"))
    batch = inputs()
    with torch.no_grad():
        want = net(**batch)
        got = model(batch["data"], batch["label"])
    assert list(got) == ["loss", "pool2", "prob"]
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert {n for n, _ in model.named_parameters()} >= {"conv1__0", "fc__0", "scale1__1"}


@pytest.mark.slow
def test_a_fork_net_round_trips_and_the_cli_writes_both_files(tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(SHUFFLENET), "--torch",
                                       str(tmp_path / "shuffle.py")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "shuffle.py").is_file() and (tmp_path / "shuffle.pt").is_file()
    bad = CliRunner().invoke(main, ["export", "--model", str(SHUFFLENET), "--torch",
                                    str(tmp_path / "shuffle.onnx")])  # fmt: skip
    assert bad.exit_code == 1 and "give a .py file" in bad.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_written_module_runs_without_caffe_alex(tmp_path):
    net = Net.from_prototxt(str(SHUFFLENET), "TEST")
    randomize(net, seed=3)
    export_torch(net, tmp_path / "shuffle.py")
    x = torch.randn(net.blob_shapes["data"])
    with torch.no_grad():
        want = net(data=x)
    torch.save((x, want), tmp_path / "case.pt")
    code = (
        "import sys; sys.modules['caffe_alex'] = sys.modules['caffe'] = None\n"
        "import torch, shuffle\n"
        "model = shuffle.Net(); model.load_state_dict(torch.load('shuffle.pt'))\n"
        "x, want = torch.load('case.pt')\n"
        "got = model(x)\n"
        "print(max(float((got[k] - want[k]).abs().max()) for k in want))\n"
    )
    # the same thread count as here: a convolution's sums are split by thread, so bit for bit
    # equality needs the same split
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) == 0.0
