"""``caffe-alex compare``: the net in caffe-alex and in OpenCV's dnn module on the user's images
(deploy's preprocessing), blob by blob; exit status 1 when a blob differs beyond --tolerance."""

from __future__ import annotations

import click

from ..errors import CaffeAlexError
from ..tools.compare import compare as compare_nets
from ..tools.compare import opencv, report_lines
from ..tools.pycaffe_io import expand_images, load_image
from .deploy import _classifier, _preprocessing
from .options import option, user_errors


def _missing(path: str, message: str) -> None:
    raise CaffeAlexError(message)


@click.command()
@_preprocessing
@option("tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
        help="Largest relative difference accepted per blob: max |caffe-alex - OpenCV| "
        "over max |OpenCV|.")  # fmt: skip
@option("opencv-model", default=None, help="The prototxt OpenCV reads (default: --model), e.g. "
        "the original of an edited or upgraded net.")  # fmt: skip
@option("opencv-weights", default=None, help="The .caffemodel OpenCV reads (default: --weights "
        "when it is one), e.g. the original of converted weights.")  # fmt: skip
@click.argument("images", nargs=-1, required=True)
@user_errors
def compare(tolerance, opencv_model, opencv_weights, images, **opts) -> None:
    """Run the net in caffe-alex and in OpenCV on IMAGES and print, per blob both expose, the
    largest absolute and relative difference, and the top-1/top-5 agreement of the output."""
    opencv()  # a missing OpenCV is said before any work
    paths = expand_images(images, _missing)
    if not paths:
        raise CaffeAlexError("no image given")
    clf = _classifier(opts)
    pictures = [load_image(path, clf.channels != 1) for path in paths]  # a bad one stops here
    batch = clf.prepare(pictures, oversample=False)
    result = compare_nets(clf, opts["model"], opts["weights"], batch,
                          opencv_model=opencv_model, opencv_weights=opencv_weights)  # fmt: skip
    for line in report_lines(result, tolerance):
        click.echo(line)
    if not result.diffs:
        raise CaffeAlexError("OpenCV exposes none of the net's blobs: nothing was compared")
    differing = result.above(tolerance)
    if differing:
        first = differing[0]
        what = first.note if first.note.startswith("shape") else f"relative difference " \
            f"{first.relative:.3g} > {tolerance:g}"  # fmt: skip
        raise CaffeAlexError(
            f"blob '{first.blob}' (layer '{first.layer}') differs from OpenCV's: {what} "
            f"({len(differing)} of {len(result.diffs)} blobs differ)"
        )
    click.echo(f"all {len(result.diffs)} compared blobs agree within {tolerance:g}")
