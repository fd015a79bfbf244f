"""The web dashboard (GET /) in a real browser: Debian's chromium driven by Playwright,
against real `zse serve` processes on the fixture model.

The page must load with no console error (a CSP violation is one), stream a chat answer
equal to the API's, show live figures from /metrics that move after a request, work by
keyboard and at a phone's width, and write client text as text. With --auth, an admin key
manages keys through the admin routes, which refuse an ordinary key (403) and no key (401)
before reading a body; without --auth they are off (403). POST / stays TGI's route.
"""
import os
import re
import subprocess
import time

import httpx
import pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # a missing browser driver is a failure, never a skip
    pytest.fail("playwright is missing from the venv: run tools/install-deps.sh", pytrace=False)

CHROMIUM = "/usr/bin/chromium"
XSS = '<img src=x onerror="window.__xss=1">'


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: Debian's chromium package (tools/install-deps.sh installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


class Page:
    """a browser page that records console errors and uncaught exceptions"""

    def __init__(self, browser, **kw):
        self.context = browser.new_context(**kw)
        self.page = self.context.new_page()
        self.errors = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser):
    p = Page(browser)
    yield p
    p.close()


def figure(pg, sel):
    text = pg.locator(sel).inner_text()
    return float(text) if re.fullmatch(r"[0-9.]+", text) else None


def test_page_headers_and_routes(server):
    r = httpx.get(server.url("/"), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "/ui/app.js" in r.text
    assert httpx.head(server.url("/"), timeout=10).status_code == 200
    js = httpx.get(server.url("/ui/app.js"), timeout=10)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url("/ui/nothing.js"), timeout=10).status_code == 404
    # POST / is still TGI's compat route
    tgi = httpx.post(server.url("/"), json={"inputs": "def", "parameters": {"max_new_tokens": 3}}, timeout=60)
    assert tgi.status_code == 200 and isinstance(tgi.json(), list) and "generated_text" in tgi.json()[0]
    # without --auth the admin routes are off, the session says who is asking (nobody)
    off = httpx.get(server.url("/admin/keys"), timeout=10)
    assert off.status_code == 403 and off.json()["error"]["code"] == "admin_off"
    s = httpx.get(server.url("/ui/session"), timeout=10).json()
    assert s["auth"] is False and s["key"] is None and s["model"]["id"] == "tiny-qwen2" and s["ready"] is True


def test_chat_streams_like_the_api(server, client, page):
    pg = page.page
    pg.goto(server.url("/"))
    expect(pg.locator("#model-name")).to_have_text("tiny-qwen2")
    expect(pg.locator("#chat-model")).to_have_value("tiny-qwen2")
    pg.fill("#chat-temperature", "0")
    pg.fill("#chat-max-tokens", "24")
    pg.fill("#chat-system", "You write Python.")
    pg.fill("#chat-input", "def add(a, b):")
    pg.press("#chat-input", "Enter")  # Enter sends
    stats = pg.locator(".msg.assistant .stats")
    expect(stats).to_contain_text("TTFT", timeout=60000)
    expect(stats).to_contain_text("24 tokens")
    expect(stats).to_contain_text("tokens/s")
    shown = pg.locator(".msg.assistant .text").inner_text()
    want = client.chat.completions.create(
        model="tiny-qwen2", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}],
    ).choices[0].message.content
    assert shown.strip() == want.strip() and want.strip()
    assert page.errors == []


def test_stop_button(server, page):
    pg = page.page
    pg.goto(server.url("/"))
    expect(pg.locator("#chat-model")).to_have_value("tiny-qwen2")
    pg.fill("#chat-max-tokens", "1900")
    pg.fill("#chat-temperature", "1")
    pg.fill("#chat-seed", "7")
    pg.fill("#chat-input", "import os")
    pg.click("#chat-send")
    expect(pg.locator("#chat-stop")).to_be_enabled()
    expect(pg.locator(".msg.assistant .text")).not_to_be_empty(timeout=60000)
    pg.keyboard.press("Escape")  # Esc stops, as the Stop button does
    expect(pg.locator(".msg.assistant .stats")).to_contain_text("stopped", timeout=30000)
    expect(pg.locator("#chat-send")).to_be_enabled()
    m = server.wait_idle()  # the server noticed the client leave and freed its sequence
    assert m["zse_running_sequences"] == 0 and m["zse_kv_blocks_used"] == 0, m
    assert page.errors == []


