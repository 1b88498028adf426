//! A real browser client nobody here wrote: Converse.js (npm, pinned in
//! `tests/browser/package.json`) in headless Chromium (Debian `chromium`,
//! driven through `chromium-driver` by Debian's `python3-selenium`) logs in
//! to the real `xmpp-node` over WebSocket (RFC 7395) and, separately, over
//! BOSH (XEP-0124/0206), and chats both ways with slixmpp on TCP c2s.
//!
//! The browser side is `tests/browser/converse_chat.py` with the page
//! `tests/browser/index.html`; it prints one machine-checkable line per
//! step (`LOGGEDIN`, `SENT`, `RECEIVED`, `DISPLAYED`, `SCREENSHOT`, `DONE`,
//! `ERROR`), which these tests assert on. The screenshot of the chat and
//! Chromium's console log land in `target/artifacts/`.
//!
//! Missing Chromium, chromedriver, selenium, slixmpp or Converse.js
//! (`tests/browser/node_modules`) is a failure naming `.ci/run`, which
//! installs them all; so is a Chromium that cannot start. Never a skip.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::node::{NodeOptions, TestNode};

/// For the whole script: Chromium start, two logins, two messages.
const TIMEOUT: Duration = Duration::from_secs(180);

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// `target/artifacts/`, next to the binaries.
fn artifacts_dir() -> PathBuf {
    let dir = tests::node::bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("artifacts");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// The Debian python, which has slixmpp and selenium (pyenv's python on
/// PATH has neither). Panics naming what is missing.
fn python() -> PathBuf {
    let py = PathBuf::from(
        std::env::var_os("INTEROP_PYTHON").unwrap_or_else(|| "/usr/bin/python3".into()),
    );
    for module in ["slixmpp", "selenium"] {
        let ok = Command::new(&py)
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{} cannot import {module}: .ci/run installs it (Debian package python3-{module}), \
             or set INTEROP_PYTHON to a python that has it",
            py.display()
        );
    }
    py
}

/// Chromium, chromedriver and Converse.js are where the script expects them.
fn check_browser_prerequisites() {
    for (what, path, package) in [
        ("Chromium", CHROMIUM, "chromium"),
        ("chromedriver", CHROMEDRIVER, "chromium-driver"),
    ] {
        assert!(
            Path::new(path).is_file(),
            "{what} is missing at {path}: .ci/run installs it (Debian package {package})"
        );
    }
    let converse = browser_dir().join("node_modules/converse.js/dist/converse.min.js");
    assert!(
        converse.is_file(),
        "Converse.js is missing ({}): .ci/run installs it with `npm ci --prefix tests/browser`",
        converse.display()
    );
}

fn node_with_alice_and_bob() -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        vhosts: vec!["localhost".into()],
        // Plain HTTP on loopback: let SASL run over it.
        extra_config: "[http]\nconsider_secure = true\n".into(),
        ..Default::default()
    })
    .expect("start xmpp-node");
    node.adduser("alice", "alice-secret")
        .expect("adduser alice");
    node.adduser("bob", "bob-secret").expect("adduser bob");
    node
}

/// The script's outcome: its stdout lines and stderr.
struct Run {
    lines: Vec<String>,
    stderr: String,
    what: String,
}

impl Run {
    fn report(&self, node: &TestNode) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- node log ---\n{}",
            self.what,
            self.lines.join("\n"),
            self.stderr,
            node.log()
        )
    }

    /// The line starting with `prefix` (and a space, or the whole line).
    fn line(&self, node: &TestNode, prefix: &str) -> &str {
        self.lines
            .iter()
            .find(|l| *l == prefix || l.starts_with(&format!("{prefix} ")))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {}", self.report(node)))
    }
}

/// Runs `converse_chat.py` for one transport to the end; panics with the
/// script's output and the node log unless it succeeded.
fn run_converse_chat(node: &TestNode, transport: &str, url: &str) -> Run {
    let py = python();
    check_browser_prerequisites();
    let screenshot = artifacts_dir().join(format!("converse-{transport}.png"));
    let script = browser_dir().join("converse_chat.py");
    let mut cmd = Command::new(&py);
    cmd.arg(&script)
        .args(["--transport", transport, "--url", url])
        .args(["--c2s-host", &node.c2s.ip().to_string()])
        .args(["--c2s-port", &node.c2s.port().to_string()])
        .args(["--domain", &node.domain])
        .args([
            "--alice-password",
            "alice-secret",
            "--bob-password",
            "bob-secret",
        ])
        .arg("--screenshot")
        .arg(&screenshot)
        .args(["--chromium", CHROMIUM, "--chromedriver", CHROMEDRIVER])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("converse_chat.py --transport {transport} --url {url}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", py.display(), script.display()));

    // Read both pipes in threads so a chatty stderr cannot block the script.
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for converse_chat.py") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let run = Run {
        lines: out_thread
            .join()
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect(),
        stderr: err_thread.join().unwrap_or_default(),
        what,
    };
    match status {
        None => panic!("timed out after {TIMEOUT:?}: {}", run.report(node)),
        Some(s) => assert!(
            s.success() && run.lines.iter().any(|l| l == "DONE"),
            "failed with {s}: {}",
            run.report(node)
        ),
    }
    run
}

/// The assertions both transports share: the message went both ways, and
/// the screenshot exists.
fn check_chat(node: &TestNode, run: &Run, transport: &str) {
    assert_eq!(
        run.line(node, "LOGGEDIN"),
        format!("LOGGEDIN {transport}"),
        "{}",
        run.report(node)
    );
    let hello = format!("hello bob from Converse.js over {transport}");
    let received = run.line(node, "RECEIVED bob");
    assert!(
        received.starts_with(&format!("RECEIVED bob alice@{}/", node.domain))
            && received.ends_with(&hello),
        "bob got the wrong message: {received}\n{}",
        run.report(node)
    );
    let reply = format!("hi alice, slixmpp here ({transport})");
    assert_eq!(
        run.line(node, "DISPLAYED"),
        format!("DISPLAYED alice {reply}"),
        "{}",
        run.report(node)
    );
    let shot = run.line(node, "SCREENSHOT");
    let path = PathBuf::from(shot.trim_start_matches("SCREENSHOT "));
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 0,
        "no screenshot at {}: {}",
        path.display(),
        run.report(node)
    );
    println!(
        "screenshot of the Converse.js chat over {transport}: {}",
        path.display()
    );
    println!(
        "browser console log: {}",
        path.with_extension("console.log").display()
    );
}

#[test]
fn converse_js_over_websocket_chats_with_slixmpp() {
    let node = node_with_alice_and_bob();
    let url = format!("ws://{}/xmpp-websocket", node.http);
    let run = run_converse_chat(&node, "websocket", &url);
    check_chat(&node, &run, "websocket");
}

#[test]
fn converse_js_over_bosh_chats_with_slixmpp() {
    let node = node_with_alice_and_bob();
    let url = format!("http://{}/http-bind", node.http);
    let run = run_converse_chat(&node, "bosh", &url);
    check_chat(&node, &run, "bosh");
}
