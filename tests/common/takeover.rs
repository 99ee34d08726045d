//! What the hitless-upgrade tests share.

use super::netns::{Lab, read, wait_for};
use std::path::Path;
use std::time::Duration;

/// A successor that cannot take over: saves the state it received (argv[2])
/// and kills itself, as if killed halfway; with argv[3] `go`, only after it
/// said it was ready and was told to go.
pub const DYING_SUCCESSOR: &str = "import socket, sys, os, json
ctl, out = sys.argv[1], sys.argv[2]
path = os.path.splitext(ctl)[0] + '.takeover%d' % os.getpid()
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(path)
l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(ctl)
body = json.dumps({'socket': path, 'formats': [1], 'version': 'dying', 'pid': os.getpid()})
c.sendall(('POST /v1/takeover HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n%s' % (len(body), body)).encode())
resp = b''
while True:
    d = c.recv(4096)
    if not d:
        break
    resp += d
if b' 202 ' not in resp.split(b'\\r\\n')[0]:
    sys.exit('refused: %r' % resp)
s, _ = l.accept()
head, fds, _, _ = socket.recv_fds(s, 8, 300)
while len(head) < 8:
    head += s.recv(8 - len(head))
n = int.from_bytes(head, 'big')
data = b''
while len(data) < n:
    data += s.recv(n - len(data))
open(out, 'wb').write(data)
os.unlink(path)
if len(sys.argv) > 3 and sys.argv[3] == 'go':
    ready = json.dumps({'msg': 'ready'}).encode()
    s.sendall(len(ready).to_bytes(8, 'big') + ready)
    head = b''
    while len(head) < 8:
        head += s.recv(8 - len(head))
    n = int.from_bytes(head, 'big')
    msg = b''
    while len(msg) < n:
        msg += s.recv(n - len(msg))
    if json.loads(msg) != {'msg': 'go'}:
        sys.exit('not go: %r' % msg)
os.kill(os.getpid(), 9)
";

/// Starts download `i` of `url` in namespace `tag` at `rate`; its exit
/// status goes to `dl-i.rc` once it ends.
pub fn download(lab: &mut Lab, tag: &str, i: usize, url: &str, rate: &str) {
    let dir = lab.dir.clone();
    let f = dir.join(format!("dl-{i}"));
    lab.spawn(
        tag,
        &format!(
            "curl -sS --max-time 300 --limit-rate {rate} -o {f} {url}; echo $? > {f}.rc",
            f = f.display()
        ),
        &dir.join(format!("dl-{i}.log")),
    );
}

/// Waits (up to `limit`) for downloads `ids` to end; panics unless each exited 0 with
/// exactly `want`.
pub fn downloads_intact(
    dir: &Path,
    limit: Duration,
    ids: impl Iterator<Item = usize> + Clone,
    want: &[u8],
    ctx: impl Fn() -> String,
) {
    let rc = |i: usize| read(&dir.join(format!("dl-{i}.rc"))).trim().to_string();
    assert!(
        wait_for(limit, || ids.clone().all(|i| !rc(i).is_empty())),
        "downloads did not end: {:?}\n{}",
        ids.clone()
            .filter(|&i| rc(i).is_empty())
            .collect::<Vec<_>>(),
        ctx()
    );
    for i in ids {
        assert_eq!(
            rc(i),
            "0",
            "download {i} failed: {}\n{}",
            read(&dir.join(format!("dl-{i}.log"))),
            ctx()
        );
        let got = std::fs::read(dir.join(format!("dl-{i}"))).unwrap();
        assert!(
            got == want,
            "download {i}: {} bytes, not the {} served (or different bytes)",
            got.len(),
            want.len()
        );
    }
}
