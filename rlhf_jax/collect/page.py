"""The annotation page: one HTML document, its style (STYLE, served as /page.css) and its
script (page.js next to this file, served as /page.js). No inline script or style, so the
server's Content-Security-Policy allows only these two files, and no external requests: the
page works offline.

Data from the database is only ever written with `textContent` and `createElement`, never
`innerHTML` (the CSP's Trusted Types make any HTML sink throw), so a response that contains
markup is shown as text, not run. Unicode bidi controls in the data are shown as visible
marks, not obeyed: otherwise they reorder what is displayed and the annotator would judge
text that differs from what is stored and exported (report.BIDI_CONTROLS, the same set).
"""
import pathlib

SCRIPT = (pathlib.Path(__file__).parent / "page.js").read_text(encoding="utf-8")

STYLE = r"""
:root { --fg: #1d2330; --muted: #5b6475; --line: #d5dae3; --accent: #2456c9; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--fg); background: var(--bg); overflow-wrap: anywhere; }
header { display: flex; gap: .4rem 1rem; align-items: center; flex-wrap: wrap;
         padding: .6rem 1.2rem; background: #fff; border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.1rem; margin: 0 auto 0 0; }
#who, #progress { color: var(--muted); }
main { max-width: 1100px; margin: 0 auto; padding: 1rem 1.2rem 2rem; }
details, .notice { background: #fff; border: 1px solid var(--line); border-radius: 6px;
                   padding: .5rem .9rem; margin-bottom: 1rem; }
summary { cursor: pointer; font-weight: 600; }
details ul { margin: .4rem 0; padding-left: 1.3rem; }
code { font: .85em ui-monospace, monospace; }
/* Texts wrap anywhere (a 30,000-character "word" too), and grid columns may shrink below
   their content's width (minmax(0, ...)): long data never widens the page. */
.prompt { background: #fff; border: 1px solid var(--line); border-radius: 6px;
          padding: .7rem .9rem; margin-bottom: 1rem; white-space: pre-wrap;
          overflow-wrap: anywhere; }
.label { font-size: .75rem; text-transform: uppercase; letter-spacing: .05em;
         color: var(--muted); margin-bottom: .25rem; }
.pair { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1rem; }
.response { background: #fff; border: 1px solid var(--line); border-radius: 6px;
            padding: .7rem .9rem; white-space: pre-wrap; overflow-wrap: anywhere;
            min-height: 6rem; }
/* A bidi control character of the data, shown as a mark instead of obeyed. */
.ctl { display: inline-block; unicode-bidi: isolate; direction: ltr; white-space: nowrap;
       font: .7rem/1.3 ui-monospace, monospace; color: #8a1c14; background: #fde8e6;
       border: 1px solid #e7a59f; border-radius: 3px; padding: 0 .25rem; margin: 0 .1rem; }
.badge { display: inline-block; font-size: .7rem; padding: 0 .4rem; border-radius: 3px;
         background: #fde9c8; color: #7a4a00; margin-left: .4rem; }
/* The buttons wrap on a narrow screen instead of overflowing it on both sides. */
.buttons { display: flex; flex-wrap: wrap; gap: .6rem; justify-content: center;
           margin: 1.1rem 0 .4rem; }
button { font: inherit; padding: .5rem 1.1rem; border-radius: 6px; cursor: pointer;
         border: 1px solid var(--line); background: #fff; }
button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
button:disabled { opacity: .5; cursor: default; }
kbd { font: .75rem ui-monospace, monospace; border: 1px solid var(--line);
      border-bottom-width: 2px; border-radius: 3px; padding: 0 .3rem; background: #fafafa; }
#status { text-align: center; color: var(--muted); min-height: 1.5em; }
#status.error { color: #b3261e; }
#done { text-align: center; padding: 2rem 0; }
#done-title { font-size: 1.1rem; }
#done-detail { color: var(--muted); max-width: 42rem; margin: 0 auto 1rem; }
.hidden { display: none !important; }
@media (max-width: 720px) {
  .pair { grid-template-columns: minmax(0, 1fr); }
  header, main { padding-left: .7rem; padding-right: .7rem; }
  button { padding: .5rem .8rem; }
}
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Preference annotation</title>
<link rel="stylesheet" href="/page.css">
<script src="/page.js" defer></script>
</head>
<body data-state="loading">
<header>
  <h1>Which response is better?</h1>
  <span id="who"></span>
  <span id="progress" aria-live="polite"></span>
  <button id="sign-out" class="hidden">Sign out</button>
</header>
<main>
  <div id="signin" class="notice hidden">
    <p><b>Open your login link.</b> This page signs you in with the link you were given (it
      ends in <code>#key=&hellip;</code>); the key stays in this browser tab only. Whoever
      runs the round makes links with
      <code>python -m rlhf_jax.collect add-annotator NAME</code>.</p>
  </div>
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
    <p>A small red box such as <span class="ctl">RLO U+202E</span> stands for an invisible
      character in the text that would reorder how it is displayed; it is shown, not obeyed,
      so you judge the text as it is stored.</p>
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
  <div id="done" class="hidden">
    <p id="done-title"></p>
    <p id="done-detail"></p>
    <button id="check-again">Check again</button>
  </div>
  <div id="status" role="status" aria-live="polite"></div>
</main>
</body>
</html>
"""
