"""Seeded, generated hostile inputs for every input family, and the rules their outcomes obey.

A case writes its inputs into a fresh folder, runs one `caffe-alex` command on them, and is
judged by the class of what happened:

- ``ok``: exit 0;
- ``error``: exit 1 with exactly one ``caffe-alex: error: ...`` line and no traceback;
- ``usage``: click refused the arguments (exit 2), which only a broken case should cause;
- ``traceback``: any other exception, or a traceback in the output;
- ``crash``: the process died by a signal (cases that may crash run in a subprocess);
- ``hang``: it ran past its time limit.

Every case expects ``error`` (the input is one Caffe refuses) or ``any`` (``ok`` or ``error``:
a mutation that may still leave a valid file); ``traceback``, ``crash``, ``hang`` and ``usage``
always fail. Files a case marks as protected (an existing destination) must be byte-identical
afterwards. The same seed always gives the same cases, so a failure can be repeated.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ALEXNET = (ROOT / "models" / "bvlc_alexnet" / "train_val.prototxt").read_text()
SOLVER = (ROOT / "models" / "bvlc_alexnet" / "solver.prototxt").read_text()
# no phase rules: a mutation anywhere in it is in the net that gets built
DEPLOY = (ROOT / "models" / "bvlc_alexnet" / "deploy.prototxt").read_text()
ALEX_SHAPES = ["--input-shape", "data=2,3,227,227", "--input-shape", "label=2"]

SMALL_NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 3 } }
"""  # noqa: E501


@dataclass
class Case:
    family: str
    name: str
    setup: Callable[[Path], list[str]]  # writes the inputs; returns the CLI arguments
    expect: str = "any"  # "error" or "any"
    isolate: bool = False  # run in a subprocess: the case may crash the process
    protect: list[str] = field(default_factory=list)  # files that must stay unchanged
    timeout: float = 60.0


@dataclass
class Outcome:
    kind: str
    detail: str = ""


# -- running and judging ------------------------------------------------------------------
def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _classify(code: int | None, stderr: str, exception: BaseException | None) -> Outcome:
    lines = [line for line in stderr.splitlines() if line.startswith("caffe-alex: error:")]
    if "Traceback (most recent call last)" in stderr:
        return Outcome("traceback", stderr.strip().splitlines()[-1][:300])
    if exception is not None and not isinstance(exception, SystemExit):
        return Outcome("traceback", f"{type(exception).__name__}: {exception}"[:300])
    if code == 0:
        return Outcome("ok")
    if code == 1 and len(lines) == 1:
        return Outcome("error", lines[0][:300])
    if code == 2:
        return Outcome("usage", stderr.strip()[-300:])
    return Outcome("traceback", f"exit {code}: {stderr.strip()[-300:]}")


def run_in_process(args: list[str], cwd: Path) -> Outcome:
    from click.testing import CliRunner

    from caffe_alex.cli import main

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    finally:
        os.chdir(previous)
    return _classify(result.exit_code, result.stderr, result.exception)


MEMORY_LIMIT = 6 << 30  # a runaway allocation becomes a MemoryError, not a machine out of memory


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_in_subprocess(args: list[str], cwd: Path, timeout: float) -> Outcome:
    try:
        done = subprocess.run([sys.executable, "-m", "caffe_alex", *args], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limit_memory)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Outcome("hang", f"over {timeout:.0f} s")
    if done.returncode < 0:
        return Outcome("crash", f"signal {-done.returncode}")
    return _classify(done.returncode, done.stderr, None)


def run_case(case: Case, folder: Path) -> tuple[Outcome, bool]:
    """The outcome, and whether it is what the case allows (protected files included)."""
    folder.mkdir(parents=True, exist_ok=True)
    args = case.setup(folder)
    before = {name: _digest(folder / name) for name in case.protect}
    if case.isolate:
        outcome = run_in_subprocess(args, folder, case.timeout)
    else:
        outcome = run_in_process(args, folder)
    damaged = [name for name, digest in before.items() if _digest(folder / name) != digest]
    if damaged:
        return Outcome("damaged", f"{damaged} changed ({outcome.kind}: {outcome.detail})"), False
    allowed = {"error"} if case.expect == "error" else {"ok", "error"}
    return outcome, outcome.kind in allowed


# -- mutations ------------------------------------------------------------------------------
def flip_bytes(data: bytes, rng: random.Random, count: int = 3) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, max(2, len(data) - 1))]


