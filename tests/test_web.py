"""The station's own page (issue 24): a real daemon process against a real mosquitto, its page driven in
Debian's headless chromium through Debian's chromedriver (Selenium, given both by path: never a download).

Screenshots of each page go to docs/ (docs/web-live.png, -filmstrip, -stats, -login) with WEB_SCREENSHOTS=1, else to $TMPDIR.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from station.core.errors import ConfigError
from station.core.preprocess import Roi
from station.runtime.config.station import parse_config
from station.runtime.web.feed import WebFeed
from station.runtime.web.pictures import live_picture
from station.runtime.web.users import check_password, load_users, parse_users, user_line
from station.tools.loopback import free_port
from tests.daemon_helpers import Output, wait_until
from tests.mqtt_helpers import Recorder
from tests.daemon_helpers import start_station, write_config

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parent.parent / "docs"
WAIT = 60  # seconds for anything the browser waits for: generous, a loaded 2-core machine is slow
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (scripts/test installs them)",
)
PASSWORDS = {"vera": "viewer-password", "otto": "operator-password"}


# -- configuration and users ------------------------------------------------------------------------

BASE = "station: st1\ncamera: {source: 'sim://'}\nmodel: m.onnx\nreference: refs\n"


def test_the_web_section_is_parsed_and_a_network_address_needs_users(tmp_path):
    assert parse_config(BASE).web is None  # off unless present
    config = parse_config(BASE + "web: {port: 8081, users_file: users}\n", base=tmp_path)
    assert (config.web.port, config.web.bind, config.web.users_file) == (8081, "127.0.0.1", tmp_path / "users")
    assert parse_config(BASE + "web: {bind: 0.0.0.0, users_credential: web-users}\n").web.has_users
    assert parse_config(BASE + "web: {bind: '::1'}\n").web.bind == "::1"  # loopback: the open page
    for section, message in (
        ("web: {bind: 0.0.0.0}", "station.yaml:5: web: bind 0.0.0.0 lets the network reach the page"),
        ("web: {bind: line1-pc}", "bind line1-pc lets the network reach the page"),
        ("web: {users_file: a, users_credential: b}", "give users_file or users_credential, not both"),
        ("web: {certificate: c.pem}", "certificate and private_key go together"),
        ("web: {port: 0}", "station.yaml:5: web.port: Input should be greater than or equal to 1"),
        ("web: {password: x}", "station.yaml:5: web.password: never put a secret in the configuration file"),
    ):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            parse_config(BASE + section + "\n")


def test_station_run_refuses_a_network_bind_without_users_with_exit_78(tmp_path):
    config = tmp_path / "station.yaml"
    config.write_text(BASE + "web:\n  port: 8080\n  bind: 0.0.0.0\n")
    done = subprocess.run(
        [sys.executable, "-m", "station", "run", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 78, done.stderr
    assert f"{config}:5: web: bind 0.0.0.0 lets the network reach the page" in done.stderr
    assert "Traceback" not in done.stderr


def test_users_are_hashed_lines_written_by_station_web_user(tmp_path):
    users = tmp_path / "web-users"
    for name, role in (("vera", "viewer"), ("otto", "operator"), ("vera", "integrator")):
        done = subprocess.run(
            [sys.executable, "-m", "station", "web-user", name, role, "--file", str(users)],
            input=f"{name}-secret-1\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    text = users.read_text()
    assert stat.S_IMODE(users.stat().st_mode) == 0o600 and "secret" not in text  # hashes only
    found = parse_users(text, str(users))
    assert {name: user.role for name, user in found.items()} == {"vera": "integrator", "otto": "operator"}  # replaced
    assert check_password(found["otto"].hash, "otto-secret-1") and not check_password(found["otto"].hash, "otto")
    assert found["vera"].may("operator") and not found["otto"].may("integrator")

    short = subprocess.run(
        [sys.executable, "-m", "station", "web-user", "x", "viewer"],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert short.returncode == 78 and "8 to 1024 characters" in short.stderr
    printed = subprocess.run(
        [sys.executable, "-m", "station", "web-user", "pia", "viewer"],
        input="pia-secret-1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.stdout.startswith("pia:viewer:scrypt$")

    users.write_text(text + "mallory:root:plain\n")
    with pytest.raises(ConfigError, match=rf"{users}:3: not a user line NAME:ROLE:HASH"):
        load_users(SimpleNamespace(users_file=users, users_credential=None))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "web-users").write_text(user_line("ida", "integrator", "ida-secret-1") + "\n")
    loaded = load_users(
        SimpleNamespace(users_file=None, users_credential="web-users"), env={"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    assert loaded["ida"].role == "integrator"
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        load_users(SimpleNamespace(users_file=None, users_credential="web-users"), env={})


def test_the_feed_keeps_bounded_rings_and_figures_since_start_and_since_a_reset():
    feed = WebFeed(results=3)
    frames = [SimpleNamespace(image=np.zeros((4, 4), np.uint8)) for _ in range(4)]
    messages = [
        {"id": str(i), "seq": seq, "verdict": v, "latency_ms": ms}
        for i, (seq, v, ms) in enumerate([(1, "OK", 2.0), (2, "NG", 4.0), (4, "OK", 9.0), (5, "NG", 1.0)])
    ]
    feed.judged("inspector", messages[:2] + [{"id": "nv", "seq": 3, "reason": "no part"}], frames[:2])
    feed.reset(dropped_now=7)
    feed.judged("inspector", messages[2:], frames[2:])
    assert [m["id"] for m in feed.results(10)] == ["3", "2", "nv"]  # newest first, 3 kept
    assert [m["id"] for m in feed.results(10, ng_only=True)] == ["3", "1"]
    start, since_reset = feed.tallies()
    assert (start["parts"], start["ok"], start["ng"], start["no_verdicts"], start["yield"]) == (5, 2, 2, 1, 0.5)
    assert start["processing_ms"] == {"min": 1.0, "max": 9.0, "avg": 4.0}
    assert (since_reset["parts"], since_reset["processing_ms"]["max"], feed.dropped_at_reset) == (2, 9.0, 7)
    assert feed.latest.message["id"] == "3" and feed.latest.frame is frames[3] and feed.latest.number == 2


def test_the_live_picture_shows_the_region_and_the_worst_position():
    image = np.full((200, 300), 90, np.uint8)
    latest = SimpleNamespace(
        frame=SimpleNamespace(image=image),
        number=1,
        inspector=SimpleNamespace(regions=(), roi=Roi(50, 40, 120, 100)),
        message={"worst_position": {"x": 100, "y": 90, "width": 20, "height": 20}},
    )
    picture = cv2.imdecode(np.frombuffer(live_picture(latest), np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert picture.shape == (200, 300, 3)
    green = picture[..., 1] - picture[..., 2] > 80
    red = picture[..., 2] - picture[..., 1] > 80
    ys, xs = np.nonzero(green)
    assert xs.min() in range(49, 53) and xs.max() in range(166, 171) and ys.min() in range(39, 43)
    ys, xs = np.nonzero(red)
    assert xs.min() in range(98, 102) and xs.max() in range(117, 122) and ys.min() in range(88, 92)


def test_the_verdict_beside_a_live_picture_is_that_pictures_own():
    from station.runtime.web.pictures import LIVE_INTERVAL, LivePictures

    now = [100.0]
    pictures = LivePictures(clock=lambda: now[0])
    inspector = SimpleNamespace(regions=(), roi=None, crop=lambda image: image[:26, :36])
    part = lambda number, level: SimpleNamespace(  # noqa: E731
        frame=SimpleNamespace(image=np.full((60, 80), level, np.uint8)), number=number, inspector=inspector, message={}
    )
    dark, bright, brighter = part(1, 10), part(2, 240), part(3, 120)
    level = lambda jpeg: cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE).mean()  # noqa: E731
    assert pictures.current(dark)[0] is dark
    assert pictures.current(bright)[0] is dark  # not due yet: every browser shares the last picture
    now[0] += LIVE_INTERVAL
    assert pictures.current(bright)[0] is bright
    # A page that was told about part 1 gets part 1's picture, though part 3 is the latest by now.
    assert level(pictures.picture("frame", 1, brighter)) < 20 and level(pictures.picture("frame", 2, brighter)) > 230
    assert pictures.picture("frame", None, brighter) == pictures.current(brighter)[2]  # part 2's: not due


# -- the page in a browser, against the real daemon ---------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager (which would download a driver and a browser) must never run: point it at nothing.
    os.environ["SE_MANAGER_PATH"] = "/nonexistent/selenium-manager"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1360,900",
        "--disable-gpu",
        "--ignore-certificate-errors",
    ):
        options.add_argument(argument)
    options.accept_insecure_certs = True  # the TLS test's self-signed certificate
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


def until(driver, condition, what: str, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), f"waiting for {what}")


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def shot(driver, name: str):
    """A screenshot to look at; kept in docs/ when WEB_SCREENSHOTS=1."""
    folder = DOCS if os.environ.get("WEB_SCREENSHOTS") == "1" else Path(os.environ.get("TMPDIR", "/tmp"))
    driver.save_screenshot(str(folder / f"web-{name}.png"))


def fetch(driver, method: str, path: str, body: dict | None = None, csrf: bool = True) -> dict:
    """A request from the page's own origin, as its script makes it: {status, data}."""
    return driver.execute_async_script(
        """
        const [method, path, body, csrf, done] = arguments;
        const me = await (await fetch('/api/me')).json();
        const headers = {'Content-Type': 'application/json'};
        if (csrf) headers['X-CSRF-Token'] = me.csrf;
        const response = await fetch(path, {method, headers, body: body === null ? undefined : JSON.stringify(body)});
        done({status: response.status, data: await response.json()});
    """,
        method,
        path,
        body,
        csrf,
    )


