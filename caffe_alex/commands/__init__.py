"""The commands of the ``caffe-alex`` CLI, one module per group of commands; caffe_alex/cli.py
lists them and imports a module when one of its commands runs."""
