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
    let lines: Vec<&[u8]> = history.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
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
