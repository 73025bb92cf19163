"""``caffe-alex layers``: the layer types this build supports."""

from __future__ import annotations

import click

from ..layers import layer_family, layer_types


@click.command("layers")
def list_layers() -> None:
    """List the Caffe layer types this build supports, each with its family (the module of
    caffe_alex/layers/ that implements it)."""
    names = layer_types()
    width = max(map(len, names))
    for name in names:
        click.echo(f"{name:<{width}}  {layer_family(name)}")
