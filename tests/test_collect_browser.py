"""A real browser (Debian's chromium, driven by selenium through chromium-driver) clicks and
types through five comparisons of the annotation app; the database must hold exactly what
was chosen, mapped through the left/right order the page showed.

Skipped only when chromium is missing outside CI; with CI set, a missing browser fails (the
CI script installs it). No browser is ever downloaded: selenium is pointed at the system
binaries, and chromium runs headless with networking features off.
"""
import os
import shutil

import pytest

from conftest import REPO_ROOT
from test_collect_support import make_round, rows, running_server

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
  finally:
    driver.quit()


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
    browser.get(httpd.url)
    assert "Which response is better?" in browser.page_source
    name = browser.find_element(By.ID, "annotator")
    name.send_keys("browser-tester")
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "start")).click().perform()

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
