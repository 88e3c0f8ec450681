//! The OpenAPI 3.1 document, generated from the handlers (`utoipa` annotations, collected by the
//! router itself) and, for ledger types, from the same `schemars` schemas as `schemas/*.json`.
//! `GET /.well-known/openapi` points to `/openapi/orchestrator.json`; `schemas/openapi/` holds a
//! committed copy that a test keeps current.

use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::Modify;

/// The document's fixed parts; paths come from the router.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "orchd control plane",
        version = "1",
        description = "Jobs, leases, runs, sources, quotas and history of an orch daemon.\n\n\
            **Authentication:** `Authorization: Bearer <token>` with a token from `orchd token create` or a JWT of \
            the configured Authority. Tokens are bound to one tenant (or `*`: site administrators, who name the \
            tenant they act for in the `Orch-Tenant` header) and carry scopes.\n\n\
            **Errors:** every 4xx and 5xx answer is an `ErrorEnvelope` with a stable `code`.\n\n\
            **Pagination:** lists take `limit` and `cursor`; the body's `next_cursor` and the `Link: <…>; rel=\"next\"` \
            header give the next page.\n\n\
            **Idempotency:** POST and PUT accept `Idempotency-Key`; repeating a request with the same key and body \
            replays the first response (with `Idempotent-Replayed: true`), a different body is `422 idempotency_key_reused`.\n\n\
            **Versions:** every answer carries `Orch-Api-Version`.",
        license(name = "Apache-2.0"),
    ),
    modifiers(&Security),
    components(schemas(super::error::ErrorEnvelope, super::error::ErrorBody)),
    tags(
        (name = "worker", description = "The Task Runner bridge: enqueue, claim, heartbeat, ack, fail"),
        (name = "jobs", description = "Operator view and control of jobs"),
        (name = "history", description = "The hash-chained history"),
        (name = "runs", description = "Groups of jobs made by one operation"),
        (name = "sources", description = "Upstream feeds"),
        (name = "quotas", description = "Per-tenant limits (audited)"),
        (name = "backfills", description = "Event-time backfills (audited)"),
        (name = "flow", description = "Flow control: rate limits, throttles, concurrency, pauses, blackouts, schedules, breakers"),
        (name = "events", description = "Live event streams and failure clusters"),
        (name = "webhooks", description = "Signed webhooks: subscriptions, delivery log, redelivery"),
        (name = "imports", description = "Offline Kit: bundles from other sites"),
        (name = "legacy", description = "Deprecated aliases"),
        (name = "health", description = "Probes and discovery"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An orchd token (`orch_…`) or a JWT; scopes are listed per operation"))
                    .build(),
            ),
        );
    }
}

/// References to ledger types, whose schemas `schemars` makes (see [`document`]).
pub mod refs {
    use utoipa::openapi::schema::{Array, Ref};

    /// `#/components/schemas/Job`.
    pub fn job() -> Ref {
        Ref::from_schema_name("Job")
    }
    /// An array of jobs.
    pub fn jobs() -> Array {
        Array::new(job())
    }
    /// `#/components/schemas/Event`.
    pub fn event() -> Ref {
        Ref::from_schema_name("Event")
    }
    /// An array of events.
    pub fn events() -> Array {
        Array::new(event())
    }
}

/// The finished document: the router's paths plus the ledger schemas.
pub fn document(api: utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(&api).expect("the OpenAPI document encodes");
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut generator = settings.into_generator();
    generator.subschema_for::<orch_core::Job>();
    generator.subschema_for::<orch_core::Event>();
    let schemas = &mut doc["components"]["schemas"];
    for (name, schema) in generator.take_definitions(true) {
        schemas[name] = schema;
    }
    // The examples the issue asks for, where a reader looks first.
    doc["components"]["examples"] = json!({
        "NextPage": {
            "summary": "A page with a next page",
            "value": {"items": [], "next_cursor": "YWZ0ZXI6MTAw"},
            "description": "Also sent as `Link: </api/v1/jobs?limit=100&cursor=YWZ0ZXI6MTAw>; rel=\"next\"`."
        },
        "IdempotentReplay": {
            "summary": "Replayed response",
            "description": "A second `POST /api/v1/jobs` with `Idempotency-Key: k1` and the same body answers the first \
                response again, with `Idempotent-Replayed: true`; a different body answers 422 `idempotency_key_reused`.",
            "value": {"error": {"code": "idempotency_key_reused", "message": "this Idempotency-Key was used with a different request", "details": {"idempotency_key": "k1"}, "request_id": "req-5f1c0a9e2b7d4c31"}}
        },
        "Forbidden": {
            "summary": "Missing scope",
            "value": {"error": {"code": "forbidden", "message": "this needs the scope orch:quota", "details": {"required_scopes": ["orch:quota"]}, "request_id": "req-0b6f3e2a91c84d70"}}
        }
    });
    doc
}

#[cfg(test)]
mod tests {
    /// `schemas/openapi/orchestrator.json` is the document this build serves.
    /// `ORCH_UPDATE_SCHEMAS=1 cargo test -p orchd` rewrites it.
    #[test]
    fn committed_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/openapi/orchestrator.json");
        let mut want = serde_json::to_string_pretty(&crate::http::openapi_document()).unwrap();
        want.push('\n');
        if std::env::var_os("ORCH_UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(have == want, "{} is stale: run ORCH_UPDATE_SCHEMAS=1 cargo test -p orchd", path.display());
    }

    /// Every `$ref` resolves, every operation is secured or a probe, and the examples are there.
    #[test]
    fn document_is_complete() {
        let doc = crate::http::openapi_document();
        assert_eq!(doc["openapi"], "3.1.0");
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"").skip(1) {
            let name = r.split('"').next().unwrap().trim_start_matches("#/components/schemas/");
            assert!(doc["components"]["schemas"].get(name).is_some(), "dangling $ref {name}");
        }
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let public = ["/", "/healthz", "/readyz", "/.well-known/openapi"].contains(&path.as_str());
                assert!(public || op["security"].is_array(), "{method} {path} names no scope");
                assert!(op["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .any(|k| k.starts_with('2') || k == "302" || k == "101"));
            }
        }
        for example in ["NextPage", "IdempotentReplay", "Forbidden"] {
            assert!(doc["components"]["examples"].get(example).is_some(), "example {example} missing");
        }
    }
}