def test_client_text_is_escaped_in_the_playground(server, page):
    pg = page.page
    pg.goto(server.url("/"))
    expect(pg.locator("#chat-model")).to_have_value("tiny-qwen2")
    pg.fill("#chat-max-tokens", "2")
    pg.fill("#chat-input", XSS)
    pg.click("#chat-send")
    expect(pg.locator(".msg.user")).to_have_text(XSS)
    expect(pg.locator(".msg.assistant .stats")).to_contain_text("tokens", timeout=60000)
    assert pg.locator("#transcript img").count() == 0
    assert pg.evaluate("window.__xss") is None
    assert page.errors == []


def test_live_view_moves_after_a_request(server, client, page):
    pg = page.page
    pg.goto(server.url("/"))
    pg.click("#tab-btn-live")
    expect(pg.locator("#tab-live")).to_be_visible()
    expect(pg.locator("#live-tokens")).to_have_text(re.compile(r"^\d+$"), timeout=10000)
    expect(pg.locator("#live-kv")).to_contain_text("blocks")
    expect(pg.locator("#live-memory")).to_contain_text("CPU")
    expect(pg.locator("#health")).to_have_text("ready")
    tokens_before = figure(pg, "#live-tokens")
    requests_before = figure(pg, "#live-requests")
    client.completions.create(model="tiny-qwen2", prompt="import sys", max_tokens=12, temperature=0)
    pg.wait_for_function(
        "([t, r]) => Number(document.getElementById('live-tokens').textContent) >= t + 12 &&"
        " Number(document.getElementById('live-requests').textContent) >= r + 1",
        arg=[tokens_before, requests_before], timeout=10000)
    assert pg.locator("#live-chart").bounding_box()["height"] > 50
    assert page.errors == []


