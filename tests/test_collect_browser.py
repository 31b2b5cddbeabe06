"""A real browser (Debian's chromium, driven by selenium through chromium-driver) signs in with
a login link and clicks and types through five comparisons of the annotation app; the
database must hold exactly what was chosen, mapped through the left/right order the page
showed. Then the pages a tester broke: a 30,000-character unbroken string, a 420 px wide
screen, bidi control characters in the data, a missing or revoked key, and the end of the
queue while others still have work; and no Content-Security-Policy violation anywhere.

Skipped only when chromium is missing outside CI; with CI set, a missing browser fails (the
CI script installs it). No browser is ever downloaded: selenium is pointed at the system
binaries, and chromium runs headless with networking features off.
"""
import os
import shutil

import pytest

from conftest import REPO_ROOT
from rlhf_jax.collect import db as db_lib
from rlhf_jax.collect import report
from test_collect_support import key_for, make_custom_round, make_round, rows, running_server

SCREENSHOT_ENV = "RLHF_JAX_SAVE_SCREENSHOT"
RESULT_SCREENSHOT = REPO_ROOT / "experiments" / "results" / "collect" / "annotation_app.png"


def _browser_paths():
  chromium = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"),
                               shutil.which("chromium-browser")) if p and os.path.isfile(p)),
                  None)
  driver = shutil.which("chromedriver") or (
      "/usr/bin/chromedriver" if os.path.isfile("/usr/bin/chromedriver") else None)
  return chromium, driver


@pytest.fixture
def browser(tmp_path, monkeypatch):
  chromium, driver_path = _browser_paths()
  try:
    from selenium import webdriver
  except ImportError:
    webdriver = None
  missing = [name for name, ok in (("chromium", chromium), ("chromium-driver", driver_path),
                                   ("selenium", webdriver)) if not ok]
  if missing:
    message = (f"missing {', '.join(missing)}: apt-get install chromium chromium-driver; "
               "pip install -r requirements-test.txt")
    if os.environ.get("CI"):
      pytest.fail(f"CI is set but the browser test cannot run: {message}")
    pytest.skip(message)
  from selenium.webdriver.chrome.service import Service
  monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything.
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP reports land here.
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
               "--disable-extensions", "--window-size=1280,860",
               f"--user-data-dir={tmp_path / 'chromium-profile'}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
  driver.set_page_load_timeout(30)
  try:
    yield driver
    violations = [e["message"] for e in driver.get_log("browser")
                  if "Content Security Policy" in e["message"]
                  or "TrustedHTML" in e["message"] or "Trusted Type" in e["message"]]
    assert not violations, violations  # The page runs under its CSP, Trusted Types included.
  finally:
    driver.quit()


def _sign_in(browser, httpd, name):
  """Opens `name`'s login link (registering them on first use)."""
  browser.get(httpd.login_url(key_for(httpd.db_path, name)))


def _wait(browser, condition, timeout=20):
  from selenium.webdriver.support.ui import WebDriverWait
  return WebDriverWait(browser, timeout).until(condition)


def _state(browser):
  return browser.execute_script("return document.body.dataset.state")


