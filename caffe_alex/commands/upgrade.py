"""``caffe-alex upgrade``: a legacy net or solver definition in the current format."""

from __future__ import annotations

import click

from ..formats.prototxt import upgrade_file
from .options import user_errors


@click.command()
@click.argument("source")
@click.argument("destination")
@user_errors
def upgrade(source: str, destination: str) -> None:
    """Rewrite a legacy net or solver SOURCE in the current format as DESTINATION.

    Like Caffe's upgrade_net_proto_text / upgrade_solver_proto_text.
    """
    upgrade_file(source, destination)
