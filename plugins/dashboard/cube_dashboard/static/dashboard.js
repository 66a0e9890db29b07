// Cube dashboard: charts (uPlot), live refresh from the event bus (server-sent events), copy buttons.
// The pages work without it; it only adds charts and live updates.
"use strict";

function drawCharts(root) {
  if (typeof uPlot === "undefined") return;
  root.querySelectorAll("[data-series]").forEach(function (el) {
    if (el.dataset.drawn) return;
    el.dataset.drawn = "1";
    var s = JSON.parse(el.dataset.series), key = el.dataset.key;
    if (!s.t.length) { el.textContent = "no samples yet"; return; }
    var spark = el.classList.contains("spark");
    var color = key === "cpu" ? "#1f6feb" : "#8250df";
    var opts = {
      width: spark ? 120 : 520,
      height: spark ? 28 : 200,
      legend: { show: !spark },
      cursor: { show: !spark },
      scales: { x: { time: true }, y: { range: key === "cpu" ? [0, 100] : [0, Math.max.apply(null, s.mem_total.concat(s.mem)) || 1] } },
      axes: spark ? [{ show: false }, { show: false }] : [{}, {}],
      series: [{}, { label: key === "cpu" ? "CPU %" : "MiB", stroke: color, fill: color + "33", width: 1.5 }]
    };
    new uPlot(opts, [s.t, s[key]], el);
  });
}

var refreshing = null;
function refresh(why) {
  if (refreshing) { refreshing.again = true; return; }
  refreshing = { again: false };
  fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
    .then(function (r) {
      if (r.redirected && r.url.indexOf("/dashboard/login") >= 0) { location.href = r.url; return null; }
      return r.text();
    })
    .then(function (html) {
      if (html === null) return;
      var doc = new DOMParser().parseFromString(html, "text/html");
      var fresh = doc.getElementById("live"), here = document.getElementById("live");
      if (fresh && here) {
        here.replaceWith(fresh);
        drawCharts(fresh);
      }
      var status = document.getElementById("live-status");
      if (status && why) status.textContent = why;
    })
    .catch(function () {})
    .finally(function () {
      var again = refreshing && refreshing.again;
      refreshing = null;
      if (again) refresh(why);
    });
}

function live() {
  if (!document.body.dataset.live || typeof EventSource === "undefined") return;
  var source = new EventSource("/dashboard/events");
  source.onmessage = function (m) {
    var e = JSON.parse(m.data);
    refresh(e.type + (e.sandbox_id ? " " + e.sandbox_id : e.node_id ? " " + e.node_id : ""));
  };
  setInterval(function () { refresh(null); }, 30000);  // ages, time left and sparklines move on
}

function copyButtons() {
  document.querySelectorAll("button.copy").forEach(function (b) {
    b.addEventListener("click", function () {
      var text = document.getElementById(b.dataset.copy).textContent;
      navigator.clipboard.writeText(text).then(function () { b.textContent = "Copied"; });
    });
  });
}

window.addEventListener("DOMContentLoaded", function () {
  drawCharts(document);
  live();
  copyButtons();
});
