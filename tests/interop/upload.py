#!/usr/bin/python3
"""slixmpp's HTTP File Upload plugin (XEP-0363) against the node: it finds
the upload service through disco, learns the size limit from its form,
asks for a slot and PUTs a file with aiohttp; the file is then fetched
back from the GET URL and compared byte for byte. Driven by
tests/tests/interop.rs.

Run with the Debian python (/usr/bin/python3, packages python3-slixmpp
and python3-aiohttp):

    upload.py HOST PORT DOMAIN PASSWORD

alice (with PASSWORD) uploads.

Lines printed (stdout), one per fact established:
    SERVICE <the upload service's JID>
    MAX <max-file-size the plugin learnt>
    TOO-BIG <size refused by the plugin before any slot request>
    URL <the GET URL the plugin returned>
    DOWNLOADED <bytes> <same|different> <content type>
    DONE                        everything held; exit 0
    ERROR <text>                exit 1
"""

import asyncio
import io
import os
import ssl
import sys

from aiohttp import ClientSession
from slixmpp import ClientXMPP
from slixmpp.plugins.xep_0363.http_upload import FileTooBig

from interop_common import TIMEOUT, out, run

NS = "urn:xmpp:http:upload:0"


class Client(ClientXMPP):
    def __init__(self, jid, password, host, port):
        super().__init__(jid, password)
        self.addr = (host, port)
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        for p in ("xep_0030", "xep_0128", "xep_0363"):
            self.register_plugin(p)
        self.online = asyncio.Event()
        self.add_event_handler("session_start", self._start)

    async def _start(self, _):
        self.send_presence()
        self.online.set()

    async def login(self):
        self.connect(self.addr)
        await asyncio.wait_for(self.online.wait(), TIMEOUT)


async def scenario(host, port, domain, pw):
    alice = Client(f"alice@{domain}/a", pw, host, int(port))
    await alice.login()
    upload = alice['xep_0363']

    # The service, found the way the plugin's find_upload_service does
    # (items of the domain, then the one with identity store/file and the
    # feature); that helper itself fails on Python 3.11+ in slixmpp 1.8
    # (it hands asyncio.wait bare coroutines), so it is done here.
    items = await alice['xep_0030'].get_items(jid=domain, timeout=TIMEOUT)
    for jid, _, _ in items['disco_items']['items']:
        info = await alice['xep_0030'].get_info(jid=jid, timeout=TIMEOUT)
        ids = info['disco_info']['identities']
        if any(i[0] == 'store' and i[1] == 'file' for i in ids) \
                and NS in info['disco_info']['features']:
            upload.upload_service = info['from']
            for form in info['disco_info'].iterables:
                values = form['values']
                if values.get('FORM_TYPE') == [NS]:
                    upload.max_file_size = int(values['max-file-size'])
    if upload.upload_service is None:
        raise AssertionError("no upload service among the domain's items")

    data = os.urandom(150_000)
    url = await upload.upload_file("interop test.bin", size=len(data),
                                   content_type="application/x-interop",
                                   input_file=io.BytesIO(data), timeout=TIMEOUT)
    out("SERVICE", upload.upload_service)
    out("MAX", upload.max_file_size)
    out("URL", url)
    try:
        big = upload.max_file_size + 1
        await upload.upload_file("big.bin", size=big, input_file=io.BytesIO(b""),
                                 timeout=TIMEOUT)
        out("TOO-BIG none")
    except FileTooBig as e:
        out("TOO-BIG", e.args[0])

    async with ClientSession() as session:
        async with session.get(url) as r:
            if r.status != 200:
                raise AssertionError(f"GET {url}: HTTP {r.status}")
            got = await r.read()
            out("DOWNLOADED", len(got), "same" if got == data else "different",
                r.headers.get("Content-Type"))
    alice.disconnect()


if __name__ == "__main__":
    sys.exit(run(scenario, 4, __doc__))
