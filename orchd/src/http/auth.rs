//! Who is calling and what they may do: bearer tokens made by `orchd token create` (stored as
//! SHA-256 hashes) or JWTs of an external Authority checked against a local JWKS file. Each
//! caller is bound to one tenant, or to `*` (site administrators), and holds scopes.

use std::collections::{BTreeSet, HashMap};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use orch_store::{Scope, TokenRecord};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::AppState;

/// Read jobs, runs, sources, quotas, history.
pub const READ: &str = "orch:read";
/// Enqueue, claim, heartbeat, ack, fail (workers and producers).
pub const WORK: &str = "orch:work";
/// Pause, resume, retry, cancel.
pub const OPERATE: &str = "orch:operate";
/// Change quotas (with reason and ticket).
pub const QUOTA: &str = "orch:quota";
/// Start backfills (with reason and ticket).
pub const BACKFILL: &str = "orch:backfill";
/// Everything, including sources; implies every other scope.
pub const ADMIN: &str = "orch:admin";
/// Every scope a token may hold.
pub const ALL_SCOPES: [&str; 6] = [READ, WORK, OPERATE, QUOTA, BACKFILL, ADMIN];

/// The header a site administrator sends to act within one tenant.
pub const TENANT_HEADER: &str = "orch-tenant";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Recorded as the actor of what they do: `token:<id>` or `jwt:<sub>`.
    pub actor: String,
    /// The tenant they are bound to; `None` for site administrators (`*`).
    pub tenant: Option<String>,
    /// Their scopes.
    pub scopes: BTreeSet<String>,
    /// For site administrators: the tenant named by the `Orch-Tenant` header.
    pub acting_for: Option<String>,
}

impl Principal {
    /// 403 unless the caller holds one of `any_of` (or `orch:admin`).
    pub fn require(&self, any_of: &[&str]) -> Result<(), ApiError> {
        if self.scopes.contains(ADMIN) || any_of.iter().any(|s| self.scopes.contains(*s)) {
            return Ok(());
        }
        Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("this needs the scope {}", any_of.join(" or ")))
            .with_details(json!({ "required_scopes": any_of })))
    }

    /// What the caller may see: their tenant, or for site administrators the tenant they act
    /// for, or everything.
    pub fn scope(&self) -> Scope {
        match (&self.tenant, &self.acting_for) {
            (Some(t), _) | (None, Some(t)) => Scope::Tenant(t.clone()),
            (None, None) => Scope::All,
        }
    }

    /// The tenant a write goes to; site administrators must name one with `Orch-Tenant`.
    pub fn write_tenant(&self) -> Result<String, ApiError> {
        match self.scope() {
            Scope::Tenant(t) => Ok(t),
            Scope::All => Err(ApiError::invalid("site tokens must name the tenant in the Orch-Tenant header")
                .with_details(json!({ "header": "Orch-Tenant" }))),
        }
    }

    /// The key under which this caller's idempotency keys live.
    pub fn idempotency_tenant(&self) -> String {
        self.tenant.clone().or_else(|| self.acting_for.clone()).unwrap_or_else(|| "*".into())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Principal>().cloned().ok_or_else(|| unauthenticated("no credentials"))
    }
}

fn unauthenticated(why: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", format!("authentication failed: {why}"))
}

/// A new token secret: `orch_<id>_<secret>`. Returns `(id, token)`.
pub fn mint_token() -> (String, String) {
    let id = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let secret = format!("{:032x}", rand::random::<u128>());
    let token = format!("orch_{id}_{secret}");
    (id, token)
}

/// The stored form of a token: hex SHA-256.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Tokens read from the ledger, kept while the store's [`orch_store::Store::token_stamp`]
/// stays the same, so that a request whose token was seen before needs no read. The stamp
/// moves whenever any process may have changed a token, so a revocation (by `orchd token
/// revoke`, in another process) takes effect on the next request. At most [`TokenCache::MAX`]
/// tokens; only tokens the ledger knows are kept.
#[derive(Debug, Default)]
pub struct TokenCache {
    inner: std::sync::Mutex<(u64, HashMap<String, TokenRecord>)>,
}

impl TokenCache {
    /// Past this many tokens the cache starts over.
    pub const MAX: usize = 4096;

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<String, TokenRecord>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token with this hash, if it was read under `stamp`.
    fn get(&self, stamp: u64, hash: &str) -> Option<TokenRecord> {
        let mut g = self.lock();
        if g.0 != stamp {
            if stamp > g.0 {
                *g = (stamp, HashMap::new());
            }
            return None;
        }
        g.1.get(hash).cloned()
    }

    /// Keeps a token read after `stamp` was taken.
    fn put(&self, stamp: u64, hash: String, record: TokenRecord) {
        let mut g = self.lock();
        if g.0 != stamp {
            // Stamps only grow; an older one's reads may be stale.
            if g.0 > stamp {
                return;
            }
            *g = (stamp, HashMap::new());
        }
        if g.1.len() >= Self::MAX {
            g.1.clear();
        }
        g.1.insert(hash, record);
    }
}

/// The token with this hash: from the cache if the stamp allows, otherwise from the ledger.
async fn token_record(state: &AppState, hash: String) -> Result<Option<TokenRecord>, ApiError> {
    let stamp = state.store.token_stamp();
    if let Some(r) = stamp.and_then(|s| state.tokens.get(s, &hash)) {
        return Ok(Some(r));
    }
    let key = hash.clone();
    let record = state.blocking(move |s| s.token_by_hash(&key)).await?;
    if let (Some(stamp), Some(r)) = (stamp, &record) {
        state.tokens.put(stamp, hash, r.clone());
    }
    Ok(record)
}

/// Middleware: authenticates the bearer credential and stores the [`Principal`] in the request.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let principal = principal_of(&state, req.headers()).await;
    match principal {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => {
            let mut resp = e.into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

async fn principal_of(state: &AppState, headers: &axum::http::HeaderMap) -> Result<Principal, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| unauthenticated("no Authorization header"))?;
    let value = value.to_str().map_err(|_| unauthenticated("unreadable Authorization header"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthenticated("expected Authorization: Bearer <token>"))?;
    let acting_for = headers
        .get(TENANT_HEADER)
        .map(|v| v.to_str().map(str::to_string).map_err(|_| ApiError::invalid("unreadable Orch-Tenant header")))
        .transpose()?;
    let (actor, tenant, scopes) = if token.starts_with("orch_") {
        let record = token_record(state, token_hash(token)).await?.ok_or_else(|| unauthenticated("unknown token"))?;
        if record.revoked_at.is_some() {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "token_revoked", "the token was revoked"));
        }
        if record.expires_at.is_some_and(|e| e <= state.clock.now()) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "token_expired", "the token has expired"));
        }
        (format!("token:{}", record.id), record.tenant, record.scopes)
    } else if let Some(jwt) = &state.jwt {
        let p = jwt
            .verify(token)
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.code(), format!("authentication failed: {e}")))?;
        (format!("jwt:{}", p.subject), p.tenant, p.scopes)
    } else {
        return Err(unauthenticated("unknown token"));
    };
    let tenant = if tenant == "*" { None } else { Some(tenant) };
    if let (Some(own), Some(asked)) = (&tenant, &acting_for) {
        if own != asked {
            return Err(ApiError::not_found("tenant not found"));
        }
    }
    Ok(Principal { actor, tenant, scopes: scopes.into_iter().collect(), acting_for })
}
