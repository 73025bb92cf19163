"""caffe-alex draw NET net.html: one self-contained page, tested in a real browser (headless
Chromium through Selenium): click a layer and read its type, parameters, shapes, blobs, MACs
and weight statistics; search; pan and zoom; switch views; no JavaScript console error; a
screenshot of each page kept in the test's temporary folder. Without a browser the browser
tests skip, except on CI, where they fail.

The expected values are computed here from the nets' definitions (shapes, counts and MACs by
hand from the layer parameters, statistics with NumPy from the saved arrays)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.formats.prototxt import parse_net_text, read_net
from caffe_alex.net import Net
from caffe_alex.tools.html_view import blob_statistics, html_page
from tests.corpus import CORPUS
from tests.paths import ROOT
from tests.reference import fan_in_weights

ALEXNET = ROOT / "models" / "bvlc_alexnet" / "deploy.prototxt"
ALEXNET_TRAIN = ROOT / "models" / "bvlc_alexnet" / "train_val.prototxt"
GOOGLENET = CORPUS / "BVLC__caffe" / "models" / "bvlc_googlenet" / "train_val.prototxt"
RESNET152 = (ROOT / "tests" / "fork_nets" / "KaimingHe__deep-residual-networks" / "prototxt"
             / "ResNet-152-deploy.prototxt")  # fmt: skip
_DATA = re.compile(r'<script type="application/json" id="net-data">(.*?)</script>', re.S)

# a net whose TRAIN and TEST inputs differ in batch size, with names HTML would misread
PHASED = r"""name: "phased"
layer { name: "train_in" type: "Input" top: "data" include { phase: TRAIN }
  input_param { shape { dim: 8 dim: 3 dim: 10 dim: 10 } } }
layer { name: "test_in" type: "Input" top: "data" include { phase: TEST }
  input_param { shape { dim: 2 dim: 3 dim: 10 dim: 10 } } }