def test_browser_clicks_and_keys_through_five_comparisons(browser, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait

  db_path = tmp_path / "collect.db"
  # Review-world prompts and samples (no policy needed): 4 x 3 pairs = 12 items.
  make_round(db_path, n_prompts=4, k=3, seed=3, review_world=True)
  wait = WebDriverWait(browser, 20)

  def ready_after(previous):
    """Waits for a new comparison (another assignment id) to be ready; returns its ids."""
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
               == "ready" and d.find_element(By.ID, "card").get_attribute(
                   "data-assignment-id") != previous)
    card = browser.find_element(By.ID, "card")
    return (card.get_attribute("data-assignment-id"), card.get_attribute("data-item-id"),
            browser.find_element(By.ID, "response-A").text,
            browser.find_element(By.ID, "response-B").text)

  with running_server(db_path) as httpd:
    _sign_in(browser, httpd, "Browser-Tester")
    assert "Which response is better?" in browser.page_source
    # The key left the address bar at once (and never reached the server: it is a fragment).
    wait.until(lambda d: "#key=" not in d.current_url)
    assert browser.current_url == httpd.url

    # Mouse for the first two, keyboard shortcuts for the last three.
    plan = [("click", "choose-A", "A"), ("click", "choose-tie", "tie"), ("key", "b", "B"),
            ("key", Keys.ARROW_LEFT, "A"), ("key", "s", "skip")]
    shown, previous = [], None
    for i, (how, what, choice) in enumerate(plan):
      assignment_id, item_id, left_text, right_text = ready_after(previous)
      shown.append((int(assignment_id), int(item_id), left_text, right_text, choice))
      if i == len(plan) - 1:
        browser.save_screenshot(str(tmp_path / "annotation_app.png"))
      if how == "click":
        ActionChains(browser).move_to_element(browser.find_element(By.ID, what)).click().perform()
      else:
        ActionChains(browser).send_keys(what).perform()
      previous = assignment_id
    ready_after(previous)  # The sixth comparison loads: the fifth was stored.
    progress = browser.find_element(By.ID, "progress").text
    assert "judged by you: 5" in progress, progress
    assert browser.find_element(By.ID, "who").text == "signed in as browser-tester"

  stored = rows(db_path, """
      SELECT j.assignment_id, j.item_id, j.annotator, j.choice, j.winner_response,
             s.left_response, s.right_response, rl.text AS left_text, rr.text AS right_text
      FROM judgments j JOIN assignments s ON s.id = j.assignment_id
      JOIN responses rl ON rl.id = s.left_response JOIN responses rr ON rr.id = s.right_response
      ORDER BY j.id""")
  assert len(stored) == 5
  for row, (assignment_id, item_id, left_text, right_text, choice) in zip(stored, shown):
    assert (row["assignment_id"], row["item_id"], row["choice"]) == (assignment_id, item_id,
                                                                     choice)
    assert row["annotator"] == "browser-tester"
    # The page showed the recorded left/right order, and the winner follows it.
    assert (row["left_text"], row["right_text"]) == (left_text, right_text)
    expected = {"A": row["left_response"], "B": row["right_response"]}.get(choice)
    assert row["winner_response"] == expected
  assert len({s[1] for s in shown}) == 5  # Five different items.

  screenshot = tmp_path / "annotation_app.png"
  assert screenshot.stat().st_size > 10_000
  if os.environ.get(SCREENSHOT_ENV) == "1":
    RESULT_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, RESULT_SCREENSHOT)


def _layout(browser):
  """Page width against the viewport, and where every choice button is."""
  return browser.execute_script("""
    const buttons = [...document.querySelectorAll("button[data-choice]")].map((b) => {
      const r = b.getBoundingClientRect();
      return {id: b.id, left: r.left, right: r.right, top: r.top, bottom: r.bottom};
    });
    return {viewport: document.documentElement.clientWidth,
            scroll: document.documentElement.scrollWidth,
            body: document.body.scrollWidth, buttons};""")


def _assert_fits(layout):
  assert layout["scroll"] <= layout["viewport"] and layout["body"] <= layout["viewport"], layout
  for b in layout["buttons"]:
    assert 0 <= b["left"] and b["right"] <= layout["viewport"], (b, layout["viewport"])


