"""``caffe-alex deploy`` (pycaffe's classify.py with labels) and ``caffe-alex extract-features``
(Caffe's tools/extract_features). Unreadable images are named on stderr and skipped."""

from __future__ import annotations

import csv
import json
import os
import sys

import click
import numpy as np

from ..data.db import detect_backend
from ..errors import CaffeAlexError
from ..formats.prototxt import read_net
from ..net import Net
from ..proto import caffe_pb2
from ..solvers.devices import choose_device
from ..tools import features
from ..tools.deploy import Classifier, class_names, labels_blob, load_mean, output_task, top_k
from ..tools.detection import detect_files
from ..tools.detection import draw_boxes as draw_boxes_on  # the option takes the name
from ..tools.inference import for_inference
from ..tools.pycaffe_io import OutputFolder, announce_resize, expand_images, write_png
from ..tools.segmentation import class_shares, overlay, segment_files, voc_palette
from .options import option, user_errors


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
        option("image-dims", default=None, metavar="H,W", help="Size images are resized to "
                "before cropping [default: 256,256]. Detection and segmentation resize to the "
                "net input instead."),
        option("raw-scale", type=float, default=255.0, show_default=True,
                help="Multiply the [0, 1] pixels by this before the mean."),
        option("input-scale", type=float, default=None, help="Multiply by this after the mean."),
        option("channel-swap", default="2,1,0", show_default=True,
                help="Channel order after loading RGB ('' for none)."),
        option("batch-size", type=click.IntRange(min=1), default=None,
                help="Images (crops with --oversample) per forward (default: net batch)."),
        option("gpu", default=None, help="GPU id to run on (default: CPU)."),
        option("channels-last", is_flag=True, help="NHWC memory order for convolutions "
               "(often faster; results equal up to float rounding)."),
        option("fast", is_flag=True, help="The inference fast path: BatchNorm/Scale folded "
               "into the convolutions, channels_last (within 1e-5 of Caffe's numbers)."),
        option("bf16", is_flag=True, help="Run in bfloat16 (about 1e-2 off; the difference on "
               "the first batch is printed)."),
        option("compile", is_flag=True, help="torch.compile the net traced "
               "whole (a minute or more per batch shape first; pays on many images)."),
    ]  # fmt: skip
    for add_option in reversed(options):
        fn = add_option(fn)
    return fn


def _classifier(opts: dict, net=None, image_dims=None, keep=()):
    """The Classifier the preprocessing options describe; ``image_dims`` (default: the
    --image-dims option, else 256,256) is the size images are resized to before cropping;
    ``keep``: blobs read besides the outputs (the fast path leaves them unfolded)."""
    values = _floats(opts["mean_values"], "--mean-values")
    mean = load_mean(opts["mean"], values, opts["mean_mode"])
    swap = [int(v) for v in _floats(opts["channel_swap"], "--channel-swap") or []]
    if image_dims is None:
        image_dims = [int(v) for v in _floats(opts["image_dims"] or "256,256", "--image-dims")]
    clf = Classifier(net or opts["model"], None if net else opts["weights"], image_dims=image_dims,
                     raw_scale=opts["raw_scale"], input_scale=opts["input_scale"],
                     device=choose_device(opts["gpu"]), batch_size=opts["batch_size"],
                     channels_last=opts["channels_last"], fast=opts["fast"], bf16=opts["bf16"],
                     compile=opts["compile"], keep=keep)  # fmt: skip
    if mean is not None and mean.ndim == 1 and mean.size == 1:
        mean = mean.repeat(clf.channels)  # one value for all channels, as Caffe's mean_value
    if mean is not None:
        clf.transformer.set_mean(clf.input, mean)
    if swap and clf.channels > 1:
        clf.transformer.set_channel_swap(clf.input, swap)
    announce_resize()
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
@option("labels", default=None, help="Class names: one per line (line i names class i), or "
         "SSD's labelmap prototxt.")  # fmt: skip
@option("task", type=click.Choice(["auto", "classify", "detect", "segment"]), default="auto",
         show_default=True, help="What the net's output is; auto: a DetectionOutput top "
         "is a detector's, an N x C x H x W output a segmentation's, else a "
         "classifier's.")  # fmt: skip
@option("top", type=click.IntRange(min=1), default=5, show_default=True,
         help="classify: classes shown.")  # fmt: skip