def state_on_mqtt(recorder) -> dict:
    return recorder.json_on("/state")[-1] if recorder.on("/state") else {}


@needs_chromium
def test_the_open_page_live_view_filmstrip_statistics_and_pause(tmp_path, station_files, broker, chromium):
    port = free_port()
    config = write_config(
        tmp_path,
        station_files,
        broker,
        '{source: "sim://?seed=3", fps: 25}',
        roi="{x: 142, y: 107, width: 36, height: 26}",
        keep_crops="{ng: true, ok_sample_rate: 1.0}",
        web=f"{{port: {port}}}",
    )
    recorder = Recorder(broker.host, broker.port, "plant/st1/#")
    process = start_station(config)
    output = Output(process)
    driver = chromium
    try:
        output.wait_for("the station's page on http://127.0.0.1", WAIT)
        driver.get(f"http://127.0.0.1:{port}/")
        # Live view: the picture follows the parts, with the verdict beside it.
        until(
            driver,
            lambda d: js(d, "return +document.getElementById('live-frame').dataset.number || 0") > 0,
            "a live frame",
        )
        first = js(driver, "return +document.getElementById('live-frame').dataset.number")
        until(
            driver,
            lambda d: js(d, "return +document.getElementById('live-frame').dataset.number") > first + 2,
            "the live frame to update",
        )
        size = js(driver, "const i = document.getElementById('live-frame'); return [i.naturalWidth, i.naturalHeight]")
        assert size == [320, 240]
        assert js(driver, "return document.getElementById('live-crop').naturalWidth") == 36 * 4  # the model's input
        assert driver.find_element("id", "live-verdict").text in ("OK", "NG")
        assert driver.find_element("id", "run-state").text == "running"

        # Filmstrip: an NG part with its kept crop; open it; freeze and step.
        driver.find_element("css selector", "nav button[data-tab=filmstrip]").click()
        ng_card = "#strip .card.NG .thumb img"
        until(
            driver,
            lambda d: js(
                d, f"return [...document.querySelectorAll('{ng_card}')].some(i => i.complete && i.naturalWidth > 0)"
            ),
            "an NG card with its crop",
        )
        driver.find_element("css selector", "#strip .card.NG").click()
        until(driver, lambda d: '"verdict": "NG"' in d.find_element("id", "detail-json").text, "the NG's verdict JSON")
        detail = json.loads(driver.find_element("id", "detail-json").text)
        assert detail["station"] == "st1" and detail["threshold"] and "distances" in detail
        until(
            driver,
            lambda d: js(d, "return document.getElementById('detail-crop').naturalWidth") == 36,
            "the NG's kept crop (the region at the camera's resolution)",
        )
        driver.find_element("id", "ng-only").click()
        until(
            driver,
            lambda d: js(
                d,
                "const c = [...document.querySelectorAll('#strip .card')];"
                "return c.length > 0 && c.every(e => e.dataset.verdict === 'NG')",
            ),
            "NG only",
        )
        driver.find_element("id", "ng-only").click()
        until(driver, lambda d: js(d, "return document.querySelectorAll('#strip .card.OK').length") > 0, "OK cards")
        driver.find_element("id", "freeze").click()
        frozen = js(driver, "return [...document.querySelectorAll('#strip .card')].map(c => c.dataset.id)")
        newest = fetch(driver, "GET", "/api/results?n=1")["data"]["results"][0]["id"]
        wait_until(
            lambda: fetch(driver, "GET", "/api/results?n=1")["data"]["results"][0]["id"] != newest,
            WAIT,
            "newer results",
        )
        driver.find_element("css selector", "#strip .card").click()
        driver.find_element("id", "step-older").click()
        until(
            driver,
            lambda d: js(d, "return document.querySelector('#strip .card.selected')?.dataset.id") == frozen[1],
            "the step to the next older result",
        )
        assert js(driver, "return [...document.querySelectorAll('#strip .card')].map(c => c.dataset.id)") == frozen
        shot(driver, "filmstrip")
        driver.find_element("id", "freeze").click()

        # Statistics since start and since a reset, which is logged.
        driver.find_element("css selector", "nav button[data-tab=stats]").click()
        parts = "return +(document.querySelector('#stats-table tr[data-key=parts] td:nth-child({})')?.textContent || 0)"
        until(driver, lambda d: js(d, parts.format(2)) > 5, "parts counted")
        driver.find_element("id", "reset-stats").click()
        until(driver, lambda d: js(d, parts.format(3)) < js(d, parts.format(2)), "figures since the reset")
        output.wait_for("web: local (integrator) reset the statistics", WAIT)
        assert driver.find_element("css selector", "#stats-now dd[data-key=broker]").text == "connected"
        shot(driver, "stats")

        # Pause through the page: the MQTT command's path, so the daemon's retained state says so.
        driver.find_element("id", "pause").click()
        recorder.wait_for(lambda: state_on_mqtt(recorder).get("paused") is True, WAIT, "paused on MQTT")
        until(driver, lambda d: d.find_element("id", "run-state").text == "PAUSED", "the PAUSED badge")
        until(driver, lambda d: d.find_element("id", "message").text == "pause: done", "the answer")
        output.wait_for("web: local (integrator) pause (web-1): done", WAIT)
        driver.find_element("id", "resume").click()
        recorder.wait_for(lambda: state_on_mqtt(recorder).get("paused") is False, WAIT, "resumed on MQTT")

        # A changeover through the button, to one of the configured products, as the product command.
        from selenium.webdriver.support.ui import Select

        assert [o.text for o in Select(driver.find_element("id", "product-choice")).options] == ["A", "B"]
        Select(driver.find_element("id", "product-choice")).select_by_visible_text("B")
        driver.find_element("id", "change-over").click()
        recorder.wait_for(lambda: state_on_mqtt(recorder).get("product") == "B", WAIT, "product B on MQTT")
        until(driver, lambda d: d.find_element("id", "message").text == "changeover to B: done", "the answer")
        until(driver, lambda d: d.find_element("id", "product").text.startswith("product B"), "product B shown")
        output.wait_for("web: local (integrator) asks product 'B'", WAIT)
        unknown = fetch(driver, "POST", "/api/command", {"cmd": "product", "product": "../etc"})
        assert unknown["status"] == 200 and unknown["data"]["ok"] is False  # answered as the MQTT command is
        assert "unknown product '../etc'" in unknown["data"]["error"]

        # The open page answers to loopback names only (a DNS-rebinding site gets nothing), and changes
        # nothing without the page's CSRF token.
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/state", headers={"Host": f"evil.example:{port}"})
        assert _status(request) == 421
        assert fetch(driver, "POST", "/api/command", {"cmd": "pause"}, csrf=False)["status"] == 403
        assert fetch(driver, "POST", "/api/command", {"cmd": "explode"})["status"] == 400
        assert fetch(driver, "GET", "/api/results?n=lots")["status"] == 400
        assert fetch(driver, "GET", "/api/nothing")["status"] == 404
    finally:
        process.terminate()
        code = output.finish(30)
        recorder.close()
    assert code == 0, output.text
    assert "Traceback" not in output.text


