//! A real Prosody (Debian's package) as a federation peer: started by the
//! test as user `prosody` (it refuses root) on a loopback address of its
//! own, with a config, a self-signed certificate and a hosts file written
//! into a temporary directory. Prosody resolves our test domain through
//! that hosts file (`unbound = { hoststxt = … }`), so our node must listen
//! for s2s on port 5269 of the address the hosts file names.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub const PROSODY: &str = "/usr/bin/prosody";
const PROSODYCTL: &str = "/usr/bin/prosodyctl";

pub struct Prosody {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub domain: String,
    pub c2s: SocketAddr,
    pub s2s: SocketAddr,
    config: PathBuf,
}

fn as_prosody(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "prosody",
        "--regid",
        "prosody",
        "--init-groups",
        program,
    ]);
    c
}

/// A free port on `ip`, chosen by the kernel.
pub(crate) fn free_port(ip: Ipv4Addr) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0))?;
    Ok(l.local_addr()?.port())
}

/// A self-signed certificate and key for `domain` in `dir` (openssl), as
/// `(certificate, key)` paths.
pub(crate) fn self_signed(dir: &Path, domain: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (crt, key) = (
        dir.join(format!("{domain}.crt")),
        dir.join(format!("{domain}.key")),
    );
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg(format!("/CN={domain}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{domain}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("openssl")?;
    if !status.success() {
        bail!("openssl could not make a certificate");
    }
    Ok((crt, key))
}

/// A certificate for the peer's domain issued by a test CA, and that CA,
/// which the peer then trusts for the other side's certificates: with it
/// the domains authenticate each other with SASL EXTERNAL.
#[derive(Clone, Debug)]
pub struct CaSigned {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaSigned {
    /// Copies the three files into `dir` (which the peer's user owns) and
    /// returns `(ca, cert, key)` there.
    pub(crate) fn copy_into(&self, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
        let to = |from: &Path, name: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::copy(from, &p).with_context(|| format!("copying {}", from.display()))?;
            Ok(p)
        };
        Ok((
            to(&self.ca, "test-ca.crt")?,
            to(&self.cert, "ca-signed.crt")?,
            to(&self.key, "ca-signed.key")?,
        ))
    }
}

impl Prosody {
    /// Starts Prosody serving `domain` on `ip` with a self-signed
    /// certificate (dialback both ways); `hosts` are the (domain, address)
    /// lines of its hosts file.
    pub fn start(
        domain: &str,
        ip: Ipv4Addr,
        hosts: &[(&str, Ipv4Addr)],
    ) -> anyhow::Result<Prosody> {
        Prosody::start_with(domain, ip, hosts, None)
    }

    /// As [`Prosody::start`]; with `certs`, Prosody serves the CA-signed
    /// certificate, trusts only that CA and requires certificate
    /// authentication of every peer (`s2s_secure_auth`).
    pub fn start_with(
        domain: &str,
        ip: Ipv4Addr,
        hosts: &[(&str, Ipv4Addr)],
        certs: Option<&CaSigned>,
    ) -> anyhow::Result<Prosody> {
        if !Path::new(PROSODY).exists() {
            bail!("{PROSODY} is missing: `.ci/run` installs the prosody package");
        }
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        std::fs::create_dir_all(d.join("data"))?;
        let (c2s_port, s2s_port) = (free_port(ip)?, free_port(ip)?);
        let mut hosts_txt = String::from("127.0.0.1 localhost\n");
        for (name, addr) in hosts {
            hosts_txt.push_str(&format!("{addr} {name}\n"));
        }
        std::fs::write(d.join("hosts"), hosts_txt)?;
        let p = |x: &Path| x.display().to_string();
        let (crt, key, trust) = match certs {
            None => {
                let (crt, key) = self_signed(d, domain)?;
                (crt, key, None)
            }
            Some(c) => {
                let (ca, crt, key) = c.copy_into(d)?;
                (crt, key, Some(ca))
            }
        };
        let config = d.join("prosody.cfg.lua");
        std::fs::write(
            &config,
            format!(
                r#"pidfile = "{pid}"
data_path = "{data}"
daemonize = false
log = {{ debug = "{log}" }}
interfaces = {{ "{ip}" }}
c2s_ports = {{ {c2s_port} }}
s2s_ports = {{ {s2s_port} }}
c2s_direct_tls_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", "tls", "dialback", "disco", "ping", "version" }}
authentication = "internal_plain"
c2s_require_encryption = true
s2s_require_encryption = true
s2s_secure_auth = {secure}
{global_ssl}unbound = {{ hoststxt = "{hosts}" }}
VirtualHost "{domain}"
  ssl = {{ certificate = "{crt}", key = "{key}"{cafile} }}
"#,
                secure = trust.is_some(),
                global_ssl = trust
                    .as_ref()
                    .map(|ca| format!("ssl = {{ cafile = \"{}\" }}\n", p(ca)))
                    .unwrap_or_default(),
                cafile = trust
                    .as_ref()
                    .map(|ca| format!(", cafile = \"{}\"", p(ca)))
                    .unwrap_or_default(),
                pid = p(&d.join("prosody.pid")),
                data = p(&d.join("data")),
                log = p(&d.join("prosody.log")),
                hosts = p(&d.join("hosts")),
                crt = p(&crt),
                key = p(&key),
            ),
        )?;
        // Prosody runs as its own user: it must read and write all of it.
        let status = Command::new("chown")
            .arg("-R")
            .arg("prosody:prosody")
            .arg(d)
            .status()?;
        if !status.success() {
            bail!("cannot chown {} to prosody", d.display());
        }
        let stderr = std::fs::File::create(d.join("stderr.log"))?;
        let child = as_prosody(PROSODY)
            .arg("--config")
            .arg(&config)
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot start prosody")?;
        let mut me = Prosody {
            child: Some(child),
            domain: domain.to_owned(),
            c2s: SocketAddr::new(ip.into(), c2s_port),
            s2s: SocketAddr::new(ip.into(), s2s_port),
            config,
            dir,
        };
        me.wait_listening()?;
        Ok(me)
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(self.c2s).is_ok()
                && std::net::TcpStream::connect(self.s2s).is_ok()
            {
                return Ok(());
            }
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    bail!("prosody exited ({status}):\n{}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!("prosody never listened:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Prosody's log and stderr so far.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("prosody.log"))
    }

    pub fn register(&self, user: &str, password: &str) -> anyhow::Result<()> {
        let out = as_prosody(PROSODYCTL)
            .arg("--config")
            .arg(&self.config)
            .args(["register", user, &self.domain, password])
            .output()?;
        if !out.status.success() {
            bail!(
                "prosodyctl register failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
