// cnnlab serve: the "Bad labels" panel, the training images whose given label is likely wrong (confident
// learning: what `cnnlab labels` kept in label_issues.json, else the validation split's). A click sends the
// image to the "Image in" panel (app.js listens for the cnnlab:image event). Names are written with textContent.
"use strict";

(function () {
  const run = document.body.dataset.run;
  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function pick(ref) {
    document.dispatchEvent(new CustomEvent("cnnlab:image", { detail: ref }));
    $("image-in").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  function show(result) {
    const where = result.source === "validation"
      ? `the ${result.examined} validation images, scored by the run's model`
      : `the ${result.examined} training images, each scored by the one of ${result.folds} cross-validation models trained without it`;
    const origin = result.kept ? " (kept by cnnlab labels)" : "; cnnlab labels --folds K examines the training images too";
    $("labels-caption").textContent = `Confident learning on ${where}${origin}: ${result.found} likely label errors, ` +
      "lowest probability of the given label first" +
      (result.found > result.issues.length ? `; the first ${result.issues.length} shown` : "") + ". Click one to look at it.";
    const box = $("bad-labels");
    box.replaceChildren();
    for (const issue of result.issues) {
      const text = `#${issue.index} given ${issue.given} → ${issue.suggested} (p(given) ${issue.self_confidence.toFixed(3)})`;
      const fig = el("figure", null, "thumb clickable");
      fig.tabIndex = 0;
      fig.dataset.ref = issue.ref;
      const img = el("img");
      img.src = issue.thumb;
      img.alt = text;
      fig.append(img, el("figcaption", text));
      fig.addEventListener("click", () => pick(issue.ref));
      fig.addEventListener("keydown", (ev) => { if (ev.key === "Enter") pick(issue.ref); });
      box.append(fig);
    }
  }

  async function load() {
    const bar = $("labels-progress");
    for (;;) {
      let ok = false;
      let data = {};
      try {
        const response = await fetch(`/api/${run}/labels`);
        ok = response.ok;
        data = await response.json();
      } catch (err) {
        data = { error: "the server did not answer" };
      }
      const pending = ok && (data.state === "queued" || data.state === "running");
      bar.hidden = !pending;
      if (pending && data.state === "running") bar.value = data.progress;
      if (ok && data.state === "done") return show(data.result);
      if (!pending) {
        $("labels-caption").textContent = "could not be computed: " + (data.error || "the server's answer was not understood");
        return;
      }
      await sleep(500);
    }
  }

  load();
})();
