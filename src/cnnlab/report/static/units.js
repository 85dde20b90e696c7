// Sorts the grid of unit pages (cnnlab visualize dossier, the explorer's /run/N/units/LAYER) by the
// key the select names; each cell carries its keys as data attributes. No request is made.
(function () {
  "use strict";
  function sortUnits() {
    var select = document.getElementById("sort");
    var grid = document.getElementById("units");
    if (!select || !grid) { return; }
    var key = select.value;
    var cells = Array.prototype.slice.call(grid.children);
    cells.sort(function (a, b) {
      var ca = Number(a.dataset.channel), cb = Number(b.dataset.channel);
      if (key === "selectivity") {
        return Number(b.dataset.selectivity) - Number(a.dataset.selectivity) || ca - cb;
      }
      if (key === "class") {
        return Number(a.dataset.class) - Number(b.dataset.class) ||
          Number(b.dataset.selectivity) - Number(a.dataset.selectivity) || ca - cb;
      }
      if (key === "quality") {
        return Number(b.dataset.quality) - Number(a.dataset.quality) || ca - cb;
      }
      return ca - cb;
    });
    cells.forEach(function (cell) { grid.appendChild(cell); });
    grid.dataset.sorted = key;
  }
  function start() {
    var select = document.getElementById("sort");
    if (select) { select.addEventListener("change", sortUnits); sortUnits(); }
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
}());
