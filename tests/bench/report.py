#!/usr/bin/python3
"""Reads xmpp-load's --json reports for tests/bench/run.sh.

report.py verdict CHAT.json MAX_P99_MS   pass/fail of one chat step, one line
report.py brief FILE.json                one line on a login, chat or hold run
report.py table RUNDIR                   the Markdown result of a whole run
"""
import glob
import json
import os
import sys

NAMES = {"ours": "ours (xmpp-node)", "prosody": "Prosody", "ejabberd": "ejabberd"}

# What each peer runs with that shapes the figures (their Debian defaults,
# kept on purpose, plus what the benchmark itself sets).
DEFAULTS = {
    "ours": [
        "embedded defaults (README \"Configuration\"); info-level log line per login",
        "tokio runtime pinned to one CPU, so one worker thread",
    ],
    "prosody": [
        "Debian's prosody.cfg.lua: `mod_limits` caps each client at 10 kB/s read, "
        "`mod_smacks`, `mod_carbons`, `mod_csi_simple` and the rest of Debian's module list loaded, info logging to a file",
        "epoll backend (0.12 default), one Lua thread; listen backlog 128",
        "`default_iteration_count` set to 4096 (Prosody's own default is 10,000)",
    ],
    "ejabberd": [
        "Debian's ejabberd.yml: c2s shaper `normal` = 3,000 B/s per client (burst 20,000) "
        "read from each client, `mod_fail2ban`, `mod_stream_mgmt`, `mod_offline` (100 stored per user), info logging",
        "c2s listener backlog 5 (ejabberd's default `backlog`)",
        "`auth_password_format: scram` (SCRAM-SHA-1, 4096 iterations), Mnesia storage",
        "BEAM pinned to one CPU with taskset (its schedulers share that CPU)",
    ],
}


def load(path):
    with open(path) as f:
        return json.load(f)


def meta(path):
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    out[k] = v
    return out


def verdict(r, max_p99_ms):
    """(passed, reason) for one chat step."""
    c = r.get("chat")
    if c is None:
        return False, "no chat figures: " + (r.get("error") or "run failed")
    off = c["offered_per_s"]
    lat = c["latency"]
    problems = []
    if c["lost"]:
        problems.append(f"{c['lost']} of {c['sent']} lost")
    if c["duplicated"]:
        problems.append(f"{c['duplicated']} duplicated")
    if c["bounced"]:
        problems.append(f"{c['bounced']} bounced")
    if c["connection_errors"]:
        problems.append(f"{c['connection_errors']} connections broke")
    if c["sent_per_s"] < 0.95 * off:
        problems.append(f"only {c['sent_per_s']:.0f}/s could be sent")
    dws = c.get("delivered_while_sending_per_s")
    if dws is not None and dws < 0.95 * off:
        problems.append(f"only {dws:.0f}/s delivered while sending (backlog growing)")
    if lat["p99_ms"] > max_p99_ms:
        problems.append(f"p99 {lat['p99_ms']:.0f} ms > {max_p99_ms:.0f} ms (falling behind)")
    if r.get("error") and not problems:
        problems.append(r["error"])
    summary = (f"offered {off:.0f}/s sent {c['sent_per_s']:.0f}/s delivered {c['delivered']}/{c['sent']} "
               + (f"({dws:.0f}/s while sending, drained in {c.get('drain_s', 0):.2f} s) " if dws is not None else "")
               + 
               f"p50 {lat['p50_ms']:.2f} ms p99 {lat['p99_ms']:.2f} ms "
               f"server {cores(r, 'server_process')} cores, xmpp-load {cores(r, 'load_process')} cores")
    if problems:
        return False, summary + " -- " + "; ".join(problems)
    return True, summary


def cores(r, key):
    p = r.get(key)
    return f"{p['cpu_cores']:.2f}" if p else "?"


def brief(r):
    if r.get("login"):
        l = r["login"]
        ms = l.get("server_cpu_ms_per_login")
        errs = ", ".join(f"{k} {v}" for k, v in l["errors"].items()) or "no errors"
        return (f"   {l['per_s']:.1f} logins/s, p50 {l['latency']['p50_ms']:.1f} ms, p99 {l['latency']['p99_ms']:.1f} ms, "
                f"server {ms:.2f} CPU-ms/login, {errs}" if ms is not None else f"   {l['per_s']:.1f} logins/s, {errs}")
    if r.get("chat"):
        ok, why = verdict(r, float("inf"))
        c = r["chat"]
        cpu = c.get("server_cpu_s_per_1000_messages")
        return f"   {why}" + (f", {cpu:.4f} server CPU-s per 1000" if cpu is not None else "")
    if r.get("hold"):
        h = r["hold"]
        k = h.get("server_kib_per_connection")
        return (f"   {h['connections']} held ({h['alive_at_end']} alive), RSS {h.get('server_rss_before_kib')} -> "
                f"{h.get('server_rss_after_kib')} KiB" + (f", {k:.1f} KiB per connection" if k is not None else ""))
    return "   " + (r.get("error") or "no figures")


