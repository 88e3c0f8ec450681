//! Merkle inclusion proofs for single events of a bundle.

use orch_core::merkle::{self, InclusionProof};
use serde::{Deserialize, Serialize};

/// A proof that one history line is a leaf of a bundle's Merkle tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventProof {
    /// The event's sequence number.
    pub seq: u64,
    /// The event's line in `history.jsonl` (the leaf data).
    pub line: String,
    /// The RFC 6962 audit path.
    pub proof: InclusionProof,
}

/// Builds the proof for event `seq` of a bundle.
pub fn prove(bundle: &[u8], seq: u64) -> Result<EventProof, String> {
    let entries = crate::archive::read(bundle)?;
    let history = entries.files.get(orch_core::bundle::HISTORY).ok_or("the bundle has no history.jsonl")?;
    // The lines as the verifier takes them for the Merkle tree: the proof's leaf index is the
    // event's place among exactly those.
    let lines: Vec<&[u8]> = crate::history_lines(history).collect();
    let leaves: Vec<[u8; 32]> = lines.iter().map(|l| merkle::leaf_hash(l)).collect();
    for (i, line) in lines.iter().enumerate() {
        let ev = orch_core::Event::from_line(std::str::from_utf8(line).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        if ev.seq == seq {
            return Ok(EventProof {
                seq,
                line: String::from_utf8_lossy(line).into_owned(),
                proof: merkle::InclusionProof::build(&leaves, i),
            });
        }
    }
    Err(format!("event {seq} is not in this bundle"))
}

/// Checks that the proof's line is its leaf, the line is event `seq`, and the path leads to its root.
pub fn check(p: &EventProof) -> Result<(), String> {
    let ev = orch_core::Event::from_line(&p.line).map_err(|e| format!("the line is not an event: {e}"))?;
    if ev.seq != p.seq {
        return Err(format!("the line is event {}, not {}", ev.seq, p.seq));
    }
    if hex::encode(merkle::leaf_hash(p.line.as_bytes())) != p.proof.leaf_hash {
        return Err("the leaf hash is not the hash of the line".into());
    }
    if !p.proof.verify() {
        return Err("the audit path does not lead to the root".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::{EventDraft, EventKind, Timestamp};

    /// A `tar.zst` holding only `history.jsonl` with this content: all `prove` reads.
    fn bundle_with_history(history: &[u8]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(history.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, orch_core::bundle::HISTORY, history).unwrap();
        zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap()
    }

    fn lines() -> Vec<String> {
        let mut prev = orch_core::hash::GENESIS_HASH.to_string();
        (1..=3)
            .map(|seq| {
                let draft = EventDraft {
                    at: Timestamp::from_millis(seq),
                    tenant: "acme".into(),
                    project: "p".into(),
                    job_id: None,
                    actor: "orchd".into(),
                    correlation_id: "c".into(),
                    kind: EventKind::Audit { action: "test".into(), details: serde_json::json!(seq) },
                };
                let (ev, line) = draft.seal_with_line(seq as u64, &prev);
                prev = ev.hash;
                line
            })
            .collect()
    }

    /// A proof's leaf is the event's place among the lines the verifier builds its Merkle tree
    /// from; a blank line is one of them, so it is not skipped but refused.
    #[test]
    fn proofs_index_the_lines_the_verifier_hashes() {
        let lines = lines();
        let history = format!("{}\n", lines.join("\n"));
        let p = prove(&bundle_with_history(history.as_bytes()), 2).unwrap();
        let leaves: Vec<[u8; 32]> = lines.iter().map(|l| merkle::leaf_hash(l.as_bytes())).collect();
        assert_eq!(p.proof, InclusionProof::build(&leaves, 1));
        assert_eq!(p.proof.root, hex::encode(merkle::root(&leaves)));
        assert_eq!(check(&p), Ok(()));

        let blank = format!("{}\n\n{}\n{}\n", lines[0], lines[1], lines[2]);
        assert!(prove(&bundle_with_history(blank.as_bytes()), 2).is_err());
    }
}