def _status(request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10, context=_insecure()) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        assert "Traceback" not in body and json.loads(body)["error"]
        return exc.code


def _insecure():
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def _users_file(path: Path) -> Path:
    path.write_text(
        "# the station's page\n"
        + "\n".join(
            user_line(name, "viewer" if name == "vera" else "operator", password)
            for name, password in PASSWORDS.items()
        )
    )
    return path


def _certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "web.pem", folder / "web.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def log_in(driver, name: str, password: str):
    until(driver, lambda d: d.find_element("id", "login-name").is_displayed(), "the login form")
    field = driver.find_element("id", "login-name")
    field.clear()
    field.send_keys(name)
    driver.find_element("id", "login-password").send_keys(password)
    driver.find_element("id", "login-submit").click()


@needs_chromium
def test_users_log_in_over_https_a_viewer_is_refused_and_an_operator_pauses(tmp_path, station_files, broker, chromium):
    port = free_port()
    cert, key = _certificate(tmp_path)
    users = _users_file(tmp_path / "web-users")
    config = write_config(
        tmp_path,
        station_files,
        broker,
        '{source: "sim://?seed=4", fps: 20}',
        web=f"{{port: {port}, users_file: {users}, certificate: {cert}, private_key: {key}}}",
    )
    recorder = Recorder(broker.host, broker.port, "plant/st1/#")
    process = start_station(config)
    output = Output(process)
    driver = chromium
    base = f"https://127.0.0.1:{port}"
    try:
        output.wait_for(f"the station's page on https://127.0.0.1:{port}/ (2 users)", WAIT)
        # Nothing but the login without a session, and no secret in the page.
        assert _status(urllib.request.Request(f"{base}/api/state")) == 401
        assert _status(urllib.request.Request(f"{base}/api/live/frame.jpg")) == 401
        with urllib.request.urlopen(f"{base}/", timeout=10, context=_insecure()) as response:
            page = response.read().decode()
        assert "csrf" not in page.lower() and "scrypt" not in page
        driver.delete_all_cookies()
        driver.get(f"{base}/")
        log_in(driver, "vera", "wrong-password")
        until(driver, lambda d: d.find_element("id", "login-error").text == "wrong name or password", "the refusal")
        shot(driver, "login")
        output.wait_for("web: failed login as 'vera'", WAIT)

        log_in(driver, "vera", PASSWORDS["vera"])
        until(driver, lambda d: d.find_element("id", "user").text == "vera (viewer)", "vera's page")
        cookie = driver.get_cookie("station_session")
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        assert js(driver, "return document.cookie") == ""  # the session is out of every script's reach
        until(
            driver,
            lambda d: js(d, "return +document.getElementById('live-frame').dataset.number || 0") > 0,
            "the viewer's live view",
        )
        assert driver.find_element("id", "pause").get_attribute("disabled") == "true"
        refused = fetch(driver, "POST", "/api/command", {"cmd": "pause"})
        assert refused["status"] == 403 and "viewer vera may not pause" in refused["data"]["error"]
        assert fetch(driver, "POST", "/api/stats/reset")["status"] == 403
        output.wait_for("web: vera (viewer) may not pause: refused", WAIT)
        assert state_on_mqtt(recorder).get("paused") is False

        driver.find_element("id", "logout").click()
        until(driver, lambda d: d.find_element("id", "login-name").is_displayed(), "logged out")
        assert (
            _status(
                urllib.request.Request(f"{base}/api/state", headers={"Cookie": f"station_session={cookie['value']}"})
            )
            == 401
        )  # the old session is gone
        log_in(driver, "otto", PASSWORDS["otto"])
        until(driver, lambda d: d.find_element("id", "user").text == "otto (operator)", "otto's page")
        assert fetch(driver, "POST", "/api/command", {"cmd": "pause"}, csrf=False)["status"] == 403  # CSRF
        until(driver, lambda d: d.find_element("id", "pause").is_enabled(), "the pause button")
        driver.find_element("id", "pause").click()
        recorder.wait_for(lambda: state_on_mqtt(recorder).get("paused") is True, WAIT, "paused on MQTT")
        output.wait_for("web: otto (operator) asks pause", WAIT)
        output.wait_for("web: otto (operator) logged in from 127.0.0.1", WAIT)
        reload = fetch(driver, "POST", "/api/command", {"cmd": "reload"})
        assert reload["status"] == 200 and reload["data"]["ok"] is True and reload["data"]["id"].startswith("web-")

        # Guessing passwords is slowed: five failures, then refused without a check.
        statuses = [_login_status(base, "otto", f"guess-{i}") for i in range(6)]
        assert statuses == [401] * 5 + [429], statuses
        assert _login_status(base, "otto", PASSWORDS["otto"]) == 429  # even the right one, for a minute
        output.wait_for("web: login as 'otto' from 127.0.0.1 refused: too many failed logins", WAIT)
    finally:
        process.terminate()
        code = output.finish(30)
        recorder.close()
    assert code == 0, output.text
    assert "Traceback" not in output.text and PASSWORDS["otto"] not in output.text


