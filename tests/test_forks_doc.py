"""docs/forks.md: the 'Your own fork' example registers a type in a few lines, and it runs."""

from __future__ import annotations

import re

import torch

from caffe_alex import registry
from caffe_alex.net import Net
from tests.paths import ROOT
from tests.reference import parse_net


def test_the_register_example_runs_as_written():
    text = (ROOT / "docs" / "forks.md").read_text()
    section = text[text.index("### Your own fork") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    try:
        exec(compile(code, "docs/forks.md", "exec"), {})
        net = Net(
            parse_net(
                'layer { name: "in" type: "Input" top: "x"\n'
                "        input_param { shape { dim: 2 dim: 5 } } }\n"
                'layer { name: "hs" type: "HardSwish" bottom: "x" top: "y" }\n'
            ),
            "TEST",
        )
        x = torch.linspace(-5, 5, 10).reshape(2, 5)
        torch.testing.assert_close(net(x=x)["y"], torch.nn.functional.hardswish(x))
    finally:
        registry._LAYER_TYPES.pop("HardSwish", None)