@option("oversample", is_flag=True, help="classify: average the 4 corner + centre crops and "
         "mirrors.")  # fmt: skip
@option("threshold", type=float, default=0.5, show_default=True,
         help="detect: the lowest score of a box shown and drawn.")  # fmt: skip
@option("draw-boxes", default=None, metavar="DIR", help="detect: write each image with its "
         "boxes drawn into DIR, as <name>_boxes.png.")  # fmt: skip
@option("label-maps", default=None, metavar="DIR", help="segment: write each image's label "
         "map (<name>_labels.png, class numbers) and a coloured overlay (<name>_overlay.png) "
         "into DIR.")  # fmt: skip
@click.option("--format", "-format", "fmt", type=click.Choice(["table", "json", "csv"]),
              default="table", show_default=True, help="Output format.")  # fmt: skip
@click.argument("images", nargs=-1, required=True)
@user_errors
def deploy(labels, task, top, oversample, threshold, draw_boxes, label_maps, fmt, images,
           **opts) -> None:  # fmt: skip
    """Run the net on IMAGES (files, folders, glob patterns): classify them with pycaffe
    Classifier's steps, or list a detector's boxes, or a segmentation's classes."""
    net = Net.from_prototxt(opts["model"], "TEST")
    task, blob = output_task(net, task)
    _check_task_options(task, opts, oversample, draw_boxes, label_maps)
    folder = OutputFolder(draw_boxes or label_maps) if draw_boxes or label_maps else None
    names = class_names(labels) if labels else {}
    net.load_weights(opts["weights"])
    skips = _Skips()
    paths = expand_images(images, skips)
    if task == "classify":
        clf = _classifier(opts, net)
        results = _classify(clf, paths, top, oversample, skips)
    else:
        clf = _classifier(opts, net, net.blob_shapes[net.input_names[0]][2:], keep=[blob])
        run = _detect if task == "detect" else _segment
        results = run(clf, net, blob, paths, names, folder, threshold, skips)
    PRINTERS[task, fmt](results, names)
    _report_cost(clf)
    if skips.count:
        click.echo(f"caffe-alex: {skips.count} input(s) skipped, {len(results)} "
                   f"{_DONE[task]}", err=True)  # fmt: skip
    if not results:
        raise CaffeAlexError(f"no image could be {_DONE[task]}")


_DONE = {"classify": "classified", "detect": "searched", "segment": "segmented"}


def _check_task_options(task, opts, oversample, draw_boxes, label_maps) -> None:
    given = {"--oversample": oversample, "--image-dims": opts["image_dims"],
             "--draw-boxes": draw_boxes, "--label-maps": label_maps}  # fmt: skip
    allowed = {"classify": {"--oversample", "--image-dims"}, "detect": {"--draw-boxes"},
               "segment": {"--label-maps"}}[task]  # fmt: skip
    wrong = [name for name, value in given.items() if value and name not in allowed]
    if wrong:
        raise CaffeAlexError(f"{wrong[0]} does not apply to this net's output ({task}; "
                             "--task sets it)")  # fmt: skip


def _classify(clf, paths, top, oversample, skips) -> list:
    rows = []
    for path, scores in clf.classify_files(paths, oversample=oversample, on_error=skips):
        rows.append((path, [(int(i), float(scores[i])) for i in top_k(scores, top)]))
    return rows


def _detect(clf, net, blob, paths, names, folder, threshold, skips) -> list:
    rows = []
    palette = voc_palette(256)
    for path, image, boxes in detect_files(clf, paths, blob, threshold, skips):
        drawn = None
        if folder is not None:
            drawn = folder.file(path, "_boxes")
            write_png(drawn, draw_boxes_on(image, boxes, names, palette))
        rows.append((path, image.shape[:2], boxes, drawn))
    return rows


def _segment(clf, net, blob, paths, names, folder, threshold, skips) -> list:
    rows = []
    given = labels_blob(net, blob)
    palette = voc_palette(max(256, net.blob_shapes[blob][1]))
    for path, image, labels in segment_files(clf, paths, blob, given, skips):
        files = None
        if folder is not None:
            files = folder.file(path, "_labels"), folder.file(path, "_overlay")
            write_png(files[0], labels, palette if labels.dtype == np.uint8 else None)
            write_png(files[1], overlay(image, labels, palette))
        rows.append((path, image.shape[:2], class_shares(labels), files))
    return rows


