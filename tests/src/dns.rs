//! A DNS responder for tests on loopback: answers A queries for the names
//! it is given and NXDOMAIN for everything else (so SRV lookups fail fast
//! and peers fall back to A on 5269, RFC 6120 §3.2.1). This machine has no
//! DNS server a test could configure, and ejabberd resolves domains only
//! through DNS (not a hosts file), so this stands in for one; it is the
//! only stand-in in the federation tests and it is plain RFC 1035 over UDP.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};

pub struct Dns {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Dns {
    /// Serves `names` (without the trailing dot) on `ip`, a free port.
    pub fn start(ip: Ipv4Addr, names: &[(&str, Ipv4Addr)]) -> anyhow::Result<Dns> {
        let socket = UdpSocket::bind((ip, 0))?;
        socket.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
        let addr = socket.local_addr()?;
        let table: HashMap<String, Ipv4Addr> = names
            .iter()
            .map(|(n, a)| (format!("{}.", n.to_ascii_lowercase()), *a))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::new();
                reply
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(query.op_code())
                    .set_recursion_desired(query.recursion_desired())
                    .set_recursion_available(true)
                    .set_authoritative(true);
                let mut found = false;
                for q in query.queries() {
                    reply.add_query(q.clone());
                    let name = q.name().to_ascii().to_ascii_lowercase();
                    let name = if name.ends_with('.') {
                        name
                    } else {
                        format!("{name}.")
                    };
                    if let Some(ip) = table.get(&name) {
                        found = true;
                        if q.query_type() == RecordType::A {
                            reply.add_answer(Record::from_rdata(
                                q.name().clone(),
                                5,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                }
                if !found {
                    reply.set_response_code(ResponseCode::NXDomain);
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, from);
                }
            }
        });
        Ok(Dns { addr, stop })
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
