//! The vhost-user messages a network backend takes from its front end
//! (QEMU, DPDK's `virtio_user`): their header, the requests pollux serves
//! and their replies, as the vhost-user protocol specification (QEMU's
//! `docs/interop/vhost-user.rst`) lays them out: little-endian, a 12-byte
//! header (request, flags, payload size), then the payload; descriptors
//! ride with the header in `SCM_RIGHTS`.
//!
//! Parsing is pure (bytes and a descriptor count in, a [`Request`] or a
//! [`ProtoError`] naming the request out), so the front end's bytes are
//! fuzzed (`fuzz/fuzz_targets/vhost_user.rs`) without a socket.

/// Length of a message header.
pub const HEADER_LEN: usize = 12;
/// The largest payload pollux reads (a memory table of
/// [`MAX_REGIONS`] is 8 + 32 * 8 bytes; the protocol's largest messages,
/// which pollux does not serve, are 4 KiB).
pub const MAX_PAYLOAD: usize = 4096;
/// Memory regions a table may have (the protocol's limit without the
/// `CONFIGURE_MEM_SLOTS` feature, which pollux does not offer).
pub const MAX_REGIONS: usize = 8;

/// The header's version bits (always 1).
const VERSION: u32 = 0x1;
/// The header flag of a reply.
const REPLY: u32 = 0x4;
/// The header flag asking for an acknowledgement (`REPLY_ACK`).
pub const NEED_REPLY: u32 = 0x8;

/// Request codes.
pub mod req {
    /// Which features the backend has.
    pub const GET_FEATURES: u32 = 1;
    /// The features the front end chose.
    pub const SET_FEATURES: u32 = 2;
    /// The front end takes the device.
    pub const SET_OWNER: u32 = 3;
    /// The front end lets the device go (stops it).
    pub const RESET_OWNER: u32 = 4;
    /// The guest's memory: regions, one descriptor each.
    pub const SET_MEM_TABLE: u32 = 5;
    /// A ring's size.
    pub const SET_VRING_NUM: u32 = 8;
    /// A ring's addresses (in the front end's address space).
    pub const SET_VRING_ADDR: u32 = 9;
    /// Where a ring's next available entry is.
    pub const SET_VRING_BASE: u32 = 10;
    /// Stops a ring; the reply says where its next available entry is.
    pub const GET_VRING_BASE: u32 = 11;
    /// A ring's kick eventfd (the device starts on it).
    pub const SET_VRING_KICK: u32 = 12;
    /// A ring's call eventfd (the device interrupts the guest through it).
    pub const SET_VRING_CALL: u32 = 13;
    /// A ring's error eventfd.
    pub const SET_VRING_ERR: u32 = 14;
    /// Which protocol features the backend has.
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    /// The protocol features the front end chose.
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    /// How many queues the backend has.
    pub const GET_QUEUE_NUM: u32 = 17;
    /// Enables or disables a ring.
    pub const SET_VRING_ENABLE: u32 = 18;
    /// Resets the device (with `RESET_DEVICE`; served as `RESET_OWNER`).
    pub const RESET_DEVICE: u32 = 34;
}

/// `VIRTIO_NET_F_MRG_RXBUF`: the 12-byte header (with `num_buffers`).
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// `VHOST_USER_F_PROTOCOL_FEATURES`: rings start disabled; protocol
/// features are negotiated.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_F_VERSION_1`: little-endian rings, the 12-byte header.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VHOST_USER_PROTOCOL_F_REPLY_ACK`: a request flagged [`NEED_REPLY`]
/// is acknowledged, zero when done, non-zero when refused (and the
/// connection stays).
pub const PF_REPLY_ACK: u64 = 1 << 3;
/// The protocol features pollux offers.
pub const PROTOCOL_FEATURES: u64 = PF_REPLY_ACK;
/// What pollux offers: a plain network device (no offloads, no
/// mergeable buffers: each packet in one descriptor chain; no indirect
/// descriptors or event indexes; one queue pair).
pub const FEATURES: u64 = F_VERSION_1 | F_PROTOCOL_FEATURES;

/// The `u64` of a kick, call or error message that says no descriptor
/// comes with it (the ring is polled).
const NO_FD: u64 = 1 << 8;

/// A guest memory region of a memory table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest physical address of its first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Its address in the front end's address space (ring addresses are
    /// given in those).
    pub uaddr: u64,
    /// Where the region starts in its descriptor's file.
    pub mmap_offset: u64,
}

/// A ring's addresses, in the front end's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringAddr {
    /// Ring index.
    pub index: u32,
    /// The descriptor table.
    pub desc: u64,
    /// The used ring.
    pub used: u64,
    /// The available ring.
    pub avail: u64,
}