EXTREME = ["4294967295", "2147483648", "-1", "-2147483649", "1099511627776", "0",
           "1e40", "-1e40", "nan", "inf", "99999999999999999999999"]  # fmt: skip


def replace_number(text: str, rng: random.Random) -> str:
    spots = [m for m in re.finditer(r"(?<=: )-?\d+(\.\d+)?", text)]
    spot = rng.choice(spots)
    return text[: spot.start()] + rng.choice(EXTREME) + text[spot.end() :]


def replace_enum(text: str, rng: random.Random) -> str:
    spots = [m for m in re.finditer(r"(?<=: )[A-Z][A-Z_]+\b", text)]
    spot = rng.choice(spots)
    bogus = rng.choice(["BOGUS", "max", "", "7", "LMDBX"])
    return text[: spot.start()] + bogus + text[spot.end() :]


def rename_blob(text: str, rng: random.Random) -> str:
    spots = [m for m in re.finditer(r'bottom: "([^"]+)"', text)]
    spot = rng.choice(spots)
    return text[: spot.start(1)] + "nowhere" + text[spot.end(1) :]


def duplicate_top(text: str, rng: random.Random) -> str:
    spots = [m for m in re.finditer(r'top: "([^"]+)"', text)]
    spot = rng.choice(spots)
    return text[: spot.end()] + f' top: "{spot.group(1)}"' + text[spot.end() :]


# -- families -------------------------------------------------------------------------------
def _writer(name: str, data: bytes | str, args: list[str]):
    def setup(folder: Path) -> list[str]:
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
        return args

    return setup


def prototxt_cases(rng: random.Random, n: int) -> list[Case]:
    cases = []
    summary = ["summary", "net.prototxt", "--phase", "TRAIN", *ALEX_SHAPES]
    kinds = [
        ("truncated", lambda: truncate(ALEXNET.encode(), rng), "any"),
        ("byte-flip", lambda: flip_bytes(ALEXNET.encode(), rng), "any"),
        ("number", lambda: replace_number(ALEXNET, rng), "any"),
        ("enum", lambda: replace_enum(ALEXNET, rng), "error"),
        ("missing-bottom", lambda: rename_blob(DEPLOY, rng), "error"),
        ("duplicate-top", lambda: duplicate_top(DEPLOY, rng), "error"),
        ("unknown-type", lambda: ALEXNET.replace('type: "LRN"', 'type: "Nope"', 1), "error"),
        ("deep-nesting", lambda: "layer { " * 2000 + "}" * 2000, "error"),
        ("non-utf8", lambda: ALEXNET.encode()[:500] + b"\xff\xfe\x80" + ALEXNET.encode()[500:],
         "any"),
        ("empty", lambda: b"", "any"),
        ("binary-garbage", lambda: bytes(rng.randrange(256) for _ in range(2000)), "error"),
        ("huge-dim", lambda: SMALL_NET.replace("dim: 8 dim: 8", "dim: 1099511627776 dim: 8"),
         "error"),
        ("negative-dim", lambda: SMALL_NET.replace("dim: 8 dim: 8", "dim: -8 dim: 8"), "error"),
        ("huge-kernel", lambda: SMALL_NET.replace("kernel_size: 3", "kernel_size: 4294967295"),
         "error"),
        ("huge-outputs", lambda: SMALL_NET.replace("num_output: 3", "num_output: 2000000000"),
         "error"),
    ]  # fmt: skip
    for i in range(n):
        kind, make, expect = kinds[i % len(kinds)]
        data = make()
        plain = "dim" in kind or "huge" in kind or kind in ("missing-bottom", "duplicate-top")
        args = ["summary", "net.prototxt"] if plain else summary
        cases.append(Case("prototxt", f"{kind}-{i}", _writer("net.prototxt", data, args), expect))
    return cases


