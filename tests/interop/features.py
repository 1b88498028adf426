#!/usr/bin/python3
"""slixmpp's own plugins against the node: the message archive (XEP-0313),
PEP (XEP-0163) with user nicknames (XEP-0172) and avatars (XEP-0084),
vCard avatars in presence (XEP-0153), PEP-native bookmarks (XEP-0402,
published through XEP-0060 with publish-options) and entity time
(XEP-0202). Driven by tests/tests/interop.rs.

Run with the Debian python (/usr/bin/python3, package python3-slixmpp):

    features.py HOST PORT DOMAIN PASSWORD

alice and bob (both with PASSWORD) become contacts both ways first.

Lines printed (stdout), one per fact established:
    MAM <bodies, comma-separated, oldest first>
    MAM-REVERSE <bodies, newest first>
    NICK <nick bob was notified of>
    AVATAR <id in the metadata bob was notified of>
    VCARD-AVATAR <photo hash bob saw in alice's presence>
    BOOKMARKS <item ids alice reads back>
    BOOKMARKS-HIDDEN <error condition bob gets>
    TIME <utc of the server>
    DONE                        everything held; exit 0
    ERROR <text>                exit 1
"""

import asyncio
import hashlib
import ssl
import sys

from slixmpp import ClientXMPP, JID
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from interop_common import TIMEOUT, out, run, until

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")
BOOKMARKS = "urn:xmpp:bookmarks:1"


class Client(ClientXMPP):
    def __init__(self, jid, password, host, port):
        super().__init__(jid, password)
        self.user = jid.split("@", 1)[0]
        self.addr = (host, port)
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.roster.auto_authorize = True
        self.roster.auto_subscribe = True
        for p in ("xep_0030", "xep_0059", "xep_0060", "xep_0115", "xep_0163",
                  "xep_0172", "xep_0084", "xep_0054", "xep_0153", "xep_0313",
                  "xep_0202"):
            self.register_plugin(p)
        self.online = asyncio.Event()
        self.nick = None
        self.avatar = None
        self.photo = None
        self.add_event_handler("session_start", self._start)
        self.add_event_handler("user_nick_publish", self._nick)
        self.add_event_handler("avatar_metadata_publish", self._avatar)
        self.add_event_handler("vcard_avatar_update", self._photo)

    async def _start(self, _):
        await self.get_roster(timeout=TIMEOUT)
        self.send_presence()
        self.online.set()

    def _nick(self, msg):
        self.nick = msg['pubsub_event']['items']['item']['nick']['nick']

    def _avatar(self, msg):
        info = msg['pubsub_event']['items']['item']['avatar_metadata']['info']
        self.avatar = info['id']

    def _photo(self, pres):
        self.photo = pres['vcard_temp_update']['photo']

    async def login(self):
        self.connect(self.addr)
        await asyncio.wait_for(self.online.wait(), TIMEOUT)

    def subscription(self, contact):
        if contact not in self.client_roster:
            return None
        return self.client_roster[contact]['subscription']


async def scenario(host, port, domain, pw):
    a_jid, b_jid = f"alice@{domain}", f"bob@{domain}"
    alice = Client(a_jid + "/a", pw, host, int(port))
    bob = Client(b_jid + "/b", pw, host, int(port))
    await asyncio.gather(alice.login(), bob.login())
    alice.send_presence_subscription(pto=b_jid)
    for me, other in ((alice, b_jid), (bob, a_jid)):
        await until(f"{me.user}: {other} 'both'", lambda: me.subscription(other) == "both")

    # The archive: five messages, read back by bob two at a time.
    got = []
    bob.add_event_handler("message", lambda m: got.append(m['body']) if m['body'] else None)
    sent = [f"archived {i}" for i in range(1, 6)]
    for body in sent:
        alice.send_message(mto=b_jid, mbody=body, mtype="chat")
    await until("bob receives the five", lambda: len(got) >= 5)
    bodies = []
    async for m in bob['xep_0313'].iterate(with_jid=JID(a_jid), rsm={'max': 2}):
        bodies.append(m['mam_result']['forwarded']['stanza']['body'])
    out("MAM", ",".join(bodies))
    bodies = []
    async for m in bob['xep_0313'].iterate(with_jid=JID(a_jid), reverse=True, rsm={'max': 2}):
        bodies.append(m['mam_result']['forwarded']['stanza']['body'])
    out("MAM-REVERSE", ",".join(bodies))

    # PEP: a nickname and an avatar, notified to bob through his caps.
    await alice['xep_0172'].publish_nick("Alice in PEP")
    await until("bob notified of the nick", lambda: bob.nick is not None)
    out("NICK", bob.nick)
    avatar_id = hashlib.sha1(PNG).hexdigest()
    await alice['xep_0084'].publish_avatar(PNG)
    await alice['xep_0084'].publish_avatar_metadata(
        items=[{'id': avatar_id, 'type': 'image/png', 'bytes': len(PNG)}])
    await until("bob notified of the avatar", lambda: bob.avatar is not None)
    out("AVATAR", bob.avatar)

    # vCard avatar: the hash travels in alice's presence.
    await alice['xep_0153'].set_avatar(avatar=PNG, mtype="image/png")
    await until("bob sees the photo hash", lambda: bob.photo)
    out("VCARD-AVATAR", bob.photo)

    # Bookmarks: private to alice, many items.
    form = alice['xep_0004'].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden",
                   value="http://jabber.org/protocol/pubsub#publish-options")
    form.add_field(var="pubsub#persist_items", value="true")
    form.add_field(var="pubsub#access_model", value="whitelist")
    form.add_field(var="pubsub#max_items", value="max")
    for room in ("one@conference." + domain, "two@conference." + domain):
        conf = ET.Element(f"{{{BOOKMARKS}}}conference", {"name": room, "autojoin": "true"})
        await alice['xep_0060'].publish(JID(a_jid), BOOKMARKS, id=room, payload=conf,
                                        options=form)
    items = await alice['xep_0060'].get_items(JID(a_jid), BOOKMARKS)
    out("BOOKMARKS", ",".join(i['id'] for i in items['pubsub']['items']))
    try:
        await bob['xep_0060'].get_items(JID(a_jid), BOOKMARKS)
        out("BOOKMARKS-HIDDEN", "none")
    except IqError as e:
        out("BOOKMARKS-HIDDEN", e.iq['error']['condition'])

    t = await bob['xep_0202'].get_entity_time(JID(domain))
    # Read as text: slixmpp 1.8's `utc` getter appends a second 'Z' to the
    # XEP-0082 stamp every server sends ('...Z'), and then cannot parse it.
    out("TIME", t['entity_time'].xml.find("{urn:xmpp:time}utc").text)
    alice.disconnect()
    bob.disconnect()


if __name__ == "__main__":
    sys.exit(run(scenario, 4, __doc__))
