#!/usr/bin/python3
"""Converse.js in headless Chromium chats with a slixmpp client.

Run by tests/tests/browser.rs with the Debian python (/usr/bin/python3,
packages python3-selenium, python3-slixmpp, chromium, chromium-driver;
.ci/run installs them, and `npm ci` Converse.js into node_modules/):

    converse_chat.py --transport websocket|bosh --url URL
                     --c2s-host HOST --c2s-port PORT --domain DOMAIN
                     --alice-password PW --bob-password PW
                     --screenshot PATH

alice logs in with Converse.js (this directory's index.html, served on
127.0.0.1) over the given transport URL; bob logs in with slixmpp over
TCP c2s (STARTTLS, the test node's self-signed certificate). alice opens
a chat with bob and sends a message, bob answers, and the answer must
show in Converse's chat. Every wait is on a DOM marker or an XMPP event,
with a deadline.

Lines printed on stdout:
    BOB ONLINE <full jid>           slixmpp session started
    PAGE <url>                      the page Chromium opened (no password)
    LOGGEDIN <transport>            Converse shows its logged-in control box
    CHAT_OPEN <jid>                 the chat with bob is open
    SENT alice <to> <body>          typed into Converse and sent
    RECEIVED bob <from> <body>      slixmpp got it
    SENT bob <to> <body>            slixmpp answered
    DISPLAYED alice <body>          the answer is in Converse's chat DOM
    SCREENSHOT <path>               the chat, as PNG
    CONSOLE <path>                  Chromium's console log
    DONE
    ERROR <text>                    on any failure (exit status non-zero)
"""

import argparse
import asyncio
import functools
import http.server
import os
import ssl
import sys
import tempfile
import threading
import traceback
import urllib.parse
from pathlib import Path

import slixmpp
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

HERE = Path(__file__).resolve().parent
TIMEOUT = 45.0


def out(*parts):
    print(*parts, flush=True)


def err(*parts):
    print(*parts, file=sys.stderr, flush=True)


class Failure(Exception):
    pass


# --- the page, served over plain HTTP on a kernel-picked port ---------------

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        err("http.server:", fmt % args)


def serve_directory(directory):
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- bob: slixmpp in an asyncio loop of its own thread ----------------------

class Bob(slixmpp.ClientXMPP):
    def __init__(self, jid, password):
        super().__init__(jid, password)
        # The test node has a self-signed certificate.
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.online = asyncio.Event()
        self.failed = None
        self.inbox = asyncio.Queue()
        self.add_event_handler("session_start", self._start)
        self.add_event_handler("failed_all_auth", self._auth_failed)
        self.add_event_handler("message", self._message)

    async def _start(self, _):
        await self.get_roster()
        self.send_presence()
        self.online.set()

    def _auth_failed(self, _):
        self.failed = "bob: authentication failed"
        self.online.set()

    def _message(self, msg):
        if msg["type"] in ("chat", "normal") and msg["body"]:
            self.inbox.put_nowait(msg)


class BobThread:
    """Runs bob's event loop in a thread; the main thread drives Chromium."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.bob = None

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro, timeout=TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def login(self, jid, password, host, port):
        async def go():
            self.bob = Bob(jid, password)
            self.bob.connect((host, port))
            await asyncio.wait_for(self.bob.online.wait(), TIMEOUT)
            if self.bob.failed:
                raise Failure(self.bob.failed)
            return self.bob.boundjid.full
        return self.call(go(), TIMEOUT + 5)

    def receive(self):
        async def go():
            return await asyncio.wait_for(self.bob.inbox.get(), TIMEOUT)
        return self.call(go(), TIMEOUT + 5)

    def send(self, to, body):
        async def go():
            self.bob.send_message(mto=to, mbody=body, mtype="chat")
        self.call(go())

    def logout(self):
        if self.bob is None:
            return
        async def go():
            self.bob.disconnect()
            try:
                await asyncio.wait_for(self.bob.disconnected, 5)
            except Exception:
                pass
        try:
            self.call(go(), 10)
        except Exception:
            pass


# --- alice: Converse.js in headless Chromium --------------------------------

def start_chromium(chromium, chromedriver, profile_dir):
    """Chromium through chromedriver, both given explicitly: selenium never
    looks for (or downloads) a browser or driver of its own."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in (
        "--headless=new",
        "--no-sandbox",  # we run as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile_dir}",
        "--window-size=1280,900",
        "--no-first-run",
        "--no-default-browser-check",
    ):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver)
    return webdriver.Chrome(service=service, options=opts)


