// The annotation page's script, served as /page.js (rlhf_jax/collect/page.py has the page):
// a file of its own so the Content-Security-Policy needs no 'unsafe-inline'. Server data is
// written with textContent and createElement only, never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_ITEM = "rlhf_jax.collect.key";
  let key = null;      // The login key: from the link's #key=, then this tab's sessionStorage.
  let current = null;  // The assignment on screen.
  let busy = false;    // A request is in flight: buttons and keys do nothing.

  // Unicode's Bidi_Control characters (report.BIDI_CONTROLS is the same set). Obeyed, they
  // reorder how the text around them is displayed, so the annotator would judge something
  // other than the stored text; they are shown as marks instead.
  const BIDI_NAMES = {
    "\u061C": "ALM", "\u200E": "LRM", "\u200F": "RLM", "\u202A": "LRE", "\u202B": "RLE",
    "\u202C": "PDF", "\u202D": "LRO", "\u202E": "RLO", "\u2066": "LRI", "\u2067": "RLI",
    "\u2068": "FSI", "\u2069": "PDI",
  };
  const BIDI_SPLIT = /([\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069])/;

  function showText(element, text) {
    const parts = document.createDocumentFragment();
    for (const piece of text.split(BIDI_SPLIT)) {
      if (!piece) continue;
      const name = piece.length === 1 ? BIDI_NAMES[piece] : undefined;
      if (name === undefined) {
        parts.append(document.createTextNode(piece));
        continue;
      }
      const code = "U+" + piece.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
      const mark = document.createElement("span");
      mark.className = "ctl";
      mark.textContent = name + " " + code;
      mark.title = "invisible bidi control character " + code + " (" + name + ") in the " +
          "text: shown, not obeyed";
      parts.append(mark);
    }
    element.replaceChildren(parts);
  }

  function setState(state, message, isError) {
    document.body.dataset.state = state;
    $("status").textContent = message || "";
    $("status").classList.toggle("error", !!isError);
    for (const b of document.querySelectorAll("button[data-choice]")) {
      b.disabled = state !== "ready";
    }
  }

  function takeKey() {
    const m = /^#key=([A-Za-z0-9_-]{20,128})$/.exec(location.hash);
    if (m) {
      key = m[1];
      try { sessionStorage.setItem(KEY_ITEM, key); } catch (e) { /* storage off: this load */ }
      // Out of the address bar (and of screenshots, shared screens and history).
      history.replaceState(null, "", location.pathname);
      return;
    }
    try { key = sessionStorage.getItem(KEY_ITEM); } catch (e) { key = null; }
  }

  function signOut(message) {
    key = null;
    current = null;
    try { sessionStorage.removeItem(KEY_ITEM); } catch (e) { /* storage off */ }
    for (const id of ["card", "done", "sign-out"]) $(id).classList.add("hidden");
    $("signin").classList.remove("hidden");
    $("who").textContent = "";
    $("progress").textContent = "";
    setState("signed-out", message || "", !!message);
  }

  async function api(method, path, body) {
    const options = { method, cache: "no-store", headers: { Authorization: "Bearer " + key } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (e) {  // Server down or network gone: say so, and let the annotator retry.
      return { status: 0, body: { error: { code: "network",
                                           message: "cannot reach the server (" + e + ")" } } };
    }
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    return { status: response.status, body: data };
  }

  function errorText(r) {
    return (r.body && r.body.error) ? r.body.error.message : "HTTP " + r.status;
  }

  function showProgress(p) {
    if (!p) return;
    $("progress").textContent = "judged by you: " + p.judged_by_you +
        " \u00b7 still needed: " + p.remaining;
  }

  // Why the queue is empty for this annotator while judgments are still needed (db.progress).
  function explainDone(p) {
    if (p.remaining === 0) {
      $("done-title").textContent = "Nothing left to annotate: every comparison has its " +
          "judgments. Thank you!";
      $("done-detail").textContent = "";
      return;
    }
    $("done-title").textContent = "Nothing left for you right now. Thank you!";
    const why = [];
    if (p.leased) {
      why.push(p.leased + " on comparisons others are judging right now (they come back to " +
               "the queue if left unjudged)");
    }
    if (p.for_others) {
      why.push(p.for_others + " that need another annotator (second opinions on " +
               "comparisons you judged, or comparisons you skipped)");
    }
    if (p.no_annotator_left) {
      why.push(p.no_annotator_left + " that no current annotator can give, because each " +
               "one has judged or skipped the comparison; whoever runs the round can add an " +
               "annotator or label them by machine");
    }
    if (p.for_you) {
      why.push(p.for_you + " that became free for you a moment ago: check again");
    }
    $("done-detail").textContent = "Still needed: " + p.remaining + " judgment" +
        (p.remaining === 1 ? "" : "s") + ": " + why.join("; ") + ".";
  }

  async function loadNext() {
    busy = true;
    setState("loading", "Loading\u2026");
    const r = await api("POST", "/api/next");
    busy = false;
    if (r.status === 401) { signOut(errorText(r)); return; }
    if (r.status !== 200) { setState("error", errorText(r), true); return; }
    $("who").textContent = "signed in as " + r.body.annotator;
    $("sign-out").classList.remove("hidden");
    showProgress(r.body.progress);
    current = r.body.assignment;
    if (!current) {
      $("card").classList.add("hidden");
      explainDone(r.body.progress);
      $("done").classList.remove("hidden");
      setState("done", "");
      return;
    }
    $("done").classList.add("hidden");
    $("card").classList.remove("hidden");
    $("card").dataset.assignmentId = String(current.assignment_id);
    $("card").dataset.itemId = String(current.item_id);
    showText($("prompt"), current.prompt);
    for (const side of ["A", "B"]) {
      showText($("response-" + side), current[side].text);
      $("trunc-" + side).classList.toggle("hidden", !current[side].truncated);
    }
    setState("ready", "");
  }

  async function submit(choice) {
    if (!current || busy) return;
    busy = true;
    setState("submitting", "Saving\u2026");
    const r = await api("POST", "/api/judgment", {
      item_id: current.item_id, assignment_id: current.assignment_id, token: current.token,
      choice: choice,
    });
    busy = false;
    if (r.status === 401) { signOut(errorText(r)); return; }
    const code = r.body && r.body.error ? r.body.error.code : null;
    if (r.status === 201 || code === "already_submitted" || code === "lease_expired") {
      await loadNext();
      if (code) setState(document.body.dataset.state, errorText(r), false);
    } else {
      setState("ready", "Not saved: " + errorText(r), true);
    }
  }

  $("sign-out").addEventListener("click", () => signOut(""));
  $("check-again").addEventListener("click", () => { if (!busy) loadNext(); });
  for (const b of document.querySelectorAll("button[data-choice]")) {
    b.addEventListener("click", () => submit(b.dataset.choice));
  }
  const KEYS = { a: "A", "1": "A", ArrowLeft: "A", b: "B", "2": "B", ArrowRight: "B",
                 t: "tie", "3": "tie", s: "skip", "0": "skip" };
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement || e.repeat || e.ctrlKey || e.metaKey ||
        e.altKey) {
      return;
    }
    const choice = KEYS[e.key.length === 1 ? e.key.toLowerCase() : e.key];
    if (choice && document.body.dataset.state === "ready") { e.preventDefault(); submit(choice); }
  });

  function start() {
    takeKey();
    if (key) {
      loadNext();
    } else {
      signOut("");
    }
  }
  // A login link opened in a tab that shows the page already changes only the fragment: the
  // page is not reloaded, so the new key is taken from here.
  window.addEventListener("hashchange", () => { if (!busy) start(); });
  start();
})();
