//! Interop with real third-party clients: slixmpp (Python, Debian package
//! `python3-slixmpp`) and go-sendxmpp (Debian package `go-sendxmpp`) against
//! the real `xmpp-node` binary.
//!
//! The slixmpp side is `tests/interop/slix.py`; it prints one
//! machine-checkable line per event (`AUTH`, `ONLINE`, `READY`, `RECEIVED`,
//! `DELAY`, `FEATURE`, `PING`, `VERSION`, `DONE`, `ERROR`), which these tests
//! assert on. A missing client is a failure with an install hint, never a
//! skip: CI (`.ci/run`) installs both.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::node::TestNode;

const TIMEOUT: Duration = Duration::from_secs(90);

/// The Debian python that has slixmpp (pyenv's python on PATH does not).
fn python() -> PathBuf {
    let py = PathBuf::from(
        std::env::var_os("INTEROP_PYTHON").unwrap_or_else(|| "/usr/bin/python3".into()),
    );
    let ok = Command::new(&py)
        .args(["-c", "import slixmpp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import slixmpp: install it with \
         `apt-get install python3-slixmpp` (or set INTEROP_PYTHON to a python that has it)",
        py.display()
    );
    py
}

fn go_sendxmpp() -> PathBuf {
    let bin = PathBuf::from(
        std::env::var_os("INTEROP_GO_SENDXMPP").unwrap_or_else(|| "/usr/bin/go-sendxmpp".into()),
    );
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "cannot run {}: install it with `apt-get install go-sendxmpp` \
         (or set INTEROP_GO_SENDXMPP)",
        bin.display()
    );
    bin
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/slix.py")
}

/// A running `slix.py` scenario whose stdout lines arrive on a channel.
struct Slix {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: tempfile::NamedTempFile,
    what: String,
}

