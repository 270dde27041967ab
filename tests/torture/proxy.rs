//! A small TCP proxy on 127.0.0.1 with a pause switch on every connection.
//!
//! Each worker slot gets its own listening port, so the harness knows which
//! process each connection belongs to, and the server-side port of every
//! upstream connection (what `pg_stat_activity.client_port` and MySQL's
//! processlist show). A paused connection is black-holed: the proxy stops
//! reading on both sides, so nothing is delivered and nothing is reset; the
//! bytes wait in the kernel's buffers until the switch is turned back. A
//! closed connection is dropped on both sides.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One proxied connection's switches.
#[derive(Debug)]
struct Conn {
    /// The local port of the upstream socket: the client port the database sees.
    upstream_port: u16,
    paused: watch::Sender<bool>,
    closed: watch::Sender<bool>,
}

/// A listening port and its connections.
#[derive(Debug)]
pub struct Slot {
    pub port: u16,
    paused: watch::Sender<bool>,
    /// The "server" is down: new connections are closed at once.
    down: watch::Sender<bool>,
    conns: Mutex<Vec<Conn>>,
}

/// The proxy: one slot per worker.
#[derive(Debug, Clone)]
pub struct Proxy {
    slots: Arc<Vec<Arc<Slot>>>,
}

impl Proxy {
    /// Starts `n` listeners; slot `i` forwards to `upstreams[i % len]`.
    pub async fn start(n: usize, upstreams: &[SocketAddr]) -> Proxy {
        let mut slots = Vec::new();
        for i in 0..n {
            let upstream = upstreams[i % upstreams.len()];
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
            let slot = Arc::new(Slot {
                port: listener.local_addr().unwrap().port(),
                paused: watch::channel(false).0,
                down: watch::channel(false).0,
                conns: Mutex::new(Vec::new()),
            });
            tokio::spawn(accept(listener, slot.clone(), upstream));
            slots.push(slot);
        }
        Proxy {
            slots: Arc::new(slots),
        }
    }

    pub fn port(&self, slot: usize) -> u16 {
        self.slots[slot].port
    }

    /// Black-holes (or restores) every connection of a slot, and those it
    /// accepts meanwhile.
    pub fn pause(&self, slot: usize, on: bool) {
        let s = &self.slots[slot];
        s.paused.send_replace(on);
        for c in s.conns.lock().unwrap().iter() {
            c.paused.send_replace(on);
        }
    }

    /// Takes the slot's "server" down (every connection closed, new ones
    /// closed at once) or brings it back.
    pub fn down(&self, slot: usize, on: bool) {
        self.slots[slot].down.send_replace(on);
        if on {
            self.close(slot);
        }
    }

    /// Closes every connection of a slot.
    pub fn close(&self, slot: usize) {
        let s = &self.slots[slot];
        for c in s.conns.lock().unwrap().drain(..) {
            c.closed.send_replace(true);
        }
    }

    /// The upstream ports of a slot's live connections.
    pub fn upstream_ports(&self, slot: usize) -> Vec<u16> {
        let s = &self.slots[slot];
        let mut conns = s.conns.lock().unwrap();
        conns.retain(|c| !c.closed.is_closed() && !*c.closed.borrow());
        conns.iter().map(|c| c.upstream_port).collect()
    }
}

async fn accept(listener: TcpListener, slot: Arc<Slot>, upstream: SocketAddr) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *slot.down.borrow() {
            drop(client);
            continue;
        }
        let slot = slot.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return; // the database is down: the client sees a close
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let upstream_port = server.local_addr().map(|a| a.port()).unwrap_or(0);
            let paused = watch::channel(*slot.paused.borrow()).0;
            let closed = watch::channel(false).0;
            let (p1, p2, mut c) = (paused.subscribe(), paused.subscribe(), closed.subscribe());
            slot.conns.lock().unwrap().push(Conn {
                upstream_port,
                paused,
                closed,
            });
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::select! {
                _ = pump(cr, sw, p1) => {}
                _ = pump(sr, cw, p2) => {}
                _ = c.wait_for(|c| *c) => {}
            }
            // Dropping the halves closes both sockets.
            let mut conns = slot.conns.lock().unwrap();
            conns.retain(|c| c.upstream_port != upstream_port);
        });
    }
}

/// Copies one direction, reading nothing while paused.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut paused: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => r,
            // Paused while waiting: stop reading (read is cancel safe).
            _ = paused.wait_for(|p| *p) => continue,
        };
        let n = match n {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Paused after the read: hold the bytes until restored.
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `host:port` of a server URL, and the URL with another port on 127.0.0.1.
pub fn authority(url: &str) -> (String, impl Fn(u16) -> String + '_) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let auth = &url[start..end];
    let host_start = auth.rfind('@').map_or(start, |i| start + i + 1);
    let hostport = url[host_start..end].to_owned();
    let with_port =
        move |port: u16| format!("{}127.0.0.1:{port}{}", &url[..host_start], &url[end..]);
    (hostport, with_port)
}

impl Proxy {
    /// One slot in front of the server of `url` (a `postgres://` or
    /// `mysql://` URL), and the same URL through the proxy.
    pub async fn in_front_of(url: &str) -> (Proxy, String) {
        let (hostport, with_port) = authority(url);
        let upstream = tokio::net::lookup_host(hostport.as_str())
            .await
            .expect("resolve the server")
            .find(|a| a.is_ipv4())
            .expect("an IPv4 address");
        let proxy = Proxy::start(1, &[upstream]).await;
        let through = with_port(proxy.port(0));
        (proxy, through)
    }
}
