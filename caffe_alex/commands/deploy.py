"""``caffe-alex deploy`` (pycaffe's classify.py with labels) and ``caffe-alex extract-features``
(Caffe's tools/extract_features). Unreadable images are named on stderr and skipped."""

from __future__ import annotations

import csv
import json
import os
import sys

import click

from ..data.db import detect_backend
from ..errors import CaffeAlexError
from ..formats.prototxt import read_net
from ..net import Net
from ..proto import caffe_pb2
from ..tools import features
from ..tools.deploy import Classifier, load_mean, read_labels, top_k
from ..tools.inference import for_inference
from ..tools.pycaffe_io import expand_images
from .options import option, resolve_device, user_errors


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{what}: expected comma-separated numbers, got {text!r}"
        ) from None


def _preprocessing(fn):
    """The options that configure the Classifier's preprocessing (classify.py's flags)."""
    options = [
        option("model", required=True, help="Deploy net definition."),
        option("weights", required=True, help="Trained weights (comma-separated list)."),
        option("mean", default=None, help="Mean image, .binaryproto or .npy (C x H x W)."),
        option("mean-values", default=None, metavar="B,G,R",
                help="Per-channel mean in the net's channel order, e.g. 104,117,123."),
        option("mean-mode", type=click.Choice(["image", "channel"]), default="image",
                show_default=True, help="Subtract the mean file as an image (resized to the "
                "input, as pycaffe) or its per-channel averages."),
        option("image-dims", default="256,256", show_default=True, metavar="H,W",
                help="Size images are resized to before cropping."),
        option("raw-scale", type=float, default=255.0, show_default=True,
                help="Multiply the [0, 1] pixels by this before the mean."),
        option("input-scale", type=float, default=None, help="Multiply by this after the mean."),
        option("channel-swap", default="2,1,0", show_default=True,
                help="Channel order after loading RGB ('' for none)."),
        option("batch-size", type=click.IntRange(min=1), default=None,
                help="Images (crops with --oversample) per forward (default: net batch)."),
        option("gpu", default=None, help="GPU id to run on (default: CPU)."),
        option("fast", is_flag=True, help="The inference fast path: BatchNorm/Scale folded "
               "into the convolutions, channels_last (within 1e-5 of Caffe's numbers)."),
        option("bf16", is_flag=True, help="Run in bfloat16 (about 1e-2 off; the difference on "
               "the first batch is printed)."),
    ]  # fmt: skip
    for add_option in reversed(options):
        fn = add_option(fn)
    return fn


def _classifier(opts: dict, keep=()):
    values = _floats(opts["mean_values"], "--mean-values")
    mean = load_mean(opts["mean"], values, opts["mean_mode"])
    swap = [int(v) for v in _floats(opts["channel_swap"], "--channel-swap") or []]
    dims = [int(v) for v in _floats(opts["image_dims"], "--image-dims")]
    clf = Classifier(opts["model"], opts["weights"], image_dims=dims, raw_scale=opts["raw_scale"],
                     input_scale=opts["input_scale"], device=resolve_device(opts["gpu"]),
                     batch_size=opts["batch_size"], fast=opts["fast"], bf16=opts["bf16"],
                     keep=keep)  # fmt: skip
    if mean is not None and mean.ndim == 1 and mean.size == 1:
        mean = mean.repeat(clf.channels)  # one value for all channels, as Caffe's mean_value
    if mean is not None:
        clf.transformer.set_mean(clf.input, mean)
    if swap and clf.channels > 1:
        clf.transformer.set_channel_swap(clf.input, swap)
    return clf


def _report_cost(clf) -> None:
    """With --bf16: how far its first batch's output was from the exact path's (stderr)."""
    if clf.cost:
        c = clf.cost
        click.echo(f"caffe-alex: bf16 cost on the first batch: {c['output']} within "
                   f"{c['relative_difference']:.2e} of the exact output (relative to its "
                   f"largest value), top-1 agreement {c['top1_agreement']:.0%}",
                   err=True)  # fmt: skip


class _Skips:
    """Reports unreadable images on stderr, one line each, and counts them."""

    def __init__(self):
        self.count = 0

    def __call__(self, path: str, message: str) -> None:
        self.count += 1
        click.echo(f"caffe-alex: skipped '{path}': {message}", err=True)


@click.command()
@_preprocessing
@option("labels", default=None, help="Class names, one per line (synset_words.txt).")
@option("top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown.")
@option("oversample", is_flag=True, help="Average the 4 corner + centre crops and mirrors.")
@click.option("--format", "-format", "fmt", type=click.Choice(["table", "json", "csv"]),
              default="table", show_default=True, help="Output format.")  # fmt: skip
