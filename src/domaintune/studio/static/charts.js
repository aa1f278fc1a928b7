/* Light SVG line charts for the studio (no library, no CDN): lineChart(element, [[x, y], ...], options). */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function fmt(v) {
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return +v.toPrecision(4) + "";
  }
  function lineChart(target, points, opts) {
    opts = opts || {};
    var w = opts.width || 320, h = opts.height || 180, pad = {l: 56, r: 10, t: 10, b: 24};
    target.innerHTML = "";
    var svg = el("svg", {width: w, height: h, viewBox: "0 0 " + w + " " + h, "class": "linechart"}, target);
    if (!points || !points.length) {
      el("text", {x: w / 2, y: h / 2, "text-anchor": "middle", fill: "#999", "font-size": 12}, svg).textContent = opts.empty || "–";
      return svg;
    }
    var xs = points.map(function (p) { return p[0]; }), ys = points.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x1 = x0 + 1; }
    if (y1 === y0) { y1 = y0 + Math.abs(y0 || 1) * 0.05; y0 = y0 - Math.abs(y0 || 1) * 0.05; }
    function sx(x) { return pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r); }
    function sy(y) { return h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b); }
    el("line", {x1: pad.l, y1: h - pad.b, x2: w - pad.r, y2: h - pad.b, stroke: "#999"}, svg);
    el("line", {x1: pad.l, y1: pad.t, x2: pad.l, y2: h - pad.b, stroke: "#999"}, svg);
    [y0, (y0 + y1) / 2, y1].forEach(function (v) {
      el("text", {x: pad.l - 4, y: sy(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#555"}, svg).textContent = fmt(v);
    });
    [x0, x1].forEach(function (v) {
      el("text", {x: sx(v), y: h - 6, "text-anchor": "middle", "font-size": 10, fill: "#555"}, svg).textContent = fmt(v);
    });
    var d = points.map(function (p, i) { return (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1); }).join(" ");
    el("path", {d: d, fill: "none", stroke: opts.color || "#36c", "stroke-width": 2, "class": "series"}, svg);
    points.forEach(function (p) { el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: opts.color || "#36c"}, svg); });
    return svg;
  }
  window.lineChart = lineChart;
})();