def solver_cases(rng: random.Random, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        kind = ["number", "enum", "truncated", "byte-flip"][i % 4]
        if kind == "number":
            text = replace_number(SOLVER, rng)
        elif kind == "enum":
            text = SOLVER.replace("solver_mode: GPU", f"solver_mode: {rng.choice(['X', '9', ''])}")
        elif kind == "truncated":
            text = truncate(SOLVER.encode(), rng)
        else:
            text = flip_bytes(SOLVER.encode(), rng)
        expect = "error" if kind == "enum" else "any"
        args = ["upgrade", "solver.prototxt", "out.prototxt"]
        cases.append(Case("solver", f"{kind}-{i}", _writer("solver.prototxt", text, args), expect))
    return cases


def _small_weights(folder: Path, name: str) -> None:
    from caffe_alex.net import Net
    from tests.reference import parse_net

    Net(parse_net(SMALL_NET)).save_weights(folder / name)


def caffemodel_cases(rng: random.Random, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        kind = ["truncated", "byte-flip", "varint", "swapped-shape", "to-pt"][i % 5]
        seed = rng.randrange(1 << 30)

        def setup(folder: Path, kind=kind, seed=seed) -> list[str]:
            local = random.Random(seed)
            _small_weights(folder, "w.caffemodel")
            data = (folder / "w.caffemodel").read_bytes()
            if kind == "truncated":
                data = truncate(data, local)
            elif kind in ("byte-flip", "to-pt"):
                data = flip_bytes(data, local, 5)
            elif kind == "varint":
                spot = local.randrange(len(data) - 12)
                data = data[:spot] + b"\xff" * 11 + data[spot + 11 :]
            else:  # a net whose conv has another shape: the loader must name both shapes
                (folder / "net.prototxt").write_text(SMALL_NET.replace("num_output: 4",
                                                                       "num_output: 5"))
                return ["convert", "w.caffemodel", "out.caffemodel", "--model", "net.prototxt"]
            (folder / "w.caffemodel").write_bytes(data)
            if kind == "to-pt":
                return ["convert", "w.caffemodel", "out.pt"]
            return ["inspect", "w.caffemodel"]

        expect = "error" if kind in ("truncated", "swapped-shape") else "any"
        cases.append(Case("caffemodel", f"{kind}-{i}", setup, expect))
    return cases


def _torch_file(folder: Path, meta: dict, name: str = "w.pt") -> None:
    import torch

    tensors = {"layers.conv.blobs.0": torch.zeros(4, 3, 3, 3)}
    torch.save({"state_dict": tensors, **meta}, folder / name)


def _safetensors_file(folder: Path, meta: dict) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"layers.conv.blobs.0": torch.zeros(4, 3, 3, 3)}, str(folder / "w.safetensors"),
              metadata=meta)  # fmt: skip


HOSTILE_META = [
    {"caffe_blobs": "not json"},
    {"caffe_blobs": "[1, 2, 3]"},
    {"caffe_blobs": '{"layers.nothere.blobs.0": ["conv", 0]}'},
    {"caffe_blobs": '{"layers.conv.blobs.0": ["conv", 99999999999]}'},
    {"caffe_blobs": '{"layers.conv.blobs.0": ["conv", -3]}'},
    {"caffe_blobs": '{"layers.conv.blobs.0": "conv"}'},
    {"caffe_shared": '{"a": "b"}'},
    {"caffe_net": "layer { name: "},
    {"caffe_net": "\x00\x01"},
]