@click.argument("images", nargs=-1, required=True)
@user_errors
def deploy(labels, top, oversample, fmt, images, **opts) -> None:
    """Classify IMAGES (files, folders, glob patterns) with pycaffe Classifier's steps."""
    skips = _Skips()
    clf = _classifier(opts)
    names = read_labels(labels) if labels else []
    paths = expand_images(images, skips)
    rows = []
    for path, scores in clf.classify_files(paths, oversample=oversample, on_error=skips):
        rows.append((path, [(int(i), float(scores[i])) for i in top_k(scores, top)]))
    _print(rows, names, fmt)
    _report_cost(clf)
    if skips.count:
        click.echo(f"caffe-alex: {skips.count} input(s) skipped, {len(rows)} classified", err=True)
    if not rows:
        raise CaffeAlexError("no image could be classified")


def _label(names: list[str], index: int) -> str:
    return names[index] if index < len(names) else str(index)


def _print(rows, names, fmt: str) -> None:
    if fmt == "json":
        doc = [{"image": path, "top": [{"rank": r + 1, "index": i, "label": _label(names, i),
                                        "probability": p} for r, (i, p) in enumerate(top)]}
               for path, top in rows]  # fmt: skip
        click.echo(json.dumps(doc, indent=2))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["image", "rank", "index", "label", "probability"])
        for path, top in rows:
            for r, (i, p) in enumerate(top):
                writer.writerow([path, r + 1, i, _label(names, i), f"{p:.6g}"])
    else:
        for path, top in rows:
            click.echo(path)
            for r, (i, p) in enumerate(top):
                click.echo(f"  {r + 1:>2}  {p:8.4f}  {i:>5}  {_label(names, i)}")


@click.command("extract-features")
@_preprocessing
@option("blobs", required=True, help="Comma-separated blob names, e.g. fc7,prob.")
@option("source", multiple=True, help="An LMDB/LevelDB for the net's Data layer, or images: "
         "files, folders, globs, a .txt list of paths. Default: the net's data layer.")  # fmt: skip
@option("out", required=True, help="Output .npy, .npz, .h5, .lmdb or .leveldb (or one path "
         "per blob, comma-separated).")  # fmt: skip
@option(
    "num-batches",
    type=click.IntRange(min=1),
    default=None,
    help="Batches to run (default: all the images, or one pass over the database).",
)
@user_errors
def extract_features(blobs, source, out, num_batches, **opts) -> None:
    """Write the values of BLOBS for each input, like Caffe's extract_features."""
    names = [b for b in blobs.split(",") if b]
    features.output_plan(out, names)  # refuse a bad or existing output before any work
    skips = _Skips()
    database = _database(source)
    if source and database is None:
        clf, paths = _classifier(opts, keep=names), _source_images(source, skips)
        features.extract_features(clf, names, out, images=paths, num_batches=num_batches,
                                  on_error=skips)  # fmt: skip
        _report_cost(clf)
    else:
        net = _data_net(opts["model"], database, opts["weights"])
        if opts["fast"] or opts["bf16"]:
            net = for_inference(net, fast=opts["fast"], bf16=opts["bf16"], keep=names,
                                copy_net=False)  # fmt: skip
        device = resolve_device(opts["gpu"])
        features.extract_features(net, names, out, num_batches=num_batches, device=device)


def _database(source) -> str | None:
    if len(source) != 1 or not os.path.isdir(source[0]):
        return None
    path = source[0]
    found = [f for f in ("data.mdb", "CURRENT") if os.path.exists(os.path.join(path, f))]
    return path if found else None


def _data_net(model: str, database: str | None, weights: str):
    """The TEST net with its Data layers reading ``database`` when one is given."""
    net_param, source_map = read_net(model)
    if database:
        data_layers = [lp for lp in net_param.layer if lp.type == "Data"]
        if not data_layers:
            raise CaffeAlexError(f"--source '{database}' is a database; the net has no Data layer")
        backend = caffe_pb2.DataParameter.LMDB
        if detect_backend(database) == "leveldb":
            backend = caffe_pb2.DataParameter.LEVELDB
        for lp in data_layers:
            lp.data_param.source, lp.data_param.backend = database, backend
    net = Net(net_param, "TEST", source=source_map)
    net.load_weights(weights)
    return net


def _source_images(source, skips) -> list[str]:
    args = []
    for item in source:
        if item.endswith(".txt") and os.path.isfile(item):
            args += _list_file(item)
        else:
            args.append(item)
    return expand_images(args, skips)


def _list_file(path: str) -> list[str]:
    """Paths of an image list ('<path>' or '<path> <label>' per line, ImageData's format)."""
    paths = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            head, _, tail = line.rpartition(" ")
            paths.append(head if head and tail.lstrip("-").isdigit() else line)
    return [p for p in paths if p]
