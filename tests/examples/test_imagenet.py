"""examples/imagenet: the scripts build AlexNet's LMDBs and mean from an ILSVRC-style folder,
and models/bvlc_alexnet's own net definitions train from them (shrunk to batch 2, 1 iteration).

The images are made here: 3 synsets, JPEGs of assorted sizes, lists in Caffe's train.txt /
val.txt format.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from caffe_alex.data.datum import datum_to_array, parse_datum
from caffe_alex.data.db import open_db
from caffe_alex.formats.caffemodel import read_binaryproto
from tests.paths import ROOT

pytestmark = pytest.mark.subprocess  # the example's bash scripts

SCRIPTS = ROOT / "examples" / "imagenet"
CLI = f"{sys.executable} -m caffe_alex"


def _fake_ilsvrc(root, per_class: dict[str, int]) -> dict[str, str]:
    rng = np.random.default_rng(0)
    lists = {}
    for split, count in per_class.items():
        lines = []
        for label, synset in enumerate(["n01440764", "n01443537", "n01484850"]):
            (root / split / synset).mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(200, 330, size=2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                name = f"{synset}/{synset}_{i}.JPEG"
                Image.fromarray(pixels).save(root / split / name, format="JPEG")
                lines.append(f"{name} {label}")
        lists[split] = "\n".join(lines) + "\n"
        (root / "labels").mkdir(exist_ok=True)
        (root / "labels" / f"{split}.txt").write_text(lists[split])
    return lists


def _run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture
def built(tmp_path):
    _fake_ilsvrc(tmp_path, {"train": 4, "val": 2})
    work = tmp_path / "work"
    work.mkdir()
    env = {
        "TRAIN_DATA_ROOT": f"{tmp_path}/train/",
        "VAL_DATA_ROOT": f"{tmp_path}/val/",
        "LABELS": str(tmp_path / "labels"),
        "WORKDIR": str(work),
        "CAFFE_ALEX": CLI,
    }
    done = _run("create_imagenet.sh", env)
    assert done.returncode == 0, done.stderr
    return work, env


def test_create_imagenet_builds_the_lmdbs_and_mean(built):
    work, _ = built
    for name, count in (("train", 12), ("val", 6)):
        with open_db(str(work / f"examples/imagenet/ilsvrc12_{name}_lmdb"), "lmdb") as db:
            records = list(db)
        assert len(records) == count
        labels = sorted(parse_datum(v).label for _, v in records)
        assert labels == sorted([0, 1, 2] * (count // 3))
        assert datum_to_array(parse_datum(records[0][1])).shape == (3, 256, 256)
    mean = read_binaryproto(work / "data/ilsvrc12/imagenet_mean.binaryproto")
    assert mean.shape == (1, 3, 256, 256) and 60 < mean.mean() < 200


def test_alexnet_definitions_train_from_them(built):
    work, env = built
    # BVLC's files, shrunk: batch 2, one iteration, one test batch, no snapshot
    shutil.copytree(ROOT / "models" / "bvlc_alexnet", work / "models" / "bvlc_alexnet")
    net = work / "models/bvlc_alexnet/train_val.prototxt"
    net.write_text(re.sub(r"batch_size: \d+", "batch_size: 2", net.read_text()))
    solver = work / "models/bvlc_alexnet/solver.prototxt"
    text = solver.read_text()
    for field, value in (("test_iter", 1), ("max_iter", 1), ("snapshot", 0), ("display", 1)):
        text = re.sub(rf"^{field}: \d+", f"{field}: {value}", text, flags=re.M)
    solver.write_text(text.replace("solver_mode: GPU", "solver_mode: CPU"))
    done = _run("train_alexnet.sh", env, "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Iteration 0 (" in done.stderr and "Optimization Done." in done.stderr
    assert "Test net output #0: accuracy = " in done.stderr


def test_missing_inputs_are_one_line(tmp_path):
    missing = {"TRAIN_DATA_ROOT": f"{tmp_path}/nope/", "VAL_DATA_ROOT": str(tmp_path),
               "LABELS": str(tmp_path)}  # fmt: skip
    done = _run("create_imagenet.sh", missing)
    assert done.returncode == 1
    assert done.stderr.strip() == f"create_imagenet.sh: no such folder: {tmp_path}/nope/"