def torch_weights_cases(rng: random.Random, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        meta = HOSTILE_META[i % len(HOSTILE_META)]
        kind = "pt" if i % 2 == 0 else "safetensors"

        def setup(folder: Path, meta=meta, kind=kind) -> list[str]:
            if kind == "pt":
                as_objects = {k: (v if k != "caffe_net" else v) for k, v in meta.items()}
                _torch_file(folder, as_objects)
                return ["inspect", "w.pt"]
            _safetensors_file(folder, {k: v for k, v in meta.items()})
            return ["inspect", "w.safetensors"]

        cases.append(Case("torch-weights", f"{kind}-{i}", setup, "any", isolate=True))
    cases.append(Case("torch-weights", "pickle-object", _writer(
        "w.pt", b"cos\nsystem\n(S'echo pwned > pwned.txt'\ntR.", ["inspect", "w.pt"]), "error",
        isolate=True))  # fmt: skip
    return cases


def hdf5_cases(rng: random.Random, n: int) -> list[Case]:
    import h5py

    layouts = [
        lambda f: f.create_group("data").create_group("conv").create_dataset("0", data="text"),
        lambda f: f.create_group("data").create_group("conv").create_dataset("x", data=[1.0]),
        lambda f: f.create_group("data").create_group("conv").create_dataset("99999999",
                                                                             data=[1.0]),
        lambda f: f.create_dataset("data", data=[1, 2, 3]),
        lambda f: f.create_group("nodata"),
        lambda f: f.create_group("data").create_dataset("conv", data=[1.0]),
    ]  # fmt: skip
    cases = []
    for i in range(n):
        layout = layouts[i % len(layouts)]

        def setup(folder: Path, layout=layout) -> list[str]:
            with h5py.File(folder / "w.caffemodel.h5", "w") as f:
                layout(f)
            return ["inspect", "w.caffemodel.h5"]

        cases.append(Case("hdf5-weights", f"layout-{i}", setup, "any", isolate=True))
    return cases


def _datum(array: np.ndarray, label: int) -> bytes:
    from caffe_alex.data.datum import array_to_datum

    return array_to_datum(array, label).SerializeToString()


def lmdb_cases(rng: random.Random, n: int) -> list[Case]:
    cases = []
    kinds = ["bad-datum", "mixed-shapes", "truncated-db", "huge-label", "empty-value"]
    for i in range(n):
        kind = kinds[i % len(kinds)]

        def setup(folder: Path, kind=kind) -> list[str]:
            from caffe_alex.data.db import open_db

            with open_db(str(folder / "db"), "lmdb", "new") as db:
                txn = db.transaction()
                for k in range(6):
                    # records of several pages each, so that truncation cuts into them
                    shape = (3, 40, 40) if kind != "mixed-shapes" or k < 3 else (3, 41, 40)
                    value = _datum(np.full(shape, k, np.uint8), 2147483647 if kind == "huge-label"
                                   else k % 2)  # fmt: skip
                    if kind == "bad-datum" and k == 3:
                        value = b"\x08\xff\xff\xff"
                    if kind == "empty-value" and k == 2:
                        value = b""
                    txn.put(f"{k:08d}", value)
                txn.commit()
            if kind == "truncated-db":
                data = folder / "db" / "data.mdb"
                data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
            return ["compute-image-mean", "db", "mean.binaryproto"]

        expect = "any" if kind in ("huge-label",) else "error"
        cases.append(Case("lmdb", f"{kind}-{i}", setup, expect, isolate=True))
    return cases


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def image_cases(rng: random.Random, n: int) -> list[Case]:
    good = _png(np.zeros((8, 8, 3), np.uint8))
    cmyk_jpeg = _cmyk_jpeg()
    kinds = [
        ("truncated", good[:40]),
        ("zero-bytes", b""),
        ("wrong-extension", b"GIF89a" + bytes(20)),
        ("16-bit", _png(np.full((8, 8), 40000, np.uint16))),
        ("cmyk", cmyk_jpeg),
        ("bomb", _bomb_png()),
        ("garbage", bytes(rng.randrange(256) for _ in range(300))),
    ]
    cases = []
    for i in range(n):
        kind, data = kinds[i % len(kinds)]

        def setup(folder: Path, data=data) -> list[str]:
            (folder / "a.png").write_bytes(data)
            (folder / "b.png").write_bytes(good)
            (folder / "list.txt").write_text("a.png 0\nb.png 1\n")
            return ["convert-imageset", "--resize_height", "8", "--resize_width", "8",
                    f"{folder}/", "list.txt", "db"]  # fmt: skip

        cases.append(Case("images", f"{kind}-{i}", setup, "any", isolate=kind == "bomb"))
    return cases


def _cmyk_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bomb_png() -> bytes:
    """A PNG header declaring 100000 x 100000 pixels (no real data behind it)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))  # fmt: skip

    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 1000)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def fault_cases(rng: random.Random, n: int) -> list[Case]:
    """Writes refused by the destination: the existing file must survive."""
    cases = []
    for i in range(n):
        def setup(folder: Path) -> list[str]:
            _small_weights(folder, "w.caffemodel")
            (folder / "ro").mkdir(exist_ok=True)
            (folder / "ro" / "out.pt").write_bytes(b"precious")
            os.chmod(folder / "ro", 0o555)
            return ["convert", "w.caffemodel", "ro/out.pt"]

        expect = "error" if os.geteuid() != 0 else "any"  # root writes anyway
        cases.append(Case("faults", f"read-only-{i}", setup, expect,
                          protect=[] if os.geteuid() == 0 else ["ro/out.pt"]))  # fmt: skip
    return cases


FAMILIES: dict[str, Callable[[random.Random, int], list[Case]]] = {
    "prototxt": prototxt_cases,
    "solver": solver_cases,
    "caffemodel": caffemodel_cases,
    "torch-weights": torch_weights_cases,
    "hdf5-weights": hdf5_cases,
    "lmdb": lmdb_cases,
    "images": image_cases,
    "faults": fault_cases,
}


def generate(seed: int, per_family: dict[str, int]) -> list[Case]:
    cases = []
    for family, make in FAMILIES.items():
        count = per_family.get(family, 0)
        if count:
            cases += make(random.Random(f"{seed}:{family}"), count)
    return cases