/// A message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The request code ([`req`]).
    pub request: u32,
    /// Flags: version, reply, need-reply.
    pub flags: u32,
    /// Payload length.
    pub size: u32,
}

impl Header {
    /// Reads a header, checking its version and payload size.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, ProtoError> {
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = Header {
            request: u(0),
            flags: u(4),
            size: u(8),
        };
        if h.flags & 0x3 != VERSION {
            return Err(ProtoError::Version {
                request: h.request,
                flags: h.flags,
            });
        }
        if h.size as usize > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge {
                request: h.request,
                size: h.size,
            });
        }
        Ok(h)
    }
}

/// A request pollux serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Reply with [`FEATURES`].
    GetFeatures,
    /// The features chosen.
    SetFeatures(u64),
    /// The front end takes the device.
    SetOwner,
    /// Stop the device (`RESET_OWNER`, `RESET_DEVICE`).
    Reset,
    /// The guest's memory; one descriptor per region came with it.
    SetMemTable(Vec<Region>),
    /// Ring `index` has `num` entries.
    SetVringNum {
        /// Ring.
        index: u32,
        /// Entries.
        num: u32,
    },
    /// Ring addresses.
    SetVringAddr(VringAddr),
    /// Ring `index`'s next available entry is `num`.
    SetVringBase {
        /// Ring.
        index: u32,
        /// Entry.
        num: u32,
    },
    /// Stop ring `index` and reply where its next available entry is.
    GetVringBase {
        /// Ring.
        index: u32,
    },
    /// Ring `index`'s kick eventfd came with it (`fd`), or it is polled.
    SetVringKick {
        /// Ring.
        index: u32,
        /// Whether a descriptor came with the message.
        fd: bool,
    },
    /// Ring `index`'s call eventfd came with it (`fd`), or none is used.
    SetVringCall {
        /// Ring.
        index: u32,
        /// Whether a descriptor came with the message.
        fd: bool,
    },
    /// Ring `index`'s error eventfd (kept only to be closed).
    SetVringErr {
        /// Ring.
        index: u32,
        /// Whether a descriptor came with the message.
        fd: bool,
    },
    /// Reply with the protocol features offered.
    GetProtocolFeatures,
    /// The protocol features chosen.
    SetProtocolFeatures(u64),
    /// Reply with the number of queue pairs (1).
    GetQueueNum,
    /// Enable or disable ring `index`.
    SetVringEnable {
        /// Ring.
        index: u32,
        /// On or off.
        enable: bool,
    },
}

impl Request {
    /// Whether the front end waits for a reply to this request.
    pub fn has_reply(&self) -> bool {
        matches!(
            self,
            Request::GetFeatures
                | Request::GetVringBase { .. }
                | Request::GetProtocolFeatures
                | Request::GetQueueNum
        )
    }
}

/// A message pollux cannot take. Each names the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The header's version bits are not 1.
    #[error("request {request}: header flags {flags:#x} are not version 1")]
    Version {
        /// Request code.
        request: u32,
        /// The flags.
        flags: u32,
    },
    /// The payload is larger than any request pollux serves.
    #[error("request {request}: a payload of {size} bytes is larger than {MAX_PAYLOAD}")]
    TooLarge {
        /// Request code.
        request: u32,
        /// Payload size.
        size: u32,
    },
    /// The payload is shorter than the request's fields.
    #[error("request {request}: payload of {got} bytes, {need} needed")]
    Short {
        /// Request code.
        request: u32,
        /// Bytes needed.
        need: usize,
        /// Bytes that came.
        got: usize,
    },
    /// The wrong number of descriptors came with the message.
    #[error("request {request}: {got} descriptors came with it, {want} expected")]
    Descriptors {
        /// Request code.
        request: u32,
        /// Descriptors expected.
        want: usize,
        /// Descriptors that came.
        got: usize,
    },
    /// A memory table with no region or more than [`MAX_REGIONS`].
    #[error("memory table: {regions} regions (1 to {MAX_REGIONS} taken)")]
    Regions {
        /// Regions it had.
        regions: u32,
    },
    /// A request pollux does not serve (it offers no feature that asks
    /// for it).
    #[error("request {request} is not served (no feature pollux offers asks for it)")]
    Unsupported {
        /// Request code.
        request: u32,
    },
}

