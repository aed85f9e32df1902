//! The local control socket: a Unix stream socket, mode 0600 (root only).
//! One request line per connection, one reply until EOF.
//!
//! Requests: `stats` → the JSON [`Stats`](crate::control::stats::Stats);
//! `reload` → `ok: ...` or `error: ...` (the running config is unchanged).
//!
//! The control thread serves this socket between health checks, reloads
//! and neighbour refreshes, so reading a request never waits: connections
//! are read without blocking on each call of [`ControlSocket::pending`]
//! until their line is complete, and one whose line has not arrived
//! [`REQUEST_DEADLINE`] after it connected is closed. Replies are written
//! the same way: what the socket buffer does not take at once is sent on
//! later calls, as the client reads, until [`REPLY_DEADLINE`].

use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Time a client has, from connecting, to send its request line. `l4lb`
/// sends it at once; a second is ample even on a loaded host.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(1);

/// Time a client has, from its reply being ready, to read all of it: the
/// `l4lb` CLI waits 10 s for a reply.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(10);

/// Longest request line accepted, newline excluded: the requests are
/// single words, so anything longer is not one.
pub const MAX_REQUEST_LINE: usize = 64;

/// Connections served at once (reading a request or sending a reply);
/// more wait in the listen backlog. Each holds a file descriptor until its
/// reply is sent or its deadline passes.
const MAX_WAITING: usize = 16;

pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Connections whose request line is still incomplete.
    waiting: Vec<Waiting>,
    /// Replies the client has not read all of yet.
    sending: Vec<Sending>,
}

/// A reply partly written: `data[at..]` is still to go.
struct Sending {
    stream: UnixStream,
    data: Vec<u8>,
    at: usize,
    deadline: Instant,
}

struct Waiting {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What reading a waiting connection gave.
enum LineRead {
    /// The whole line (without the newline), or what came before EOF.
    Line(String),
    /// Not all there yet.
    More,
    /// Too long, timed out or broken: closed, with this reply if any.
    Drop(Option<String>),
}

impl ControlSocket {
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use: another l4lb is running with this control socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            waiting: Vec::new(),
            sending: Vec::new(),
        })
    }

    /// The requests whose line is complete now, each with its connection.
    /// Never blocks: it reads what has arrived and returns; a request line
    /// still incomplete is read on a later call, until its deadline.
    pub fn pending(&mut self) -> Vec<Request> {
        let now = Instant::now();
        self.sending.retain_mut(|s| s.send(now) == Sent::More);
        while self.waiting.len() + self.sending.len() < MAX_WAITING {
            let Ok((stream, _)) = self.listener.accept() else {
                break;
            };
            // A connection that cannot be made non-blocking is dropped
            // rather than risk a blocking read.
            if stream.set_nonblocking(true).is_ok() {
                self.waiting.push(Waiting {
                    stream,
                    line: Vec::new(),
                    deadline: now + REQUEST_DEADLINE,
                });
            }
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            let read = self.waiting[i].read(now);
            if let LineRead::More = read {
                i += 1;
                continue;
            }
            let w = self.waiting.swap_remove(i);
            match read {
                LineRead::Line(line) => {
                    out.push(Request {
                        line: line.trim().to_string(),
                        stream: w.stream,
                    });
                }
                LineRead::Drop(Some(reply)) => self.send(w.stream, &reply),
                LineRead::Drop(None) | LineRead::More => {}
            }
        }
        out
    }

    /// Sends `text` as the reply to `req` and closes the connection once
    /// it is all out. Never blocks: what the socket does not take now is
    /// sent by later calls of [`ControlSocket::pending`] as the client
    /// reads; a client that has not read it all [`REPLY_DEADLINE`] from
    /// now is cut off.
    pub fn reply(&mut self, req: Request, text: &str) {
        self.send(req.stream, text);
    }

    /// Sends `text` on `stream` and closes it, as [`ControlSocket::reply`]
    /// says (also how a refused request is told why).
    fn send(&mut self, stream: UnixStream, text: &str) {
        let mut s = Sending {
            stream,
            data: text.as_bytes().to_vec(),
            at: 0,
            deadline: Instant::now() + REPLY_DEADLINE,
        };
        if s.send(Instant::now()) == Sent::More {
            self.sending.push(s);
        }
    }
}

#[derive(PartialEq, Eq)]
enum Sent {
    /// Some of the reply is still to go.
    More,
    /// All of it went out, or the connection is given up.
    Done,
}

impl Sending {
    fn send(&mut self, now: Instant) -> Sent {
        while self.at < self.data.len() {
            match (&self.stream).write(&self.data[self.at..]) {
                Ok(0) => return Sent::Done,
                Ok(n) => self.at += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return if now >= self.deadline {
                        Sent::Done
                    } else {
                        Sent::More
                    };
                }
                Err(_) => return Sent::Done,
            }
        }
        Sent::Done
    }
}

fn too_long() -> String {
    format!("error: request line longer than {MAX_REQUEST_LINE} bytes\n")
}

