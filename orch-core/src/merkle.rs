//! RFC 6962 (RFC 9162 §2.1) Merkle trees over byte strings: roots, a streaming builder with
//! O(log n) memory, and inclusion proofs.
//!
//! leaf = SHA-256(0x00 ‖ data), node = SHA-256(0x01 ‖ left ‖ right); a tree of n > 1 leaves splits
//! at the largest power of two smaller than n; the empty tree's root is SHA-256("").

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A 32-byte hash.
pub type Hash = [u8; 32];

/// The hash of a leaf holding `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

fn split(n: usize) -> usize {
    // Largest power of two strictly smaller than n (n > 1).
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The root over leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest(b"").into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// Builds a root from leaves pushed one at a time, keeping one hash per set bit of the count.
#[derive(Debug, Clone, Default)]
pub struct MerkleBuilder {
    // Roots of perfect subtrees, largest (leftmost) first, with their sizes.
    stack: Vec<(u64, Hash)>,
    count: u64,
}

impl MerkleBuilder {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a leaf holding `data`.
    pub fn push_leaf(&mut self, data: &[u8]) {
        self.push_leaf_hash(leaf_hash(data));
    }

    /// Adds a leaf by its hash.
    pub fn push_leaf_hash(&mut self, h: Hash) {
        let mut size = 1u64;
        let mut h = h;
        while let Some(&(s, left)) = self.stack.last() {
            if s != size {
                break;
            }
            self.stack.pop();
            h = node_hash(&left, &h);
            size *= 2;
        }
        self.stack.push((size, h));
        self.count += 1;
    }

    /// Leaves so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether no leaf was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The root of the leaves so far.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        match it.next() {
            None => Sha256::digest(b"").into(),
            Some(&(_, last)) => it.fold(last, |acc, (_, left)| node_hash(left, &acc)),
        }
    }
}

/// The audit path of leaf `index` (RFC 6962 §2.1.1), bottom-up.
pub fn inclusion_path(leaves: &[Hash], index: usize) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 || index >= n {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut p = inclusion_path(&leaves[..k], index);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_path(&leaves[k..], index - k);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Verifies an audit path (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &r == root
}

/// An inclusion proof in portable form (hex hashes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    /// The leaf's position, from 0.
    pub leaf_index: u64,
    /// Leaves in the tree.
    pub tree_size: u64,
    /// The leaf's hash.
    pub leaf_hash: String,
    /// The audit path, bottom-up.
    pub path: Vec<String>,
    /// The tree's root.
    pub root: String,
}

impl InclusionProof {
    /// The proof for leaf `index` of `leaves`.
    pub fn build(leaves: &[Hash], index: usize) -> InclusionProof {
        InclusionProof {
            leaf_index: index as u64,
            tree_size: leaves.len() as u64,
            leaf_hash: hex::encode(leaves[index]),
            path: inclusion_path(leaves, index).iter().map(hex::encode).collect(),
            root: hex::encode(root(leaves)),
        }
    }

    /// Whether the path leads from the leaf to the root.
    pub fn verify(&self) -> bool {
        let dec = |s: &str| -> Option<Hash> { hex::decode(s).ok()?.try_into().ok() };
        let (Some(leaf), Some(root)) = (dec(&self.leaf_hash), dec(&self.root)) else { return false };
        let Some(path) = self.path.iter().map(|p| dec(p)).collect::<Option<Vec<_>>>() else { return false };
        verify_inclusion(&leaf, self.leaf_index, self.tree_size, &path, &root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The RFC 6962 test leaves used by Certificate Transparency implementations.
    fn rfc_leaves() -> Vec<Vec<u8>> {
        ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
            .iter()
            .map(|h| hex::decode(h).unwrap())
            .collect()
    }

    #[test]
    fn rfc6962_roots() {
        let want = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let leaves: Vec<Hash> = rfc_leaves().iter().map(|d| leaf_hash(d)).collect();
        for (n, w) in want.iter().enumerate() {
            assert_eq!(hex::encode(root(&leaves[..=n])), *w, "size {}", n + 1);
        }
        assert_eq!(hex::encode(root(&[])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn rfc6962_inclusion_paths() {
        // Leaf 0 of 8, leaf 5 of 8 and leaf 2 of 3, from the CT test vectors.
        let leaves: Vec<Hash> = rfc_leaves().iter().map(|d| leaf_hash(d)).collect();
        let p: Vec<String> = inclusion_path(&leaves, 0).iter().map(hex::encode).collect();
        assert_eq!(
            p,
            [
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ]
        );
        let p: Vec<String> = inclusion_path(&leaves[..3], 2).iter().map(hex::encode).collect();
        assert_eq!(p, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]);
    }

    proptest! {
        #[test]
        fn builder_matches_recursive_root_and_proofs_verify(n in 1usize..70, pick in any::<prop::sample::Index>()) {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&(i as u64).to_be_bytes())).collect();
            let mut b = MerkleBuilder::new();
            for l in &leaves { b.push_leaf_hash(*l); }
            let r = root(&leaves);
            prop_assert_eq!(b.root(), r);
            let i = pick.index(n);
            let proof = InclusionProof::build(&leaves, i);
            prop_assert!(proof.verify());
            let path = inclusion_path(&leaves, i);
            if n > 1 {
                prop_assert!(!verify_inclusion(&leaves[i], ((i + 1) % n) as u64, n as u64, &path, &r));
            }
            prop_assert!(!verify_inclusion(&leaf_hash(b"other"), i as u64, n as u64, &path, &r));
        }
    }
}
