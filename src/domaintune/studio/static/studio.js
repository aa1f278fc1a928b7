/* The studio's bit of browser code: confirmations, upload, mapping preview, estimate, live job view, arena. */
(function () {
  "use strict";
  function $(sel) { return document.querySelector(sel); }
  function csrf() { var m = $("meta[name=csrf]"); return m ? m.content : ""; }
  function post(url, body, type) {
    return fetch(url, {method: "POST", headers: {"X-CSRF-Token": csrf(), "Content-Type": type || "application/json"}, body: body, credentials: "same-origin"});
  }
  function cell(row, text, tag) { var c = document.createElement(tag || "td"); c.textContent = text; row.appendChild(c); return c; }

  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (e) { if (!window.confirm(f.dataset.confirm)) e.preventDefault(); });
  });

  var up = $("#upload-btn");
  if (up) up.addEventListener("click", function () {
    var file = $("#upload-file").files[0], status = $("#upload-status");
    if (!file) { status.textContent = "?"; return; }
    status.textContent = "…";
    post(up.dataset.url + "?filename=" + encodeURIComponent(file.name), file, "application/octet-stream")
      .then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
      .then(function (res) {
        if (!res[0]) { status.textContent = res[1].error; status.className = "err"; return; }
        window.location = window.location.pathname + "?file=" + encodeURIComponent(res[1].file);
      });
  });

  var rowsEl = $("#preview-rows");
  function renderPreview() {
    var rows = JSON.parse(rowsEl.textContent), table = $("#mapped-preview"), maps = [];
    document.querySelectorAll("select.map").forEach(function (s) { if (s.value) maps.push([s.name, s.value]); });
    table.innerHTML = "";
    var head = document.createElement("tr"); table.appendChild(head);
    maps.forEach(function (m) { cell(head, m[0] + " ← " + m[1], "th"); });
    rows.forEach(function (r) {
      var tr = document.createElement("tr"); table.appendChild(tr);
      maps.forEach(function (m) { var v = r[m[1]]; cell(tr, v === undefined || v === null ? "" : String(v).slice(0, 300)); });
    });
  }
  if (rowsEl) { document.querySelectorAll("select.map").forEach(function (s) { s.addEventListener("change", renderPreview); }); renderPreview(); }

  var qf = $("#q-filter");
  if (qf) qf.addEventListener("change", function () {
    document.querySelectorAll("#quarantine tr[data-reason]").forEach(function (tr) {
      tr.style.display = !qf.value || tr.dataset.reason === qf.value ? "" : "none";
    });
  });

  var est = $("#estimate-btn");
  if (est) est.addEventListener("click", function () {
    var out = $("#estimate"); out.textContent = "…";
    fetch(est.dataset.url, {credentials: "same-origin"}).then(function (r) { return r.json(); }).then(function (j) {
      out.innerHTML = "";
      if (j.error) { out.textContent = j.error; out.className = "err"; return; }
      var p = document.createElement("p"); p.textContent = j.header; out.appendChild(p);
      j.targets.forEach(function (t) {
        var table = document.createElement("table"), head = document.createElement("tr"); table.appendChild(head);
        cell(head, t.name + " (" + t.memory_gib.toFixed(0) + " GiB)", "th");
        ["trainable (M)", "GiB", "fits", "tokens/s", "time (min)"].forEach(function (h) { cell(head, h, "th"); });
        t.rows.forEach(function (r) {
          var tr = document.createElement("tr"); table.appendChild(tr);
          if (r.chosen) tr.style.fontWeight = "bold";
          [r.method, r.trainable_m.toFixed(2), r.memory_gib.toFixed(2), r.fits ? "✔" : "✘", Math.round(r.tokens_per_s), r.run_seconds ? (r.run_seconds / 60).toFixed(1) : "–"].forEach(function (v) { cell(tr, v); });
        });
        out.appendChild(table);
      });
    });
  });

  var job = $("#job");
  function refreshJob() {
    fetch(job.dataset.url, {credentials: "same-origin"}).then(function (r) { return r.json(); }).then(function (j) {
      var log = $("#job-log"); log.textContent = j.log; log.scrollTop = log.scrollHeight;
      var st = $("#job-state"); st.textContent = st.dataset[j.job.state] || j.job.state; st.className = "pill " + j.job.state;
      Object.keys(j.metrics).forEach(function (k) { var c = $("#chart-" + k); if (c) window.lineChart(c, j.metrics[k]); });
      j.stages.forEach(function (s) { var c = $(".st-" + s.name + " .pill"); if (c && s.status) { c.textContent = s.status; c.className = "pill " + s.status; } });
      job.dataset.state = j.job.state;
      if (j.job.state === "running") setTimeout(refreshJob, 1500);
    });
  }
  if (job) refreshJob();

  var send = $("#arena-send");
  function stream(side) {
    var out = $("#answer-" + side); out.textContent = ""; out.dataset.done = "0";
    var body = JSON.stringify({model: $("#model-" + side).value, prompt: $("#arena-prompt").value});
    return post($("#arena").dataset.stream, body).then(function (r) {
      if (!r.ok) return r.json().then(function (j) { out.textContent = j.error; out.dataset.done = "1"; });
      var reader = r.body.getReader(), dec = new TextDecoder();
      function pump() {
        return reader.read().then(function (x) {
          if (x.done) { out.dataset.done = "1"; return; }
          out.textContent += dec.decode(x.value, {stream: true}); return pump();
        });
      }
      return pump();
    });
  }
  if (send) send.addEventListener("click", function () {
    $("#arena-status").textContent = "…";
    Promise.all([stream("left"), stream("right")]).then(function () { $("#arena-status").textContent = "✔"; });
  });
  document.querySelectorAll(".save-correction").forEach(function (b) {
    b.addEventListener("click", function () {
      var side = b.dataset.side;
      var body = JSON.stringify({model: $("#model-" + side).value, prompt: $("#arena-prompt").value, answer: $("#answer-" + side).textContent,
        correction: $("#correction-" + side).value, comment: $("#comment-" + side).value});
      post($("#arena").dataset.correct, body).then(function (r) { return r.json(); }).then(function (j) {
        $("#saved-" + side).textContent = j.error ? j.error : "✔ " + j.request_id;
      });
    });
  });

  var ff = $("#fb-filter"), fc = $("#fb-corrections");
  function filterFeedback() {
    var q = (ff.value || "").toLowerCase();
    document.querySelectorAll("#feedback tr.fb").forEach(function (tr) {
      var show = (!q || tr.textContent.toLowerCase().indexOf(q) >= 0) && (!fc.checked || tr.dataset.correction === "1");
      tr.style.display = show ? "" : "none";
    });
  }
  if (ff) { ff.addEventListener("input", filterFeedback); fc.addEventListener("change", filterFeedback); }
})();
