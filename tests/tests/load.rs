//! The load generator against the real node: a clean chat run delivers
//! everything, and failures name their cause. No speed or latency figure
//! is asserted (the machine is shared and noisy).

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Output};

use tests::node::{NodeOptions, TestNode};

fn xmpp_load(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xmpp-load"))
        .args(args)
        .output()
        .expect("xmpp-load runs")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Creates user1..userN (passwords pw1..pwN) through `clusterctl import-users`,
/// with the file xmpp-load itself writes.
fn import_users(node: &TestNode, n: usize) {
    let out = xmpp_load(&[
        "accounts",
        "--users",
        &n.to_string(),
        "--domain",
        &node.domain,
    ]);
    assert!(out.status.success());
    let file = node.dir.path().join("users.txt");
    std::fs::write(&file, &out.stdout).unwrap();
    node.clusterctl(&["import-users", file.to_str().unwrap()])
        .expect("import-users");
}

#[test]
fn chat_run_delivers_every_message_once() {
    let node = TestNode::start().unwrap();
    import_users(&node, 10);
    let server = node.c2s.to_string();
    let pid = node.pid().unwrap().to_string();
    let out = xmpp_load(&[
        "chat",
        "--server",
        &server,
        "--domain",
        &node.domain,
        "--users",
        "10",
        "--rate",
        "200",
        "--duration",
        "3",
        "--server-pid",
        &pid,
        "--json",
        "--quiet",
    ]);
    let r = json(&out);
    assert!(
        out.status.success(),
        "{r:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chat = &r["chat"];
    assert_eq!(chat["sent"], 600, "{r:#}");
    assert_eq!(chat["delivered"], chat["sent"], "{r:#}");
    assert_eq!(chat["lost"], 0, "{r:#}");
    assert_eq!(chat["duplicated"], 0, "{r:#}");
    assert_eq!(chat["bounced"], 0, "{r:#}");
    assert_eq!(chat["latency"]["count"], 600, "{r:#}");
    assert_eq!(r["ok"], true);
    assert!(r["server_process"]["cpu_s"].is_number(), "{r:#}");
}

#[test]
fn hold_and_login_runs_over_direct_tls_with_scram() {
    let node = TestNode::start().unwrap();
    import_users(&node, 5);
    let server = node.c2s_tls.to_string();
    for scenario in ["login", "hold"] {
        let out = xmpp_load(&[
            scenario,
            "--server",
            &server,
            "--tls",
            "direct",
            "--mechanism",
            "scram-sha-256",
            "--users",
            "5",
            "--arrival-rate",
            "20",
            "--duration",
            "1",
            "--json",
            "--quiet",
        ]);
        let r = json(&out);
        assert!(out.status.success(), "{scenario}: {r:#}");
        assert_eq!(r["ok"], true);
    }
}

#[test]
fn login_runs_with_fast_tokens_after_one_password_login_each() {
    let node = TestNode::start().unwrap();
    import_users(&node, 5);
    let server = node.c2s.to_string();
    let pid = node.pid().unwrap().to_string();
    let out = xmpp_load(&[
        "login",
        "--server",
        &server,
        "--mechanism",
        "fast",
        "--users",
        "5",
        "--arrival-rate",
        "20",
        "--duration",
        "1",
        "--server-pid",
        &pid,
        "--json",
        "--quiet",
    ]);
    let r = json(&out);
    assert!(out.status.success(), "{r:#}");
    assert_eq!(r["mechanism"], "FAST", "{r:#}");
    let login = &r["login"];
    assert!(login["succeeded"].as_u64().unwrap_or(0) > 0, "{r:#}");
    assert_eq!(login["failed"], 0, "{r:#}");
    // The measured logins are FAST ones (the server logs each login's
    // mechanism).
    assert!(
        node.log().contains("HT-SHA-256-NONE"),
        "FAST logins reach the server"
    );
}

#[test]
fn wrong_password_fails_naming_the_authentication_failure() {
    let node = TestNode::start().unwrap();
    import_users(&node, 2);
    let out = xmpp_load(&[
        "login",
        "--server",
        &node.c2s.to_string(),
        "--users",
        "2",
        "--password-pattern",
        "not-the-password",
        // One login at a time: user1 is tried (and fails) first, so the
        // first failure named is user1's, not whichever of two racing
        // logins the server answered first.
        "--concurrency",
        "1",
        "--duration",
        "1",
        "--quiet",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("authentication failed for user1@localhost: not-authorized")
            && err.contains("wrong password or unknown account"),
        "{err}"
    );
}

#[test]
fn closed_port_fails_naming_the_refused_connection() {
    // A port nobody listens on: bind, note it, close.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let out = xmpp_load(&[
        "chat",
        "--server",
        &port.to_string(),
        "--users",
        "2",
        "--duration",
        "1",
        "--json",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot connect to {port}: connection refused")),
        "{err}"
    );
    let r = json(&out);
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("connection refused"));
}

#[test]
fn presence_run_builds_rosters_and_fans_out_status_changes() {
    let node = TestNode::start().unwrap();
    import_users(&node, 8);
    let out = xmpp_load(&[
        "presence",
        "--server",
        &node.c2s.to_string(),
        "--users",
        "8",
        "--roster-size",
        "4",
        "--rate",
        "16",
        "--duration",
        "1",
        "--json",
        "--quiet",
    ]);
    let r = json(&out);
    assert!(out.status.success(), "{r:#}");
    let p = &r["presence"];
    assert_eq!(p["min_roster"], 4, "{r:#}");
    assert_eq!(p["status_changes_sent"], 16, "{r:#}");
    assert_eq!(p["expected"], 64, "{r:#}");
    assert_eq!(p["received"], p["expected"], "{r:#}");
}

#[test]
fn chat_runs_over_websocket_with_and_without_tls() {
    // Plain ws:// counts as encrypted only behind a TLS proxy the operator
    // vouches for (`http.consider_secure`), as here.
    let node = TestNode::start_with(NodeOptions {
        extra_config: "[http]\nconsider_secure = true\n".into(),
        ..NodeOptions::default()
    })
    .unwrap();
    import_users(&node, 6);
    // wss:// on the HTTPS port, ws:// on the plain HTTP port.
    for (server, tls) in [(node.https, "direct"), (node.http, "none")] {
        let out = xmpp_load(&[
            "chat",
            "--transport",
            "websocket",
            "--server",
            &server.to_string(),
            "--tls",
            tls,
            "--mechanism",
            "scram-sha-1",
            "--domain",
            &node.domain,
            "--users",
            "6",
            "--rate",
            "60",
            "--duration",
            "2",
            "--json",
            "--quiet",
        ]);
        let r = json(&out);
        assert!(
            out.status.success(),
            "{tls}: {r:#}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(r["transport"], "websocket", "{r:#}");
        let chat = &r["chat"];
        assert_eq!(chat["sent"], 120, "{tls}: {r:#}");
        assert_eq!(chat["delivered"], chat["sent"], "{tls}: {r:#}");
        assert_eq!(chat["lost"], 0, "{tls}: {r:#}");
        assert_eq!(chat["duplicated"], 0, "{tls}: {r:#}");
    }
    // WebSocket has no STARTTLS: the flag combination is refused by name.
    let out = xmpp_load(&[
        "hold",
        "--transport",
        "websocket",
        "--server",
        &node.https.to_string(),
        "--users",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WebSocket has no STARTTLS"), "{err}");
}

/// Runs `xmpp-load` with its open-files limit lowered to `limit` (soft and
/// hard), as on a machine where it cannot be raised.
fn xmpp_load_with_fd_limit(limit: u64, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xmpp-load"));
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("xmpp-load runs")
}

#[test]
fn processes_and_source_addresses_share_the_users_and_count_each_once() {
    // Logins as fast as they go, from two addresses.
    let node = TestNode::start_with(NodeOptions {
        extra_config:
            "[limits]\nmax_unauthenticated = 1000\nmax_unauthenticated_per_address = 1000\n".into(),
        ..NodeOptions::default()
    })
    .unwrap();
    import_users(&node, 200);
    let server = node.c2s.to_string();
    let pid = node.pid().unwrap().to_string();
    let common = [
        "--server",
        &server,
        "--domain",
        &node.domain,
        "--users",
        "200",
        "--processes",
        "2",
        "--source-ips",
        "127.0.0.2-127.0.0.3",
        "--arrival-rate",
        "0",
        "--server-pid",
        &pid,
        "--json",
        "--quiet",
    ];
    let run = |scenario: &str, extra: &[&str]| {
        let mut args = vec![scenario];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        let out = xmpp_load(&args);
        let r = json(&out);
        assert!(
            out.status.success(),
            "{scenario}: {r:#}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(r["ok"], true, "{r:#}");
        assert_eq!(r["processes"], 2, "{r:#}");
        assert_eq!(r["users"], 200, "{r:#}");
        // The children's histograms are merged by the parent, not shown.
        assert!(r.get("latency_buckets").is_none(), "{r:#}");
        r
    };

    // Every message goes to a user of either process; the merged report
    // counts each one once, and nothing is lost.
    let r = run("chat", &["--rate", "400", "--duration", "2"]);
    let chat = &r["chat"];
    assert_eq!(chat["sent"], 800, "{r:#}");
    assert_eq!(chat["delivered"], 800, "{r:#}");
    assert_eq!(chat["lost"], 0, "{r:#}");
    assert_eq!(chat["duplicated"], 0, "{r:#}");
    assert_eq!(chat["bounced"], 0, "{r:#}");
    assert_eq!(chat["latency"]["count"], 800, "{r:#}");
    assert!(chat["server_cpu_s_per_1000_messages"].is_number(), "{r:#}");
    // Each user connected once, from the two addresses in turn (as the
    // kernel reports the sockets' local addresses).
    assert_eq!(
        r["source_addresses"],
        serde_json::json!({ "127.0.0.2": 100, "127.0.0.3": 100 }),
        "{r:#}"
    );

    let r = run("hold", &["--duration", "1"]);
    let hold = &r["hold"];
    assert_eq!(hold["connections"], 200, "{r:#}");
    assert_eq!(hold["alive_at_end"], 200, "{r:#}");
    assert!(hold["server_kib_per_connection"].is_number(), "{r:#}");
    assert!(r["server_process"]["cpu_s"].is_number(), "{r:#}");
}

#[test]
fn more_connections_than_one_process_may_open_names_the_processes_needed() {
    // Nothing listens on the port: the run must stop before connecting.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    // 256 descriptors, 64 kept for the process itself: 192 connections each.
    let out = xmpp_load_with_fd_limit(256, &["hold", "--server", &port, "--users", "1000"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a process may have 256") && err.contains("--processes 6"),
        "{err}"
    );
    // Asked for enough processes, it goes as far as connecting.
    let out = xmpp_load_with_fd_limit(
        256,
        &[
            "hold",
            "--server",
            &port,
            "--users",
            "1000",
            "--processes",
            "6",
            "--quiet",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connection refused"), "{err}");
    assert!(!err.contains("--processes 6"), "{err}");
}
