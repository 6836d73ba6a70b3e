// deltadrive web: the little the pages do with a script. Everything works without it.
"use strict";
document.addEventListener("submit", function (ev) {
  var f = ev.target;
  var q = f.getAttribute("data-confirm");
  if (q && !window.confirm(q)) {
    ev.preventDefault();
  }
});