def _login_status(base: str, name: str, password: str) -> int:
    body = json.dumps({"name": name, "password": password}).encode()
    return _status(urllib.request.Request(f"{base}/api/login", data=body, headers={"Content-Type": "application/json"}))


def test_a_second_station_on_the_same_port_is_told_which_key_to_change(tmp_path, station_files, broker):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, station_files, broker, "{source: 'sim://'}", web=f"{{port: {port}}}")
        process = start_station(config)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 78, out
    assert f"web: cannot serve the page on 127.0.0.1:{port}" in out and "web.port" in out and "Traceback" not in out


@needs_chromium
def test_the_live_view_marks_a_per_position_verdicts_worst_position(tmp_path, broker, chromium):
    pytest.importorskip("torch")  # the per-position model is exported from a frozen torch backbone
    from calibration import workflow
    from export.positions import export_position_model
    from station.core.embedder import Embedder
    from station.core.simulated_line import FRAME_ROI
    from tests.test_positions import BLOB, good_frame, with_blob

    good, parts = tmp_path / "good", tmp_path / "parts"
    good.mkdir()
    parts.mkdir()
    for index in range(160):
        cv2.imwrite(str(good / f"good_{index:04d}.png"), good_frame(index))
    export_position_model(8, (36, 26), tmp_path / "model.onnx")
    workflow.calibrate_folders(Embedder(tmp_path / "model.onnx"), good, [], tmp_path / "refs" / "A", "A", roi=FRAME_ROI)
    cv2.imwrite(str(parts / "b_blob.png"), with_blob(good_frame(3100)))
    port = free_port()
    roi = FRAME_ROI
    config = tmp_path / "station.yaml"
    config.write_text(
        f"station: st1\ncamera: {{source: {parts}, loop: true, fps: 4}}\nmodel: {tmp_path / 'model.onnx'}\n"
        f"reference: {tmp_path / 'refs' / 'A'}\nroi: {{x: {roi.x}, y: {roi.y}, width: {roi.width}, height: {roi.height}}}\n"
        f"state_dir: {tmp_path / 'state'}\nmqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: plant}}\n"
        f"web: {{port: {port}}}\n"
    )
    process = start_station(config)
    output = Output(process)
    driver = chromium
    try:
        output.wait_for("the station's page on http://127.0.0.1", WAIT)
        driver.get(f"http://127.0.0.1:{port}/")
        until(driver, lambda d: d.find_element("id", "live-verdict").text == "NG", "the blob's NG verdict")
        box = fetch(driver, "GET", "/api/live")["data"]["verdict"]["worst_position"]
        assert box["x"] <= BLOB[0] < box["x"] + box["width"] and box["y"] <= BLOB[1] < box["y"] + box["height"]
        # The red box is drawn where the verdict says, on the picture the browser shows.
        red = driver.execute_script("""
            const img = document.getElementById('live-frame');
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            const g = canvas.getContext('2d'); g.drawImage(img, 0, 0);
            const px = g.getImageData(0, 0, canvas.width, canvas.height).data;
            let xs = [], ys = [];
            for (let i = 0; i < px.length; i += 4) {
              if (px[i] - px[i + 1] > 80) { xs.push((i / 4) % canvas.width); ys.push(Math.floor(i / 4 / canvas.width)); }
            }
            return xs.length ? [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)] : null;""")
        assert red is not None, "no red box on the live picture"
        assert box["x"] - 3 <= red[0] and red[1] <= box["x"] + box["width"] + 2
        assert box["y"] - 3 <= red[2] and red[3] <= box["y"] + box["height"] + 2
        shot(driver, "live")
    finally:
        process.terminate()
        code = output.finish(30)
    assert code == 0, output.text