def test_keyboard_and_phone_width(server, browser):
    p = Page(browser, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    try:
        pg = p.page
        pg.goto(server.url("/"))
        expect(pg.locator("#model-name")).to_have_text("tiny-qwen2")
        # nothing wider than the screen
        assert pg.evaluate("document.documentElement.scrollWidth") <= 360
        # tabs by arrow keys
        pg.focus("#tab-btn-playground")
        pg.keyboard.press("ArrowRight")
        expect(pg.locator("#tab-btn-live")).to_be_focused()
        expect(pg.locator("#tab-live")).to_be_visible()
        expect(pg.locator("#tab-playground")).to_be_hidden()
        pg.keyboard.press("ArrowLeft")
        expect(pg.locator("#tab-playground")).to_be_visible()
        # the composer is reached with Tab and sends with Enter
        pg.fill("#chat-max-tokens", "3")
        pg.focus("#chat-send")
        pg.keyboard.press("Shift+Tab")
        expect(pg.locator("#chat-input")).to_be_focused()
        pg.keyboard.type("x = 1")
        pg.keyboard.press("Enter")
        expect(pg.locator(".msg.assistant .stats")).to_contain_text("tokens", timeout=60000)
        assert pg.evaluate("document.documentElement.scrollWidth") <= 360
        assert p.errors == []
    finally:
        p.close()


# ---- with --auth: login, roles, the admin routes --------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(zse_bin, model_path, server_factory, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("dash-db") / "zse.db")

    def make_key(*args):
        out = subprocess.run([str(zse_bin), "api-key", "create", *args, "--db", db],
                             check=True, capture_output=True, timeout=60)
        return out.stdout.decode().strip()

    admin = make_key("root", "--admin")
    user = make_key("plain")
    s = server_factory("--auth", db=db, api_key=user)
    s.admin_key, s.user_key = admin, user
    yield s
    rc, log = s.close()
    assert rc == 0, log[-4000:]
    assert "AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_admin_routes_refuse_others(auth_server):
    s = auth_server
    for method, path, body in (("GET", "/admin/keys", None), ("POST", "/admin/keys", {"name": "sneaky"}),
                               ("POST", "/admin/keys/plain", {"role": "admin"}), ("DELETE", "/admin/keys/root", None),
                               ("GET", "/admin/audit", None)):
        none = httpx.request(method, s.url(path), json=body, timeout=10)
        assert none.status_code == 401, (method, path, none.text)
        plain = httpx.request(method, s.url(path), json=body, headers=bearer(s.user_key), timeout=10)
        assert plain.status_code == 403 and plain.json()["error"]["code"] == "not_admin", (method, path, plain.text)
        bad = httpx.request(method, s.url(path), json=body, headers=bearer("zse-" + "0" * 48), timeout=10)
        assert bad.status_code == 401
    keys = httpx.get(s.url("/admin/keys"), headers=bearer(s.admin_key), timeout=10).json()["keys"]
    assert sorted(k["name"] for k in keys) == ["plain", "root"]  # nothing was made or changed
    assert {k["name"]: k["role"] for k in keys} == {"plain": "user", "root": "admin"}
    # the session needs no key to say that one is needed, and tells nothing more
    anon = httpx.get(s.url("/ui/session"), timeout=10).json()
    assert anon["auth"] is True and anon["key"] is None and anon["model"] is None
    assert httpx.get(s.url("/ui/session"), headers=bearer("zse-wrong"), timeout=10).status_code == 401
    mine = httpx.get(s.url("/ui/session"), headers=bearer(s.user_key), timeout=10).json()
    assert mine["key"] == "plain" and mine["role"] == "user" and mine["model"]["id"] == "tiny-qwen2"


def test_plain_key_sees_no_admin_views(auth_server, page):
    pg = page.page
    pg.goto(auth_server.url("/"))
    expect(pg.locator("#login")).to_be_visible()
    expect(pg.locator("#tab-btn-playground")).to_be_hidden()
    pg.fill("#login-key", auth_server.user_key)
    pg.press("#login-key", "Enter")
    expect(pg.locator("#whoami")).to_have_text("plain (user)")
    expect(pg.locator("#login")).to_be_hidden()
    expect(pg.locator("#tab-btn-keys")).to_be_hidden()
    expect(pg.locator("#tab-btn-audit")).to_be_hidden()
    expect(pg.locator("#chat-model")).to_have_value("tiny-qwen2")
    assert page.errors == []


def test_wrong_key_is_refused_at_login(auth_server, page):
    pg = page.page
    pg.goto(auth_server.url("/"))
    pg.fill("#login-key", "zse-" + "1" * 48)
    pg.click("#login-form button")
    expect(pg.locator("#login-error")).to_contain_text("Incorrect API key")
    expect(pg.locator("#tab-btn-playground")).to_be_hidden()


def test_admin_manages_keys_and_reads_the_audit_log(auth_server, page):
    s = auth_server
    pg = page.page
    pg.on("dialog", lambda d: d.accept())
    pg.goto(s.url("/"))
    pg.fill("#login-key", s.admin_key)
    pg.press("#login-key", "Enter")
    expect(pg.locator("#whoami")).to_have_text("root (admin)")
    pg.click("#tab-btn-keys")
    expect(pg.locator("#keys-table tbody tr")).to_have_count(2)

    # create: the key is shown once and works at once
    pg.fill("#key-name", "made-in-ui")
    pg.fill("#key-rate", "7")
    pg.click("#key-form button[type=submit]")
    expect(pg.locator("#key-created")).to_be_visible()
    new_key = pg.locator("#key-created-value").inner_text()
    assert re.fullmatch(r"zse-[0-9a-f]{48}", new_key)
    row = pg.locator("#keys-table tr[data-key='made-in-ui']")
    expect(row).to_contain_text("7/min")
    expect(row).to_contain_text("user")
    assert httpx.get(s.url("/v1/models"), headers=bearer(new_key), timeout=10).status_code == 200
    # the new key is an ordinary one: no admin routes
    assert httpx.get(s.url("/admin/keys"), headers=bearer(new_key), timeout=10).status_code == 403

    # a rate limit changed in the table
    row.locator("input").fill("3")
    row.get_by_role("button", name="Set limit").click()
    expect(pg.locator("#keys-table tr[data-key='made-in-ui']")).to_contain_text("3/min")

    # disable: refused at once; enable again
    pg.locator("#keys-table tr[data-key='made-in-ui']").get_by_role("button", name="Disable").click()
    expect(pg.locator("#keys-table tr[data-key='made-in-ui']")).to_contain_text("disabled")
    assert httpx.get(s.url("/v1/models"), headers=bearer(new_key), timeout=10).status_code == 401
    pg.locator("#keys-table tr[data-key='made-in-ui']").get_by_role("button", name="Enable").click()
    expect(pg.locator("#keys-table tr[data-key='made-in-ui']")).to_contain_text("enabled")
    assert httpx.get(s.url("/v1/models"), headers=bearer(new_key), timeout=10).status_code == 200

    # the admin cannot delete its own key; the error is shown
    pg.locator("#keys-table tr[data-key='root']").get_by_role("button", name="Delete").click()
    expect(pg.locator("#keys-error")).to_contain_text("cannot delete itself")

    # delete
    pg.locator("#keys-table tr[data-key='made-in-ui']").get_by_role("button", name="Delete").click()
    expect(pg.locator("#keys-table tr[data-key='made-in-ui']")).to_have_count(0)
    assert httpx.get(s.url("/v1/models"), headers=bearer(new_key), timeout=10).status_code == 401

    # a request whose route holds markup, then the audit log, filtered by key
    bad = httpx.get(s.url("/v1/models/" + XSS), headers=bearer(s.user_key), timeout=10)
    assert bad.status_code == 404
    pg.click("#tab-btn-audit")
    pg.fill("#audit-key", "plain")
    pg.wait_for_timeout(400)  # the audit writer flushes every quarter second
    pg.click("#audit-form button")
    cell = pg.locator("#audit-table td", has_text="/v1/models/<img")
    expect(cell).to_have_count(1)
    assert cell.inner_text() == "/v1/models/" + XSS
    assert pg.locator("#audit-table img").count() == 0
    assert pg.evaluate("window.__xss") is None
    keys_shown = set(pg.locator("#audit-table tbody tr td:nth-child(2)").all_inner_texts())
    assert keys_shown == {"plain"}
    pg.fill("#audit-key", "")
    pg.click("#audit-form button")
    expect(pg.locator("#audit-table tbody tr td:nth-child(2)", has_text="root").first).to_be_visible()
    # the refused delete (409) is the one failed request the page made
    assert [e for e in page.errors if "status of 409" not in e] == []


def test_cli_changes_still_reach_the_server(auth_server, zse_bin):
    """the admin routes' database connection must not hide `zse api-key` changes from the
    server (closing a descriptor of the file in the same process would drop its locks)"""
    s = auth_server
    h = bearer(s.user_key)
    assert httpx.get(s.url("/admin/keys"), headers=bearer(s.admin_key), timeout=10).status_code == 200
    for action, want in (("disable", 401), ("enable", 200), ("disable", 401), ("enable", 200)):
        subprocess.run([str(zse_bin), "api-key", action, "plain", "--db", s.db], check=True, capture_output=True,
                       timeout=60)
        end = time.time() + 10
        while time.time() < end and httpx.get(s.url("/v1/models"), headers=h, timeout=10).status_code != want:
            time.sleep(0.1)
        assert httpx.get(s.url("/v1/models"), headers=h, timeout=10).status_code == want, action
        assert httpx.get(s.url("/admin/keys"), headers=bearer(s.admin_key), timeout=10).status_code == 200
