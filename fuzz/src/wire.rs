//! Target `wire`: the control-socket codec (`ioreq_server::oop::wire`).
//!
//! Input: mode byte, then
//! - mode even: a packet. `decode` never panics; what decodes re-encodes to exactly the same
//!   bytes (the encoding is canonical) and decodes again to the same message; `peek` agrees
//!   with the header; an error maps to a code.
//! - mode odd: a message built from the bytes; what `encode` accepts fits in
//!   `MAX_MESSAGE` and decodes back to the same message.

use crate::Bytes;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::wire::{
    self, Code, HEADER_SIZE, Info, MAX_MESSAGE, Message, Notice, Reply, Request, op,
};
use ioreq_server::{IoRange, Position, RangeKind};

pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8() & 1 == 0 {
        packet(b.rest());
    } else {
        let m = message(&mut b);
        if let Ok(bytes) = wire::encode(&m) {
            assert!(bytes.len() <= MAX_MESSAGE);
            assert_eq!(
                wire::decode(&bytes),
                Ok(m.clone()),
                "decode(encode(m)) for {m:?}"
            );
            let (o, tag) = wire::peek(&bytes).expect("a whole header");
            let want_tag = match &m {
                Message::Request { tag, .. } | Message::Reply { tag, .. } => *tag,
                Message::Notice(_) => 0,
            };
            assert_eq!(tag, want_tag);
            let _ = op::name(o);
        }
    }
}

fn packet(p: &[u8]) {
    let peeked = wire::peek(p);
    assert_eq!(peeked.is_some(), p.len() >= HEADER_SIZE);
    match wire::decode(p) {
        Ok(m) => {
            let again = wire::encode(&m);
            assert_eq!(again.as_deref(), Ok(p), "encode(decode(p)) is p, for {m:?}");
            assert_eq!(wire::decode(p), Ok(m.clone()));
            let (o, tag) = peeked.expect("a decoded packet has a header");
            let _ = op::name(o);
            match &m {
                Message::Request { tag: t, req } => {
                    assert_eq!((*t, req.op()), (tag, o));
                    let _ = req.id();
                }
                Message::Reply { tag: t, .. } => assert_eq!(*t, tag),
                Message::Notice(_) => assert_eq!(tag, 0),
            }
        }
        Err(e) => {
            let _ = (e.code(), e.code().name(), e.to_string(), format!("{e:?}"));
        }
    }
}

fn text(b: &mut Bytes<'_>) -> String {
    let n = usize::from(b.u16() % 1100);
    String::from_utf8_lossy(b.take(n)).into_owned()
}

fn position(b: &mut Bytes<'_>) -> Position {
    let hops = usize::from(b.u8() % 36);
    Position {
        segment: b.u16(),
        root_bus: b.u8(),
        path: b.take(hops).to_vec(),
    }
}

fn mode(v: u8) -> BufioreqMode {
    match v % 3 {
        0 => BufioreqMode::Off,
        1 => BufioreqMode::Legacy,
        _ => BufioreqMode::Atomic,
    }
}

fn message(b: &mut Bytes<'_>) -> Message {
    let tag = b.u32();
    let id = b.u16();
    match b.u8() % 18 {
        0 => {
            let n = usize::from(b.u8() % 80);
            Message::Request {
                tag,
                req: Request::Create {
                    bufioreq: mode(b.u8()),
                    name: String::from_utf8_lossy(b.take(n)).into_owned(),
                },
            }
        }
        1 => Message::Request {
            tag,
            req: Request::GetInfo { id },
        },
        k @ (2 | 3) => {
            let kind = [RangeKind::Port, RangeKind::Mmio, RangeKind::Pci][usize::from(b.u8() % 3)];
            let range = IoRange::new(kind, b.u64(), b.u64());
            let req = if k == 2 {
                Request::MapRange { id, range }
            } else {
                Request::UnmapRange { id, range }
            };
            Message::Request { tag, req }
        }
        4 => Message::Request {
            tag,
            req: Request::SetState {
                id,
                enabled: b.bool(),
            },
        },
        5 => Message::Request {
            tag,
            req: Request::Destroy { id },
        },
        6 => Message::Request {
            tag,
            req: Request::MapPcidev { id, sbdf: b.u32() },
        },
        7 => Message::Request {
            tag,
            req: Request::UnmapPcidev { id, sbdf: b.u32() },
        },
        8 => Message::Request {
            tag,
            req: Request::MapPosition {
                id,
                position: position(b),
            },
        },
        9 => Message::Request {
            tag,
            req: Request::UnmapPosition {
                id,
                position: position(b),
            },
        },
        10 => Message::Reply {
            tag,
            reply: Reply::Created {
                id,
                nr_vcpus: b.u32(),
            },
        },
        11 => Message::Reply {
            tag,
            reply: Reply::Info(Info {
                id,
                bufioreq: mode(b.u8()),
                nr_vcpus: b.u32(),
                shm_size: b.u32(),
                buf_offset: b.u32(),
                ioreq_offset: b.u32(),
                notify_offset: b.u32(),
            }),
        },
        12 => {
            let k = usize::from(b.u8());
            let o = match op::REQUESTS.get(k) {
                Some(o) => *o,
                None => b.u16(),
            };
            Message::Reply {
                tag,
                reply: Reply::Done { op: o },
            }
        }
        13 => Message::Reply {
            tag,
            reply: Reply::Error {
                op: b.u16(),
                code: Code(b.u32()),
                message: text(b),
            },
        },
        14 => {
            let resolved = b.bool();
            let sbdf = b.u32();
            Message::Notice(Notice::PositionMoved {
                id,
                position: position(b),
                sbdf: resolved.then_some(sbdf),
            })
        }
        16 => Message::Request {
            tag,
            req: Request::InjectMsi {
                id,
                addr: b.u64(),
                data: b.u32(),
            },
        },
        _ => Message::Notice(Notice::Goodbye {
            code: Code(b.u32()),
            message: text(b),
        }),
    }
}
