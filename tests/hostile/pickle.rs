//! The `torch.save` reader against pickles built to hurt: deep nesting, memo amplification,
//! storages shared by many keys, stride-0 views and overflowing sizes.

use std::io::Write;
use std::time::Instant;

use tch::Kind;
use tch_peft::{io, Error};

/// A `torch.save` archive holding `pkl` as `archive/data.pkl` and `storages` as
/// `archive/data/<i>`, stored (as torch writes it).
pub fn archive(pkl: &[u8], storages: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pkl).unwrap();
        z.start_file("archive/byteorder", opts).unwrap();
        z.write_all(b"little").unwrap();
        for (i, s) in storages.iter().enumerate() {
            z.start_file(format!("archive/data/{i}"), opts).unwrap();
            z.write_all(s).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// A pickled int (LONG1, 8 bytes).
fn int(v: i64) -> Vec<u8> {
    let mut b = vec![0x8a, 8];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

fn unicode(s: &str) -> Vec<u8> {
    let mut b = vec![b'X'];
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// One tensor of a pickled state dict: name, storage key, offset, size, stride.
pub type Entry<'a> = (&'a str, usize, i64, &'a [i64], &'a [i64]);

/// `{name: tensor}` for each entry, f32 storages.
pub fn state_dict(entries: &[Entry]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    for (name, key, offset, size, stride) in entries {
        p.extend(unicode(name));
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        p.extend(unicode("storage"));
        p.extend(b"ctorch\nFloatStorage\n");
        p.extend(unicode(&key.to_string()));
        p.extend(unicode("cpu"));
        p.extend(int(1));
        p.extend(b"tQ");
        p.extend(int(*offset));
        p.push(b'(');
        for s in size.iter() {
            p.extend(int(*s));
        }
        p.push(b't');
        p.push(b'(');
        for s in stride.iter() {
            p.extend(int(*s));
        }
        p.push(b't');
        p.push(0x89);
        p.extend(b"ccollections\nOrderedDict\n)R");
        p.extend(b"tR");
    }
    p.extend(b"u.");
    p
}

fn floats(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

fn corrupt_reason(e: Error) -> String {
    match e {
        Error::CorruptFile { reason, .. } => reason,
        other => panic!("expected CorruptFile, got {other:?}"),
    }
}

#[test]
fn a_well_formed_state_dict_reads() {
    let pkl = state_dict(&[("w", 0, 0, &[2, 3], &[3, 1]), ("t", 0, 1, &[2], &[3])]);
    let got = io::read_torch_dict_bytes(&archive(&pkl, &[floats(6)]), "ok.bin").unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(Vec::<f32>::try_from(got[0].1.flatten(0, -1)).unwrap(), [0., 1., 2., 3., 4., 5.]);
    assert_eq!(Vec::<f32>::try_from(&got[1].1).unwrap(), [1., 4.]);
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    // 2 M nested one-tuples: the recursive Value used to overflow the stack when cloned/dropped
    let mut pkl = vec![0x80, 2, b')'];
    pkl.extend(std::iter::repeat_n(0x85u8, 2_000_000));
    pkl.push(b'.');
    let e = io::read_torch_dict_bytes(&archive(&pkl, &[]), "deep.bin").unwrap_err();
    assert!(corrupt_reason(e).contains("nesting deeper than"));
}

#[test]
fn memo_amplification_finishes_fast() {
    // t = (); 60 times: t = (t, t) through BINPUT/BINGET: 2^60 nodes as a tree (each BINGET
    // used to deep-clone it), 61 objects here
    let mut pkl = vec![0x80, 2, b')', b'q', 0];
    for _ in 0..60 {
        pkl.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
    }
    pkl.push(b'.');
    let started = Instant::now();
    let e = io::read_torch_dict_bytes(&archive(&pkl, &[]), "memo.bin").unwrap_err();
    assert!(corrupt_reason(e).contains("does not hold a dict"));
    assert!(started.elapsed().as_secs() < 5);
}

#[test]
fn keys_sharing_a_storage_share_it_in_memory() {
    // 300 keys on one 1 MiB storage used to be 300 contiguous copies
    let n = 1 << 18;
    let names: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let (size, stride) = ([n as i64], [1i64]);
    let entries: Vec<Entry> =
        names.iter().map(|k| (k.as_str(), 0, 0, &size[..], &stride[..])).collect();
    let got =
        io::read_torch_dict_bytes(&archive(&state_dict(&entries), &[floats(n)]), "s.bin").unwrap();
    assert_eq!(got.len(), 300);
    let ptr = got[0].1.data_ptr();
    assert!(got.iter().all(|(_, t)| t.data_ptr() == ptr && t.kind() == Kind::Float));
}

#[test]
fn views_must_lie_inside_their_storage() {
    let cases: [(&[i64], &[i64], i64); 6] = [
        (&[65536, 65536], &[0, 0], 0), // stride-0 expansion: 16 GiB when made contiguous
        (&[4], &[1], 3),               // runs past the end
        (&[i64::MAX, 2], &[1, 1], 0),  // size arithmetic overflows
        (&[2], &[i64::MAX], 0),        // stride arithmetic overflows
        (&[-1], &[1], 0),              // negative size
        (&[2], &[1], -1),              // negative offset
    ];
    for (size, stride, offset) in cases {
        let pkl = state_dict(&[("w", 0, offset, size, stride)]);
        let e = io::read_torch_dict_bytes(&archive(&pkl, &[floats(6)]), "v.bin").unwrap_err();
        assert!(corrupt_reason(e).contains("inside its storage"), "{size:?} {stride:?} {offset}");
    }
}

#[test]
fn code_is_never_run_and_missing_storages_are_errors() {
    let mut pkl = vec![0x80, 2];
    pkl.extend(b"cos\nsystem\n");
    pkl.extend(unicode("true"));
    pkl.extend([0x85, b'R', b'.']);
    let e = io::read_torch_dict_bytes(&archive(&pkl, &[]), "evil.bin").unwrap_err();
    assert!(corrupt_reason(e).contains("`os.system` is not allowed"));
    // a storage key that names no entry
    let pkl = state_dict(&[("w", 7, 0, &[1], &[1])]);
    assert!(io::read_torch_dict_bytes(&archive(&pkl, &[]), "m.bin").is_err());
}

#[test]
fn absurd_ranks_are_refused() {
    let (size, stride) = (vec![1i64; 65], vec![1i64; 65]);
    let pkl = state_dict(&[("w", 0, 0, &size, &stride)]);
    let e = io::read_torch_dict_bytes(&archive(&pkl, &[floats(6)]), "rank.bin").unwrap_err();
    assert!(corrupt_reason(e).contains("rank 65"));
}
