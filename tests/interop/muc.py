#!/usr/bin/python3
"""slixmpp's xep_0045 plugin against the node, alongside a client of ours:
alice creates and configures a room, waits for our client ("Rusty") to
join and speak, bob joins with history, alice sets the subject and
speaks. Driven by tests/tests/interop.rs.

Run with the Debian python (/usr/bin/python3, package python3-slixmpp):

    muc.py HOST PORT DOMAIN PASSWORD ROOM

Lines printed (stdout), one per fact established:
    CREATED <status codes of alice's self-presence>
    CONFIGURED <room name read back from disco>
    READY                       our client may join now
    HEARD <nick> <body>         alice heard a room message
    HISTORY <bodies>            bob's history on joining
    BOB-HEARD <nick> <body>
    SUBJECT <text>              bob saw the new subject
    DONE                        exit 0
    ERROR <text>                exit 1
"""

import asyncio
import ssl
import sys

from slixmpp import ClientXMPP, JID

from interop_common import TIMEOUT, out, run, until


class Client(ClientXMPP):
    def __init__(self, jid, password, host, port):
        super().__init__(jid, password)
        self.addr = (host, port)
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        for p in ("xep_0030", "xep_0004", "xep_0045"):
            self.register_plugin(p)
        self.online = asyncio.Event()
        self.heard = []
        self.subject = None
        self.add_event_handler("session_start", self._start)
        self.add_event_handler("groupchat_message", self._message)
        self.add_event_handler("groupchat_subject", self._subject)

    async def _start(self, _):
        self.send_presence()
        self.online.set()

    def _message(self, msg):
        if msg['body'] and not msg.get_plugin('delay', check=True):
            self.heard.append((msg['from'].resource, msg['body']))

    def _subject(self, msg):
        self.subject = msg['subject']

    async def login(self):
        self.connect(self.addr)
        await asyncio.wait_for(self.online.wait(), TIMEOUT)


async def scenario(host, port, domain, pw, room):
    room = JID(room)
    alice = Client(f"alice@{domain}/a", pw, host, int(port))
    bob = Client(f"bob@{domain}/b", pw, host, int(port))
    await asyncio.gather(alice.login(), bob.login())

    pres, _subject, _occ, _hist = await alice['xep_0045'].join_muc_wait(room, "Alice", timeout=TIMEOUT)
    out("CREATED", ",".join(sorted(str(c) for c in pres['muc']['status_codes'])))
    form = await alice['xep_0045'].get_room_config(room)
    form.set_values({"muc#roomconfig_roomname": "Interop Room",
                     "muc#roomconfig_persistentroom": True})
    await alice['xep_0045'].set_room_config(room, form)
    info = await alice['xep_0030'].get_info(jid=room)
    names = [i[3] for i in info['disco_info']['identities']]
    out("CONFIGURED", names[0] if names else "")
    out("READY")

    await until("our client speaks", lambda: any(b == "from rust" for _, b in alice.heard))
    out("HEARD", *next((n, b) for n, b in alice.heard if b == "from rust"))

    _pres, _subject, _occ, hist = await bob['xep_0045'].join_muc_wait(room, "Bob", maxstanzas=10, timeout=TIMEOUT)
    out("HISTORY", ",".join(m['body'] for m in hist))
    alice.send_message(mto=room, mbody="from slixmpp alice", mtype="groupchat")
    await until("bob hears alice", lambda: any(b == "from slixmpp alice" for _, b in bob.heard))
    out("BOB-HEARD", *next((n, b) for n, b in bob.heard if b == "from slixmpp alice"))
    alice['xep_0045'].set_subject(room, "interop works")
    await until("bob sees the subject", lambda: bob.subject == "interop works")
    out("SUBJECT", bob.subject)
    alice.disconnect()
    bob.disconnect()


if __name__ == "__main__":
    sys.exit(run(scenario, 5, __doc__))
