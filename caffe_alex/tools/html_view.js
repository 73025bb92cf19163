// caffe-alex draw's page: the views of a net drawn by Graphviz (inline SVG), a panel that
// describes the clicked node, a search box, pan and zoom. Plain DOM code (see html_view.py).
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("net-data").textContent);
  const stage = document.getElementById("stage");
  const info = document.getElementById("info");
  const search = document.getElementById("search");
  const names = document.getElementById("names");
  const status = document.getElementById("status");
  const select = document.getElementById("view-select");
  const MIN_NODE_PIXELS = 160; // a found node is zoomed to at least this width

  // ---- the views --------------------------------------------------------------------------
  const views = Array.from(stage.querySelectorAll(".view")).map(function (div, index) {
    const svg = div.querySelector("svg");
    const base = svg.viewBox.baseVal;
    const home = { x: base.x, y: base.y, w: base.width, h: base.height };
    svg.removeAttribute("width"); // the SVG fills the stage; the viewBox pans and zooms
    svg.removeAttribute("height");
    const nodes = data.views[index].nodes;
    const byName = new Map(); // name -> node ids, layers before blobs
    for (const [id, node] of Object.entries(nodes)) {
      const ids = byName.get(node.name) || [];
      if (node.kind === "layer") ids.unshift(id); else ids.push(id);
      byName.set(node.name, ids);
      const title = document.getElementById(id).querySelector("title"); // the hover text
      if (title) title.textContent = node.kind === "layer" ? `${node.name} (${node.type})`
        : node.name;
    }
    svg.querySelectorAll("g.edge > title").forEach((t) => { t.textContent = ""; });
    const option = document.createElement("option");
    option.value = String(index);
    option.textContent = data.views[index].label;
    select.appendChild(option);
    return { div, svg, home, box: Object.assign({}, home), nodes, byName };
  });
  let view = null;
  let selected = null;

  function show(index) {
    const previous = selected && view.nodes[selected];
    views.forEach((v, i) => { v.div.hidden = i !== index; });
    view = views[index];
    select.value = String(index);
    names.replaceChildren(...Array.from(view.byName.keys(), (name) => {
      const option = document.createElement("option");
      option.value = name;
      return option;
    }));
    setBox(view.box);
    selected = null;
    const again = previous && (view.byName.get(previous.name) || [])
      .find((id) => view.nodes[id].kind === previous.kind);
    if (again) choose(again); else describe(null);
  }

  // ---- pan and zoom: the viewBox is the camera ---------------------------------------------
  function setBox(box) {
    view.box = box;
    view.svg.setAttribute("viewBox", `${box.x} ${box.y} ${box.w} ${box.h}`);
  }

  function toSvg(clientX, clientY) {
    return new DOMPoint(clientX, clientY).matrixTransform(view.svg.getScreenCTM().inverse());
  }

  function unitsPerPixel() {
    return 1 / view.svg.getScreenCTM().a;
  }

  function zoom(factor, clientX, clientY) {
    const b = view.box;
    const size = Math.min(Math.max(b.w / factor, view.home.w / 2000), view.home.w * 4);
    const f = b.w / size;
    const p = toSvg(clientX, clientY);
    setBox({ x: p.x - (p.x - b.x) / f, y: p.y - (p.y - b.y) / f, w: b.w / f, h: b.h / f });
  }

  function centreZoom(factor) {
    const r = stage.getBoundingClientRect();
    zoom(factor, r.left + r.width / 2, r.top + r.height / 2);
  }

  function fit() {
    setBox(Object.assign({}, view.home));
  }

  let drag = null;
  stage.addEventListener("pointerdown", function (e) {
    if (e.button !== 0) return;
    drag = { x: e.clientX, y: e.clientY, box: view.box, upp: unitsPerPixel(), moved: false,
             node: e.target.closest("g.node") };
    stage.setPointerCapture(e.pointerId);
  });
  stage.addEventListener("pointermove", function (e) {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 4) return;
    drag.moved = true;
    stage.classList.add("dragging");
    const b = drag.box;
    setBox({ x: b.x - dx * drag.upp, y: b.y - dy * drag.upp, w: b.w, h: b.h });
  });
  stage.addEventListener("pointerup", function () {
    if (drag && !drag.moved && drag.node) choose(drag.node.id);
    drag = null;
    stage.classList.remove("dragging");
  });
  stage.addEventListener("wheel", function (e) {
    e.preventDefault();
    zoom(Math.exp(-e.deltaY * (e.deltaMode ? 0.05 : 0.002)), e.clientX, e.clientY);
  }, { passive: false });

  // ---- choosing, finding ---------------------------------------------------------------------
  function choose(id) {
    if (selected) document.getElementById(selected).classList.remove("selected");
    selected = id;
    document.getElementById(id).classList.add("selected");
    describe(view.nodes[id]);
  }

  function centreOn(id) {
    // the box of the node's outline in the SVG's units: its text's box is measured with
    // the font at the current zoom (much wider when the net is shown whole), and a screen
    // rectangle a few pixels wide is rounded to pixels
    const shape = document.getElementById(id).querySelector("polygon, ellipse, path");
    const box = shape.getBBox();
    const m = view.svg.getScreenCTM().inverse().multiply(shape.getScreenCTM());
    const p = new DOMPoint(box.x + box.width / 2, box.y + box.height / 2).matrixTransform(m);
    const upp = Math.min(unitsPerPixel(), (box.width * m.a) / MIN_NODE_PIXELS);
    const s = stage.getBoundingClientRect();
    const w = s.width * upp, h = s.height * upp;
    setBox({ x: p.x - w / 2, y: p.y - h / 2, w, h });
  }

  function go(id) {
    centreOn(id);
    choose(id);
  }

  let lastQuery = "", lastIndex = -1;
  function find(query) {
    query = query.trim();
    if (!query) return;
    let ids = view.byName.get(query) || [];
    if (!ids.length) {
      const lower = query.toLowerCase();
      for (const [name, list] of view.byName) {
        if (name.toLowerCase().includes(lower)) ids = ids.concat(list);
      }
    }
    if (!ids.length) {
      status.textContent = `nothing named like "${query}" in this view`;
      return;
    }
    lastIndex = query === lastQuery ? (lastIndex + 1) % ids.length : 0; // Enter again: next
    lastQuery = query;
    status.textContent = ids.length > 1 ? `${lastIndex + 1} of ${ids.length}` : "";
    go(ids[lastIndex]);
  }

  search.addEventListener("keydown", function (e) {
    if (e.key === "Enter") find(search.value);
  });
  search.addEventListener("change", function () { // a name picked from the list
    const name = search.value.trim();
    if (name !== lastQuery && view.byName.has(name)) find(name);
  });
  select.addEventListener("change", () => show(Number(select.value)));
  document.getElementById("zoom-in").addEventListener("click", () => centreZoom(1.5));
  document.getElementById("zoom-out").addEventListener("click", () => centreZoom(1 / 1.5));
  document.getElementById("fit").addEventListener("click", fit);
  document.addEventListener("keydown", function (e) {
    if (e.target === search || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "+" || e.key === "=") centreZoom(1.5);
    else if (e.key === "-") centreZoom(1 / 1.5);
    else if (e.key === "0") fit();
    else if (e.key === "/") { e.preventDefault(); search.focus(); }
  });

  // ---- the panel -----------------------------------------------------------------------------
  // Built from elements with textContent: names come from the prototxt and are never markup.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }
  const text = (tag, className, content) => el(tag, { className, textContent: content });
  const heading = (content) => text("h3", "", content);
  const note = (content) => text("p", "note", content);
  const count = (n) => n.toLocaleString("en-US");
  const number = (x) => (x !== 0 && (Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3)
    ? x.toExponential(3) : x.toPrecision(4));

  function link(name, id) {
    const a = el("a", { textContent: name, href: "#" });
    a.addEventListener("click", (e) => { e.preventDefault(); go(id); });
    return a;
  }

  // header: [[text, class]]; rows: [[[content, class], ...], ...]
  function table(className, header, rows) {
    const cell = (tag) => ([content, cls]) => el(tag, { className: cls || "" }, content);
    return el("table", { className },
      el("tr", {}, ...header.map(cell("th"))),
      ...rows.map((cells) => el("tr", {}, ...cells.map(cell("td")))));
  }

  const STATS = [["mean", "mean"], ["std", "std"], ["min", "min"], ["max", "max"],
                 ["abs_mean", "|x| mean"]];

  function blobTable(blobs) {
    const withStats = data.weights !== null;
    const header = [["#"], ["shape"], ["count", "num"]];
    if (withStats) header.push(...STATS.map(([, label]) => [label, "num"]));
    return table("blobs", header, blobs.map(function (b, i) {
      const shape = b.shape + (b.shared ? ` (shared: ${b.shared})` : "");
      const cells = [[String(i)], [shape, "shape"], [count(b.count), "num"]];
      if (withStats) {
        const s = b.stats || {};
        cells.push(...STATS.map(([key]) => [key in s ? number(s[key]) : "", "num"]));
      }
      return cells;
    }));
  }

  function wiring(className, list) {
    return table(className, [["blob"], ["shape"]], list.map(([name, shape, id]) =>
      [[link(name, id), "name"], [shape || "?", "shape"]]));
  }

  function layerLinks(ids) {
    if (!ids.length) return note("none");
    return el("p", {}, ...ids.flatMap((id, i) => [i ? ", " : "", link(view.nodes[id].name, id)]));
  }

  function describeLayer(node) {
    const parts = [
      text("h2", "", node.name), text("p", "type", node.type),
      heading("parameters"),
      node.parameters ? text("pre", "parameters", node.parameters) : note("none set"),
      heading("bottoms"), wiring("bottoms", node.bottoms),
      heading("tops"), wiring("tops", node.tops),
    ];
    if (node.blobs.length) {
      parts.push(heading(`parameter blobs (${count(node.count)} values)`), blobTable(node.blobs));
      if (data.weights !== null && !node.stored) {
        parts.push(note("not in the weights file: the fillers' values"));
      }
    }
    if (node.macs !== null && node.macs !== undefined) {
      parts.push(heading("multiply-adds"), text("p", "macs", count(node.macs)));
    }
    return parts;
  }

  function describeBlob(node) {
    return [
      text("h2", "", node.name), text("p", "type", "blob"),
      heading("shape"), text("p", "shape", node.shape || "unknown"),
      heading("written by"), layerLinks(node.producers),
      heading("read by"), layerLinks(node.readers),
    ];
  }

  function describe(node) {
    const hint = "Click a layer or a blob. Drag to pan, wheel to zoom; + / \u2212 / 0 keys, "
      + "/ to search.";
    const parts = !node ? [text("p", "hint", hint)]
      : node.kind === "blob" ? describeBlob(node) : describeLayer(node);
    info.replaceChildren(...parts, ...data.notes.map(note));
  }

  show(0);
  fit();
  document.body.dataset.ready = "true";
})();
