#!/usr/bin/python3
"""slixmpp clients for the interop tests in tests/tests/interop.rs.

Run with the Debian python (/usr/bin/python3, package python3-slixmpp).
Every scenario prints machine-checkable lines on stdout and exits 0 on
success, non-zero on failure or timeout:

    slix.py chat     HOST PORT DOMAIN ALICE_PW BOB_PW
    slix.py listen   HOST PORT DOMAIN USER PW COUNT
    slix.py send     HOST PORT DOMAIN USER PW TO BODY
    slix.py features HOST PORT DOMAIN USER PW

Lines printed:
    AUTH <user> <mechanism>               SASL mechanism the client used
    ONLINE <full jid>                     session started, presence sent
    ROSTER <user> ok|error <condition>    outcome of the roster get
    READY                                 (listen) bob is available
    RECEIVED <user> <from> <body>         a chat message arrived
    DELAY <user> <stamp>                  it carried a XEP-0203 delay stamp
    SENT <from> <to> <body>
    FEATURE <var>, PING <seconds>, VERSION <name> <version>
    ERROR <text>                          on failure
"""

import asyncio
import logging
import ssl
import sys

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout

# Only SCRAM: if the server offered nothing else, login fails instead of
# silently falling back to PLAIN.
SCRAM = {
    "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512",
    "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-512-PLUS",
}
TIMEOUT = 20.0


def out(*parts):
    print(*parts, flush=True)


class Client(ClientXMPP):
    def __init__(self, jid, password, host, port, plugins=()):
        super().__init__(jid, password, sasl_mech=None)
        self.user = jid.split("@", 1)[0]
        self.addr = (host, port)
        self['feature_mechanisms'].use_mechs = set(SCRAM)
        # The test node has a self-signed certificate.
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        for p in ("xep_0203",) + tuple(plugins):  # 0203: delayed delivery
            self.register_plugin(p)
        self.online = asyncio.Event()
        self.failed = None
        self.inbox = asyncio.Queue()
        self.add_event_handler("session_start", self._start)
        self.add_event_handler("message", self._message)
        self.add_event_handler("failed_all_auth", self._auth_failed)
        self.add_event_handler("auth_success", self._auth_ok)

    def _auth_ok(self, _):
        mech = self['feature_mechanisms'].mech
        out("AUTH", self.user, mech.name if mech else "?")

    def _auth_failed(self, _):
        self.failed = "authentication failed"
        out("ERROR", self.user, "authentication failed")
        self.online.set()

    async def _start(self, _):
        # A real client fetches its roster first (RFC 6121 2.2). An error is
        # reported (the tests assert on it) rather than hanging the login.
        try:
            await self.get_roster(timeout=TIMEOUT)
            out("ROSTER", self.user, "ok")
        except IqError as e:
            out("ROSTER", self.user, "error", e.iq['error']['condition'])
        except IqTimeout:
            out("ROSTER", self.user, "timeout")
        self.send_presence()
        out("ONLINE", self.boundjid.full)
        self.online.set()

    def _message(self, msg):
        if msg['type'] in ('chat', 'normal'):
            body = msg['body']
            out("RECEIVED", self.user, msg['from'].full, body)
            if msg.xml.find('{urn:xmpp:delay}delay') is not None:
                out("DELAY", self.user, msg['delay']['stamp'].isoformat())
            self.inbox.put_nowait(msg)

    async def login(self):
        self.connect(self.addr)
        await asyncio.wait_for(self.online.wait(), TIMEOUT)
        if self.failed:
            raise RuntimeError(self.failed)

    async def logout(self):
        self.disconnect()
        try:
            await asyncio.wait_for(self.disconnected, 5)
        except Exception:
            pass

    async def receive(self):
        return await asyncio.wait_for(self.inbox.get(), TIMEOUT)


def bare(user, domain):
    return f"{user}@{domain}"


async def chat(host, port, domain, alice_pw, bob_pw):
    alice = Client(bare("alice", domain) + "/a", alice_pw, host, int(port))
    bob = Client(bare("bob", domain) + "/b", bob_pw, host, int(port))
    await asyncio.gather(alice.login(), bob.login())
    alice.send_message(mto=bob.boundjid.full, mbody="hello bob", mtype="chat")
    out("SENT", alice.boundjid.full, bob.boundjid.full, "hello bob")
    got = await bob.receive()
    assert got['body'] == "hello bob", got
    bob.send_message(mto=got['from'], mbody="hi alice", mtype="chat")
    out("SENT", bob.boundjid.full, got['from'].full, "hi alice")
    got = await alice.receive()
    assert got['body'] == "hi alice", got
    await asyncio.gather(alice.logout(), bob.logout())


async def listen(host, port, domain, user, pw, count):
    c = Client(bare(user, domain) + "/listen", pw, host, int(port))
    await c.login()
    out("READY")
    for _ in range(int(count)):
        await c.receive()
    await c.logout()


async def send(host, port, domain, user, pw, to, body):
    c = Client(bare(user, domain) + "/send", pw, host, int(port))
    await c.login()
    c.send_message(mto=to, mbody=body, mtype="chat")
    out("SENT", c.boundjid.full, to, body)
    await c.logout()


async def features(host, port, domain, user, pw):
    c = Client(bare(user, domain) + "/features", pw, host, int(port),
               plugins=("xep_0030", "xep_0092", "xep_0199"))
    await c.login()
    info = await c['xep_0030'].get_info(jid=domain, timeout=TIMEOUT)
    for var in sorted(info['disco_info']['features']):
        out("FEATURE", var)
    rtt = await c['xep_0199'].ping(jid=domain, timeout=TIMEOUT)
    out("PING", f"{rtt:.3f}")
    ver = await c['xep_0092'].get_version(domain, timeout=TIMEOUT)
    v = ver['software_version']
    out("VERSION", v['name'], v['version'])
    await c.logout()


SCENARIOS = {"chat": chat, "listen": listen, "send": send, "features": features}


def main():
    logging.basicConfig(level=logging.DEBUG if "-d" in sys.argv else logging.WARNING,
                        stream=sys.stderr)
    args = [a for a in sys.argv[1:] if a != "-d"]
    if not args or args[0] not in SCENARIOS:
        out("ERROR usage:", __doc__)
        return 2
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(
            asyncio.wait_for(SCENARIOS[args[0]](*args[1:]), 4 * TIMEOUT))
    except asyncio.TimeoutError:
        out("ERROR timeout")
        return 1
    except Exception as e:  # noqa: BLE001 - report anything to the test
        out("ERROR", type(e).__name__, e)
        return 1
    out("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
