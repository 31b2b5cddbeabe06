"""The annotation page: one self-contained HTML document (inline CSS and JS, no external
requests), so the server needs no static-file handling and the page works offline.

Data from the database is only ever written with `textContent`, never `innerHTML`, so a
response that contains markup is shown as text, not run.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Preference annotation</title>
<style>
  :root { --fg: #1d2330; --muted: #5b6475; --line: #d5dae3; --accent: #2456c9; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
         color: var(--fg); background: var(--bg); }
  header { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap;
           padding: .6rem 1.2rem; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1.1rem; margin: 0 auto 0 0; }
  main { max-width: 1100px; margin: 0 auto; padding: 1rem 1.2rem 2rem; }
  details { background: #fff; border: 1px solid var(--line); border-radius: 6px;
            padding: .5rem .9rem; margin-bottom: 1rem; }
  summary { cursor: pointer; font-weight: 600; }
  details ul { margin: .4rem 0; padding-left: 1.3rem; }
  .prompt { background: #fff; border: 1px solid var(--line); border-radius: 6px;
            padding: .7rem .9rem; margin-bottom: 1rem; white-space: pre-wrap; }
  .label { font-size: .75rem; text-transform: uppercase; letter-spacing: .05em;
           color: var(--muted); margin-bottom: .25rem; }
  .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
  .response { background: #fff; border: 1px solid var(--line); border-radius: 6px;
              padding: .7rem .9rem; white-space: pre-wrap; min-height: 6rem; }
  .badge { display: inline-block; font-size: .7rem; padding: 0 .4rem; border-radius: 3px;
           background: #fde9c8; color: #7a4a00; margin-left: .4rem; }
  .buttons { display: flex; gap: .6rem; justify-content: center; margin: 1.1rem 0 .4rem; }
  button { font: inherit; padding: .5rem 1.1rem; border-radius: 6px; cursor: pointer;
           border: 1px solid var(--line); background: #fff; }
  button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
  button:disabled { opacity: .5; cursor: default; }
  kbd { font: .75rem ui-monospace, monospace; border: 1px solid var(--line);
        border-bottom-width: 2px; border-radius: 3px; padding: 0 .3rem; background: #fafafa; }
  #status { text-align: center; color: var(--muted); min-height: 1.5em; }
  #status.error { color: #b3261e; }
  #done { text-align: center; padding: 3rem 0; font-size: 1.1rem; }
  .hidden { display: none !important; }
  @media (max-width: 720px) { .pair { grid-template-columns: 1fr; } }
</style>
</head>
<body data-state="start">
<header>
  <h1>Which response is better?</h1>
  <label>Annotator <input id="annotator" autocomplete="username" maxlength="64"
         placeholder="your name"></label>
  <button id="start" class="primary">Start</button>
  <span id="progress" aria-live="polite"></span>
</header>
<main>
  <details id="guidelines" open>
    <summary>Guidelines</summary>
    <p>Pick the response that is better overall. A good response is:</p>
    <ul>
      <li><b>Helpful</b>: it does what the prompt asks, directly and completely.</li>
      <li><b>Honest</b>: it does not state false things or pretend to know what it does not.</li>
      <li><b>Harmless</b>: it does not help cause harm, insult, or demean.</li>
      <li><b>Concise</b>: no padding, repetition or rambling.</li>
      <li><b>Well formatted</b>: readable, grammatical, and it ends properly.</li>
    </ul>
    <p>When these conflict: <b>harmless &gt; honest &gt; helpful</b>. Choose <b>Tie</b> only
      when neither is better; <b>Skip</b> when you cannot judge (e.g. you do not understand
      the prompt). Left/right order is random.</p>
    <p>Keys: <kbd>A</kbd>/<kbd>1</kbd>/<kbd>&larr;</kbd> left is better,
      <kbd>B</kbd>/<kbd>2</kbd>/<kbd>&rarr;</kbd> right is better,
      <kbd>T</kbd>/<kbd>3</kbd> tie, <kbd>S</kbd>/<kbd>0</kbd> skip.</p>
  </details>
  <section id="card" class="hidden">
    <div class="label">Prompt</div>
    <div id="prompt" class="prompt"></div>
    <div class="pair">
      <div><div class="label">Response A (left)<span id="trunc-A" class="badge hidden">cut off
        at the length limit</span></div><div id="response-A" class="response"></div></div>
      <div><div class="label">Response B (right)<span id="trunc-B" class="badge hidden">cut off
        at the length limit</span></div><div id="response-B" class="response"></div></div>
    </div>
    <div class="buttons">
      <button id="choose-A" data-choice="A">A is better <kbd>A</kbd></button>
      <button id="choose-tie" data-choice="tie">Tie <kbd>T</kbd></button>
      <button id="choose-B" data-choice="B">B is better <kbd>B</kbd></button>
      <button id="choose-skip" data-choice="skip">Skip <kbd>S</kbd></button>
    </div>
  </section>
  <div id="done" class="hidden">Nothing left to annotate for you. Thank you!</div>
  <div id="status" role="status" aria-live="polite"></div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let annotator = "";
let current = null;  // The assignment on screen.
let busy = false;    // A request is in flight: buttons and keys do nothing.

function setState(state, message, isError) {
  document.body.dataset.state = state;
  $("status").textContent = message || "";
  $("status").classList.toggle("error", !!isError);
  for (const b of document.querySelectorAll("button[data-choice]")) {
    b.disabled = state !== "ready";
  }
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {  // Server down or network gone: say so, and let the annotator retry.
    return { status: 0, body: { error: { code: "network",
                                         message: "cannot reach the server (" + e + ")" } } };
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return { status: response.status, body };
}

function errorText(r) {
  return (r.body && r.body.error) ? r.body.error.message : "HTTP " + r.status;
}

function showProgress(p) {
  if (!p) return;
  $("progress").textContent = "judged by you: " + p.judged_by_you +
      " \u00b7 still needed: " + p.remaining;
}

async function loadNext() {
  busy = true;
  setState("loading", "Loading\u2026");
  const r = await api("/api/next?annotator=" + encodeURIComponent(annotator));
  busy = false;
  if (r.status !== 200) { setState("error", errorText(r), true); return; }
  showProgress(r.body.progress);
  current = r.body.assignment;
  if (!current) {
    $("card").classList.add("hidden");
    $("done").classList.remove("hidden");
    setState("done", "");
    return;
  }
  $("done").classList.add("hidden");
  $("card").classList.remove("hidden");
  $("card").dataset.assignmentId = String(current.assignment_id);
  $("card").dataset.itemId = String(current.item_id);
  $("prompt").textContent = current.prompt;
  for (const side of ["A", "B"]) {
    $("response-" + side).textContent = current[side].text;
    $("trunc-" + side).classList.toggle("hidden", !current[side].truncated);
  }
  setState("ready", "");
}

async function submit(choice) {
  if (!current || busy) return;
  busy = true;
  setState("submitting", "Saving\u2026");
  const r = await api("/api/judgment", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ item_id: current.item_id, assignment_id: current.assignment_id,
                           token: current.token, annotator: annotator, choice: choice }),
  });
  busy = false;
  const code = r.body && r.body.error ? r.body.error.code : null;
  if (r.status === 201 || code === "already_submitted" || code === "lease_expired") {
    await loadNext();
    if (code) setState(document.body.dataset.state, errorText(r), false);
  } else {
    setState("ready", "Not saved: " + errorText(r), true);
  }
}

function start() {
  const name = $("annotator").value.trim();
  if (!name) { setState("start", "Enter your name first.", true); $("annotator").focus(); return; }
  annotator = name;
  try { localStorage.setItem("annotator", name); } catch (e) { /* storage may be off */ }
  $("annotator").blur();
  loadNext();
}

$("start").addEventListener("click", start);
$("annotator").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
for (const b of document.querySelectorAll("button[data-choice]")) {
  b.addEventListener("click", () => submit(b.dataset.choice));
}
const KEYS = { a: "A", "1": "A", ArrowLeft: "A", b: "B", "2": "B", ArrowRight: "B",
               t: "tie", "3": "tie", s: "skip", "0": "skip" };
document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement || e.repeat || e.ctrlKey || e.metaKey || e.altKey) {
    return;
  }
  const choice = KEYS[e.key.length === 1 ? e.key.toLowerCase() : e.key];
  if (choice && document.body.dataset.state === "ready") { e.preventDefault(); submit(choice); }
});
setState("start", "");
try {
  const saved = localStorage.getItem("annotator");
  if (saved) { $("annotator").value = saved; }
} catch (e) { /* storage may be off */ }
</script>
</body>
</html>
"""