fn u32_at(p: &[u8], i: usize) -> u32 {
    p.get(i..i + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(p: &[u8], i: usize) -> u64 {
    p.get(i..i + 8).map_or(0, |b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    })
}

/// Reads request `h` with its `payload` and the number of descriptors
/// that came with it.
pub fn parse(h: &Header, payload: &[u8], fds: usize) -> Result<Request, ProtoError> {
    let request = h.request;
    let need = |n: usize| {
        if payload.len() < n {
            Err(ProtoError::Short {
                request,
                need: n,
                got: payload.len(),
            })
        } else {
            Ok(())
        }
    };
    let want_fds = |n: usize| {
        if fds == n {
            Ok(())
        } else {
            Err(ProtoError::Descriptors {
                request,
                want: n,
                got: fds,
            })
        }
    };
    // A kick, call or error message: a ring index and whether a
    // descriptor comes with it.
    let ring_fd = || -> Result<(u32, bool), ProtoError> {
        need(8)?;
        let v = u64_at(payload, 0);
        let fd = v & NO_FD == 0;
        want_fds(usize::from(fd))?;
        Ok(((v & 0xff) as u32, fd))
    };
    let state = || -> Result<(u32, u32), ProtoError> {
        need(8)?;
        Ok((u32_at(payload, 0), u32_at(payload, 4)))
    };
    if !matches!(
        request,
        req::SET_MEM_TABLE | req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR
    ) {
        want_fds(0)?;
    }
    Ok(match request {
        req::GET_FEATURES => Request::GetFeatures,
        req::SET_FEATURES => {
            need(8)?;
            Request::SetFeatures(u64_at(payload, 0))
        }
        req::SET_OWNER => Request::SetOwner,
        req::RESET_OWNER | req::RESET_DEVICE => Request::Reset,
        req::SET_MEM_TABLE => {
            need(8)?;
            let n = u32_at(payload, 0);
            if n == 0 || n as usize > MAX_REGIONS {
                return Err(ProtoError::Regions { regions: n });
            }
            let n = n as usize;
            need(8 + 32 * n)?;
            want_fds(n)?;
            let regions = (0..n)
                .map(|k| {
                    let at = 8 + 32 * k;
                    Region {
                        gpa: u64_at(payload, at),
                        size: u64_at(payload, at + 8),
                        uaddr: u64_at(payload, at + 16),
                        mmap_offset: u64_at(payload, at + 24),
                    }
                })
                .collect();
            Request::SetMemTable(regions)
        }
        req::SET_VRING_NUM => {
            let (index, num) = state()?;
            Request::SetVringNum { index, num }
        }
        req::SET_VRING_ADDR => {
            need(40)?;
            Request::SetVringAddr(VringAddr {
                index: u32_at(payload, 0),
                desc: u64_at(payload, 8),
                used: u64_at(payload, 16),
                avail: u64_at(payload, 24),
            })
        }
        req::SET_VRING_BASE => {
            let (index, num) = state()?;
            Request::SetVringBase { index, num }
        }
        req::GET_VRING_BASE => Request::GetVringBase { index: state()?.0 },
        req::SET_VRING_KICK => {
            let (index, fd) = ring_fd()?;
            Request::SetVringKick { index, fd }
        }
        req::SET_VRING_CALL => {
            let (index, fd) = ring_fd()?;
            Request::SetVringCall { index, fd }
        }
        req::SET_VRING_ERR => {
            let (index, fd) = ring_fd()?;
            Request::SetVringErr { index, fd }
        }
        req::GET_PROTOCOL_FEATURES => Request::GetProtocolFeatures,
        req::SET_PROTOCOL_FEATURES => {
            need(8)?;
            Request::SetProtocolFeatures(u64_at(payload, 0))
        }
        req::GET_QUEUE_NUM => Request::GetQueueNum,
        req::SET_VRING_ENABLE => {
            let (index, on) = state()?;
            Request::SetVringEnable {
                index,
                enable: on != 0,
            }
        }
        _ => return Err(ProtoError::Unsupported { request }),
    })
}

/// A reply to `request`: its header and payload.
pub fn reply(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// A reply carrying one `u64`.
pub fn reply_u64(request: u32, v: u64) -> Vec<u8> {
    reply(request, &v.to_le_bytes())
}

/// A reply carrying a ring's state (index, number).
pub fn reply_state(request: u32, index: u32, num: u32) -> Vec<u8> {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&index.to_le_bytes());
    p[4..].copy_from_slice(&num.to_le_bytes());
    reply(request, &p)
}

/// A request as a front end writes it (header and payload): for tests
/// and fuzzing.
pub fn request(code: u32, payload: &[u8]) -> Vec<u8> {
    request_flagged(code, 0, payload)
}

/// [`request`] with header flags `flags` besides the version
/// ([`NEED_REPLY`]).
pub fn request_flagged(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + payload.len());
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&(VERSION | flags).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(code: u32, payload: &[u8], fds: usize) -> Result<Request, ProtoError> {
        let m = request(code, payload);
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&m[..HEADER_LEN]);
        let h = Header::parse(&h)?;
        assert_eq!(h.size as usize, payload.len());
        parse(&h, &m[HEADER_LEN..], fds)
    }

    #[test]
    fn requests_read_as_the_specification_lays_them_out() {
        assert_eq!(parsed(req::GET_FEATURES, &[], 0), Ok(Request::GetFeatures));
        assert_eq!(
            parsed(req::SET_FEATURES, &F_VERSION_1.to_le_bytes(), 0),
            Ok(Request::SetFeatures(F_VERSION_1))
        );
        let mut t = vec![2, 0, 0, 0, 0, 0, 0, 0];
        for r in [
            [0x1000u64, 0x2000, 0x7f00_0000_0000, 0],
            [0x10_0000, 0x1000, 0x7f00_1000_0000, 64],
        ] {
            for v in r {
                t.extend_from_slice(&v.to_le_bytes());
            }
        }
        assert_eq!(
            parsed(req::SET_MEM_TABLE, &t, 2),
            Ok(Request::SetMemTable(vec![
                Region {
                    gpa: 0x1000,
                    size: 0x2000,
                    uaddr: 0x7f00_0000_0000,
                    mmap_offset: 0
                },
                Region {
                    gpa: 0x10_0000,
                    size: 0x1000,
                    uaddr: 0x7f00_1000_0000,
                    mmap_offset: 64
                },
            ]))
        );
        let mut a = vec![1, 0, 0, 0, 0, 0, 0, 0];
        for v in [0xa000u64, 0xb000, 0xc000, 0] {
            a.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(
            parsed(req::SET_VRING_ADDR, &a, 0),
            Ok(Request::SetVringAddr(VringAddr {
                index: 1,
                desc: 0xa000,
                used: 0xb000,
                avail: 0xc000
            }))
        );
        assert_eq!(
            parsed(req::SET_VRING_KICK, &1u64.to_le_bytes(), 1),
            Ok(Request::SetVringKick { index: 1, fd: true })
        );
        assert_eq!(
            parsed(req::SET_VRING_CALL, &(NO_FD | 1).to_le_bytes(), 0),
            Ok(Request::SetVringCall {
                index: 1,
                fd: false
            })
        );
        let st = |i: u32, n: u32| [i.to_le_bytes(), n.to_le_bytes()].concat();
        assert_eq!(
            parsed(req::SET_VRING_ENABLE, &st(0, 1), 0),
            Ok(Request::SetVringEnable {
                index: 0,
                enable: true
            })
        );
        assert_eq!(
            parsed(req::GET_VRING_BASE, &st(1, 0), 0),
            Ok(Request::GetVringBase { index: 1 })
        );
        assert!(Request::GetVringBase { index: 1 }.has_reply());
        assert!(!Request::SetOwner.has_reply());
    }

    #[test]
    fn bad_messages_are_refused_naming_the_request() {
        let e = parsed(req::SET_FEATURES, &[1, 2], 0).unwrap_err();
        assert_eq!(e.to_string(), "request 2: payload of 2 bytes, 8 needed");
        let e = parsed(req::SET_VRING_KICK, &1u64.to_le_bytes(), 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "request 12: 0 descriptors came with it, 1 expected"
        );
        let e = parsed(req::SET_OWNER, &[], 1).unwrap_err();
        assert!(
            matches!(e, ProtoError::Descriptors { request: 3, .. }),
            "{e}"
        );
        let e = parsed(req::SET_MEM_TABLE, &[9, 0, 0, 0, 0, 0, 0, 0], 9).unwrap_err();
        assert_eq!(e, ProtoError::Regions { regions: 9 });
        let e = parsed(req::SET_MEM_TABLE, &[1, 0, 0, 0, 0, 0, 0, 0], 1).unwrap_err();
        assert!(matches!(e, ProtoError::Short { need: 40, .. }), "{e}");
        let e = parsed(6, &[0; 8], 0).unwrap_err();
        assert_eq!(e, ProtoError::Unsupported { request: 6 });
        let mut h = [0u8; HEADER_LEN];
        h[4] = 2;
        assert!(matches!(Header::parse(&h), Err(ProtoError::Version { .. })));
        h[4] = 1;
        h[8..].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            Header::parse(&h),
            Err(ProtoError::TooLarge { size: 5000, .. })
        ));
    }

    #[test]
    fn replies_carry_the_reply_flag_and_their_payload() {
        let r = reply_u64(req::GET_FEATURES, FEATURES);
        assert_eq!(&r[..4], &1u32.to_le_bytes());
        assert_eq!(&r[4..8], &5u32.to_le_bytes());
        assert_eq!(&r[8..12], &8u32.to_le_bytes());
        assert_eq!(&r[12..], &FEATURES.to_le_bytes());
        let s = reply_state(req::GET_VRING_BASE, 1, 300);
        assert_eq!(&s[12..16], &1u32.to_le_bytes());
        assert_eq!(&s[16..], &300u32.to_le_bytes());
    }
}