def _name(names: dict[int, str], index: int) -> str:
    return names.get(index, str(index))


# ---- printing: one function per (task, format) -----------------------------------------------
def _classes_json(rows, names) -> None:
    doc = [{"image": path, "top": [{"rank": r + 1, "index": i, "label": _name(names, i),
                                    "probability": p} for r, (i, p) in enumerate(top)]}
           for path, top in rows]  # fmt: skip
    click.echo(json.dumps(doc, indent=2))


def _classes_csv(rows, names) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["image", "rank", "index", "label", "probability"])
    for path, top in rows:
        for r, (i, p) in enumerate(top):
            writer.writerow([path, r + 1, i, _name(names, i), f"{p:.6g}"])


def _classes_table(rows, names) -> None:
    for path, top in rows:
        click.echo(path)
        for r, (i, p) in enumerate(top):
            click.echo(f"  {r + 1:>2}  {p:8.4f}  {i:>5}  {_name(names, i)}")


def _boxes_json(rows, names) -> None:
    doc = [{"image": path, "height": int(size[0]), "width": int(size[1]),
            "boxes": [{"label": b.label, "name": _name(names, b.label), "score": b.score,
                       "xmin": b.xmin, "ymin": b.ymin, "xmax": b.xmax, "ymax": b.ymax}
                      for b in boxes], **({"drawn": drawn} if drawn else {})}
           for path, size, boxes, drawn in rows]  # fmt: skip
    click.echo(json.dumps(doc, indent=2))


def _boxes_csv(rows, names) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["image", "label", "name", "score", "xmin", "ymin", "xmax", "ymax"])
    for path, _, boxes, _ in rows:
        for b in boxes:
            writer.writerow([path, b.label, _name(names, b.label), f"{b.score:.6g}",
                             *(f"{v:.6g}" for v in b.corners)])  # fmt: skip


def _boxes_table(rows, names) -> None:
    for path, (height, width), boxes, drawn in rows:
        click.echo(f"{path}  ({width} x {height}): {len(boxes)} box(es)"
                   + (f", drawn in {drawn}" if drawn else ""))  # fmt: skip
        if boxes:
            click.echo(f"  {'label':>5}  {'name':<16} {'score':>7}  {'xmin':>7} {'ymin':>7} "
                       f"{'xmax':>7} {'ymax':>7}")  # fmt: skip
        for b in boxes:
            corners = " ".join(f"{v:7.1f}" for v in b.corners)
            click.echo(f"  {b.label:>5}  {_name(names, b.label):<16} {b.score:7.4f}  {corners}")


def _shares_json(rows, names) -> None:
    doc = [{"image": path, "height": int(size[0]), "width": int(size[1]),
            "classes": [{"label": c, "name": _name(names, c), "pixels": n, "share": share}
                        for c, n, share in shares],
            **({"label_map": files[0], "overlay": files[1]} if files else {})}
           for path, size, shares, files in rows]  # fmt: skip
    click.echo(json.dumps(doc, indent=2))


def _shares_csv(rows, names) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["image", "label", "name", "pixels", "share"])
    for path, _, shares, _ in rows:
        for c, n, share in shares:
            writer.writerow([path, c, _name(names, c), n, f"{share:.6g}"])


def _shares_table(rows, names) -> None:
    for path, (height, width), shares, files in rows:
        click.echo(f"{path}  ({width} x {height}): {len(shares)} class(es)"
                   + (f", label map {files[0]}, overlay {files[1]}" if files else ""))  # fmt: skip
        for c, n, share in shares:
            click.echo(f"  {c:>5}  {_name(names, c):<16} {100 * share:6.2f}%  {n:>9} px")


PRINTERS = {
    ("classify", "json"): _classes_json, ("classify", "csv"): _classes_csv,
    ("classify", "table"): _classes_table, ("detect", "json"): _boxes_json,
    ("detect", "csv"): _boxes_csv, ("detect", "table"): _boxes_table,
    ("segment", "json"): _shares_json, ("segment", "csv"): _shares_csv,
    ("segment", "table"): _shares_table,
}  # fmt: skip


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
        if opts["fast"] or opts["bf16"] or opts["compile"]:
            net = for_inference(net, fast=opts["fast"], bf16=opts["bf16"], keep=names,
                                compile=opts["compile"], copy_net=False)  # fmt: skip
        device = choose_device(opts["gpu"])
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