impl Waiting {
    fn read(&mut self, now: Instant) -> LineRead {
        let mut chunk = [0u8; MAX_REQUEST_LINE + 1];
        loop {
            match (&self.stream).read(&mut chunk) {
                Ok(0) => return LineRead::Line(String::from_utf8_lossy(&self.line).into_owned()),
                Ok(n) => {
                    self.line.extend_from_slice(&chunk[..n]);
                    if let Some(end) = self.line.iter().position(|&b| b == b'\n') {
                        self.line.truncate(end);
                        if end > MAX_REQUEST_LINE {
                            return LineRead::Drop(Some(too_long()));
                        }
                        return LineRead::Line(String::from_utf8_lossy(&self.line).into_owned());
                    }
                    if self.line.len() > MAX_REQUEST_LINE {
                        return LineRead::Drop(Some(too_long()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return if now >= self.deadline {
                        LineRead::Drop(Some(format!(
                            "error: no request line within {} ms\n",
                            REQUEST_DEADLINE.as_millis()
                        )))
                    } else {
                        LineRead::More
                    };
                }
                Err(_) => return LineRead::Drop(None),
            }
        }
    }
}

/// One request on the control socket, answered with
/// [`ControlSocket::reply`].
pub struct Request {
    pub line: String,
    stream: UnixStream,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to a running instance and returns its reply.
pub fn request(path: &Path, req: &str) -> Result<String> {
    let mut s = UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is l4lb running, and are you root?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A control socket in /tmp, unique to this test.
    fn socket(name: &str) -> (ControlSocket, PathBuf) {
        let path = PathBuf::from(format!(
            "/tmp/l4lb-ctl-test-{}-{name}.sock",
            std::process::id()
        ));
        (ControlSocket::bind(&path).unwrap(), path)
    }

    /// Calls `pending` every 10 ms for `span`, replying `reply` to each
    /// request; returns the requests' lines and the longest single call
    /// (of `pending` or `reply`).
    fn serve(ctl: &mut ControlSocket, span: Duration, reply: &str) -> (Vec<String>, Duration) {
        let end = Instant::now() + span;
        let (mut lines, mut longest) = (Vec::new(), Duration::ZERO);
        while Instant::now() < end {
            let t = Instant::now();
            let reqs = ctl.pending();
            longest = longest.max(t.elapsed());
            for r in reqs {
                lines.push(r.line.clone());
                let t = Instant::now();
                ctl.reply(r, reply);
                longest = longest.max(t.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        (lines, longest)
    }

    #[test]
    fn a_request_gets_its_reply() {
        let (mut ctl, path) = socket("reply");
        let client = thread::spawn(move || request(&path, "stats").unwrap());
        let (lines, _) = serve(&mut ctl, Duration::from_millis(500), "the stats\n");
        assert_eq!(lines, ["stats"]);
        assert_eq!(client.join().unwrap(), "the stats\n");
    }

    /// A client that sends its line one byte every 900 ms never holds up
    /// the control thread: every call returns at once, and the client is
    /// told off and closed once its second is up.
    #[test]
    fn a_trickling_client_never_blocks_the_control_thread() {
        let (mut ctl, path) = socket("trickle");
        let client = thread::spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for b in b"stats\n" {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(900));
                // Closed by the server: what did it say?
                let mut reply = String::new();
                if let Ok(n) = s.read_to_string(&mut reply) {
                    if n > 0 {
                        return reply;
                    }
                }
            }
            String::new()
        });
        let (lines, longest) = serve(&mut ctl, Duration::from_millis(2500), "");
        assert!(lines.is_empty(), "{lines:?}");
        assert!(
            longest < Duration::from_millis(100),
            "one call took {longest:?}"
        );
        assert_eq!(
            client.join().unwrap(),
            "error: no request line within 1000 ms\n"
        );
    }

    /// A client that asks for a reply far larger than the socket buffer
    /// and only starts reading a second and a half later never holds up
    /// the control thread either, and still gets every byte.
    #[test]
    fn a_slow_reader_of_a_large_reply_never_blocks_the_control_thread() {
        let (mut ctl, path) = socket("slow-reader");
        let big: String = (0..4 << 20)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        let want = big.clone();
        let client = thread::spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(b"stats\n").unwrap();
            thread::sleep(Duration::from_millis(1500));
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        });
        let (lines, longest) = serve(&mut ctl, Duration::from_millis(3000), &big);
        assert_eq!(lines, ["stats"]);
        assert!(
            longest < Duration::from_millis(100),
            "one call took {longest:?}"
        );
        let got = client.join().unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the reply arrived altered");
    }

    #[test]
    fn an_overlong_request_line_is_refused() {
        let (mut ctl, path) = socket("long");
        // Closed with the rest of the line unread, the connection is
        // reset after the reply: read up to the reset.
        let client = thread::spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&[b'x'; 1000]).unwrap();
            let (mut reply, mut buf) = (Vec::new(), [0u8; 256]);
            while let Ok(n @ 1..) = s.read(&mut buf) {
                reply.extend_from_slice(&buf[..n]);
            }
            String::from_utf8(reply).unwrap()
        });
        let (lines, _) = serve(&mut ctl, Duration::from_millis(500), "");
        assert!(lines.is_empty(), "{lines:?}");
        assert_eq!(
            client.join().unwrap(),
            "error: request line longer than 64 bytes\n"
        );
    }
}
