#!/usr/bin/python3
"""The benchmark's accounts, in each server's batch format.

accounts.py lists N DOMAIN OUTDIR
    OUTDIR/accounts.txt  `user@domain;password` lines: `clusterctl
                         import-users` reads them, and so does
                         `xmpp-load --accounts`
    OUTDIR/ejabberd.xml  the same accounts as XEP-0227 <server-data> files
                         for `ejabberdctl import_piefxis`, 2,000 a file:
                         ejabberd.xml, then ejabberd-2001.xml, ...
    User names are user1..userN, passwords bench-<i>-<random tag>.

accounts.py prosody ACCOUNTS_TXT DOMAIN DATA_DIR ITERATIONS
    Writes Prosody's internal_hashed store directly,
    DATA_DIR/<escaped host>/accounts/<escaped user>.dat: SCRAM-SHA-1 salt,
    iteration count, StoredKey and ServerKey (hex), which is exactly what
    `prosodyctl adduser` writes, without one Prosody start per account.
"""
import hashlib
import hmac
import os
import secrets
import sys


def prosody_escape(s):
    # util.datamanager's encode: every byte outside [A-Za-z0-9] is %xx.
    return "".join(c if c.isascii() and c.isalnum() else "%%%02x" % b
                   for c, b in ((chr(b), b) for b in s.encode()))


def scram_sha1(password, salt, iterations):
    salted = hashlib.pbkdf2_hmac("sha1", password.encode(), salt.encode(), iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha1).digest()
    stored_key = hashlib.sha1(client_key).hexdigest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha1).hexdigest()
    return stored_key, server_key


def lists(n, domain, outdir):
    n = int(n)
    tag = secrets.token_hex(4)
    # ejabberdctl gives up on a command after 60 s and ejabberd hashes each
    # imported account (about 7 ms here): one XEP-0227 file per 2,000.
    per_file = 2000
    with open(os.path.join(outdir, "accounts.txt"), "w") as plain:
        for first in range(1, n + 1, per_file):
            last = min(n, first + per_file - 1)
            name = "ejabberd.xml" if first == 1 else f"ejabberd-{first}.xml"
            with open(os.path.join(outdir, name), "w") as pie:
                pie.write("<?xml version='1.0' encoding='UTF-8'?>\n"
                          "<server-data xmlns='urn:xmpp:pie:0'>\n"
                          f"<host jid='{domain}'>\n")
                for i in range(first, last + 1):
                    user, password = f"user{i}", f"bench-{i}-{tag}"
                    plain.write(f"{user}@{domain};{password}\n")
                    pie.write(f"<user name='{user}' password='{password}'/>\n")
                pie.write("</host>\n</server-data>\n")


def prosody(accounts_txt, domain, data_dir, iterations):
    iterations = int(iterations)
    accounts_dir = os.path.join(data_dir, prosody_escape(domain), "accounts")
    os.makedirs(accounts_dir, exist_ok=True)
    with open(accounts_txt) as f:
        for line in f:
            jid, password = line.rstrip("\n").split(";", 1)
            user = jid.split("@", 1)[0]
            salt = secrets.token_hex(16)
            stored_key, server_key = scram_sha1(password, salt, iterations)
            with open(os.path.join(accounts_dir, prosody_escape(user) + ".dat"), "w") as out:
                out.write("return {\n"
                          f"\t[\"iteration_count\"] = {iterations};\n"
                          f"\t[\"salt\"] = \"{salt}\";\n"
                          f"\t[\"server_key\"] = \"{server_key}\";\n"
                          f"\t[\"stored_key\"] = \"{stored_key}\";\n"
                          "};\n")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"lists": lists, "prosody": prosody}[cmd](*args)
