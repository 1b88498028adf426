//! A real ejabberd (Debian's 23.01 package) as a federation peer: started
//! by the test as user `ejabberd` (its `ejabberdctl` with a config dir,
//! spool, logs, Erlang node name and cookie of the test's own) on a
//! loopback address of its own. It finds our test domain through an
//! Erlang `inetrc` host entry, on port 5269 of the address given, so our
//! node must listen for s2s there.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::prosody::{free_port, self_signed, CaSigned};

pub const EJABBERDCTL: &str = "/usr/sbin/ejabberdctl";

pub struct Ejabberd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub domain: String,
    pub c2s: SocketAddr,
    pub s2s: SocketAddr,
    ctl: PathBuf,
    _dns: crate::dns::Dns,
}

impl Ejabberd {
    /// Starts ejabberd serving `domain` on `ip` with a self-signed
    /// certificate (dialback both ways); `hosts` are the (domain, address)
    /// entries of its resolver.
    pub fn start(
        domain: &str,
        ip: Ipv4Addr,
        hosts: &[(&str, Ipv4Addr)],
    ) -> anyhow::Result<Ejabberd> {
        Ejabberd::start_with(domain, ip, hosts, None)
    }

    /// As [`Ejabberd::start`]; with `certs`, ejabberd serves the
    /// CA-signed certificate, trusts that CA (`s2s_cafile`) and has no
    /// dialback module, so SASL EXTERNAL is the only way in or out.
    pub fn start_with(
        domain: &str,
        ip: Ipv4Addr,
        hosts: &[(&str, Ipv4Addr)],
        certs: Option<&CaSigned>,
    ) -> anyhow::Result<Ejabberd> {
        if !Path::new(EJABBERDCTL).exists() {
            bail!("{EJABBERDCTL} is missing: `.ci/run` installs the ejabberd package");
        }
        let dir = tempfile::tempdir()?;
        // ejabberd's s2s resolves through DNS only: a responder of our own.
        let dns = crate::dns::Dns::start(ip, hosts)?;
        let d = dir.path().to_path_buf();
        for sub in ["conf", "spool", "logs", "home"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let (c2s_port, s2s_port) = (free_port(ip)?, free_port(ip)?);
        let (crt, key, trust) = match certs {
            None => {
                let (crt, key) = self_signed(&d, domain)?;
                (crt, key, None)
            }
            Some(c) => {
                let (ca, crt, key) = c.copy_into(&d)?;
                (crt, key, Some(ca))
            }
        };
        let pem = d.join("ejabberd.pem");
        std::fs::write(&pem, [std::fs::read(&crt)?, std::fs::read(&key)?].concat())?;
        let conf = d.join("conf");
        let o = match dns.addr.ip() {
            std::net::IpAddr::V4(v4) => v4.octets(),
            std::net::IpAddr::V6(_) => bail!("the DNS responder listens on IPv4"),
        };
        let inetrc = format!(
            "{{lookup, [file, dns]}}.\n{{host, {{127,0,0,1}}, [\"localhost\"]}}.\n{{nameserver, {{{},{},{},{}}}, {}}}.\n{{timeout, 1000}}.\n{{retry, 1}}.\n",
            o[0], o[1], o[2], o[3], dns.addr.port()
        );
        std::fs::write(conf.join("inetrc"), inetrc)?;
        std::fs::write(
            conf.join("ejabberd.yml"),
            format!(
                r#"loglevel: info
log_rotate_count: 0
hosts:
  - "{domain}"
certfiles:
  - "{pem}"
s2s_use_starttls: required
{cafile}s2s_dns_timeout: 2
s2s_dns_retries: 1
outgoing_s2s_families:
  - ipv4
auth_method: internal
auth_password_format: scram
listen:
  -
    port: {c2s_port}
    ip: "{ip}"
    module: ejabberd_c2s
    starttls_required: true
  -
    port: {s2s_port}
    ip: "{ip}"
    module: ejabberd_s2s_in
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
shaper_rules:
  c2s_shaper: none
  s2s_shaper: none
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
{dialback}  mod_version: {{}}
"#,
                pem = pem.display(),
                cafile = trust
                    .as_ref()
                    .map(|ca| format!("s2s_cafile: \"{}\"\n", ca.display()))
                    .unwrap_or_default(),
                dialback = if trust.is_some() {
                    ""
                } else {
                    "  mod_s2s_dialback: {}\n"
                },
            ),
        )?;
        // Every Erlang VM here (the server and each ejabberdctl call) has a
        // distribution listener on a port the kernel picks; on the default
        // 0.0.0.0 it can take a port a test node was given on its own
        // loopback address and has not bound yet (its start then fails
        // with "address in use"). On 127.0.0.1 it cannot.
        std::fs::write(
            conf.join("ejabberdctl.cfg"),
            format!(
                "ERL_OPTIONS=\"-env ERL_CRASH_DUMP_BYTES 0 -kernel inet_dist_use_interface {{127,0,0,1}}\"\nEJABBERD_PID_PATH={}\n",
                d.join("ejabberd.pid").display()
            ),
        )?;
        let node = format!(
            "ejabberd_t{}_{}@localhost",
            std::process::id(),
            ip.octets()[3]
        );
        let ctl = d.join("ctl.sh");
        std::fs::write(
            &ctl,
            format!(
                "#!/bin/sh\ncd '{d}' && HOME='{d}/home' ERL_EPMD_ADDRESS=127.0.0.1 exec setpriv --reuid ejabberd --regid ejabberd --init-groups \\\n  {EJABBERDCTL} --config-dir '{d}/conf' --config '{d}/conf/ejabberd.yml' --ctl-config '{d}/conf/ejabberdctl.cfg' \\\n  --spool '{d}/spool' --logs '{d}/logs' --node {node} \"$@\"\n",
                d = d.display()
            ),
        )?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755))?;
        }
        let status = Command::new("chown")
            .arg("-R")
            .arg("ejabberd:ejabberd")
            .arg(&d)
            .status()?;
        if !status.success() {
            bail!("cannot chown {} to ejabberd", d.display());
        }
        let out = std::fs::File::create(d.join("stdout.log"))?;
        let child = Command::new(&ctl)
            .arg("foreground")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("cannot start ejabberd")?;
        let mut me = Ejabberd {
            child: Some(child),
            domain: domain.to_owned(),
            c2s: SocketAddr::new(ip.into(), c2s_port),
            s2s: SocketAddr::new(ip.into(), s2s_port),
            ctl,
            dir,
            _dns: dns,
        };
        me.wait_started()?;
        Ok(me)
    }

    fn wait_started(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(self.c2s).is_ok()
                && std::net::TcpStream::connect(self.s2s).is_ok()
            {
                // Listening; `started` says the applications are all up.
                if self.ctl(&["started"]).is_ok() {
                    return Ok(());
                }
            }
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    bail!("ejabberd exited ({status}):\n{}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!("ejabberd never started:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.ctl).args(args).output()?;
        if !out.status.success() {
            bail!(
                "ejabberdctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// ejabberd's own log and its console output so far.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("logs/ejabberd.log"))
    }

    pub fn register(&self, user: &str, password: &str) -> anyhow::Result<()> {
        self.ctl(&["register", user, &self.domain, password])
            .map(|_| ())
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // The whole process group (the wrapper and beam.smp), which
            // this test started in a group of its own.
            // SAFETY: kill(2) with a process group id and a signal.
            unsafe {
                libc::kill(-(c.id() as i32), libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }
}
