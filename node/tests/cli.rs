//! The binaries' command-line behaviour. (Having integration tests here
//! also makes `cargo test --workspace` build `xmpp-node` and `clusterctl`,
//! which the end-to-end tests in `tests/` start as processes.)

use std::process::Command;

#[test]
fn bad_config_value_names_file_line_and_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "node_id = 1\n\n[limits]\nmax_stanza_bytes = \"big\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_xmpp-node"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run xmpp-node");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:", path.display())), "{err}");
    assert!(
        err.contains("invalid type") && err.contains("whole number"),
        "{err}"
    );
}

#[test]
fn missing_config_file_is_reported_by_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_xmpp-node"))
        .args(["--config", "/nonexistent/xmpp.toml"])
        .output()
        .expect("run xmpp-node");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/xmpp.toml"));
}

#[test]
fn clusterctl_says_when_the_node_is_unreachable() {
    let out = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args(["--node", "127.0.0.1:1", "status"])
        .output()
        .expect("run clusterctl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the node's admin API at 127.0.0.1:1"),
        "{err}"
    );
}
