/* Annotation screens: span marking by selecting text, and reading an uploaded task file into the form. */
(function () {
  "use strict";
  function codepoints(s) { return Array.from(s).length; }
  document.querySelectorAll(".spanbox").forEach(function (box) {
    var pre = box.querySelector(".spantext"), data = box.querySelector(".spandata"), list = box.querySelector(".spanlist");
    var chars = Array.from(pre.textContent);
    function spans() { try { return JSON.parse(data.value || "[]"); } catch (e) { return []; } }
    function draw() {
      list.innerHTML = "";
      spans().forEach(function (s, k) {
        var b = document.createElement("button");
        b.type = "button"; b.className = "span-chip"; b.title = "✕";
        b.textContent = s[2] + ": " + chars.slice(s[0], s[1]).join("") + " ✕";
        b.addEventListener("click", function () { var all = spans(); all.splice(k, 1); data.value = JSON.stringify(all); draw(); });
        list.appendChild(b);
      });
    }
    box.querySelectorAll("button.ent").forEach(function (btn) {
      btn.addEventListener("mousedown", function (e) { e.preventDefault(); });  /* keep the text selection */
      btn.addEventListener("click", function () {
        var sel = window.getSelection(), hint = box.querySelector(".hint");
        if (!sel.rangeCount || !pre.contains(sel.anchorNode) || !pre.contains(sel.focusNode)) { hint.classList.add("warn"); return; }
        hint.classList.remove("warn");
        var r = sel.getRangeAt(0), before = document.createRange();
        before.selectNodeContents(pre); before.setEnd(r.startContainer, r.startOffset);
        var start = codepoints(before.toString()), end = start + codepoints(r.toString());
        if (end <= start) return;
        var all = spans(); all.push([start, end, btn.dataset.label]);
        data.value = JSON.stringify(all); sel.removeAllRanges(); draw();
      });
    });
    draw();
  });
  var up = document.getElementById("task-upload");
  if (up) up.addEventListener("change", function () {
    var f = up.files[0];
    if (f) f.text().then(function (text) { document.getElementById("task-text").value = text; });
  });
})();
