#!/usr/bin/python3
"""Two slixmpp clients subscribe to each other and watch each other's
presence; driven by tests/tests/roster_presence.rs.

Run with the Debian python (/usr/bin/python3, package python3-slixmpp):

    roster_presence.py HOST PORT DOMAIN ALICE_PW BOB_PW

Alice sends a subscription request to bob; both clients auto-authorize and
auto-subscribe back (slixmpp's roster.auto_authorize / auto_subscribe), so
both should end with subscription 'both' and see each other available.
Then alice goes away with a status, and bob must see it.

Lines printed (stdout), one per fact established:
    ONLINE <full jid>
    SUBSCRIPTION <user> <contact> <subscription>
    AVAILABLE <user> <contact>
    STATUS <user> <contact> <show> <status>
    DONE                        everything held; exit 0
    ERROR <text>                exit 1
"""

import asyncio
import logging
import ssl
import sys

from slixmpp import ClientXMPP

SCRAM = {
    "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512",
    "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-512-PLUS",
}
TIMEOUT = 20.0


def out(*parts):
    print(*parts, flush=True)


class Client(ClientXMPP):
    def __init__(self, jid, password, host, port):
        super().__init__(jid, password, sasl_mech=None)
        self.user = jid.split("@", 1)[0]
        self.addr = (host, port)
        self['feature_mechanisms'].use_mechs = set(SCRAM)
        # The test node has a self-signed certificate.
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.roster.auto_authorize = True
        self.roster.auto_subscribe = True
        self.online = asyncio.Event()
        self.failed = None
        self.add_event_handler("session_start", self._start)
        self.add_event_handler("failed_all_auth", self._auth_failed)

    def _auth_failed(self, _):
        self.failed = "authentication failed"
        self.online.set()

    async def _start(self, _):
        await self.get_roster(timeout=TIMEOUT)
        self.send_presence()
        out("ONLINE", self.boundjid.full)
        self.online.set()

    async def login(self):
        self.connect(self.addr)
        await asyncio.wait_for(self.online.wait(), TIMEOUT)
        if self.failed:
            raise RuntimeError(f"{self.user}: {self.failed}")

    async def logout(self):
        self.disconnect()
        try:
            await asyncio.wait_for(self.disconnected, 5)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def subscription(self, contact):
        if contact not in self.client_roster:
            return None
        return self.client_roster[contact]['subscription']

    def resources(self, contact):
        if contact not in self.client_roster:
            return {}
        return self.client_roster.presence(contact)


async def until(what, check):
    """Polls `check` until it is true; fails with `what` after TIMEOUT."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def scenario(host, port, domain, alice_pw, bob_pw):
    a_jid, b_jid = f"alice@{domain}", f"bob@{domain}"
    alice = Client(a_jid + "/a", alice_pw, host, int(port))
    bob = Client(b_jid + "/b", bob_pw, host, int(port))
    await asyncio.gather(alice.login(), bob.login())

    alice.send_presence_subscription(pto=b_jid)
    for me, other in ((alice, b_jid), (bob, a_jid)):
        await until(f"{me.user}: {other} subscription 'both' (now "
                    f"{me.subscription(other)!r})",
                    lambda: me.subscription(other) == "both")
        out("SUBSCRIPTION", me.user, other, me.subscription(other))
    for me, other in ((alice, b_jid), (bob, a_jid)):
        await until(f"{me.user}: {other} available",
                    lambda: len(me.resources(other)) > 0)
        out("AVAILABLE", me.user, other)

    alice.send_presence(pshow="away", pstatus="lunch")

    def away():
        res = bob.resources(a_jid).get("a")
        return res is not None and res['show'] == "away" and res['status'] == "lunch"
    await until(f"bob: alice away (now {bob.resources(a_jid)!r})", away)
    res = bob.resources(a_jid)["a"]
    out("STATUS", "bob", a_jid, res['show'], res['status'])
    await asyncio.gather(alice.logout(), bob.logout())


def main():
    logging.basicConfig(level=logging.DEBUG if "-d" in sys.argv else logging.WARNING,
                        stream=sys.stderr)
    args = [a for a in sys.argv[1:] if a != "-d"]
    if len(args) != 5:
        out("ERROR usage:", __doc__)
        return 2
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(*args), 4 * TIMEOUT))
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
