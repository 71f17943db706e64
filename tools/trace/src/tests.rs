use super::writer::encode_header;
use super::*;
use proptest::prelude::*;

fn meta() -> TraceMeta {
    TraceMeta {
        source: "unit test".into(),
        producer: "trace::tests".into(),
        extra: serde_json::json!({"k": 1}),
    }
}

fn sbdf(bus: u8, device: u8, function: u8) -> Sbdf {
    Sbdf::new(0, bus, device, function).unwrap()
}

fn access(addr: u64, data: u64) -> Access {
    Access {
        vcpu: 0,
        space: Space::Port,
        dir: Dir::Read,
        addr,
        size: 4,
        rep: 1,
        data,
        region: None,
        config: None,
    }
}

fn write_all(records: &[Record], strings: &[&str]) -> Vec<u8> {
    let mut w = TraceWriter::new(Vec::new(), &meta()).unwrap();
    for s in strings {
        w.intern(s).unwrap();
    }
    for r in records {
        w.write(r).unwrap();
    }
    w.finish().unwrap().0
}

fn read_all(bytes: &[u8]) -> Result<Vec<Record>, TraceError> {
    TraceReader::new(bytes)?.collect()
}

/// The accesses and events of a record sequence with repeats expanded.
fn expand(records: &[Record]) -> Vec<Record> {
    let mut out = Vec::new();
    for r in records {
        match r {
            Record::Access { access, repeat } => {
                for _ in 0..*repeat {
                    out.push(Record::access(*access));
                }
            }
            Record::Bar(_) => out.push(*r),
        }
    }
    out
}

/// What the writer should store: adjacent identical accesses merged.
fn fold(records: &[Record]) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    for r in records {
        if let (
            Some(Record::Access {
                access: pa,
                repeat: pn,
            }),
            Record::Access { access, repeat },
        ) = (out.last_mut(), r)
            && pa == access
        {
            *pn += *repeat;
            continue;
        }
        out.push(*r);
    }
    out
}

#[test]
fn round_trip_with_names_and_meta() {
    let mut w = TraceWriter::new(Vec::new(), &meta()).unwrap();
    let data = w.intern("pci-conf-data").unwrap();
    let mch = w.intern("mch").unwrap();
    assert_eq!(w.intern("pci-conf-data").unwrap(), data);
    let a = Access {
        vcpu: 1,
        space: Space::Port,
        dir: Dir::Read,
        addr: 0xcfe,
        size: 2,
        rep: 1,
        data: 0x29c0,
        region: Some(data),
        config: Some(ConfigAnnotation {
            path: ConfigPath::Cf8,
            sbdf: sbdf(0, 0, 0),
            reg: 2,
            device: Some(mch),
        }),
    };
    let ev = BarEvent {
        kind: BarEventKind::Map,
        device: Some(mch),
        sbdf: sbdf(1, 2, 3),
        bar: 6,
        space: Space::Mmio,
        base: 0xfe00_0000,
        size: 0x4_0000,
    };
    w.write_access(&a).unwrap();
    w.write(&Record::Bar(ev)).unwrap();
    let (bytes, summary) = w.finish_with_trailer(&serde_json::json!({"x": 2})).unwrap();
    assert_eq!(summary.records, 2);
    assert_eq!(summary.strings, 2);

    let mut r = TraceReader::new(&bytes[..]).unwrap();
    assert_eq!(r.meta(), &meta());
    assert_eq!(r.version(), FORMAT_VERSION);
    let Some(Record::Access { access, repeat }) = r.next_record().unwrap() else {
        panic!("expected an access");
    };
    assert_eq!((access, repeat), (a, 1));
    assert_eq!(r.string(access.region.unwrap()), Some("pci-conf-data"));
    assert_eq!(
        r.string(access.config.unwrap().device.unwrap()),
        Some("mch")
    );
    assert_eq!(r.next_record().unwrap(), Some(Record::Bar(ev)));
    assert!(r.trailer().is_none());
    assert_eq!(r.next_record().unwrap(), None);
    assert_eq!(r.next_record().unwrap(), None);
    let t = r.trailer().unwrap();
    assert_eq!((t.records, t.accesses, t.strings), (2, 1, 2));
    assert_eq!(t.info, serde_json::json!({"x": 2}));
    assert_eq!(r.strings().find("mch"), Some(mch));
}