layer { name: "</script><b>conv & co" type: "Convolution" bottom: "data" top: "c<1>"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "deep" type: "ReLU" bottom: "c<1>" top: "c<1>" include { stage: "deep" } }
"""


def draw(*args):
    return CliRunner().invoke(main, ["draw", *map(str, args)])


def page_data(page: str) -> dict:
    return json.loads(_DATA.search(page).group(1))


def nodes_named(data: dict, view: int = 0) -> dict[tuple[str, str], dict]:
    return {(n["kind"], n["name"]): n for n in data["views"][view]["nodes"].values()}


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory):
    """AlexNet deploy with random weights, and the .caffemodel they are saved in."""
    net = Net.from_prototxt(str(ALEXNET), "TEST")
    fan_in_weights(net, seed=3)
    path = tmp_path_factory.mktemp("weights") / "alexnet.caffemodel"
    net.save_weights(str(path))
    return net, path


# -- the page as text --------------------------------------------------------------------------
def test_page_is_self_contained_and_describes_each_layer(tmp_path):
    out = tmp_path / "alexnet.html"
    result = draw(ALEXNET, out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    # nothing fetched: no external script, style, image or font
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    assert not re.search(r'href="(?!#)', page)
    data = page_data(page)
    assert [v["label"] for v in data["views"]] == ["ALL = TRAIN = TEST"]  # a deploy net
    nodes = nodes_named(data)
    conv1 = nodes[("layer", "conv1")]
    assert conv1["type"] == "Convolution"
    assert "num_output: 96" in conv1["parameters"] and "kernel_size: 11" in conv1["parameters"]
    assert "lr_mult: 2\n" in conv1["parameters"] + "\n"  # Caffe's number style
    assert [b[:2] for b in conv1["bottoms"]] == [["data", "10 x 3 x 227 x 227"]]
    assert [b[:2] for b in conv1["tops"]] == [["conv1", "10 x 96 x 55 x 55"]]
    assert [(b["shape"], b["count"]) for b in conv1["blobs"]] == [("96 x 3 x 11 x 11", 34848),
                                                                  ("96", 96)]  # fmt: skip
    assert conv1["macs"] == 10 * 96 * 55 * 55 * 3 * 11 * 11
    conv2 = nodes[("layer", "conv2")]  # group 2: 48 input channels per output
    assert conv2["blobs"][0]["shape"] == "256 x 48 x 5 x 5"
    assert conv2["macs"] == 10 * 256 * 27 * 27 * 48 * 5 * 5
    assert nodes[("layer", "fc6")]["macs"] == 10 * 4096 * 9216
    assert nodes[("layer", "pool1")]["macs"] is None  # not counted, rather than 0
    blob = nodes[("blob", "conv1")]
    names = {i: n["name"] for i, n in data["views"][0]["nodes"].items()}
    assert [names[i] for i in blob["producers"]] == ["conv1", "relu1"]
    assert [names[i] for i in blob["readers"]] == ["relu1", "norm1"]
    assert data["notes"] == [] and data["weights"] is None


@pytest.mark.slow
def test_weight_statistics(tmp_path, alexnet_weights):
    net, weights = alexnet_weights
    out = tmp_path / "alexnet.html"
    assert draw(ALEXNET, out, "--weights", weights).exit_code == 0
    data = page_data(out.read_text())
    fc8 = nodes_named(data)[("layer", "fc8")]
    values = net.params["fc8"][0].detach().double().numpy()
    stats = fc8["blobs"][0]["stats"]
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-9)
    assert stats["min"] == pytest.approx(values.min()) and stats["max"] == pytest.approx(
        values.max()
    )
    assert stats["abs_mean"] == pytest.approx(np.abs(values).mean(), rel=1e-9)
    assert fc8["stored"] is True
    assert blob_statistics(np.array([-1.0, 3.0])) == {
        "mean": 1.0, "std": 2.0, "min": -1.0, "max": 3.0, "abs_mean": 2.0,
    }  # fmt: skip


def test_views_follow_phase_level_and_stage(tmp_path):
    net_param, _ = parse_net_text(PHASED)
    data = page_data(html_page(net_param))
    assert [v["label"] for v in data["views"]] == ["ALL", "TRAIN", "TEST"]
    shapes = [nodes_named(data, i)[("blob", "data")]["shape"] for i in range(3)]
    assert shapes == ["TRAIN: 8 x 3 x 10 x 10, TEST: 2 x 3 x 10 x 10", "8 x 3 x 10 x 10",
                      "2 x 3 x 10 x 10"]  # fmt: skip
    assert ("layer", "deep") not in nodes_named(data, 1)  # stage "deep" not given
    data = page_data(html_page(net_param, phase="TEST", stages=["deep"]))
    assert [v["label"] for v in data["views"]] == ["TEST"]
    assert {name for kind, name in nodes_named(data) if kind == "layer"} == {
        "test_in", "</script><b>conv & co", "deep",
    }  # fmt: skip
    # with --phase and a stage, the image shows that state's layers too
    dot = tmp_path / "net.dot"
    (tmp_path / "net.prototxt").write_text(PHASED)
    assert draw(tmp_path / "net.prototxt", dot, "--phase", "TEST", "--stage", "deep").exit_code == 0
    text = dot.read_text()
    assert "deep" in text and "train_in" not in text


def test_shapes_of_a_net_that_does_not_build_are_left_out_with_a_note(tmp_path):
    out = tmp_path / "alexnet.html"
    result = draw(ALEXNET_TRAIN, out)  # its LMDBs are not here
    assert result.exit_code == 0, result.output
    data = page_data(out.read_text())
    assert len(data["notes"]) == 2 and "shapes unknown for the TRAIN net" in data["notes"][0]
    assert nodes_named(data)[("layer", "conv1")]["tops"][0][1] == ""
    assert "shapes unknown for the TRAIN net" in result.stderr


@pytest.mark.slow
def test_dot_failing_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """A net dot cannot lay out (here a dot that fails as it does on such a graph)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dot").write_text(
        "#!/bin/sh\ncat >/dev/null\necho 'Error: trouble in init_rank' >&2\nexit 1\n"
    )
    (fake / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out" / "net.html"
    out.parent.mkdir()
    result = draw(ALEXNET, out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("caffe-alex:")]
    assert errors == ["caffe-alex: error: Graphviz's dot failed to render .svg: "
                      "Error: trouble in init_rank"], result.stderr  # fmt: skip
    assert list(out.parent.iterdir()) == []
    # a dot that stops at once: the graph written to it may or may not fit in the pipe
    (fake / "dot").write_text("#!/bin/sh\nexit 3\n")
    result = draw(ALEXNET, out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("caffe-alex:")]
    assert len(errors) == 1 and "Graphviz's dot" in errors[0]
    assert list(out.parent.iterdir()) == []
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no dot at all
    result = draw(ALEXNET, out)
    assert result.exit_code == 1 and "needs Graphviz's 'dot' program" in result.stderr
    assert list(out.parent.iterdir()) == []


def test_weights_are_for_pages_only(tmp_path):
    result = draw(ALEXNET, tmp_path / "n.png", "--weights", "w.caffemodel")
    assert result.exit_code == 2 and "--weights is for an .html page" in result.output


# -- in the browser ------------------------------------------------------------------------------
def _browser_programs() -> tuple[str | None, str | None]:
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                  "google-chrome"))), None)  # fmt: skip
    return binary, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _browser_programs()
    missing = not (binary and driver_path)
    try:
        from selenium import webdriver  # the test extra installs it
    except ImportError:
        webdriver, missing = None, True
    if missing:
        message = "headless Chromium, chromedriver and selenium are needed (scripts/setup.sh)"
        if os.environ.get("CI"):
            pytest.fail(f"CI: {message}")
        pytest.skip(message)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


