#!/usr/bin/env python3
"""Drives the developer portal in headless Chromium (selenium + chromedriver) for
tests/portal_ui.rs: a developer signs up, is approved through the management API, signs in,
creates an app, subscribes it to a product, copies the new key from the page, calls the API
through Envoy with it, and sees the call in the app's usage chart. Prints one JSON line with
what it saw; screenshots go to OUT_DIR.

    browse.py PORTAL_URL ADMIN_URL ENVOY_URL OUT_DIR
"""

import json
import sys
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

portal, admin, envoy, out = sys.argv[1:5]
EMAIL = "ada@example.com"
PASSWORD = "correct horse battery staple"


def call(url, headers=None, method="GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=1280,1400", "--no-first-run", "--disable-extensions"):
    opts.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
seen = {}


def click_and_wait(by, what):
    """Clicks and waits for the next page (the old one's element goes stale)."""
    el = d.find_element(by, what)
    el.click()
    WebDriverWait(d, 30).until(EC.staleness_of(el))


def wait_for(css):
    return WebDriverWait(d, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


try:
    d.get(portal + "/signup")
    d.find_element(By.NAME, "name").send_keys("Ada")
    d.find_element(By.NAME, "email").send_keys(EMAIL)
    d.find_element(By.NAME, "password").send_keys(PASSWORD)
    click_and_wait(By.CSS_SELECTOR, "form button[type=submit]")
    seen["signed_up"] = wait_for("#signed-up").text

    # Pending until approved: sign-in is refused.
    d.get(portal + "/signin")
    d.find_element(By.NAME, "email").send_keys(EMAIL)
    d.find_element(By.NAME, "password").send_keys(PASSWORD)
    click_and_wait(By.CSS_SELECTOR, "main form button[type=submit]")
    seen["pending_signin"] = wait_for(".error").text

    seen["approve_status"], _ = call(admin + "/v1/developers/" + EMAIL + "/approve",
                                     method="POST")

    d.get(portal + "/signin")
    d.find_element(By.NAME, "email").send_keys(EMAIL)
    d.find_element(By.NAME, "password").send_keys(PASSWORD)
    click_and_wait(By.CSS_SELECTOR, "main form button[type=submit]")
    wait_for("#create-app")
    seen["after_signin"] = d.current_url
    seen["cookies"] = [
        {k: c.get(k) for k in ("name", "httpOnly", "secure", "sameSite")}
        for c in d.get_cookies() if c["name"] == "tg_portal"
    ]

    d.find_element(By.NAME, "name").send_keys("Weather dashboard")
    click_and_wait(By.ID, "create-app")
    wait_for("#product-select")
    app_url = d.current_url
    seen["app_url"] = app_url
    Select(d.find_element(By.ID, "product-select")).select_by_value("weather")
    click_and_wait(By.ID, "subscribe")
    click_and_wait(By.ID, "new-key-button")
    key = wait_for("#new-key").text.strip()
    seen["key_prefix"] = key[:3]

    seen["api_status"], body = call(envoy + "/weather/today", {"x-api-key": key})
    seen["api_body_has_path"] = "/weather/today" in body
    seen["no_key_status"], _ = call(envoy + "/weather/today")

    total = 0
    deadline = time.time() + 20
    while time.time() < deadline:
        d.get(app_url)
        bars = d.find_elements(By.CSS_SELECTOR, "#usage svg rect.bar")
        total = sum(int(b.get_attribute("data-value") or 0) for b in bars)
        if total >= 1:
            break
        time.sleep(0.5)
    seen["usage_requests"] = total
    seen["usage_text"] = d.find_element(By.ID, "usage-total").text
    d.find_element(By.ID, "usage").screenshot(out + "/usage-chart.png")
    # The key is shown once: the app page no longer holds it.
    seen["key_shown_again"] = key in d.page_source

    d.get(portal + "/")
    seen["catalog_has_weather"] = "weather" in d.find_element(By.CSS_SELECTOR, "table.catalog").text
    d.save_screenshot(out + "/catalog.png")
    d.get(portal + "/products/weather")
    seen["reference_ops"] = len(d.find_elements(By.CSS_SELECTOR, ".reference .operation"))
    seen["scripts_run"] = d.execute_script("return window.__pwned === true")
    d.save_screenshot(out + "/api-reference.png")
finally:
    d.quit()
print(json.dumps(seen))