impl Slix {
    fn start(node: &TestNode, args: &[&str]) -> Slix {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(python());
        cmd.arg(script())
            .arg(args[0])
            .arg(node.c2s.ip().to_string())
            .arg(node.c2s.port().to_string())
            .arg(&node.domain)
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap());
        if std::env::var_os("INTEROP_DEBUG").is_some() {
            cmd.arg("-d");
        }
        let mut child = cmd.spawn().expect("cannot run slix.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Slix {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            what: format!("slix.py {}", args.join(" ")),
        }
    }

    fn report(&self, node: &TestNode) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- node log ---\n{}",
            self.what,
            self.seen.join("\n"),
            std::fs::read_to_string(self.stderr.path()).unwrap_or_default(),
            node.log()
        )
    }

    /// Waits for a line starting with `prefix`; panics on timeout or exit.
    fn wait_line(&mut self, node: &TestNode, prefix: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "timed out waiting for {prefix:?} from {}",
                        self.report(node)
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    panic!("exited before printing {prefix:?}: {}", self.report(node));
                }
            }
        }
    }

    /// Waits for the script to exit successfully; returns all its stdout lines.
    fn finish(mut self, node: &TestNode) -> Vec<String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("timed out: {}", self.report(node));
                }
            }
        }
        let status = self.child.wait().unwrap();
        assert!(
            status.success() && self.seen.iter().any(|l| l == "DONE"),
            "failed with {status}: {}",
            self.report(node)
        );
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Slix {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_slix(node: &TestNode, args: &[&str]) -> Vec<String> {
    Slix::start(node, args).finish(node)
}

fn node_with_users(users: &[(&str, &str)]) -> TestNode {
    let node = TestNode::start().expect("start xmpp-node");
    for (u, p) in users {
        node.adduser(u, p).expect("adduser");
    }
    node
}

/// The log without ANSI colour sequences (`ESC [ ... m`).
fn plain_log(node: &TestNode) -> String {
    let mut out = String::new();
    let log = node.log();
    let mut chars = log.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The SASL mechanism the node logged for `user@localhost`'s logins.
fn logged_mechanisms(node: &TestNode, user: &str) -> Vec<String> {
    let jid = format!("user={user}@{}", node.domain);
    plain_log(node)
        .lines()
        .filter(|l| l.contains(" authenticated") && l.contains(&jid))
        .filter_map(|l| {
            let m = l.split("mechanism=").nth(1)?;
            Some(m.split_whitespace().next()?.trim_matches('"').to_string())
        })
        .collect()
}

fn assert_scram(node: &TestNode, user: &str, out: &[String]) {
    let mechs = logged_mechanisms(node, user);
    assert!(
        !mechs.is_empty() && mechs.iter().all(|m| m.starts_with("SCRAM-")),
        "{user}: node logged mechanisms {mechs:?}, expected SCRAM-*\nclient said: {out:#?}\n{}",
        node.log()
    );
    let client = out
        .iter()
        .find_map(|l| l.strip_prefix(&format!("AUTH {user} ")))
        .unwrap_or_else(|| panic!("{user}: no AUTH line in {out:#?}"));
    assert!(client.starts_with("SCRAM-"), "{user} used {client}");
}

fn has(out: &[String], line: &str) -> bool {
    out.iter().any(|l| l == line)
}

#[test]
fn slixmpp_clients_log_in_with_scram_over_starttls_and_exchange_messages() {
    let node = node_with_users(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let out = run_slix(&node, &["chat", "alice-pw", "bob-pw"]);
    assert_scram(&node, "alice", &out);
    assert_scram(&node, "bob", &out);
    // slixmpp fetches the roster before its initial presence (RFC 6121 §2.2).
    assert!(has(&out, "ROSTER alice ok"), "{out:#?}");
    assert!(has(&out, "ROSTER bob ok"), "{out:#?}");
    assert!(has(&out, "ONLINE alice@localhost/a"), "{out:#?}");
    assert!(has(&out, "ONLINE bob@localhost/b"), "{out:#?}");
    assert!(
        has(&out, "RECEIVED bob alice@localhost/a hello bob"),
        "{out:#?}"
    );
    assert!(
        has(&out, "RECEIVED alice bob@localhost/b hi alice"),
        "{out:#?}"
    );
}

#[test]
fn go_sendxmpp_message_reaches_a_slixmpp_client() {
    let sendxmpp = go_sendxmpp();
    let node = node_with_users(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let mut bob = Slix::start(&node, &["listen", "bob", "bob-pw", "1"]);
    bob.wait_line(&node, "READY");

    // An empty HOME: go-sendxmpp must not pick up a developer's sendxmpprc.
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(&sendxmpp);
    cmd.env("HOME", home.path())
        .args([
            "-n",
            "--timeout",
            "20",
            "-u",
            "alice@localhost",
            "-p",
            "alice-pw",
            "-j",
        ])
        .arg(node.c2s.to_string())
        .arg("bob@localhost")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().expect("cannot run go-sendxmpp");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello from go-sendxmpp\n")
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} timed out:\n{}", node.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = child.wait_with_output().unwrap();
    assert!(
        sent.status.success(),
        "{what} failed with {}:\nstdout: {}\nstderr: {}\n{}",
        sent.status,
        String::from_utf8_lossy(&sent.stdout),
        String::from_utf8_lossy(&sent.stderr),
        node.log()
    );

    let got = bob.wait_line(&node, "RECEIVED");
    assert!(
        got.starts_with("RECEIVED bob alice@localhost/")
            && got.ends_with(" hello from go-sendxmpp"),
        "bob got {got:?}"
    );
    bob.finish(&node);
    // Debian's go-sendxmpp (0.5.6, mattn/go-xmpp of 2022) knows no SCRAM:
    // it picks PLAIN, which the node only offers inside TLS (STARTTLS is
    // required). Newer builds use SCRAM; either is fine here.
    let mechs = logged_mechanisms(&node, "alice");
    assert!(
        !mechs.is_empty()
            && mechs
                .iter()
                .all(|m| m.starts_with("SCRAM-") || m == "PLAIN"),
        "go-sendxmpp logged in with {mechs:?}"
    );
}

#[test]
fn slixmpp_gets_offline_message_at_next_login() {
    let node = node_with_users(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let out = run_slix(
        &node,
        &[
            "send",
            "alice",
            "alice-pw",
            "bob@localhost",
            "while you were away",
        ],
    );
    assert!(
        has(
            &out,
            "SENT alice@localhost/send bob@localhost while you were away"
        ),
        "{out:#?}"
    );

    let out = run_slix(&node, &["listen", "bob", "bob-pw", "1"]);
    assert!(
        has(
            &out,
            "RECEIVED bob alice@localhost/send while you were away"
        ),
        "{out:#?}"
    );
    let stamp = out
        .iter()
        .find_map(|l| l.strip_prefix("DELAY bob "))
        .unwrap_or_else(|| panic!("no delay stamp on the offline message: {out:#?}"));
    assert!(stamp.starts_with("20"), "odd delay stamp {stamp:?}");
}

#[test]
fn slixmpp_disco_ping_and_version() {
    let node = node_with_users(&[("alice", "alice-pw")]);
    let out = run_slix(&node, &["features", "alice", "alice-pw"]);
    for f in [
        "http://jabber.org/protocol/disco#info",
        "urn:xmpp:ping",
        "jabber:iq:version",
    ] {
        assert!(has(&out, &format!("FEATURE {f}")), "no {f}: {out:#?}");
    }
    assert!(out.iter().any(|l| l.starts_with("PING ")), "{out:#?}");
    let version = out
        .iter()
        .find_map(|l| l.strip_prefix("VERSION "))
        .unwrap_or_else(|| panic!("no VERSION: {out:#?}"));
    assert!(version.starts_with("xmpp-node "), "version {version:?}");
}

/// slixmpp's XEP-0313, 0163/0172, 0084, 0153, 0060 (bookmarks with
/// publish-options) and 0202 plugins against the node
/// (`tests/interop/features.py`).
#[test]
fn slixmpp_plugins_archive_pep_avatars_bookmarks_and_time() {
    let node = TestNode::start().expect("node starts");
    for u in ["alice", "bob"] {
        node.adduser(u, "secret").expect("adduser");
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/features.py");
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(python())
        .arg(script)
        .arg(node.c2s.ip().to_string())
        .arg(node.c2s.port().to_string())
        .arg(&node.domain)
        .arg("secret")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .expect("cannot run features.py");
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    let report = format!(
        "status {status:?}\n--- stdout ---\n{out}\n--- stderr ---\n{}\n--- node log ---\n{}",
        std::fs::read_to_string(stderr.path()).unwrap_or_default(),
        node.log()
    );
    assert!(status.is_some_and(|s| s.success()), "{report}");
    let avatar = "7e1d1baee823d5e715489481afbf20a8f1c06ba7";
    for want in [
        "MAM archived 1,archived 2,archived 3,archived 4,archived 5".to_owned(),
        "MAM-REVERSE archived 5,archived 4,archived 3,archived 2,archived 1".to_owned(),
        "NICK Alice in PEP".to_owned(),
        format!("AVATAR {avatar}"),
        format!("VCARD-AVATAR {avatar}"),
        "BOOKMARKS one@conference.localhost,two@conference.localhost".to_owned(),
        "BOOKMARKS-HIDDEN not-authorized".to_owned(),
        "DONE".to_owned(),
    ] {
        assert!(out.lines().any(|l| l == want), "missing {want:?}\n{report}");
    }
    let time = out
        .lines()
        .find_map(|l| l.strip_prefix("TIME "))
        .unwrap_or_else(|| panic!("no TIME line\n{report}"));
    assert!(time.starts_with("20") && time.ends_with('Z'), "{time}");
}

/// slixmpp's `xep_0045` plugin creating, configuring and chatting in a
/// room that a client of ours joins too (`tests/interop/muc.py`).
#[tokio::test]
async fn slixmpp_muc_plugin_and_our_client_share_a_room() {
    use tests::client::{body, Client, WAIT};
    use xmpp::element::Element;
    use xmpp::stanza::ns;
    const ROOM: &str = "interop@conference.localhost";
    let node = TestNode::start().expect("node starts");
    for u in ["alice", "bob", "rusty"] {
        node.adduser(u, "secret").expect("adduser");
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/muc.py");
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(python())
        .arg(script)
        .arg(node.c2s.ip().to_string())
        .arg(node.c2s.port().to_string())
        .arg(&node.domain)
        .arg("secret")
        .arg(ROOM)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .expect("cannot run muc.py");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let report = |seen: &[String]| {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}\n--- node log ---\n{}",
            seen.join("\n"),
            std::fs::read_to_string(stderr.path()).unwrap_or_default(),
            node.log()
        )
    };
    let wait_for = |prefix: &str, seen: &mut Vec<String>| -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) => {
                    seen.push(l.clone());
                    if l.starts_with("ERROR") {
                        panic!("muc.py failed\n{}", report(seen));
                    }
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => panic!("no {prefix} line\n{}", report(seen)),
            }
        }
    };
    let created = wait_for("CREATED", &mut seen);
    assert!(
        created.contains("110") && created.contains("201"),
        "{created}"
    );
    assert_eq!(wait_for("CONFIGURED", &mut seen), "CONFIGURED Interop Room");
    wait_for("READY", &mut seen);

    let mut rusty = Client::login_bound(&node, "rusty", "secret", "r")
        .await
        .unwrap();
    let join = Element::new("presence", ns::CLIENT)
        .attr("to", format!("{ROOM}/Rusty"))
        .child(Element::new("x", "http://jabber.org/protocol/muc"));
    rusty.send(&join).await.unwrap();
    rusty
        .recv_until(
            |e| e.get_attr("from") == Some(&format!("{ROOM}/Alice")),
            WAIT,
        )
        .await
        .unwrap();
    let say = Element::new("message", ns::CLIENT)
        .attr("to", ROOM)
        .attr("type", "groupchat")
        .child(Element::new("body", ns::CLIENT).text("from rust"));
    rusty.send(&say).await.unwrap();
    assert_eq!(wait_for("HEARD", &mut seen), "HEARD Rusty from rust");
    assert_eq!(wait_for("HISTORY", &mut seen), "HISTORY from rust");
    rusty
        .recv_until(|e| body(e).as_deref() == Some("from slixmpp alice"), WAIT)
        .await
        .unwrap();
    assert_eq!(
        wait_for("BOB-HEARD", &mut seen),
        "BOB-HEARD Alice from slixmpp alice"
    );
    assert_eq!(wait_for("SUBJECT", &mut seen), "SUBJECT interop works");
    wait_for("DONE", &mut seen);
    let _ = child.wait();
}

/// slixmpp's `xep_0363` plugin finds our upload service, learns its size
/// limit, uploads a file with aiohttp and gets it back byte for byte
/// (`tests/interop/upload.py`). The links point at the plain HTTP
/// listener (`[upload] public_url`): aiohttp would refuse the test
/// node's self-signed certificate.
#[test]
fn slixmpp_uploads_a_file_and_fetches_it_back() {
    let mut node = TestNode::create(tests::node::NodeOptions::default()).expect("node config");
    node.append_config(&format!(
        "[upload]\nmax_file_size = 200000\npublic_url = \"http://{}\"\n",
        node.http
    ))
    .expect("upload config");
    node.start_again().expect("node starts");
    node.adduser("alice", "secret").expect("adduser");
    let py = python();
    let aiohttp = Command::new(&py)
        .args(["-c", "import aiohttp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        aiohttp,
        "{} cannot import aiohttp, which slixmpp's xep_0363 needs: `apt-get install python3-aiohttp`",
        py.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/upload.py");
    let out = Command::new(py)
        .arg(script)
        .arg(node.c2s.ip().to_string())
        .arg(node.c2s.port().to_string())
        .arg(&node.domain)
        .arg("secret")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run upload.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = format!(
        "--- stdout ---\n{stdout}\n--- stderr ---\n{}\n--- node log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    assert!(out.status.success(), "upload.py failed\n{report}");
    for want in [
        "SERVICE upload.localhost",
        "MAX 200000",
        "TOO-BIG 200001",
        "DOWNLOADED 150000 same application/x-interop",
        "DONE",
    ] {
        assert!(
            stdout.lines().any(|l| l == want),
            "missing {want:?}\n{report}"
        );
    }
    let url = stdout
        .lines()
        .find_map(|l| l.strip_prefix("URL "))
        .unwrap_or_else(|| panic!("no URL line\n{report}"));
    assert!(
        url.starts_with(&format!("http://{}/upload/", node.http))
            && url.ends_with("/interop%20test.bin"),
        "{url}"
    );
}