class Page:
    """The page open in the browser, with the few gestures the tests make."""

    def __init__(self, driver, path):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        driver.get_log("browser")  # forget what earlier pages logged
        started = time.perf_counter()
        driver.get(path.as_uri())
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script("return document.body.dataset.ready") == "true"
        )
        self.load_seconds = time.perf_counter() - started

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def node(self, name: str, kind: str = "layer"):
        """The visible SVG node of a layer or blob, found by its tooltip."""
        from selenium.webdriver.common.by import By

        for g in self.driver.find_elements(By.CSS_SELECTOR, ".view:not([hidden]) g.node"):
            title = g.find_element(By.TAG_NAME, "title").get_attribute("textContent")
            if title.startswith(name + " (") if kind == "layer" else title == name:
                return g
        raise AssertionError(f"no {kind} node {name!r} shown")

    def click(self, name: str, kind: str = "layer") -> None:
        """Click the node, after showing the whole net if the node is out of sight."""
        outside = self.js(
            """const a = arguments[0].getBoundingClientRect();
               const b = document.getElementById('stage').getBoundingClientRect();
               return a.left < b.left || a.right > b.right || a.top < b.top
                      || a.bottom > b.bottom;""",
            self.node(name, kind),
        )
        if outside:
            self.js("document.getElementById('fit').click()")
        self.node(name, kind).click()

    def info(self) -> str:
        """The panel's text, a line per element (innerText's blank lines left out)."""
        text = self.js("return document.getElementById('info').innerText")
        return "\n".join(line for line in text.splitlines() if line.strip())

    def cells(self, css: str) -> list[str]:
        return self.js(f"return Array.from(document.querySelectorAll('#info {css}'), "
                       "e => e.innerText)")  # fmt: skip

    def search(self, text: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element(By.ID, "search")
        box.clear()
        box.send_keys(text, Keys.ENTER)

    def view_box(self) -> list[float]:
        return [float(v) for v in self.js(
            "return document.querySelector('.view:not([hidden]) svg').getAttribute('viewBox')"
        ).split()]  # fmt: skip

    def centre_offset(self, name: str, kind: str = "layer") -> float:
        """Distance in pixels from the node's centre to the stage's."""
        return self.js(
            """const a = arguments[0].getBoundingClientRect();
               const b = document.getElementById('stage').getBoundingClientRect();
               return Math.hypot(a.x + a.width / 2 - b.x - b.width / 2,
                                 a.y + a.height / 2 - b.y - b.height / 2);""",
            self.node(name, kind),
        )

    def errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def screenshot(self, path) -> int:
        assert self.driver.save_screenshot(str(path))
        return path.stat().st_size


def test_alexnet_in_the_browser(browser, tmp_path, alexnet_weights):
    net, weights = alexnet_weights
    out = tmp_path / "alexnet.html"
    assert draw(ALEXNET, out, "--weights", weights).exit_code == 0
    page = Page(browser, out)
    page.click("conv1")
    text = page.info()
    assert text.startswith("conv1\nConvolution\n")
    assert "num_output: 96" in text and "kernel_size: 11" in text and "stride: 4" in text
    assert page.cells("table.bottoms td.shape") == ["10 x 3 x 227 x 227"]
    assert page.cells("table.tops td.shape") == ["10 x 96 x 55 x 55"]
    assert page.cells("table.blobs td.shape") == ["96 x 3 x 11 x 11", "96"]
    assert page.cells(".macs") == ["1,054,152,000"]
    rows = page.js("return Array.from(document.querySelectorAll('#info table.blobs tr'), "
                   "r => Array.from(r.cells, c => c.innerText))")  # fmt: skip
    assert rows[0] == ["#", "shape", "count", "mean", "std", "min", "max", "|x| mean"]
    weights = net.params["conv1"][0].detach().double().numpy()
    assert rows[1][2] == "34,848"
    assert float(rows[1][4]) == pytest.approx(weights.std(), rel=1e-3)
    assert float(rows[1][6]) == pytest.approx(weights.max(), rel=1e-3)

    # a blob, and a link from its panel to the layer that reads it
    page.click("pool2", "blob")
    assert page.info().startswith("pool2\nblob\nshape\n10 x 256 x 13 x 13")
    page.js("Array.from(document.querySelectorAll('#info a')).find(a => a.innerText == "
            "'conv3').click()")  # fmt: skip
    assert page.info().startswith("conv3\nConvolution\n")

    # the search box finds and centres; Enter again goes to the next match (layer, then blob)
    page.js("document.getElementById('fit').click()")
    page.search("fc7")
    assert page.info().startswith("fc7\nInnerProduct\n")
    assert page.centre_offset("fc7") < 3
    page.search("fc7")
    assert page.info().startswith("fc7\nblob\n")
    page.search("no such thing")
    assert "nothing named like" in page.js("return document.getElementById('status').innerText")

    # zoom with the wheel, pan by dragging
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    page.js("document.getElementById('fit').click()")
    before = page.view_box()
    stage = browser.find_element("id", "stage")
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(stage), 0, -300).perform()
    zoomed = page.view_box()
    assert zoomed[2] < before[2] * 0.8
    ActionChains(browser).move_to_element_with_offset(stage, 10, 10).click_and_hold() \
        .move_by_offset(120, 40).release().perform()  # fmt: skip
    panned = page.view_box()
    assert panned[0] < zoomed[0] and panned[2] == pytest.approx(zoomed[2])

    assert page.errors() == []
    assert page.screenshot(tmp_path / "alexnet.png") > 20_000


