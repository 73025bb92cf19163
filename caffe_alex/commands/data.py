"""The dataset tools: ``convert-imageset``, ``compute-image-mean``, ``convert-mnist``,
``db-info`` and SSD's ``convert-annoset``, with the flags of Caffe's tools (``--resize_height``
or ``-resize_height``)."""

from __future__ import annotations

import contextlib

import click
from tqdm import tqdm

from ..data import annoset, tools
from ..data.db import open_db
from .options import option, user_errors

_BACKEND = click.Choice(["lmdb", "leveldb"], case_sensitive=False)


@contextlib.contextmanager
def _bar(total, unit):
    """A tqdm bar on stderr (silent when stderr is not a terminal); yields an update callback."""
    with tqdm(total=total, unit=unit, disable=None, dynamic_ncols=True) as bar:
        yield bar.update


def _count_lines(path: str) -> int | None:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None  # read_list_file reports it


def _image_db_options(fn):
    """The options and arguments convert_imageset and SSD's convert_annoset share."""
    for decorate in reversed([
        option("resize_height", type=int, default=0, help="Height images are resized to."),
        option("resize_width", type=int, default=0, help="Width images are resized to."),
        option("gray", is_flag=True, help="Treat images as grayscale ones."),
        option("shuffle", is_flag=True, help="Randomly shuffle the order of the images."),
        option("seed", type=int, default=None, help="Seed of --shuffle (default: random)."),
        option("backend", type=_BACKEND, default="lmdb", show_default=True,
               help="Database kind."),
        option("check_size", is_flag=True, help="Check that all the images have the same size."),
        option("encoded", is_flag=True,
               help="Store encoded images (the file's bytes when possible)."),
        option("encode_type", default="", help="Encode images as this type (png, jpg, ...)."),
        click.argument("root"),
        click.argument("listfile"),
        click.argument("db_name"),
    ]):  # fmt: skip
        fn = decorate(fn)
    return fn


@click.command("convert-imageset")
@_image_db_options
@user_errors
def convert_imageset(root, listfile, db_name, **flags) -> None:
    """Convert the images of LISTFILE ('<path> <label>' lines; paths relative to ROOT, which
    is prefixed as written, so end it with '/') into the new database DB_NAME, like Caffe's
    convert_imageset."""
    with _bar(_count_lines(listfile), "img") as progress:
        tools.convert_imageset(root, listfile, db_name, progress=progress, **flags)


@click.command("compute-image-mean")
@option("backend", type=_BACKEND, default="lmdb", show_default=True, help="Database kind.")
@click.argument("input_db")
@click.argument("output_file", required=False)
@user_errors
def compute_image_mean(input_db, output_file, backend) -> None:
    """Compute the mean image of INPUT_DB, written to OUTPUT_FILE (.binaryproto, 1 x C x H x W)
    when given, and print the per-channel means, like Caffe's compute_image_mean."""
    with open_db(input_db, backend) as db:
        total = len(db)
    with _bar(total, "rec") as progress:
        tools.compute_image_mean(input_db, output_file, backend, progress=progress)


@click.command("convert-mnist")
@option("backend", type=_BACKEND, default="lmdb", show_default=True, help="Database kind.")
@option("resize", type=int, default=0, help="Resize the images to SIZE x SIZE (e.g. 227).")
@option("color", is_flag=True, help="Store 3 identical (BGR) channels instead of 1.")
@option("limit", type=int, default=None, help="Convert only the first N items.")
@click.argument("images")
@click.argument("labels")
@click.argument("db_name")
@user_errors
def convert_mnist(images, labels, db_name, backend, resize, color, limit) -> None:
    """Convert MNIST-format IDX files (IMAGES, LABELS; plain or .gz), such as MNIST or
    Fashion-MNIST, into the new database DB_NAME, like Caffe's convert_mnist_data.
    --resize 227 --color makes them fit AlexNet's 3 x 227 x 227 input."""
    with _bar(limit, "img") as progress:
        tools.convert_mnist(
            images,
            labels,
            db_name,
            backend=backend,
            resize=resize,
            color=color,
            limit=limit,
            progress=progress,
        )


@click.command("db-info")
@option("backend", type=_BACKEND, default=None, help="Database kind (default: detected).")
@click.argument("db")
@user_errors
def db_info(db, backend) -> None:
    """Print the record count, Datum shapes, storage (raw or encoded) and the label
    histogram of the LMDB or LevelDB DB."""
    with open_db(db, backend) as handle:
        total = len(handle)
    with _bar(total, "rec") as progress:
        report = tools.db_info(db, backend, progress=progress)
    for line in tools.info_lines(report):
        click.echo(line)


@click.command("convert-annoset")
@option(
    "anno_type",
    type=click.Choice(annoset.ANNO_TYPES),
    default="classification",
    show_default=True,
    help="'<image> <label>' lines, or '<image> <annotation>' lines.",
)
@option(
    "label_type",
    type=click.Choice(annoset.LABEL_TYPES),
    default="xml",
    show_default=True,
    help="Annotation files: PASCAL VOC XML, SSD's JSON, or 'label x1 y1 x2 y2' text.",
)
@option("label_map_file", default="", help="LabelMap prototxt naming the classes (detection).")
@option("check_label", is_flag=True, help="Refuse a label map that names a class twice.")
@option("min_dim", type=int, default=0, help="Scale images up so the short side is this long.")
@option("max_dim", type=int, default=0, help="Scale images down so the long side fits this.")
@_image_db_options
@user_errors
def convert_annoset(root, listfile, db_name, **flags) -> None:
    """Convert the images of LISTFILE and their box annotations ('<image> <annotation>' lines
    with --anno_type detection; paths relative to ROOT, which is prefixed as written, so end it
    with '/') into AnnotatedDatum records in the new database DB_NAME, like SSD's
    convert_annoset. The AnnotatedData layer reads them."""
    with _bar(_count_lines(listfile), "img") as progress:
        annoset.convert_annoset(root, listfile, db_name, progress=progress, **flags)
