//! The bearer-credential path of the daemon's own router, in-process: arbitrary `Authorization`
//! values, and an issued API token and JWT that are mutated, cut, padded or put after other
//! schemes. Nothing answers 5xx; every refusal is a 401 with the error envelope and
//! `WWW-Authenticate: Bearer`; and a request passes only with an issued credential, exactly as
//! issued, after `Bearer` (or `bearer`) and white space. The site and that oracle are
//! `support/site.rs`, which the fuzz target `token` holds the router to as well.

use proptest::prelude::*;

// Shared with the fuzz targets `token` and `http_body`, which use all of it.
#[allow(dead_code)]
#[path = "support/site.rs"]
mod site;

use site::Site;

/// What may come before the credential.
const SCHEMES: [&str; 10] =
    ["Bearer ", "bearer ", "Bearer  ", "BEARER ", "Bearer", "Bearer\t", " Bearer ", "Basic ", "Token ", ""];

/// What may stick to a credential on its way: white space, base64 padding, separators.
const PADDING: &[u8] = b" \t=.~,;\"";

#[derive(Debug, Clone)]
enum Credential {
    /// One of the issued credentials, with these edits.
    Issued(usize, Vec<Edit>),
    Random(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Edit {
    Set(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Truncate(prop::sample::Index),
    Prepend(u8),
    Append(u8),
}

fn credential() -> impl Strategy<Value = Credential> {
    // Bytes a header value may hold: tab, printable ASCII and non-ASCII (not UTF-8 on its own).
    let byte = prop_oneof![
        6 => prop::sample::select(b"abcAZ09-_.=/+~ orch_".to_vec()),
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    let index = any::<prop::sample::Index>;
    let edit = prop_oneof![
        3 => (index(), byte.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => index().prop_map(Edit::Delete),
        1 => index().prop_map(Edit::Truncate),
        2 => prop::sample::select(PADDING.to_vec()).prop_map(Edit::Prepend),
        2 => prop::sample::select(PADDING.to_vec()).prop_map(Edit::Append),
    ];
    prop_oneof![
        2 => (0..2usize).prop_map(|i| Credential::Issued(i, Vec::new())),
        4 => (0..2usize, prop::collection::vec(edit, 1..4)).prop_map(|(i, edits)| Credential::Issued(i, edits)),
        1 => prop::collection::vec(byte, 0..40).prop_map(|mut b| {
            b.splice(0..0, b"orch_".iter().copied());
            Credential::Random(b)
        }),
        1 => prop::collection::vec(0x20u8..0x7f, 0..60).prop_map(Credential::Random),
    ]
}

fn resolve(site: &Site, c: &Credential) -> Vec<u8> {
    match c {
        Credential::Issued(i, edits) => {
            let mut t = site.issued[*i].clone().into_bytes();
            for e in edits {
                let n = t.len();
                match e {
                    Edit::Set(at, b) if n > 0 => t[at.index(n)] = *b,
                    Edit::Delete(at) if n > 0 => {
                        t.remove(at.index(n));
                    }
                    Edit::Truncate(at) if n > 0 => t.truncate(at.index(n)),
                    Edit::Prepend(b) => t.insert(0, *b),
                    Edit::Append(b) => t.push(*b),
                    _ => {}
                }
            }
            t
        }
        Credential::Random(b) => b.clone(),
    }
}

#[test]
fn only_issued_credentials_pass_and_every_refusal_is_a_401_envelope() {
    let site = Site::new();
    let get = |value: &[u8]| site.get_with_authorization(value).expect("a header value");
    for c in &site.issued {
        let reply = get(format!("Bearer {c}").as_bytes());
        assert_eq!(reply.status, 200, "{c}: {}", reply.json);
        for pad in PADDING.iter().map(|&b| b as char).filter(|p| !p.is_whitespace()) {
            for value in [format!("Bearer {pad}{c}"), format!("Bearer {c}{pad}")] {
                assert_eq!(get(value.as_bytes()).status, 401, "{value}");
            }
        }
    }
    let config = ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() };
    let tails = prop::sample::select(vec!["", " ", "\t"]);
    proptest!(config, |(scheme in prop::sample::select(&SCHEMES[..]), c in credential(), tail in tails)| {
        let mut value = scheme.as_bytes().to_vec();
        value.extend(resolve(&site, &c));
        value.extend(tail.as_bytes());
        let Some(reply) = site.get_with_authorization(&value) else {
            // Not a header value (a leading or trailing tab, say): no request can carry it.
            return Ok(());
        };
        let as_issued = matches!(&c, Credential::Issued(_, edits) if edits.is_empty());
        if as_issued && matches!(scheme, "Bearer " | "bearer ") {
            prop_assert_eq!(reply.status, 200, "{:?} refused: {}", String::from_utf8_lossy(&value), reply.json);
        }
        site.check_authorization(&value, &reply).map_err(TestCaseError::fail)?;
    });
}