def test_bad_requests_and_stalled_clients_neither_crash_nor_slow_the_station(tmp_path, station_files, broker):
    import socket

    port = free_port()
    config = write_config(
        tmp_path, station_files, broker, '{source: "sim://?seed=5", fps: 40}', web=f"{{port: {port}}}"
    )
    recorder = Recorder(broker.host, broker.port, "plant/st1/verdict")
    process = start_station(config)
    output = Output(process)
    base = f"http://127.0.0.1:{port}"
    stalled = []
    try:
        output.wait_for("the station's page on http://127.0.0.1", WAIT)
        with urllib.request.urlopen(f"{base}/api/me", timeout=10) as response:
            csrf = json.loads(response.read())["csrf"]

        def post(path: str, data: bytes) -> int:
            return _status(
                urllib.request.Request(
                    f"{base}{path}", data=data, headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"}
                )
            )

        for body in (b"\xff\xfe", b"[1, 2]", b'{"cmd": ["pause"]}', b'{"cmd": {"a": 1}}', b"{" * 5000, b"null"):
            assert post("/api/command", body) == 400, body
        assert post("/api/command", b'{"cmd": "' + b"x" * 100_000 + b'"}') == 413
        assert post("/api/login", b'{"name": "a", "password": "b"}') == 400  # the open page has no users
        for path in (
            "/static/..%2fserver.py",
            "/static/server.py",
            "/api/crops/..%2f..%2fetc%2fpasswd.jpg",
            "/api/crops/" + "a" * 5000 + ".jpg",
            "/api/results/" + "%00" * 100,
            "/api/stats/reset",
        ):
            assert _status(urllib.request.Request(f"{base}{path}")) in (404, 405), path
        for path in ("/api/live/frame.jpg?n=%C2%B2", "/api/live/crop.png?n=-1", "/api/results?after=x%00"):
            assert _status(urllib.request.Request(f"{base}{path}")) in (200, 400, 404), path
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # not HTTP at all
            raw.sendall(b"\x16\x03\x01\x00garbage\r\n\r\n")
            try:
                answer = raw.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b"" or answer.split(b" ")[1] == b"400", answer  # refused or closed
        # Browsers that stall: requests never finished, answers never read.
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /api/live/frame.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: never ends
            stalled.append(sock)
        for _ in range(5):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /api/results HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 50)  # answers pile up unread
            stalled.append(sock)
        before = max((v["seq"] for v in recorder.json_on("/verdict")), default=0)
        wait_until(
            lambda: max((v["seq"] for v in recorder.json_on("/verdict")), default=0) > before + 40,
            WAIT,
            "verdicts while browsers stall",
        )
        with urllib.request.urlopen(f"{base}/api/state", timeout=10) as response:  # and the page answers others
            assert json.loads(response.read())["station"] == "st1"
        assert process.poll() is None
    finally:
        for sock in stalled:
            sock.close()
        process.terminate()
        code = output.finish(30)
        recorder.close()
    assert code == 0, output.text
    assert "Traceback" not in output.text


def test_malformed_requests_get_a_400_and_one_log_line_never_a_traceback(tmp_path, station_files, broker):
    """What any client on the plant network can send: the station answers 400, goes on judging, and its
    log says so in a line (aiohttp logged each with a whole stack: read as a crash by plant IT)."""
    port = free_port()
    config = write_config(
        tmp_path, station_files, broker, '{source: "sim://?seed=4", fps: 20}', web=f"{{port: {port}}}"
    )
    recorder = Recorder(broker.host, broker.port, "plant/st1/verdict")
    process = start_station(config)
    output = Output(process)
    garbage = [
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"b" * 20_000 + b"\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /api/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(100),
    ]  # a TLS hello to plain HTTP
    try:
        output.wait_for(f"the station's page on http://127.0.0.1:{port}/", WAIT)
        for data in garbage:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(data)
                assert client.recv(64).startswith(b"HTTP/1.0 400") or data.startswith(b"\x16"), data[:40]
        output.wait_for("web: Error handling request", WAIT)
        before = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > before + 3, WAIT, "verdicts after the garbage")
    finally:
        process.terminate()
        code = output.finish(30)
        recorder.close()
    assert code == 0, output.text
    assert "Traceback" not in output.text, output.text
