"""Built-in layer families. Every module in this package is imported, so its ``@register``
decorators run: adding a layer type is adding one module here."""

import importlib
import pkgutil

from ..registry import get_layer_class, registered_types

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def layer_types() -> list[str]:
    """Every Caffe layer type this build can run (the built-in families and any registered
    since), sorted."""
    return registered_types()


def layer_family(type_name: str) -> str:
    """The family a type belongs to: the name of the module in caffe_alex/layers/ defining it
    (``family`` of a layer registered from elsewhere: its module's last name)."""
    return get_layer_class(type_name).__module__.rsplit(".", 1)[-1]
