"""Nets written in Python: pycaffe's ``caffe.net_spec`` for caffe_alex.

``layers`` (usually imported as ``L``) makes layers: ``L.Convolution(bottom, kernel_size=3)``
returns the layer's output as a :class:`Top`. ``params`` (``P``) names enum values:
``P.Pooling.MAX``. A :class:`NetSpec` names blobs by attribute assignment, and ``to_proto``
writes the ``NetParameter`` that computes the requested tops.

For a given script the NetParameter is the one BVLC pycaffe writes, field for field (users diff
``str(n.to_proto())`` against prototxt files): the same layer order, the same names (automatic
ones included) and the same fields set. Where pycaffe raises, this module may raise a clearer
error or, in a few documented cases, accept the script.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from ..proto import caffe_pb2

__all__ = [
    "Function",
    "Layers",
    "NetSpec",
    "Parameters",
    "Top",
    "assign_proto",
    "layers",
    "param_name_dict",
    "params",
    "to_proto",
]


def param_name_dict() -> dict[str, str]:
    """Map a layer type to the prefix of its ``*_param`` field in LayerParameter.

    The map is read off the schema the way pycaffe does: every LayerParameter field named
    ``<prefix>_param`` holds a ``<Type>Parameter`` message, and ``<Type>`` is taken to be the
    layer type (``convolution_param`` -> ``ConvolutionParameter`` -> "Convolution").
    """
    layer = caffe_pb2.LayerParameter()
    names = {}
    for field in layer.DESCRIPTOR.fields:  # declaration order: a later duplicate type wins
        if field.name.endswith("_param"):
            # pycaffe cuts len("Parameter") characters off the class name without checking
            # the suffix; every *_param field of the schema does end in "Parameter".
            type_name = type(getattr(layer, field.name)).__name__[: -len("Parameter")]
            names[type_name] = field.name[: -len("_param")]
    return names


_param_names = param_name_dict()

# Layer types that Caffe configures through another type's message. BVLC pycaffe's map lacks
# them, so there their bare keyword arguments (L.Deconvolution(x, num_output=8)) fail with an
# AttributeError and scripts spell out convolution_param=dict(...). Routing them here only
# turns those failures into nets: no ConvolutionParameter or RecurrentParameter field is also
# a LayerParameter field, so no keyword that pycaffe accepts changes place.
_SHARED_PARAM_NAMES = {
    "Deconvolution": "convolution",
    "Im2col": "convolution",
    "RNN": "recurrent",
    "LSTM": "recurrent",
}


def _type_param_prefix(type_name: str) -> str | None:
    prefix = _param_names.get(type_name)
    return prefix if prefix is not None else _SHARED_PARAM_NAMES.get(type_name)


def _fill(message, values, where: str) -> None:
    if not isinstance(values, dict):
        raise TypeError(f"{where}: expected a dict of fields, got {type(values).__name__}")
    for key, value in values.items():
        assign_proto(message, key, value)


def assign_proto(proto, name: str, val) -> None:
    """Set field ``name`` of message ``proto`` from a plain Python value.

    A dict fills a message field; a list fills a repeated field (a list of dicts adds one
    message per dict); any other value is assigned as is, and protobuf checks it (an enum
    takes its number or its name). A repeated field given a single value gets a one-element
    list (``kernel_size=3`` is ``kernel_size=[3]``). Only lists count as lists, as in
    pycaffe: a tuple is a single value.
    """
    descriptor = proto.DESCRIPTOR
    if name not in descriptor.fields_by_name:
        raise AttributeError(f"{descriptor.full_name} has no field '{name}'")
    where = f"{descriptor.full_name}.{name}"
    current = getattr(proto, name)
    if hasattr(current, "extend"):  # repeated: a container with extend(), as pycaffe tests
        items = val if isinstance(val, list) else [val]
        if items and isinstance(items[0], dict):  # pycaffe decides on the first element
            if not hasattr(current, "add"):
                raise TypeError(f"{where} holds scalars, not messages; got a dict")
            for item in items:
                _fill(current.add(), item, where)
        else:
            # An empty list leaves the field empty (pycaffe fails on it with an IndexError).
            current.extend(items)
    elif isinstance(val, list):
        raise TypeError(f"{where} is not a repeated field; got a list")
    elif isinstance(val, dict):
        if descriptor.fields_by_name[name].message_type is None:
            raise TypeError(f"{where} is not a message field; got a dict")
        # An empty dict sets nothing, so the message stays absent from the output (as there).
        _fill(current, val, where)
    else:
        setattr(proto, name, val)


def _check_top_like(value, what: str) -> None:
    # Tops and top-less Functions (ntop=0) can be written (pycaffe duck-types on _to_proto);
    # a tuple of tops cannot, and pycaffe's AttributeError for it does not say why.
    if not hasattr(value, "_to_proto"):
        hint = ""
        if isinstance(value, (tuple, list)):
            hint = "; a layer with several tops returns a tuple: name each top separately"
        raise TypeError(f"{what} is a {type(value).__name__}, not a Top{hint}")


def to_proto(*tops) -> caffe_pb2.NetParameter:
    """The NetParameter with every layer the given tops need, intermediate blobs and layers
    named automatically (``<Type><count>``)."""
    layers_out = OrderedDict()
    autonames = Counter()
    for index, top in enumerate(tops):
        _check_top_like(top, f"to_proto argument {index}")
        # pycaffe starts each argument with an empty name table; the layer table and the
        # counters carry over, so a layer already written is neither repeated nor renamed.
        top._to_proto(layers_out, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers_out.values())
    return net


class Top:
    """One output blob of a layer: the ``n``-th top of Function ``fn``."""

    def __init__(self, fn: Function, n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The net that computes this top (see the module-level ``to_proto``)."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames) -> None:
        self.fn._to_proto(layers, names, autonames)

    def __repr__(self) -> str:
        return f"<Top {self.n} of {self.fn.type_name} layer at {id(self.fn):#x}>"


class Function:
    """One layer: its type, its bottoms (Tops of other layers) and its keyword parameters.

    ``ntop`` (default 1) and ``in_place`` are taken out of the parameters; every other keyword
    becomes a field when the layer is written (see ``_to_proto``).
    """

    def __init__(self, type_name: str, inputs, params: dict):
        self.type_name = type_name
        for index, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                # Same wording as pycaffe, which its own test matches.
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(bottom)})")
        self.inputs = inputs
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_top_name(self, top: Top, names: dict, autonames: Counter) -> str:
        # A top nobody named is called after its layer's type and a per-type count that all
        # automatic names share, layer names included: Convolution1, Convolution2, ... The
        # count does not look at user-given names, so a collision is the script's business.
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _get_name(self, names: dict, autonames: Counter) -> str:
        # The layer takes its first top's name (the NetSpec attribute, else the automatic
        # name); a top-less layer has its own entry (its NetSpec attribute) or a count of its
        # own. A key of the Function itself in ``names`` wins over both.
        if self not in names:
            if self.ntop > 0:
                names[self] = self._get_top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _param_target(self, layer: caffe_pb2.LayerParameter, key: str):
        """The message a keyword goes to: keys ending in "param" (``param``, ``*_param``) and
        keys that the type's own ``*_param`` message lacks go to the LayerParameter."""
        if key.endswith("param"):
            return layer
        prefix = _type_param_prefix(self.type_name)
        if prefix is not None:
            own = getattr(layer, prefix + "_param")
            if key in own.DESCRIPTOR.fields_by_name:
                return own
        return layer

    def _to_proto(self, layers: OrderedDict, names: dict, autonames: Counter) -> None:
        if self in layers:
            return
        # Depth first: the bottoms' layers are written (and named) first, in argument order,
        # so a layer always follows every layer it reads from.
        bottom_names = []
        for bottom in self.inputs:
            bottom._to_proto(layers, names, autonames)
            # The blob's name as its producer wrote it (an in-place producer keeps its bottom's).
            bottom_names.append(layers[bottom.fn].top[bottom.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            # Every bottom is rewritten in place; the layer's own tops get no names here.
            layer.top.extend(bottom_names)
        else:
            layer.top.extend([self._get_top_name(top, names, autonames) for top in self.tops])
        # Named after the tops, so an anonymous layer's name equals its first top's.
        layer.name = self._get_name(names, autonames)
        # Keywords are set last and in call order, so name=, type=, top=, bottom= given as
        # keywords override (or extend) what was derived above, as in pycaffe.
        for key, value in self.params.items():
            assign_proto(self._param_target(layer, key), key, value)
        layers[self] = layer


class _MissingTop(KeyError, AttributeError):
    """A NetSpec name that was never assigned. pycaffe raises KeyError; being an
    AttributeError too keeps ``hasattr``, ``getattr(n, name, default)`` and copy/pickle
    (which probe attributes) working."""


class NetSpec:
    """Named tops: ``n.conv1 = L.Convolution(n.data, ...)`` names the blob (and its layer)
    "conv1". ``to_proto()`` writes every layer the named tops need; layers come in a depth-first
    walk from the named tops, in assignment order, unnamed blobs getting automatic names."""

    def __init__(self):
        object.__setattr__(self, "tops", OrderedDict())

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        tops = self.__dict__.get("tops")
        if tops is None:  # not built by __init__ (e.g. while unpickling)
            raise AttributeError(name)
        try:
            return tops[name]
        except KeyError:
            raise _MissingTop(name) from None

    def __delattr__(self, name: str) -> None:
        self.__delitem__(name)

    def __setitem__(self, key: str, value) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str):
        return self.__getattr__(item)

    def __delitem__(self, name: str) -> None:
        try:
            del self.tops[name]
        except KeyError:
            raise _MissingTop(name) from None

    def __contains__(self, name: str) -> bool:
        return name in self.tops

    def keys(self) -> list[str]:
        """The assigned names, in assignment order (reassigning keeps the first position)."""
        return list(self.tops)

    def to_proto(self) -> caffe_pb2.NetParameter:
        for name, value in self.tops.items():
            _check_top_like(value, f"NetSpec entry '{name}'")
        # One top under two names takes the later name, as a dict built over the entries does.
        names = {value: name for name, value in self.tops.items()}
        autonames = Counter()
        layers_out = OrderedDict()
        for value in self.tops.values():
            value._to_proto(layers_out, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers_out.values())
        return net


class Layers:
    """``layers.<Type>(*bottoms, **fields)`` makes a layer of that type and returns its Top,
    its tuple of Tops when ``ntop`` > 1, or the Function itself when ``ntop=0``."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):  # not a layer type: keep copy, pickle, IPython sane
            raise AttributeError(type_name)

        def make_layer(*bottoms, **fields):
            fn = Function(type_name, bottoms, fields)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        make_layer.__name__ = make_layer.__qualname__ = type_name
        return make_layer


class _EnumValues:
    """``params.<Type>``: the constants of ``caffe_pb2.<Type>Parameter``, looked up on use."""

    def __init__(self, message_name: str):
        self._message_name = message_name

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(getattr(caffe_pb2, self._message_name), name)

    def __repr__(self) -> str:
        return f"<params of {self._message_name}>"


class Parameters:
    """``params.Pooling.MAX`` is ``caffe_pb2.PoolingParameter.MAX``, the enum's number."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        return _EnumValues(type_name + "Parameter")


layers = Layers()
params = Parameters()
