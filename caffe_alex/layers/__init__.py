"""Built-in layer families. Every module in this package is imported, so its ``@register``
decorators run: adding a layer type is adding one module here."""

import importlib
import pkgutil

from ..registry import registered_types

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def layer_types() -> list[str]:
    """Every Caffe layer type this build can run (the built-in families and any registered
    since), sorted."""
    return registered_types()