#[test]
fn identical_accesses_fold() {
    let a = access(0x608, 0x1234);
    let b = access(0x608, 0x1235);
    let recs = [
        Record::access(a),
        Record::access(a),
        Record::Access {
            access: a,
            repeat: 5,
        },
        Record::access(b),
        Record::access(a),
    ];
    let mut w = TraceWriter::new(Vec::new(), &meta()).unwrap();
    for r in &recs {
        w.write(r).unwrap();
    }
    let s = w.summary();
    assert_eq!((s.access_records, s.accesses), (3, 9));
    let bytes = w.finish().unwrap().0;
    let got = read_all(&bytes).unwrap();
    assert_eq!(
        got,
        vec![
            Record::Access {
                access: a,
                repeat: 7
            },
            Record::access(b),
            Record::access(a)
        ]
    );
}

#[test]
fn bar_event_breaks_a_fold() {
    let a = access(0x61, 0x20);
    let ev = Record::Bar(BarEvent {
        kind: BarEventKind::Unmap,
        device: None,
        sbdf: sbdf(0, 3, 0),
        bar: 0,
        space: Space::Port,
        base: 0xe040,
        size: 0x20,
    });
    let recs = [Record::access(a), ev, Record::access(a)];
    assert_eq!(read_all(&write_all(&recs, &[])).unwrap(), recs.to_vec());
}