def test_long_strings_narrow_screens_and_bidi_controls(browser, tmp_path):
  from selenium.webdriver.common.by import By

  db_path = tmp_path / "collect.db"
  long_word = "x" * 30000
  prompt = "Rate the code: \u202eevil\u202c done \u2066\u2067\u2068\u2069\u061c\u200e\u200f"
  right = "sum = a \u202d+ b\u202c; \u202aok\u202b"
  make_custom_round(db_path, [prompt], [[long_word, right]])
  with running_server(db_path) as httpd:
    _sign_in(browser, httpd, "alice")
    _wait(browser, lambda d: _state(d) == "ready")

    # A 30,000-character word wraps inside its box: the page is as wide as the window.
    _assert_fits(_layout(browser))
    box = browser.find_element(By.ID, "response-A" if browser.find_element(
        By.ID, "response-A").text.startswith("xxx") else "response-B")
    assert box.size["width"] < 1280 and box.size["height"] > 200

    # Bidi controls are marks, never obeyed: every one is shown by name and code point, the
    # DOM's text holds none of them, and what remains is the stored text, in order.
    for element_id, text in (("prompt", prompt),
                             ("response-A", None), ("response-B", None)):
      element = browser.find_element(By.ID, element_id)
      content = browser.execute_script("return arguments[0].textContent", element)
      assert not report.BIDI_CONTROLS & set(content), (element_id, content[:80])
      marks = browser.execute_script(
          "return [...arguments[0].querySelectorAll('.ctl')].map((m) => m.textContent)",
          element)
      shown = content
      for mark in marks:
        shown = shown.replace(mark, chr(int(mark.split("U+")[1], 16)), 1)
      if text is not None:
        assert shown == text
      else:
        assert shown in (long_word, right)
    prompt_marks = browser.execute_script(
        "return [...document.querySelectorAll('#prompt .ctl')].map((m) => m.textContent)")
    assert prompt_marks == ["RLO U+202E", "PDF U+202C", "LRI U+2066", "RLI U+2067",
                            "FSI U+2068", "PDI U+2069", "ALM U+061C", "LRM U+200E",
                            "RLM U+200F"]
    # The stored words are all there, in their stored order.
    assert "evil" in browser.find_element(By.ID, "prompt").text

    # Phones (420 px, the tester's, and 320 px): no sideways scrolling, every button on
    # screen, the two texts stacked.
    try:
      for width in (420, 320):
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": 860, "deviceScaleFactor": 1, "mobile": True})
        browser.refresh()  # Reloads from this tab's sessionStorage: the same comparison.
        _wait(browser, lambda d: _state(d) == "ready")
        layout = _layout(browser)
        assert layout["viewport"] == width
        _assert_fits(layout)
        a, b = (browser.find_element(By.ID, f"response-{s}").rect for s in "AB")
        assert b["y"] >= a["y"] + a["height"]  # One column.
        browser.save_screenshot(str(tmp_path / f"narrow_{width}.png"))
    finally:
      browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
  assert rows(db_path, "SELECT COUNT(*) FROM assignments")[0][0] == 1  # The reload resumed.


def test_signed_out_revoked_and_end_of_queue_pages(browser, tmp_path):
  from selenium.webdriver.common.by import By

  db_path = tmp_path / "collect.db"
  make_round(db_path, n_prompts=1, k=2, repeat_fraction=1.0)  # One item, judged twice.
  with running_server(db_path) as httpd:
    # No key: the sign-in notice, and no request that could lease anything.
    browser.get(httpd.url)
    _wait(browser, lambda d: _state(d) == "signed-out")
    assert browser.find_element(By.ID, "signin").is_displayed()
    assert "add-annotator" in browser.find_element(By.ID, "signin").text
    assert not browser.find_element(By.ID, "card").is_displayed()

    # Alice judges the item; bob has not seen it, so the second opinion is his to give.
    key_for(db_path, "bob")
    _sign_in(browser, httpd, "alice")
    _wait(browser, lambda d: _state(d) == "ready")
    browser.find_element(By.ID, "choose-A").click()
    _wait(browser, lambda d: _state(d) == "done")
    detail = browser.find_element(By.ID, "done-detail").text
    assert "Still needed: 1 judgment:" in detail and "need another annotator" in detail, detail
    assert "Nothing left for you right now" in browser.find_element(By.ID, "done-title").text

    # Bob skips it; now only alice can, and "check again" gives it to her.
    conn = db_lib.connect(db_path)
    a = db_lib.next_assignment(conn, "bob")
    db_lib.submit_judgment(conn, assignment_id=a["assignment_id"], item_id=a["item_id"],
                           token=a["token"], annotator="bob", choice="skip")
    browser.find_element(By.ID, "check-again").click()
    _wait(browser, lambda d: _state(d) == "ready")
    browser.find_element(By.ID, "choose-tie").click()
    _wait(browser, lambda d: _state(d) == "done")
    assert "every comparison has its judgments" in browser.find_element(By.ID,
                                                                       "done-title").text

    # Her link is replaced (lost laptop): the page signs out with the server's reason.
    db_lib.add_annotator(conn, "alice", replace=True)
    conn.close()
    browser.find_element(By.ID, "check-again").click()
    _wait(browser, lambda d: _state(d) == "signed-out")
    assert "not valid" in browser.find_element(By.ID, "status").text
    assert browser.execute_script("return sessionStorage.length") == 0
  stored = rows(db_path, "SELECT annotator, choice FROM judgments ORDER BY id")
  assert [tuple(r) for r in stored] == [("alice", "A"), ("bob", "skip"), ("alice", "tie")]
