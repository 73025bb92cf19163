"""``caffe-alex summary`` and ``caffe-alex draw`` on every fork net: the public prototxts in
tests/fork_nets/ (the folder is enumerated, so new files are covered) and the corpus files that
only a fork reads (MobileNet-SSD, DenseNet's ceil_mode, Faster R-CNN's training net with its
Python layers on sys.path)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.formats.prototxt import read_net
from tests.corpus import CORPUS
from tests.paths import ROOT
from tests.test_corpus_build import CORPUS_LAYERS, _guessed_source_shapes
from tests.test_fork_nets_segmentation import source_shapes

FORK_NETS = ROOT / "tests" / "fork_nets"
CORPUS_FORK_NETS = [
    "chuanqi305__MobileNet-SSD/deploy.prototxt",
    "shicai__DenseNet-Caffe/DenseNet_121.prototxt",
    "rbgirshick__py-faster-rcnn/models/pascal_voc/VGG16/faster_rcnn_end2end/train.prototxt",
]


def fork_nets() -> list[Path]:
    found = sorted(p for p in FORK_NETS.rglob("*") if p.suffix in (".prototxt", ".pt"))
    return found + [CORPUS / path for path in CORPUS_FORK_NETS if (CORPUS / path).is_file()]


def _name(path: Path) -> str:
    if path.is_relative_to(CORPUS):
        return f"corpus/{path.relative_to(CORPUS)}"
    return str(path.relative_to(FORK_NETS))


def _phases(net_param) -> list[str]:
    """The phases the file's include rules name, or summary's default (TEST) when none."""
    named = {rule.phase for layer in net_param.layer for rule in layer.include
             if rule.HasField("phase")}  # fmt: skip
    return [("TRAIN", "TEST")[phase] for phase in sorted(named)] or ["TEST"]


def _shape_options(net_param) -> list[str]:
    shapes = _guessed_source_shapes(net_param)
    for layer in net_param.layer:  # SSD's AnnotatedData: resized images, one row per box
        if layer.type == "AnnotatedData":
            resize = layer.transform_param.resize_param
            batch = layer.data_param.batch_size or 1
            shapes[layer.top[0]] = (batch, 3, resize.height or 300, resize.width or 300)
            shapes.update({top: (1, 1, 1, 8) for top in layer.top[1:]})
    options = []
    shapes |= source_shapes(net_param)
    for top, shape in shapes.items():
        options += ["--input-shape", f"{top}={','.join(map(str, shape))}"]
    return options


@pytest.mark.slow
@pytest.mark.parametrize("path", fork_nets(), ids=_name)
def test_fork_net_summarises_and_draws(path, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(CORPUS_LAYERS))  # py-faster-rcnn's Python layers
    net_param, _ = read_net(str(path))
    runner = CliRunner()
    for phase in _phases(net_param):
        result = runner.invoke(main, ["summary", str(path), "--phase", phase,
                                      *_shape_options(net_param)])  # fmt: skip
        assert result.exit_code == 0, f"{phase}: {result.output}"
        assert "Total parameters:" in result.stdout
        listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
        kept = [lp.name for lp in net_param.layer if _in_phase(lp, phase)]
        assert set(kept) <= listed, f"{phase}: layers missing from the summary"
    png = tmp_path / "net.png"
    result = runner.invoke(main, ["draw", str(path), str(png)])
    assert result.exit_code == 0, result.output
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 100 and height > 100


def _in_phase(layer, phase: str) -> bool:
    wanted = {"TRAIN": 0, "TEST": 1}[phase]
    if any(rule.HasField("phase") and rule.phase != wanted for rule in layer.include):
        return False
    return not any(rule.HasField("phase") and rule.phase == wanted for rule in layer.exclude)
