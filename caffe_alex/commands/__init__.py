"""Command groups of the ``caffe-alex`` CLI beyond the core ones in cli.py. Every module here is
imported by cli.py, and registers its commands on ``caffe_alex.cli.main``."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