def login_cell(r):
    return (f"{r['login']['per_s']:,.0f} ({r['server_process']['cpu_cores']:.2f} / "
            f"{r['load_process']['cpu_cores']:.2f})")


def errors(*runs):
    """Login failures by cause, summed over runs."""
    total = {}
    for r in runs:
        for k, v in r.get("login", {}).get("errors", {}).items():
            total[k] = total.get(k, 0) + v
    return ", ".join(f"{k}: {v}" for k, v in sorted(total.items())) or "0"


def fmt(x, spec, unit=""):
    return "n/a" if x is None else format(x, spec) + unit


def table(rundir):
    m = meta(os.path.join(rundir, "run.meta"))
    servers = m.get("servers", "ours,prosody,ejabberd").split(",")
    max_p99 = float(m.get("max_p99_ms", "100"))
    cols = []
    for s in servers:
        sm = meta(os.path.join(rundir, f"{s}.meta"))
        get = lambda name: load(p) if os.path.exists(p := os.path.join(rundir, f"{s}.{name}.json")) else {}
        steps = []
        for path in glob.glob(os.path.join(rundir, f"{s}.chat-*.json")):
            r = load(path)
            if r.get("chat"):
                steps.append((r["chat"]["offered_per_s"], r))
        steps.sort(key=lambda t: t[0])
        peak = None
        if os.path.exists(os.path.join(rundir, f"{s}.peak")):
            with open(os.path.join(rundir, f"{s}.peak")) as f:
                peak = int(f.read().strip() or 0)
        cols.append(dict(name=s, meta=sm, login=get("login"), login_plain=get("login-plain"),
                         half=get("half"), hold=get("hold"), moderate=get("moderate"),
                         bighold=get("bighold"),
                         steps=steps, peak=peak))

    def row(label, fn):
        cells = []
        for c in cols:
            try:
                cells.append(fn(c))
            except (KeyError, TypeError):
                cells.append("n/a")
        return f"| {label} | " + " | ".join(cells) + " |"

    def peak_cell(c):
        if c["peak"] is None:
            return "n/a"
        if not c["steps"]:
            return "n/a"
        top = max(off for off, _ in c["steps"])
        passed = [off for off, r in c["steps"] if verdict(r, max_p99)[0]]
        if not passed:
            return f"< {min(off for off, _ in c['steps']):,.0f}"
        best = max(passed)
        # The generator itself near one full core at the first failing step.
        failed = [(off, r) for off, r in c["steps"] if not verdict(r, max_p99)[0] and off > best]
        note = ""
        if best == top:
            note = " (highest step tried)"
        elif failed and min(failed)[1].get("load_process", {}).get("cpu_cores", 0) > 0.9:
            note = " (xmpp-load's core saturated)"
        return f"{best:,.0f}{note}"

    lines = []
    lines.append(f"### Run of {m.get('date', '?')}")
    lines.append("")
    lines.append(f"Machine: {m.get('host', '?')}, {m.get('cpu', '?')}. Each server in turn pinned to CPU "
                 f"{m.get('server_cpu')} and xmpp-load to CPU {m.get('load_cpu')} (`taskset`); STARTTLS, "
                 f"SASL {m.get('mechanism', '?').upper()}, one RSA-2048 self-signed certificate for all three, "
                 f"SCRAM iteration count 4096 everywhere; {m.get('accounts', m.get('users'))} accounts, {m.get('users')} users online "
                 f"in the chat runs, {m.get('body')}-byte bodies.")
    lines.append("")
    lines.append("| | " + " | ".join(NAMES.get(c["name"], c["name"]) for c in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    lines.append(row("version", lambda c: c["meta"]["version"]))
    lines.append(row(f"logins/s achieved ({m.get('login_concurrency')} in flight, {m.get('login_secs')} s; server / xmpp-load cores)",
                     lambda c: login_cell(c["login"])))
    lines.append(row("server CPU-ms per login",
                     lambda c: fmt(c["login"]["login"].get("server_cpu_ms_per_login"), ".2f")))
    lines.append(row("logins/s one server core sustains (1000 / CPU-ms)",
                     lambda c: fmt(1000 / c["login"]["login"]["server_cpu_ms_per_login"], ",.0f")))
    lines.append(row("login latency p50 / p99 (ms)",
                     lambda c: f"{c['login']['login']['latency']['p50_ms']:.1f} / {c['login']['login']['latency']['p99_ms']:.1f}"))
    lines.append(row("logins/s with SASL PLAIN (PBKDF2 on the server)",
                     lambda c: login_cell(c["login_plain"])))
    lines.append(row("server CPU-ms per PLAIN login",
                     lambda c: fmt(c["login_plain"]["login"].get("server_cpu_ms_per_login"), ".2f")))
    lines.append(row("login errors",
                     lambda c: errors(c["login"], c["login_plain"])))
    lines.append(row("highest chat msg/s delivered without loss", peak_cell))
    lines.append(row("p99 delivery latency at half that rate (ms)",
                     lambda c: f"{c['half']['chat']['latency']['p99_ms']:.2f} (at {c['half']['chat']['offered_per_s']:,.0f}/s)"))
    lines.append(row("p50 delivery latency at half that rate (ms)",
                     lambda c: f"{c['half']['chat']['latency']['p50_ms']:.2f}"))
    lines.append(row("server CPU-s per 1,000 messages (at half rate)",
                     lambda c: fmt(c["half"]["chat"].get("server_cpu_s_per_1000_messages"), ".4f")))
    lines.append(row("messages lost / duplicated (half-rate run)",
                     lambda c: f"{c['half']['chat']['lost']} / {c['half']['chat']['duplicated']}"))
    moderate = int(m.get("moderate", "0") or 0)
    if moderate:
        def at_moderate(fn):
            def cell(c):
                if not c["moderate"]:
                    return f"n/a (peak below {moderate:,}/s)"
                return fn(c["moderate"]["chat"])
            return cell
        lines.append(row(f"server CPU-ms per delivered message at {moderate:,} msg/s",
                         at_moderate(lambda ch: fmt(ch.get("server_cpu_s_per_1000_messages"), ".4f"))))
        lines.append(row(f"delivery latency p50 / p99 / p99.9 at {moderate:,} msg/s (ms)",
                         at_moderate(lambda ch: f"{ch['latency']['p50_ms']:.2f} / {ch['latency']['p99_ms']:.2f} / "
                                                + (f"{ch['latency']['p999_ms']:.2f}" if "p999_ms" in ch["latency"] else "n/a"))))
        lines.append(row(f"messages lost / duplicated at {moderate:,} msg/s",
                         at_moderate(lambda ch: f"{ch['lost']} / {ch['duplicated']}")))
    lines.append(row(f"server KiB per held TLS connection ({m.get('hold')} held)",
                     lambda c: fmt(c["hold"]["hold"].get("server_kib_per_connection"), ".1f")))
    lines.append(row("server RSS idle → holding (MiB)",
                     lambda c: f"{c['hold']['hold']['server_rss_before_kib'] / 1024:.0f} → {c['hold']['hold']['server_rss_after_kib'] / 1024:.0f}"))
    big = int(m.get("big_hold", "0") or 0)
    if big:
        def big_cell(c):
            h = c["bighold"].get("hold") or {}
            held = h.get("connections", 0)
            if held < big or h.get("server_kib_per_connection") is None:
                why = (c["bighold"].get("error") or "not all connections held").split("\n")[0][:60]
                return f"failed ({held:,} held: {why})"
            return f"{h['server_kib_per_connection']:.1f} ({h['server_rss_before_kib'] / 1024:.0f} → {h['server_rss_after_kib'] / 1024:.0f} MiB)"
        lines.append(row(f"server KiB per held TLS connection ({big:,} held, restarted fresh; RSS)", big_cell))
    lines.append(row(f"creating {m.get('accounts', m.get('users'))} accounts (s)", lambda c: c["meta"]["accounts_secs"]))
    lines.append("")
    lines.append("Chat steps (offered msg/s: delivered/s while sending, lost, p99 ms, server cores, xmpp-load cores). "
                 "A step passes (✓) when every message arrived exactly once, xmpp-load sent and the server delivered "
                 f"at least 95% of the offered rate while sending, and p99 latency stayed under {max_p99:.0f} ms:")
    lines.append("")
    for c in cols:
        parts = []
        for off, r in c["steps"]:
            ch = r["chat"]
            ok = verdict(r, max_p99)[0]
            parts.append(f"{off:,.0f}: {ch.get('delivered_while_sending_per_s', ch['sent_per_s']):,.0f}, {ch['lost']}, {ch['latency']['p99_ms']:.1f}, "
                         f"{cores(r, 'server_process')}, {cores(r, 'load_process')} {'✓' if ok else '✗'}")
        lines.append(f"- {NAMES.get(c['name'], c['name'])}: " + ("; ".join(parts) or "no steps"))
    lines.append("")
    lines.append("Accounts, and the defaults each server ran with:")
    lines.append("")
    for c in cols:
        lines.append(f"- {NAMES.get(c['name'], c['name'])} ({c['meta'].get('version', '?')}): accounts by "
                     f"{c['meta'].get('accounts_how', '?')}; " + "; ".join(DEFAULTS.get(c["name"], [])) + ".")
    lines.append("")
    return "\n".join(lines)


def main():
    cmd = sys.argv[1]
    if cmd == "verdict":
        ok, why = verdict(load(sys.argv[2]), float(sys.argv[3]))
        print(("pass: " if ok else "fail: ") + why)
    elif cmd == "brief":
        print(brief(load(sys.argv[2])))
    elif cmd == "table":
        print(table(sys.argv[2]))
    else:
        sys.exit(f"report.py: unknown command {cmd}")


if __name__ == "__main__":
    main()
