//! The golden bundle with fuzzer-chosen byte edits (flips, sets, inserts, deletes, cuts, copies)
//! at one of three layers: the compressed file, the decompressed tar stream (header checksums
//! optionally fixed so that edits reach the checks behind them), or the content of one file of
//! the archive, repacked; the manifest is then optionally brought up to date and re-signed by the
//! trusted key or by an untrusted one. `orch_verify::verify` must refuse the result unless the
//! archive still holds the genuine export (the oracle of `tests/tests/bundle_fuzz.rs`,
//! `orch_fuzz::oracle::bundle::check_verdict`): byte for byte unless the trusted key re-signed it.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use orch_core::bundle::ALL_FILES;
use orch_fuzz::bundle::{check_verdict, compress, fix_tar_checksums, golden, opts, pack_tar, reseal};

#[derive(Arbitrary, Debug)]
enum Layer {
    Compressed,
    Tar {
        fix_checksums: bool,
    },
    /// One file of the archive (an index into `ALL_FILES`), then sealed.
    File(u8, Seal),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Seal {
    AsIs,
    /// Brought up to date and signed by key 3, which the root does not trust.
    Untrusted,
    /// Brought up to date and signed by key 2, the root's bundle key.
    Trusted,
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Flip(u32, u8),
    Set(u32, u8),
    Insert(u32, Vec<u8>),
    Delete(u32, u8),
    Truncate(u32),
    /// Copies `len` bytes from the first position to the second.
    Copy(u32, u32, u8),
}

#[derive(Arbitrary, Debug)]
struct Case {
    layer: Layer,
    edits: Vec<Edit>,
}

fn apply(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits.iter().take(16) {
        let n = bytes.len();
        let at = |p: u32, extra: usize| (p as usize) % (n + extra).max(1);
        match *e {
            Edit::Flip(p, mask) if n > 0 => bytes[at(p, 0)] ^= mask.max(1),
            Edit::Set(p, b) if n > 0 => bytes[at(p, 0)] = b,
            Edit::Insert(p, ref b) => {
                let i = at(p, 1);
                bytes.splice(i..i, b.iter().copied().take(64));
            }
            Edit::Delete(p, len) if n > 0 => {
                let i = at(p, 0);
                bytes.drain(i..(i + usize::from(len).max(1)).min(n));
            }
            Edit::Truncate(p) => bytes.truncate(at(p, 1)),
            Edit::Copy(from, to, len) if n > 0 => {
                let from = at(from, 0);
                let chunk: Vec<u8> = bytes[from..(from + usize::from(len).max(1)).min(n)].to_vec();
                let to = at(to, 1);
                bytes.splice(to..to, chunk);
            }
            _ => {}
        }
    }
}

fn build(case: &Case) -> Vec<u8> {
    let g = golden();
    match case.layer {
        Layer::Compressed => {
            let mut bytes = g.bytes.clone();
            apply(&mut bytes, &case.edits);
            bytes
        }
        Layer::Tar { fix_checksums } => {
            let mut tar = pack_tar(&g.entries);
            apply(&mut tar, &case.edits);
            if fix_checksums {
                fix_tar_checksums(&mut tar);
            }
            compress(&tar)
        }
        Layer::File(which, seal) => {
            let mut files = g.entries.clone();
            let name = ALL_FILES[usize::from(which) % ALL_FILES.len()];
            if let Some((_, content)) = files.iter_mut().find(|(n, _)| n == name) {
                apply(content, &case.edits);
            }
            match seal {
                Seal::AsIs => {}
                Seal::Untrusted => reseal(&mut files, 3),
                Seal::Trusted => reseal(&mut files, 2),
            }
            compress(&pack_tar(&files))
        }
    }
}

fuzz_target!(|case: Case| {
    let bytes = build(&case);
    let resigned = matches!(case.layer, Layer::File(_, Seal::Trusted));
    check_verdict(&bytes, &orch_verify::verify(&bytes, opts()), resigned);
});
