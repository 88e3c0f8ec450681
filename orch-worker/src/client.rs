//! The HTTP side: a small blocking client for orchd's control plane that turns the error
//! envelope into [`Error::Api`].

use std::time::Duration;

use serde_json::Value;

/// What a call to orchd can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// orchd answered with an error envelope.
    #[error("orchd answered {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The envelope's stable code, e.g. `lease_lost`, `backpressure`.
        code: String,
        /// Its message.
        message: String,
        /// Its details.
        details: Value,
        /// `Retry-After`, when sent (backpressure, overload).
        retry_after: Option<Duration>,
    },
    /// The request did not get an answer.
    #[error("cannot reach orchd: {0}")]
    Transport(String),
    /// The answer was not what the API documents.
    #[error("unexpected answer from orchd: {0}")]
    Decode(String),
}

impl Error {
    /// Whether this is orchd saying the lease is no longer held (409).
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::Api { status: 409, .. })
    }

    /// How long to wait before trying again, if the failure is worth retrying: orchd's
    /// `Retry-After`, or `None` for a client error that will not change.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Api { retry_after: Some(d), .. } => Some(*d),
            Error::Api { status, .. } if *status == 429 || *status >= 500 => Some(Duration::from_secs(1)),
            Error::Api { .. } | Error::Decode(_) => None,
            Error::Transport(_) => Some(Duration::from_secs(1)),
        }
    }
}

/// A client bound to one daemon and one bearer token.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl Client {
    /// A client for `base_url` (e.g. `http://127.0.0.1:8080`) with a token of scope `orch:work`.
    pub fn new(base_url: &str, token: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            base: base_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// Enqueues a job (`{"queue", "payload", …}` as `POST /api/v1/jobs` takes it); returns the job.
    pub fn enqueue(&self, job: &Value) -> Result<Value, Error> {
        Ok(self.post("/api/v1/jobs", job)?["job"].take())
    }

    /// One job.
    pub fn job(&self, id: i64) -> Result<Value, Error> {
        Ok(self.call("GET", &format!("/api/v1/jobs/{id}"), None)?["job"].take())
    }

    /// POSTs JSON and returns the answer's JSON.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, Error> {
        self.call("POST", path, Some(body))
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Error> {
        let url = format!("{}{path}", self.base);
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let resp = self
            .agent
            .run(req.body(body).map_err(|e| Error::Transport(e.to_string()))?)
            .map_err(|e| Error::Transport(format!("{method} {url}: {e}")))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.into_body().read_to_vec().map_err(|e| Error::Transport(e.to_string()))?;
        let json: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| Error::Decode(format!("{method} {path}: {e}")))?
        };
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let e = &json["error"];
        Err(Error::Api {
            status,
            code: e["code"].as_str().unwrap_or("unknown").to_string(),
            message: e["message"].as_str().unwrap_or_default().to_string(),
            details: e["details"].clone(),
            retry_after,
        })
    }
}
