// cnnlab serve: fills the page's panels from the JSON endpoints of the same server.
// Names from the run (classes, files, layers) are only ever written with textContent, never as HTML.
"use strict";

(function () {
  const body = document.body;
  const run = body.dataset.run;
  const layered = new Set(body.dataset.layered.split(" "));
  const $ = (id) => document.getElementById(id);
  const state = { image: null, layer: null, channel: null, compare: "" };
  const latest = {}; // panel → number of its latest request: older answers are dropped

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function say(text) {
    const m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
  }

  // GET (or POST) JSON; resolves to {ok, status, data}. Answers to superseded requests resolve to null.
  async function call(panel, url, options) {
    const n = (latest[panel] = (latest[panel] || 0) + 1);
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      return n === latest[panel] ? { ok: false, status: 0, data: { error: "the server did not answer" } } : null;
    }
    let data = {};
    try {
      data = await response.json();
    } catch (err) {
      data = { error: "the server's answer was not JSON" };
    }
    return n === latest[panel] ? { ok: response.ok, status: response.status, data: data } : null;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
    return q.toString();
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function showProgress(bar, status) {
    if (!bar) return;
    bar.hidden = !status || status.state === "done";
    if (status && status.state === "running") bar.value = status.progress;
    else if (status) bar.removeAttribute("value"); // queued: indeterminate
    bar.title = status ? status.state + (status.ahead ? ` (${status.ahead} ahead)` : "") : "";
  }

  // Ask again while a job is queued or running, showing its progress.
  async function poll(panel, url, bar, statusOf) {
    for (;;) {
      const r = await call(panel, url);
      if (!r) return null;
      const status = statusOf(r.data);
      showProgress(bar, status);
      if (!r.ok || !status || status.state === "done" || status.state === "failed") return r;
      await sleep(500);
    }
  }

  // --- Image in ----------------------------------------------------------------------------------

  // The top-5's probabilities are divided by the run's temperature where `cnnlab evaluate --calibrate` kept one.
  function calibrated(d) {
    return d.temperature == null ? "" : `; probabilities calibrated (logits divided by temperature ${d.temperature.toFixed(2)})`;
  }

  function topRows(tbody, top, clickable) {
    tbody.replaceChildren();
    for (const t of top) {
      const tr = el("tr");
      tr.append(el("td", t.label), el("td", t.percent, "num"));
      if (clickable) {
        tr.className = "clickable";
        tr.tabIndex = 0;
        tr.dataset.class = t.index;
        tr.addEventListener("click", () => setTarget(String(t.index)));
        tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") setTarget(String(t.index)); });
      }
      tbody.append(tr);
    }
  }

  async function predict() {
    if (!state.image) return;
    const r = await call("predict", `/api/${run}/predict?` + query({ image: state.image, tta: $("tta").checked ? "1" : "0" }));
    if (!r) return;
    if (!r.ok) return say(r.data.error);
    const d = r.data;
    $("input").src = d.input;
    $("input").hidden = false;
    $("input-caption").textContent = `${d.image}${d.label ? " (true class: " + d.label + ")" : ""}: the network's input, ${d.size} after resizing and normalisation; TTA ${d.tta ? "on" : "off"}` + calibrated(d);
    topRows($("top5").tBodies[0], d.top, true);
    markTarget();
  }

  async function predictOther() {
    const box = $("other-run");
    if (!box) return;
    box.hidden = !state.compare || !state.image;
    if (box.hidden) return;
    const other = state.compare;
    const r = await call("other", `/api/${other}/predict?` + query({ image: state.image }));
    if (!r) return;
    if (!r.ok) {
      $("other-caption").textContent = r.data.error;
      return;
    }
    const d = r.data;
    $("other-name").textContent = $("compare").selectedOptions[0].textContent;
    $("other-input").src = d.input;
    $("other-caption").textContent = `its input, ${d.size}; TTA ${d.tta ? "on" : "off"}` + calibrated(d);
    topRows($("other-top5").tBodies[0], d.top, false);
    const x = await call("other-explain", `/api/${other}/explain?` + query({ image: state.image, method: $("method").value }));
    if (!x) return;
    if (!x.ok) {
      $("other-explanation-caption").textContent = x.data.error;
      return;
    }
    $("other-explanation").src = x.data.picture;
    $("other-explanation-caption").textContent = `${x.data.method} for ${x.data.label}` + (x.data.layer ? ` at ${x.data.layer}` : "");
  }

  function setImage(ref) {
    state.image = ref;
    say("");
    predict();
    explain();
    predictOther();
    if (state.layer) features();
  }

  async function upload(file) {
    if (!file) return;
    say("uploading " + file.name + " …");
    const r = await call("upload", `/api/${run}/upload?` + query({ name: file.name }), {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: file,
    });
    if (!r) return;
    if (!r.ok) return say(r.data.error || `the upload failed (${r.status})`);
    setImage(r.data.image);
  }

  function thumbList(container, images, caption) {
    container.replaceChildren();
    for (const im of images) {
      const fig = el("figure", null, "thumb clickable");
      fig.tabIndex = 0;
      fig.dataset.ref = im.ref;
      const img = el("img");
      img.src = im.thumb;
      img.alt = caption(im);
      fig.append(img, el("figcaption", caption(im)));
      fig.addEventListener("click", () => setImage(im.ref));
      fig.addEventListener("keydown", (ev) => { if (ev.key === "Enter") setImage(im.ref); });
      container.append(fig);
    }
  }

  async function browse(which, container) {
    if (!which) return;
    const r = await poll("browse", `/api/${run}/images?` + query({ filter: which }), $("browse-progress"), (d) => d.status);
    if (!r) return;
    if (!r.ok) return say(r.data.error);
    thumbList(container, r.data.images, (im) => `#${im.index} ${im.true} → ${im.pred} (${(100 * im.confidence).toFixed(0)}%)`);
    if (!r.data.images.length) container.append(el("p", "no test images in this list"));
    else if (r.data.count > r.data.images.length) container.append(el("p", `the first ${r.data.images.length} of ${r.data.count}`));
  }

  // --- Why ---------------------------------------------------------------------------------------

  function markTarget() {
    const target = $("target").value;
    for (const tr of $("top5").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.class === target);
  }

  function setTarget(value) {
    $("target").value = value;
    markTarget();
    explain();
  }

  async function explain() {
    const method = $("method").value;
    $("layer").disabled = !layered.has(method);
    markTrust();
    if (!state.image) return;
    const fig = $("explanation");
    fig.classList.add("busy");
    const r = await call("explain", `/api/${run}/explain?` + query({
      image: state.image, method: method, target: $("target").value,
      layer: layered.has(method) ? $("layer").value : "",
    }));
    if (!r) return;
    fig.classList.remove("busy");
    if (!r.ok) {
      $("explanation-caption").textContent = r.data.error;
      return;
    }
    fig.src = r.data.picture;
    fig.hidden = false;
    fig.dataset.target = r.data.target;
    $("explanation-caption").textContent = `${r.data.method} for class ${r.data.label}` + (r.data.layer ? ` at ${r.data.layer}` : "");
  }

  function fixed(v, digits) {
    return typeof v === "number" ? v.toFixed(digits) : "–";
  }

  async function trust() {
    const r = await poll("trust", `/api/${run}/trust`, $("trust-progress"), (d) => d);
    if (!r) return;
    const tbody = $("trust").tBodies[0];
    tbody.replaceChildren();
    if (!r.ok || r.data.state === "failed") {
      $("trust-source").textContent = "(could not be computed: " + (r.data.error || r.status) + ")";
      return;
    }
    const res = r.data.result;
    $("trust-source").textContent = "(" + res.source + ")";
    for (const [name, m] of Object.entries(res.methods)) {
      const tr = el("tr");
      tr.dataset.method = name;
      tr.append(el("th", name), el("td", m.verdict, m.verdict === "passes" ? "pass" : "fail"),
        el("td", fixed(m.randomisation_rho, 2), "num"), el("td", fixed(m.insertion_auc, 3), "num"),
        el("td", fixed(m.road, 3), "num"));
      tbody.append(tr);
    }
    markTrust();
  }

  function markTrust() {
    for (const tr of $("trust").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.method === $("method").value);
  }

  // --- Inside ------------------------------------------------------------------------------------

  async function features() {
    for (const tr of document.querySelectorAll("#arch tr[data-layer]")) tr.classList.toggle("selected", tr.dataset.layer === state.layer);
    if (!state.image) {
      $("maps-title").textContent = `Feature maps of ${state.layer}: upload or pick an image first`;
      return;
    }
    const r = await call("features", `/api/${run}/features?` + query({ image: state.image, layer: state.layer }));
    if (!r) return;
    const maps = $("maps");
    maps.replaceChildren();
    if (!r.ok) {
      $("maps-title").textContent = r.data.error;
      return;
    }
    const d = r.data;
    $("maps-title").textContent = `Feature maps of ${d.layer}: ${d.shape.join("×")}` + (d.shown < d.shape[0] ? ` (the first ${d.shown})` : "") + "; click a channel";
    d.tiles.forEach((src, c) => {
      const img = el("img", null, "clickable");
      img.src = src;
      img.alt = `channel ${c}`;
      img.title = `channel ${c}`;
      img.tabIndex = 0;
      img.dataset.channel = c;
      img.addEventListener("click", () => channel(c));
      img.addEventListener("keydown", (ev) => { if (ev.key === "Enter") channel(c); });
      maps.append(img);
    });
  }

  async function channel(c) {
    state.channel = c;
    for (const img of $("maps").children) img.classList.toggle("selected", img.dataset.channel === String(c));
    const box = $("channel");
    box.hidden = false;
    $("channel-title").textContent = `${state.layer}, channel ${c}`;
    $("top-images").replaceChildren();
    $("maximized").hidden = true;
    const url = `/api/${run}/channel?` + query({ layer: state.layer, channel: c });
    for (;;) {
      const r = await call("channel", url);
      if (!r) return;
      if (!r.ok) {
        $("channel-title").textContent = r.data.error;
        return;
      }
      const d = r.data;
      showFilters(d.filters);
      showProgress($("top-progress"), d.top);
      showProgress($("max-progress"), d.maximize);
      if (d.top.state === "done") {
        showTop(d.top.result);
      } else if (d.top.state === "failed") {
        $("top-images").replaceChildren(el("p", d.top.error));
      }
      if (d.maximize.state === "done") {
        $("maximized").src = d.maximize.result.picture;
        $("maximized").hidden = false;
      } else if (d.maximize.state === "failed") {
        $("maximized").hidden = true;
      }
      const pending = (s) => s.state === "queued" || s.state === "running";
      if (!pending(d.top) && !pending(d.maximize)) return;
      await sleep(500);
    }
  }

  function showTop(result) {
    const container = $("top-images");
    container.replaceChildren();
    result.thumbs.forEach((t, k) => {
      const fig = el("figure", null, "thumb boxed clickable");
      fig.tabIndex = 0;
      const frame = el("div", null, "frame");
      const img = el("img");
      img.src = t.thumb;
      img.alt = `test image ${result.indices[k]}`;
      const [top, left, bottom, right] = result.boxes[k];
      const box = el("div", null, "rf");
      // Positioned through CSSOM properties, which the style-src policy allows (no style attribute is parsed).
      box.style.top = `${(100 * top) / result.size}%`;
      box.style.left = `${(100 * left) / result.size}%`;
      box.style.height = `${(100 * (bottom - top)) / result.size}%`;
      box.style.width = `${(100 * (right - left)) / result.size}%`;
      frame.append(img, box);
      fig.append(frame, el("figcaption", `#${result.indices[k]} ${t.label} (${result.scores[k].toFixed(2)})`));
      fig.addEventListener("click", () => setImage(t.ref));
      container.append(fig);
    });
  }

  function showFilters(f) {
    const box = $("filters");
    box.replaceChildren();
    if (!f) {
      $("filters-caption").textContent = "this layer's first convolution has no filter for this channel";
      return;
    }
    $("filters-caption").textContent = `${f.conv}: ${f.shape.join("×")}` + (f.tiles.length > 1 ? " (one tile per input channel" + (f.tiles.length < f.inputs ? `, the first ${f.tiles.length}` : "") + ")" : "") + ", min–max scaled";
    for (const src of f.tiles) {
      const img = el("img");
      img.src = src;
      img.alt = "filter weights";
      box.append(img);
    }
  }

  // --- Run ---------------------------------------------------------------------------------------

  async function curves() {
    const r = await call("curves", `/api/${run}/curves`);
    if (!r) return;
    const box = $("curves");
    box.replaceChildren();
    if (!r.ok) return box.append(el("p", r.data.error));
    for (const c of r.data.curves) {
      const img = el("img", null, "plot");
      img.src = c.src;
      img.alt = c.alt;
      box.append(img);
    }
  }

  async function confusionMatrix() {
    const r = await poll("confusion", `/api/${run}/confusion`, $("confusion-progress"), (d) => d.status);
    if (!r) return;
    if (!r.ok || !r.data.confusion) {
      $("confusion-caption").textContent = r.data.error || (r.data.status && r.data.status.error) || "not available";
      return;
    }
    const { matrix, top1, n } = r.data.confusion;
    const classes = r.data.classes;
    $("confusion-caption").textContent = `${n} test images, top-1 ${(100 * top1).toFixed(2)}%; rows: true class, columns: predicted. Click a cell to see its images.`;
    const table = $("confusion");
    table.replaceChildren();
    const head = el("tr");
    head.append(el("th", "true \\ predicted"));
    for (const c of classes) head.append(el("th", c, "col"));
    table.append(head);
    matrix.forEach((row, t) => {
      const total = row.reduce((a, b) => a + b, 0) || 1;
      const tr = el("tr");
      tr.append(el("th", classes[t]));
      row.forEach((count, p) => {
        const shade = Math.min(9, Math.floor((10 * count) / total));
        const td = el("td", count, `num clickable shade${shade}${t === p ? " diagonal" : ""}`);
        td.tabIndex = 0;
        td.dataset.cell = `${t},${p}`;
        td.title = `true ${classes[t]}, predicted ${classes[p]}`;
        const open = () => browse(`cell:${t},${p}`, $("cell-images"));
        td.addEventListener("click", open);
        td.addEventListener("keydown", (ev) => { if (ev.key === "Enter") open(); });
        tr.append(td);
      });
      table.append(tr);
    });
  }

  // --- The test set: its map and its mistakes ------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const shownImages = new Map(); // test index → its thumbnail answer, fetched once for the tooltip
  const percent = (p) => `${(100 * p).toFixed(0)}%`;

  async function testImage(index) {
    if (!shownImages.has(index)) {
      const r = await call("test-image", `/api/${run}/test-image?` + query({ index: index }));
      if (!r || !r.ok) return null;
      shownImages.set(index, r.data);
    }
    return shownImages.get(index);
  }

  async function tip(d, k, circle) {
    const box = $("map-box").getBoundingClientRect();
    const at = circle.getBoundingClientRect();
    const t = $("map-tip");
    const index = d.indices[k];
    $("map-tip-text").textContent = `#${index} true ${d.classes[d.labels[k]]}, predicted ${d.classes[d.predictions[k]]} (${percent(d.probabilities[k])})`;
    t.style.left = `${Math.min(at.left - box.left + 10, box.width - 160)}px`;
    t.style.top = `${at.top - box.top + 10}px`;
    t.dataset.index = index;
    $("map-tip-image").hidden = true;
    t.hidden = false;
    const im = await testImage(index);
    if (im && t.dataset.index === String(index)) {
      $("map-tip-image").src = im.thumb;
      $("map-tip-image").alt = `test image ${index}`;
      $("map-tip-image").hidden = false;
    }
  }

  function drawMap(d) {
    const svg = $("map-svg");
    const xs = d.points.map((p) => p[0]);
    const ys = d.points.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const side = 600; // the longer side of the map; the other keeps the map's proportions
    const pad = 8;
    const scale = (side - 2 * pad) / Math.max(x1 - x0, y1 - y0, 1e-9);
    const height = 2 * pad + (y1 - y0) * scale;
    svg.setAttribute("viewBox", `0 0 ${(2 * pad + (x1 - x0) * scale).toFixed(1)} ${height.toFixed(1)}`);
    svg.replaceChildren();
    d.points.forEach(([x, y], k) => {
      const c = document.createElementNS(SVG, "circle");
      c.setAttribute("cx", (pad + (x - x0) * scale).toFixed(1));
      c.setAttribute("cy", (height - pad - (y - y0) * scale).toFixed(1)); // y up, as the report's figure
      c.setAttribute("r", d.points.length > 3000 ? "2" : "3.5");
      c.setAttribute("fill", d.colours[d.labels[k]]);
      c.dataset.index = d.indices[k];
      c.addEventListener("mouseenter", () => tip(d, k, c));
      c.addEventListener("mouseleave", () => { $("map-tip").hidden = true; });
      c.addEventListener("click", () => {
        for (const other of svg.querySelectorAll("circle.current")) other.classList.remove("current");
        c.classList.add("current");
        setImage(`t${run}-${d.indices[k]}`);
      });
      svg.append(c);
    });
    const legend = $("map-legend");
    legend.replaceChildren();
    if (d.classes.length <= 20) {
      d.classes.forEach((name, c) => {
        const li = el("li");
        const swatch = el("span", null, "swatch");
        swatch.style.background = d.colours[c];
        li.append(swatch, document.createTextNode(name));
        legend.append(li);
      });
    }
    $("map-caption").textContent = `${d.points.length} test images placed by the input of ${d.layer} (${d.dims} features each), ${d.method}, seed ${d.seed}; coloured by true class. Point at one to see it; click it to look at it in the other panels.`;
  }

  async function testMap() {
    const r = await poll("map", `/api/${run}/embedding`, $("map-progress"), (d) => d);
    if (!r) return;
    if (!r.ok || r.data.state === "failed") {
      $("map-caption").textContent = "the map could not be made: " + (r.data.error || r.status);
      return;
    }
    drawMap(r.data.result);
  }

  function thumbsOf(d, indices, caption) {
    return indices.map((i) => ({ ...d.thumbs[String(i)], index: i, caption: caption(i) }));
  }

  async function mistakes() {
    const url = `/api/${run}/mistakes?` + query({ class: $("typical-class").value });
    const r = await poll("mistakes", url, $("mistakes-progress"), (d) => d);
    if (!r) return;
    if (!r.ok || r.data.state === "failed") {
      $("mistakes-caption").textContent = "could not be computed: " + (r.data.error || r.status);
      return;
    }
    const d = r.data.result;
    const name = (c) => d.classes[c];
    $("mistakes-caption").textContent = `${d.wrong} of the ${d.n} test images are misclassified.`;
    const pairs = $("pairs");
    pairs.replaceChildren();
    if (!d.pairs.length) pairs.append(el("p", "no test image was misclassified"));
    for (const p of d.pairs) {
      const row = el("div", null, "thumbs");
      pairs.append(el("h4", `${name(p.true)} → ${name(p.predicted)}: ${p.count} (${(100 * p.share).toFixed(1)}% of ${name(p.true)}; ${p.reverse} the other way)`), row);
      thumbList(row, thumbsOf(d, p.examples, (i) => `#${i}`), (im) => im.caption);
    }
    const losses = new Map(d.losses.map((x) => [x.index, x]));
    thumbList($("losses"), thumbsOf(d, d.losses.map((x) => x.index), (i) => {
      const x = losses.get(i);
      return `#${i} loss ${x.loss.toFixed(2)}: ${name(x.label)} (${percent(x.label_probability)}) → ${name(x.prediction)} (${percent(x.probability)})`;
    }), (im) => im.caption);
    const typical = d.typical[0];
    for (const [id, key] of [["typical-most", "most"], ["typical-least", "least"]]) {
      if (!typical) {
        $(id).replaceChildren(el("p", d.layer ? "no test images of this class" : "this model has no linear layer to read features from"));
        continue;
      }
      thumbList($(id), thumbsOf(d, typical[key], (i) => `#${i} ${key === "most" ? "typical" : "atypical"}`), (im) => im.caption);
    }
  }

  // --- wiring --------------------------------------------------------------------------------------

  $("file").addEventListener("change", (ev) => upload(ev.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer.files.length) upload(ev.dataTransfer.files[0]);
  });
  $("browse").addEventListener("change", (ev) => browse(ev.target.value, $("thumbs")));
  document.addEventListener("cnnlab:image", (ev) => setImage(ev.detail)); // another panel picked an image
  $("tta").addEventListener("change", predict);
  $("method").addEventListener("change", () => { explain(); predictOther(); });
  $("target").addEventListener("change", () => { markTarget(); explain(); });
  $("layer").addEventListener("change", explain);
  if ($("compare")) $("compare").addEventListener("change", (ev) => { state.compare = ev.target.value; predictOther(); });
  for (const tr of document.querySelectorAll("#arch tr[data-layer]")) {
    const open = () => { state.layer = tr.dataset.layer; $("channel").hidden = true; features(); };
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") open(); });
  }
  $("typical-class").addEventListener("change", mistakes);
  explain();
  trust();
  curves();
  confusionMatrix();
  testMap();
  mistakes();
})();