def wait_for(driver, what, condition, timeout=TIMEOUT):
    """Waits until `condition(driver)` is truthy; raises Failure naming `what`."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise Failure(f"timed out after {timeout:.0f}s waiting for {what}") from None


def login_outcome(driver):
    """'ok' once Converse shows the logged-in control box; the feedback text
    if the login form shows an error; None while still connecting."""
    if driver.find_elements(By.CSS_SELECTOR, "#controlbox converse-user-profile"):
        return "ok"
    for el in driver.find_elements(By.CSS_SELECTOR, ".conn-feedback.error"):
        text = " ".join(el.text.split())
        if text:
            return "error: " + text
    return None


def chat_selector(jid):
    return f'converse-chat[jid="{jid}"]'


def chat_texts(driver, jid):
    return [
        e.text
        for e in driver.find_elements(By.CSS_SELECTOR, f"{chat_selector(jid)} .chat-msg__text")
    ]


def save_console(driver, path):
    try:
        entries = driver.get_log("browser")
    except WebDriverException as e:
        entries = [{"level": "ERROR", "message": f"cannot read the browser log: {e}"}]
    with open(path, "w") as f:
        for e in entries:
            f.write(f"{e.get('level')} {e.get('message')}\n")
    return entries


def run(args, bob_thread):
    domain = args.domain
    alice_jid = f"alice@{domain}"
    bob_jid = f"bob@{domain}"

    bob_full = bob_thread.login(bob_jid + "/slixmpp", args.bob_password,
                                args.c2s_host, args.c2s_port)
    out("BOB ONLINE", bob_full)

    server = serve_directory(HERE)
    base = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    transport_param = {"websocket": "websocket_url", "bosh": "bosh_service_url"}[args.transport]
    query = {transport_param: args.url, "jid": alice_jid, "loglevel": "debug"}
    shown = base + "?" + urllib.parse.urlencode(query)
    query["password"] = args.alice_password
    page = base + "?" + urllib.parse.urlencode(query)

    screenshot = Path(args.screenshot)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    console = screenshot.with_suffix(".console.log")

    profile = tempfile.TemporaryDirectory(prefix="converse-chromium-")
    try:
        driver = start_chromium(args.chromium, args.chromedriver, profile.name)
    except Exception as e:
        raise Failure(
            f"Chromium did not start ({args.chromium} via {args.chromedriver}): "
            f"{type(e).__name__}: {e}"
        ) from None
    try:
        out("BROWSER", driver.capabilities.get("browserVersion", "?"))
        try:
            driver.get(page)
            out("PAGE", shown)
            wait_for(driver, "Converse.js to load (window.converse)",
                     lambda d: d.execute_script("return typeof window.converse === 'object'"))
            outcome = wait_for(driver, f"Converse.js to log in over {args.transport}",
                               login_outcome)
            if outcome != "ok":
                raise Failure(f"Converse.js login over {args.transport} failed: {outcome}")
            out("LOGGEDIN", args.transport)

            # Converse's own route: #converse/chat?jid=... opens a chat.
            driver.execute_script("window.location.hash = arguments[0]",
                                  f"converse/chat?jid={bob_jid}")
            textarea = wait_for(
                driver, f"the chat with {bob_jid} to open",
                lambda d: next(iter(d.find_elements(
                    By.CSS_SELECTOR, f"{chat_selector(bob_jid)} textarea.chat-textarea")), None))
            out("CHAT_OPEN", bob_jid)

            hello = f"hello bob from Converse.js over {args.transport}"
            textarea.send_keys(hello)
            textarea.send_keys(Keys.ENTER)
            wait_for(driver, "Converse.js to show the sent message",
                     lambda d: hello in chat_texts(d, bob_jid))
            out("SENT", "alice", bob_jid, hello)

            try:
                got = bob_thread.receive()
            except (asyncio.TimeoutError, TimeoutError):
                raise Failure("bob (slixmpp) never received alice's message") from None
            out("RECEIVED", "bob", got["from"].full, got["body"])
            if got["body"] != hello:
                raise Failure(f"bob received {got['body']!r}, expected {hello!r}")
            if got["from"].bare != alice_jid:
                raise Failure(f"bob's message came from {got['from']}, expected {alice_jid}")

            reply = f"hi alice, slixmpp here ({args.transport})"
            bob_thread.send(got["from"].full, reply)
            out("SENT", "bob", got["from"].full, reply)
            wait_for(driver, "bob's reply in Converse.js's chat",
                     lambda d: reply in chat_texts(d, bob_jid))
            out("DISPLAYED", "alice", reply)

            if not driver.save_screenshot(str(screenshot)):
                raise Failure(f"cannot save the screenshot to {screenshot}")
            out("SCREENSHOT", screenshot)
        except Exception:
            failed = screenshot.with_name(screenshot.stem + "-failed.png")
            try:
                if driver.save_screenshot(str(failed)):
                    out("SCREENSHOT", failed)
            except Exception:
                pass
            entries = save_console(driver, console)
            out("CONSOLE", console)
            err(f"--- browser console (last 150 of {len(entries)} entries, all in {console}) ---")
            for e in entries[-150:]:
                err(e.get("level"), e.get("message"))
            raise
        save_console(driver, console)
        out("CONSOLE", console)
    finally:
        try:
            driver.quit()
        except Exception:
            pass
        profile.cleanup()
        server.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=["websocket", "bosh"], required=True)
    p.add_argument("--url", required=True, help="ws://.../xmpp-websocket or http://.../http-bind")
    p.add_argument("--c2s-host", required=True)
    p.add_argument("--c2s-port", type=int, required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--alice-password", required=True)
    p.add_argument("--bob-password", required=True)
    p.add_argument("--screenshot", required=True)
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    p.add_argument("--chromedriver",
                   default=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    args = p.parse_args()

    for what, path in (("chromium", args.chromium), ("chromedriver", args.chromedriver)):
        if not os.access(path, os.X_OK):
            out("ERROR", f"{what} not found at {path} (.ci/run installs it)")
            return 2
    if not (HERE / "node_modules/converse.js/dist/converse.min.js").is_file():
        out("ERROR", f"Converse.js missing: run `npm ci --prefix {HERE}` (.ci/run does)")
        return 2

    bob_thread = BobThread()
    try:
        run(args, bob_thread)
    except Failure as e:
        out("ERROR", e)
        return 1
    except Exception as e:
        traceback.print_exc()
        out("ERROR", f"{type(e).__name__}: {e}")
        return 1
    finally:
        bob_thread.logout()
    out("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