#[test]
fn writer_rejects_bad_records() {
    let mut w = TraceWriter::new(Vec::new(), &meta()).unwrap();
    let mut a = access(0x70, 0);
    a.size = 3;
    let e = w.write_access(&a).unwrap_err();
    assert!(e.to_string().contains("size 3"), "{e}");
    a.size = 1;
    a.region = Some(StrId(0));
    let e = w.write_access(&a).unwrap_err();
    assert!(e.to_string().contains("not interned"), "{e}");
    a.region = None;
    let e = w
        .write(&Record::Access {
            access: a,
            repeat: 0,
        })
        .unwrap_err();
    assert!(e.to_string().contains("repeat count 0"), "{e}");
    // Functions the format cannot store: a device past 31 (a struct literal), and a
    // segment other than 0 (the format stores bus and devfn only).
    let bad_device = Sbdf {
        device: 32,
        ..Sbdf::default()
    };
    let other_segment = Sbdf::new(1, 0, 3, 0).unwrap();
    for (s, what) in [
        (bad_device, "out of range"),
        (other_segment, "segment 0 only"),
    ] {
        a.config = Some(ConfigAnnotation {
            path: ConfigPath::Ecam,
            sbdf: s,
            reg: 0,
            device: None,
        });
        let e = w.write_access(&a).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
        let ev = BarEvent {
            kind: BarEventKind::Map,
            device: None,
            sbdf: s,
            bar: 0,
            space: Space::Mmio,
            base: 0,
            size: 0x1000,
        };
        let e = w.write(&Record::Bar(ev)).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
}

#[test]
fn empty_trace() {
    let bytes = write_all(&[], &[]);
    let mut r = TraceReader::new(&bytes[..]).unwrap();
    assert_eq!(r.next_record().unwrap(), None);
    assert_eq!(r.trailer().unwrap().records, 0);
}

#[test]
fn plain_zstd_tools_skip_the_header() {
    let bytes = write_all(&[Record::access(access(1, 2))], &["x"]);
    // The whole file is valid zstd (header = skippable frame): decoding yields the raw records.
    let raw = zstd::decode_all(&bytes[..]).unwrap();
    assert_eq!(raw[0], codec::TAG_DEFINE_STRING);
}

#[test]
fn refuses_unknown_version() {
    let mut bytes = write_all(&[Record::access(access(1, 2))], &[]);
    // version is at offset 8 (frame magic, frame length) + 8 (magic)
    bytes[16..20].copy_from_slice(&7u32.to_le_bytes());
    let e = TraceReader::new(&bytes[..]).unwrap_err();
    assert!(matches!(
        e,
        TraceError::UnsupportedVersion {
            found: 7,
            supported: 1
        }
    ));
    assert!(e.to_string().contains("version 7"), "{e}");
}

#[test]
fn refuses_non_traces() {
    let e = TraceReader::new(&b"memory_region_ops_read cpu 0 mr 0x1 addr 0x70"[..]).unwrap_err();
    assert!(e.to_string().contains("QEMU trace log"), "{e}");
    let z = zstd::encode_all(&b"hello"[..], 3).unwrap();
    let e = TraceReader::new(&z[..]).unwrap_err();
    assert!(e.to_string().contains("zstd stream without"), "{e}");
    let e = TraceReader::new(&b"abc"[..]).unwrap_err();
    assert!(matches!(e, TraceError::NotATrace(_)), "{e}");
    let mut bytes = write_all(&[], &[]);
    bytes[20] = 1; // header flags
    let e = TraceReader::new(&bytes[..]).unwrap_err();
    assert!(e.to_string().contains("flags"), "{e}");
}

/// A file with a valid header and `raw` as the (compressed) record stream.
fn with_raw_stream(raw: &[u8]) -> Vec<u8> {
    let mut out = encode_header(&meta()).unwrap();
    out.extend(zstd::encode_all(raw, 3).unwrap());
    out
}

#[test]
fn corrupt_record_names_its_index() {
    let recs: Vec<Record> = (0..5).map(|i| Record::access(access(i, i))).collect();
    let bytes = write_all(&recs, &[]);
    let mut raw = zstd::decode_all(&bytes[..]).unwrap();
    // Each of these accesses encodes as 4 bytes (tag, ext "no region", addr, data): break the
    // third record's tag.
    assert_eq!(raw.len(), 5 * 4 + 9);
    raw[8] = 0x7f;
    let e = read_all(&with_raw_stream(&raw)).unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::Corrupt {
                record: 2,
                offset: 8,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("unknown record tag 0x7f"), "{e}");

    // An undefined string id.
    let mut raw = vec![0x80 | 0x40, 0x00, 1, 2, 5]; // ext byte 0 -> region id follows
    raw.extend([codec::TAG_END, 1, 1, 0, 0]);
    let e = read_all(&with_raw_stream(&raw)).unwrap_err();
    assert!(e.to_string().contains("undefined string id"), "{e}");

    // End record counts disagree.
    let raw = [0xc0, 0x04, 1, 2, codec::TAG_END, 2, 1, 0, 0];
    let e = read_all(&with_raw_stream(&raw)).unwrap_err();
    assert!(e.to_string().contains("end record counts"), "{e}");

    // Data after the end record.
    let raw = [codec::TAG_END, 0, 0, 0, 0, 0x80];
    let e = read_all(&with_raw_stream(&raw)).unwrap_err();
    assert!(e.to_string().contains("after the end record"), "{e}");
}

#[test]
fn missing_end_is_truncation() {
    let recs: Vec<Record> = (0..5).map(|i| Record::access(access(i, i))).collect();
    let bytes = write_all(&recs, &[]);
    let raw = zstd::decode_all(&bytes[..]).unwrap();
    let cut = &raw[..raw.len() - 5];
    let e = read_all(&with_raw_stream(cut)).unwrap_err();
    assert!(matches!(e, TraceError::Truncated { record: 5, .. }), "{e}");
    // Record cut in the middle.
    let e = read_all(&with_raw_stream(&raw[..7])).unwrap_err();
    assert!(matches!(e, TraceError::Truncated { record: 1, .. }), "{e}");
}

#[test]
fn truncated_files_never_panic() {
    let mut recs: Vec<Record> = Vec::new();
    for i in 0..3000u64 {
        recs.push(Record::access(access(i * 7, i.wrapping_mul(0x9e37_79b9))));
    }
    let bytes = write_all(&recs, &["a", "bb"]);
    for cut in (0..bytes.len()).step_by(bytes.len() / 200 + 1) {
        let r = read_all(&bytes[..cut]);
        assert!(r.is_err(), "cut at {cut} of {} read fine", bytes.len());
    }
    assert!(read_all(&bytes[..bytes.len() - 1]).is_err());
    // Flipped bytes in the compressed stream: an error (zstd checksum), never a panic.
    let start = encode_header(&meta()).unwrap().len();
    for i in (start..bytes.len()).step_by(97) {
        let mut b = bytes.clone();
        b[i] ^= 0x55;
        assert!(read_all(&b).is_err(), "flip at {i}");
    }
}

#[test]
fn error_ends_iteration() {
    let raw = [0x7f, 0x7f];
    let bytes = with_raw_stream(&raw);
    let mut r = TraceReader::new(&bytes[..]).unwrap();
    assert!(r.next().unwrap().is_err());
    assert!(r.next().is_none());
}

fn arb_space() -> impl Strategy<Value = Space> {
    prop_oneof![Just(Space::Port), Just(Space::Mmio)]
}

fn arb_dir() -> impl Strategy<Value = Dir> {
    prop_oneof![Just(Dir::Read), Just(Dir::Write)]
}

/// Any function a trace can hold: segment 0 (the format stores bus and devfn).
fn arb_sbdf() -> impl Strategy<Value = Sbdf> {
    (any::<u8>(), any::<u8>()).prop_map(|(bus, devfn)| Sbdf::from_devfn(0, bus, devfn))
}

fn arb_id(n: u32) -> impl Strategy<Value = Option<StrId>> {
    proptest::option::of((0..n).prop_map(StrId))
}

fn arb_access(n: u32) -> impl Strategy<Value = Access> {
    let config = proptest::option::of(
        (
            prop_oneof![Just(ConfigPath::Cf8), Just(ConfigPath::Ecam)],
            arb_sbdf(),
            any::<u16>(),
            arb_id(n),
        )
            .prop_map(|(path, sbdf, reg, device)| ConfigAnnotation {
                path,
                sbdf,
                reg,
                device,
            }),
    );
    (
        prop_oneof![Just(0u16), any::<u16>()],
        arb_space(),
        arb_dir(),
        prop_oneof![0u64..4, any::<u64>()],
        prop_oneof![Just(1u8), Just(2), Just(4), Just(8)],
        prop_oneof![Just(1u32), 1..=u32::MAX],
        prop_oneof![0u64..2, any::<u64>()],
        arb_id(n),
        config,
    )
        .prop_map(
            |(vcpu, space, dir, addr, size, rep, data, region, config)| Access {
                vcpu,
                space,
                dir,
                addr,
                size,
                rep,
                data,
                region,
                config,
            },
        )
}

fn arb_bar(n: u32) -> impl Strategy<Value = BarEvent> {
    (
        prop_oneof![Just(BarEventKind::Map), Just(BarEventKind::Unmap)],
        arb_id(n),
        arb_sbdf(),
        0u8..7,
        arb_space(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(kind, device, sbdf, bar, space, base, size)| BarEvent {
            kind,
            device,
            sbdf,
            bar,
            space,
            base,
            size,
        })
}

/// Record sequences with many adjacent duplicates (so folding is exercised).
fn arb_records() -> impl Strategy<Value = (Vec<String>, Vec<Record>)> {
    proptest::collection::vec("[a-z0-9.' -]{0,12}", 1..6).prop_flat_map(|names| {
        let n = names.len() as u32;
        let rec = prop_oneof![
            8 => (arb_access(n), 1u64..4).prop_map(|(access, repeat)| Record::Access { access, repeat }),
            1 => arb_bar(n).prop_map(Record::Bar),
        ];
        let runs = proptest::collection::vec((rec, 1usize..4), 0..60).prop_map(|runs| {
            runs.into_iter()
                .flat_map(|(r, k)| std::iter::repeat_n(r, k))
                .collect::<Vec<_>>()
        });
        (Just(names), runs)
    })
}

proptest! {
    /// A function is stored as its bus byte and devfn byte, segment 0, as when the trace had
    /// its own `Bdf` type: the bytes are those two, and they decode to the same `Sbdf`.
    #[test]
    fn prop_function_on_disk_is_bus_and_devfn(
        bus in any::<u8>(),
        devfn in any::<u8>(),
        reg in any::<u16>(),
        ecam in any::<bool>(),
    ) {
        let sbdf = Sbdf::from_devfn(0, bus, devfn);
        let path = if ecam { ConfigPath::Ecam } else { ConfigPath::Cf8 };
        let a = Access {
            config: Some(ConfigAnnotation { path, sbdf, reg, device: None }),
            ..access(0xcfc, 0)
        };
        let mut buf = Vec::new();
        codec::encode_access(&mut buf, &a, 1);
        // tag, ext (no region), addr 0xcfc (2-byte varint), data 0 (1 byte), then the config
        // annotation: flags, bus, devfn.
        prop_assert_eq!(&buf[5..8], &[u8::from(ecam), bus, devfn][..]);
        let mut c = codec::Cursor::new(&buf[1..]);
        prop_assert_eq!(codec::decode_access(&mut c, buf[0], 0), Ok((a, 1)));

        let ev = BarEvent {
            kind: BarEventKind::Map,
            device: None,
            sbdf,
            bar: 2,
            space: Space::Mmio,
            base: 0,
            size: 0,
        };
        let mut buf = Vec::new();
        codec::encode_bar(&mut buf, &ev);
        // tag, flags, bus, devfn, bar.
        prop_assert_eq!(&buf[2..5], &[bus, devfn, 2][..]);
        let mut c = codec::Cursor::new(&buf[1..]);
        prop_assert_eq!(codec::decode_bar(&mut c, 0), Ok(ev));
    }

    #[test]
    fn prop_round_trip((names, records) in arb_records()) {
        let mut w = TraceWriter::new(Vec::new(), &meta()).unwrap();
        let mut uniq: Vec<&str> = Vec::new();
        for s in &names {
            w.intern(s).unwrap();
            if !uniq.contains(&s.as_str()) {
                uniq.push(s);
            }
        }
        // Duplicate names intern to the first id, so only ids < unique count are valid.
        let n = uniq.len() as u32;
        let remap = |id: Option<StrId>| id.map(|StrId(i)| StrId(i % n));
        let records: Vec<Record> = records.into_iter().map(|r| match r {
            Record::Access { mut access, repeat } => {
                access.region = remap(access.region);
                if let Some(c) = &mut access.config {
                    c.device = remap(c.device);
                }
                Record::Access { access, repeat }
            }
            Record::Bar(mut e) => {
                e.device = remap(e.device);
                Record::Bar(e)
            }
        }).collect();
        for r in &records {
            w.write(r).unwrap();
        }
        let (bytes, summary) = w.finish().unwrap();
        let mut reader = TraceReader::new(&bytes[..]).unwrap();
        let mut got = Vec::new();
        while let Some(r) = reader.next_record().unwrap() {
            if let Record::Access { access: Access { region: Some(id), .. }, .. } = &r {
                prop_assert_eq!(reader.string(*id), Some(uniq[id.0 as usize]));
            }
            got.push(r);
        }
        prop_assert_eq!(&got, &fold(&records));
        prop_assert_eq!(expand(&got), expand(&records));
        prop_assert_eq!(summary.records, got.len() as u64);
        let t = reader.trailer().unwrap();
        prop_assert_eq!(t.accesses, expand(&records).iter().filter(|r| matches!(r, Record::Access { .. })).count() as u64);
    }

    #[test]
    fn prop_garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = read_all(&with_raw_stream(&raw));
    }

    #[test]
    fn prop_bit_flips_never_panic(
        (names, records) in arb_records(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let strs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        // Flip bits in the decompressed stream, so the record decoder (not zstd's checksum)
        // sees the damage.
        let clean: Vec<Record> = records.iter().map(|r| match r {
            Record::Access { access, repeat } => Record::Access {
                access: Access { region: None, config: access.config.map(|c| ConfigAnnotation { device: None, ..c }), ..*access },
                repeat: *repeat,
            },
            Record::Bar(e) => Record::Bar(BarEvent { device: None, ..*e }),
        }).collect();
        let bytes = write_all(&clean, &strs);
        let mut raw = zstd::decode_all(&bytes[..]).unwrap();
        for (i, x) in flips {
            let k = i.index(raw.len());
            raw[k] ^= x;
        }
        let _ = read_all(&with_raw_stream(&raw));
    }
}
