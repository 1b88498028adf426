-- Prosody config for tests/bench/run.sh. Debian bookworm's default
-- /etc/prosody/prosody.cfg.lua (prosody 0.12) with only these changes:
--   * paths (pidfile, data, logs) inside the run's temporary directory,
--   * every listener bound to the benchmark's own loopback address, s2s off,
--   * one virtual host with the benchmark's certificate,
--   * default_iteration_count = 4096 (Prosody's default is 10000; the other
--     two servers use 4096).
-- Everything else -- module list, mod_limits' 10 kB/s per client, the
-- internal_hashed authentication, info-level logging -- is Debian's.
-- @...@ placeholders are filled in by run.sh.

admins = { }
plugin_paths = { "/usr/local/lib/prosody/modules" }

modules_enabled = {
		"disco"; -- Service discovery
		"roster"; -- Allow users to have a roster. Recommended ;)
		"saslauth"; -- Authentication for clients and servers. Recommended if you want to log in.
		"tls"; -- Add support for secure TLS on c2s/s2s connections
		"blocklist"; -- Allow users to block communications with other users
		"bookmarks"; -- Synchronise the list of open rooms between clients
		"carbons"; -- Keep multiple online clients in sync
		"dialback"; -- Support for verifying remote servers using DNS
		"limits"; -- Enable bandwidth limiting for XMPP connections
		"pep"; -- Allow users to store public and private data in their account
		"private"; -- Legacy account storage mechanism (XEP-0049)
		"smacks"; -- Stream management and resumption (XEP-0198)
		"vcard4"; -- User profiles (stored in PEP)
		"vcard_legacy"; -- Conversion between legacy vCard and PEP Avatar, vcard
		"csi_simple"; -- Simple but effective traffic optimizations for mobile devices
		"invites"; -- Create and manage invites
		"invites_adhoc"; -- Allow admins/users to create invitations via their client
		"invites_register"; -- Allows invited users to create accounts
		"ping"; -- Replies to XMPP pings with pongs
		"register"; -- Allow users to register on this server using a client and change passwords
		"time"; -- Let others know the time here on this server
		"uptime"; -- Report how long server has been running
		"version"; -- Replies to server version requests
		"admin_adhoc"; -- Allows administration via an XMPP client that supports ad-hoc commands
		"admin_shell"; -- Allow secure administration via 'prosodyctl shell'
		"posix"; -- POSIX functionality, sends server to background, enables syslog, etc.
}
modules_disabled = {
}

pidfile = "@DIR@/prosody.pid";
data_path = "@DIR@/data";

-- The benchmark's own address for every listener; no federation.
interfaces = { "@ADDR@" }
local_interfaces = { "@ADDR@" }
c2s_ports = { @PORT@ }
s2s_ports = { }

c2s_require_encryption = true
s2s_secure_auth = true

limits = {
	c2s = {
		rate = "10kb/s";
	};
	s2sin = {
		rate = "30kb/s";
	};
}

authentication = "internal_hashed"
default_iteration_count = 4096

archive_expires_after = "1w" -- Remove archived messages after 1 week

log = {
	info = "@DIR@/prosody.log";
	error = "@DIR@/prosody.err";
}

VirtualHost "@DOMAIN@"
	ssl = {
		certificate = "@CERT@";
		key = "@KEY@";
	}
