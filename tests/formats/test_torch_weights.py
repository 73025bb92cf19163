""".pt and .safetensors files with hostile contents: every field read from the file is checked,
each problem is one line naming the file, and no file is ever unpickled beyond tensors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.weights import read_weights

TENSORS = {"layers.ip.blobs.0": torch.ones(4, 3), "layers.ip.blobs.1": torch.ones(4)}
BLOBS = {"layers.ip.blobs.0": ["ip", 0], "layers.ip.blobs.1": ["ip", 1]}


def one_clean_line(text: str) -> None:
    assert "\n" not in text and " at 0x" not in text and "weights_only" not in text, text


def write(tmp_path, ext: str, tensors=TENSORS, **meta) -> str:
    """A weights file of this extension holding ``tensors`` and ``meta`` as our writer lays
    them out (.safetensors: metadata strings, JSON for all but caffe_net; .pt: beside the
    state dict)."""
    path = str(tmp_path / f"w.{ext}")
    if ext == "safetensors":
        text = {k: v if isinstance(v, str) and k == "caffe_net" else json.dumps(v)
                for k, v in meta.items()}  # fmt: skip
        save_file(tensors, path, metadata=text)
    else:
        torch.save({"state_dict": tensors, **meta} if meta else tensors, path)
    return path


HOSTILE = [  # (metadata, what the error says)
    ({"caffe_blobs": [1, 2]}, "metadata 'caffe_blobs' is not a map"),
    ({"caffe_blobs": "x"}, "metadata 'caffe_blobs' is not a map"),
    ({"caffe_blobs": {**BLOBS, "layers.x.blobs.0": ["x", 0]}},
     "names tensor 'layers.x.blobs.0', which the file does not hold"),
    ({"caffe_blobs": {"layers.ip.blobs.0": ["ip", 10**12]}}, "blob index 1000000000000 is out"),
    ({"caffe_blobs": {"layers.ip.blobs.0": ["ip", -3]}}, "blob index -3 is out of range"),
    ({"caffe_blobs": {"layers.ip.blobs.0": ["ip", True]}}, "not [layer name, blob index]"),
    ({"caffe_blobs": {"layers.ip.blobs.0": ["ip"]}}, "not [layer name, blob index]"),
    ({"caffe_blobs": {"layers.ip.blobs.0": [3, 0]}}, "not [layer name, blob index]"),
    ({"caffe_blobs": BLOBS, "caffe_shared": [1]}, "'caffe_shared' is not a map of tensor"),
    ({"caffe_blobs": BLOBS, "caffe_shared": {"a": 3}}, "'caffe_shared' is not a map of tensor"),
    ({"caffe_blobs": BLOBS, "caffe_net": "layer { name: "}, "'caffe_net' is not a net defin"),
    ({"caffe_blobs": BLOBS, "caffe_net": "layer { blobs { x: 1 } }"}, "is not a net definition"),
]  # fmt: skip


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
@pytest.mark.parametrize(("meta", "reason"), HOSTILE)
def test_hostile_metadata_is_one_line_naming_the_file(tmp_path, ext, meta, reason):
    path = write(tmp_path, ext, **meta)
    with pytest.raises(CaffeAlexError) as info:
        read_weights(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)
    one_clean_line(str(info.value))


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda p: p.write_text('{"caffe_blobs"'), None),  # not even a safetensors header
        (lambda p: save_file(TENSORS, str(p), metadata={"caffe_blobs": "{"}),
         "metadata 'caffe_blobs' is not JSON"),
        (lambda p: save_file(TENSORS, str(p), metadata={"caffe_shared": "[1,"}),
         "metadata 'caffe_shared' is not JSON"),
    ],
)  # fmt: skip
def test_safetensors_metadata_that_is_not_json(tmp_path, build, reason):
    path = tmp_path / "w.safetensors"
    build(path)
    with pytest.raises(CaffeAlexError) as info:
        read_weights(path)
    assert str(info.value).startswith(f"{path}: ")
    assert reason is None or reason in str(info.value)
    one_clean_line(str(info.value))


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({1: torch.ones(1)}, "not a state dict of tensors"),
        ({"layers.ip.blobs.0": [1.0]}, "not a state dict of tensors"),
        ({"fc.weight": torch.ones(2)}, "no tensor is named as a net's parameters"),
        ({"layers.ip.blobs.99999999999999": torch.ones(1)}, "blob index 99999999999999 is out"),
        ({"layers.ip.blobs.0": torch.ones(2, dtype=torch.complex64)}, "is complex"),
        ({"layers.ip.blobs.0": torch.eye(2).to_sparse()}, "is sparse_coo"),
        ({"layers.ip.blobs.0": torch.ones(2, device="meta")}, "has no readable data"),
        ({"state_dict": TENSORS, "caffe_blobs": BLOBS, "caffe_net": 5}, "'caffe_net' is not text"),
        (torch.ones(3), "not a state dict of tensors"),
    ],
)  # fmt: skip
def test_pt_contents_are_checked(tmp_path, obj, reason):
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with pytest.raises(CaffeAlexError, match=f"^{path}: .*{reason}"):
        read_weights(path)


def test_indices_cannot_make_the_reader_allocate_without_bound(tmp_path):
    # 70 layers each naming blob 1000: 70,000 blobs said to be stored elsewhere
    tensors = {f"t{i}": torch.ones(1) for i in range(70)}
    path = write(tmp_path, "safetensors", tensors,
                 caffe_blobs={f"t{i}": [f"l{i}", 1000] for i in range(70)})  # fmt: skip
    with pytest.raises(CaffeAlexError, match="leave 70000 blobs out"):
        read_weights(path)


class _Runs:  # what a malicious pickle would call
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("content", "why"),
    [
        (pickle.dumps({"state_dict": {}, "x": _Runs()}, protocol=2),
         "it needs the Python object print"),
        (pickle.dumps(np.ones(2), protocol=2), "it needs the Python object numpy"),
        (pickle.dumps(np.ones(2), protocol=4), "it is not an archive of tensors"),
        (b"\x80\x02" + bytes(40), "it is not an archive of tensors"),
    ],
    ids=["global", "numpy", "protocol-4", "junk"],
)  # fmt: skip
def test_unsafe_pt_is_refused_in_one_line_without_advice(tmp_path, content, why, capfd):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(CaffeAlexError) as info:
        read_weights(path)
    text = str(info.value)
    assert text.startswith(f"{path}: not a weights file caffe-alex can read safely ({why}")
    one_clean_line(text)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("caffe-alex: error: ") and "Traceback" not in result.output
    assert "ran" not in capfd.readouterr().out


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_half_precision_tensors_load_as_float32(tmp_path, ext):
    tensors = {k: v.to(torch.bfloat16) for k, v in TENSORS.items()}
    ws = read_weights(write(tmp_path, ext, tensors, caffe_blobs=BLOBS))
    (layer,) = ws.layers
    assert [b.data.dtype for b in layer.blobs] == [np.float32, np.float32]
    assert [b.shape for b in layer.blobs] == [(4, 3), (4,)]
