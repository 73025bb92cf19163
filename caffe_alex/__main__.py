"""``python -m caffe_alex ...`` runs the ``caffe-alex`` command line."""

from .cli import main

main(prog_name="caffe-alex")
