#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    pub jwks_file: Option<std::path::PathBuf>,
    pub issuer: String,
    pub audience: String,
    pub tenant_claim: String,
    pub leeway_s: u64,
}
#[derive(Debug)]
pub struct JwtVerifier;
pub struct JwtPrincipal {
    pub subject: String,
    pub tenant: String,
    pub scopes: Vec<String>,
    pub expires_at: i64,
}
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct JwtError;
impl JwtError {
    pub fn code(&self) -> &'static str {
        "token_invalid"
    }
}
impl JwtVerifier {
    pub fn from_settings(_s: &JwtSettings) -> Result<Option<JwtVerifier>, JwtError> {
        Ok(None)
    }
    pub fn verify(&self, _t: &str) -> Result<JwtPrincipal, JwtError> {
        Err(JwtError)
    }
}