def test_views_and_odd_names_in_the_browser(browser, tmp_path):
    (tmp_path / "net.prototxt").write_text(PHASED)
    out = tmp_path / "phased.html"
    assert draw(tmp_path / "net.prototxt", out).exit_code == 0
    page = Page(browser, out)
    name = "</script><b>conv & co"
    page.click(name)
    assert page.info().startswith(name + "\nConvolution\n")  # shown as text, not markup
    assert page.js("return document.querySelectorAll('#info b').length") == 0
    assert page.cells("table.bottoms td.shape") == ["TRAIN: 8 x 3 x 10 x 10, TEST: 2 x 3 x 10 x 10"]
    # the TEST view keeps the selected layer, with the TEST net's shapes
    page.js("const s = document.getElementById('view-select'); s.value = '2'; "
            "s.dispatchEvent(new Event('change'))")  # fmt: skip
    assert page.info().startswith(name + "\nConvolution\n")
    assert page.cells("table.bottoms td.shape") == ["2 x 3 x 10 x 10"]
    page.search("c<1>")
    assert page.info().startswith("c<1>\nblob\nshape\n2 x 4 x 8 x 8")
    assert page.errors() == []


@pytest.mark.corpus
def test_googlenet_in_the_browser(browser, tmp_path):
    out = tmp_path / "googlenet.html"
    result = draw(GOOGLENET, out, "--input-shape", "data=32,3,224,224", "--input-shape",
                  "label=32")  # fmt: skip
    assert result.exit_code == 0, result.output
    page = Page(browser, out)
    assert page.load_seconds < 20
    page.search("inception_4c/3x3")
    text = page.info()
    assert text.startswith("inception_4c/3x3\nConvolution\n")
    assert "num_output: 256" in text and "pad: 1" in text
    assert page.cells("table.bottoms td.shape") == ["32 x 128 x 14 x 14"]
    assert page.cells("table.tops td.shape") == ["32 x 256 x 14 x 14"]
    assert page.cells("table.blobs td.shape") == ["256 x 128 x 3 x 3", "256"]
    assert page.cells(".macs") == [f"{32 * 256 * 14 * 14 * 128 * 9:,}"]
    assert page.centre_offset("inception_4c/3x3") < 3
    page.click("inception_4c/output")  # a Concat
    assert page.cells("table.bottoms td.shape") == [
        "32 x 128 x 14 x 14", "32 x 256 x 14 x 14", "32 x 64 x 14 x 14", "32 x 64 x 14 x 14",
    ]  # fmt: skip
    assert page.errors() == []
    assert page.screenshot(tmp_path / "googlenet.png") > 20_000


def test_resnet152_page_stays_usable(browser, tmp_path):
    out = tmp_path / "resnet152.html"
    started = time.perf_counter()
    assert draw(RESNET152, out).exit_code == 0
    made = time.perf_counter() - started
    size = out.stat().st_size
    page = Page(browser, out)
    net_param, _ = read_net(RESNET152)
    blobs = {b for layer in net_param.layer for b in [*layer.bottom, *layer.top]}
    shown = page.js("return document.querySelectorAll('.view:not([hidden]) g.node').length")
    assert shown == len(net_param.layer) + len(blobs) > 800
    page.search("res5c_branch2b")
    assert page.info().startswith("res5c_branch2b\nConvolution\n")
    assert page.cells("table.tops td.shape") == ["1 x 512 x 7 x 7"]
    assert page.centre_offset("res5c_branch2b") < 3
    assert page.errors() == []
    assert page.screenshot(tmp_path / "resnet152.png") > 20_000
    assert size < 3_000_000 and page.load_seconds < 20, (made, size, page.load_seconds)
