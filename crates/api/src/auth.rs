//! Who is calling: bearer tokens (JWT) checked against the configured key, turned into a
//! [`Principal`] with its permissions and namespace scope.
//!
//! The algorithm is pinned by the key: an HS256 secret accepts only HS256, a PEM public key
//! only its own family's algorithm, a JWKS key only the algorithm it declares, chosen by the
//! token's `kid`. `alg: none`, HS/RS confusion and unknown `kid`s are therefore refused.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tasker_domain::{NamespaceScope, Permissions};

/// The caller of one request or WebSocket connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub subject: Option<String>,
    pub permissions: Permissions,
    pub namespaces: NamespaceScope,
    /// When the token stops being valid (seconds since the epoch); `None` without auth.
    pub expires_at: Option<i64>,
    /// Which token this is, for per-token quotas; `None` without auth.
    pub key: Option<u64>,
}

impl Principal {
    /// Everything, everywhere: the principal of a server running without authentication.
    pub fn unrestricted() -> Principal {
        Principal {
            subject: None,
            permissions: Permissions::all(),
            namespaces: NamespaceScope::All,
            expires_at: None,
            key: None,
        }
    }
}

/// Why a token was refused; the message is safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send Authorization: Bearer <token>")]
    Missing,
    #[error("the bearer token is malformed")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's algorithm is not the one the server's key uses")]
    WrongAlgorithm,
    #[error("the token's key id (kid) is unknown")]
    UnknownKey,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token is invalid: {0}")]
    Invalid(String),
    /// RFC 7515 §4.1.11: a token whose `crit` header lists extensions the recipient does not
    /// understand must be refused. This server understands none.
    #[error("the token lists critical header extensions (crit) that this server does not support")]
    CriticalExtension,
}

/// A key configuration problem, found at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

/// Where the verification key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// HS256 with a shared secret (at least 32 bytes).
    Secret(Vec<u8>),
    /// RS256, ES256 or EdDSA with a public key in PEM.
    PublicKeyPem(Vec<u8>),
    /// Keys chosen by `kid`, from a JWKS document.
    Jwks(String),
}

/// Everything needed to check tokens.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub key: KeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_seconds: u64,
    /// Role name → permission patterns (`tasker.task:show`, `tasker.task:*`, `*`).
    pub roles: HashMap<String, Vec<String>>,
}

/// The shortest HS256 secret accepted.
pub const MIN_SECRET_BYTES: usize = 32;

enum Keys {
    One(Algorithm, DecodingKey),
    ById(HashMap<String, (Algorithm, DecodingKey)>),
}

/// Checks bearer tokens.
pub struct Authenticator {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_seconds: u64,
    roles: HashMap<String, Permissions>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Required; checked by the validation (a missing one is reported as such).
    exp: Option<i64>,
    #[serde(default)]
    permissions: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> Result<Authenticator, KeyError> {
        let keys = match &settings.key {
            KeySource::Secret(secret) => {
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(KeyError(format!(
                        "the JWT secret has {} bytes; use at least {MIN_SECRET_BYTES} random bytes",
                        secret.len()
                    )));
                }
                Keys::One(Algorithm::HS256, DecodingKey::from_secret(secret))
            }
            KeySource::PublicKeyPem(pem) => {
                let (algorithm, key) = DecodingKey::from_rsa_pem(pem)
                    .map(|key| (Algorithm::RS256, key))
                    .or_else(|_| DecodingKey::from_ec_pem(pem).map(|key| (Algorithm::ES256, key)))
                    .or_else(|_| DecodingKey::from_ed_pem(pem).map(|key| (Algorithm::EdDSA, key)))
                    .map_err(|_| {
                        KeyError(
                            "the public key is not an RSA, EC (P-256) or Ed25519 key in PEM"
                                .to_owned(),
                        )
                    })?;
                Keys::One(algorithm, key)
            }
            KeySource::Jwks(document) => Keys::ById(jwks_keys(document)?),
        };
        let mut roles = HashMap::new();
        for (role, patterns) in &settings.roles {
            let (permissions, unknown) =
                Permissions::from_patterns(patterns.iter().map(String::as_str));
            if !unknown.is_empty() {
                return Err(KeyError(format!(
                    "role {role:?} names unknown permissions: {}",
                    unknown.join(", ")
                )));
            }
            roles.insert(role.clone(), permissions);
        }
        Ok(Authenticator {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway_seconds: settings.leeway_seconds,
            roles,
        })
    }

    /// The principal a token stands for, or why it is refused.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            // A readable header naming an algorithm this library does not even know (`none`)
            // is an algorithm problem, not a malformed token.
            if declared_algorithm(token).is_some() {
                AuthError::WrongAlgorithm
            } else {
                AuthError::Malformed
            }
        })?;
        if header.crit.is_some() {
            return Err(AuthError::CriticalExtension);
        }
        let (algorithm, key) = match &self.keys {
            Keys::One(algorithm, key) => (*algorithm, key),
            Keys::ById(keys) => {
                let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
                let (algorithm, key) = keys.get(kid).ok_or(AuthError::UnknownKey)?;
                (*algorithm, key)
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|err| {
                use jsonwebtoken::errors::ErrorKind as Kind;
                match err.kind() {
                    Kind::ExpiredSignature => AuthError::Expired,
                    Kind::ImmatureSignature => AuthError::NotYetValid,
                    Kind::InvalidSignature => AuthError::BadSignature,
                    Kind::InvalidAlgorithm | Kind::InvalidAlgorithmName => {
                        AuthError::WrongAlgorithm
                    }
                    Kind::InvalidIssuer => AuthError::WrongIssuer,
                    Kind::InvalidAudience => AuthError::WrongAudience,
                    Kind::MissingRequiredClaim(claim) => {
                        AuthError::Invalid(format!("the {claim} claim is missing"))
                    }
                    Kind::InvalidToken | Kind::Base64(_) | Kind::Json(_) | Kind::Utf8(_) => {
                        AuthError::Malformed
                    }
                    _ => AuthError::Invalid("it cannot be verified".to_owned()),
                }
            })?
            .claims;
        // Unknown permission names are ignored: a token may be shared with newer servers.
        let (mut permissions, _) =
            Permissions::from_patterns(claims.permissions.iter().map(String::as_str));
        for role in &claims.roles {
            if let Some(granted) = self.roles.get(role) {
                permissions.extend(granted);
            }
        }
        Ok(Principal {
            subject: claims.sub,
            permissions,
            namespaces: NamespaceScope::from_claim(claims.namespaces.iter().map(String::as_str)),
            expires_at: claims.exp,
            key: Some(token_key(token)),
        })
    }
}

/// A fingerprint of a token, for counting what it holds open (never leaves the process).
fn token_key(token: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut hasher = KEYS
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher();
    hasher.write(token.as_bytes());
    hasher.finish()
}

/// The `alg` a token's header names, read without trusting anything else in it.
fn declared_algorithm(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str().map(str::to_owned)
}

/// The keys of a JWKS document by `kid`, each pinned to its algorithm.
fn jwks_keys(document: &str) -> Result<HashMap<String, (Algorithm, DecodingKey)>, KeyError> {
    let set: JwkSet = serde_json::from_str(document)
        .map_err(|err| KeyError(format!("the JWKS document is not valid: {err}")))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| KeyError("every JWKS key needs a kid".to_owned()))?;
        let declared = jwk
            .common
            .key_algorithm
            .and_then(|alg| alg.to_string().parse::<Algorithm>().ok());
        let algorithm = match (&jwk.algorithm, declared) {
            (_, Some(algorithm)) => algorithm,
            (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            (AlgorithmParameters::OctetKeyPair(_), None) => Algorithm::EdDSA,
            _ => {
                return Err(KeyError(format!(
                    "JWKS key {kid:?}: give its alg (RS256, ES256 or EdDSA)"
                )));
            }
        };
        if matches!(
            algorithm,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(KeyError(format!(
                "JWKS key {kid:?}: shared secrets do not belong in a JWKS file; use --jwt-secret"
            )));
        }
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|err| KeyError(format!("JWKS key {kid:?} is not usable: {err}")))?;
        keys.insert(kid, (algorithm, key));
    }
    if keys.is_empty() {
        return Err(KeyError("the JWKS document has no keys".to_owned()));
    }
    Ok(keys)
}

/// The claims `tasker token` writes.
#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    iat: i64,
    exp: i64,
    permissions: &'a [String],
    namespaces: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// What `tasker token` mints.
pub struct TokenRequest<'a> {
    pub subject: &'a str,
    pub permissions: &'a [String],
    pub namespaces: &'a [String],
    pub issued_at: i64,
    pub ttl_seconds: i64,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
}

/// Mints an HS256 token with the shared secret.
pub fn mint_token(secret: &[u8], request: &TokenRequest<'_>) -> Result<String, KeyError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(KeyError(format!(
            "the JWT secret has {} bytes; use at least {MIN_SECRET_BYTES} random bytes",
            secret.len()
        )));
    }
    let (_, unknown) = Permissions::from_patterns(request.permissions.iter().map(String::as_str));
    if !unknown.is_empty() {
        return Err(KeyError(format!(
            "unknown permissions: {}",
            unknown.join(", ")
        )));
    }
    let claims = MintedClaims {
        sub: request.subject,
        iat: request.issued_at,
        exp: request.issued_at + request.ttl_seconds,
        permissions: request.permissions,
        namespaces: request.namespaces,
        iss: request.issuer,
        aud: request.audience,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|err| KeyError(format!("the token could not be signed: {err}")))
}

/// The token of an `Authorization: Bearer …` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// How the server authenticates its callers.
#[derive(Clone)]
pub enum AuthMode {
    /// No authentication: every caller may do everything (loopback, or explicitly insecure).
    Off,
    /// Bearer JWTs checked by this authenticator.
    Jwt(std::sync::Arc<Authenticator>),
}

impl AuthMode {
    /// The principal of a caller that presented `token` (or none).
    pub fn principal(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        match self {
            AuthMode::Off => Ok(Principal::unrestricted()),
            AuthMode::Jwt(authenticator) => {
                authenticator.authenticate(token.ok_or(AuthError::Missing)?)
            }
        }
    }
}

/// The bearer token of an `Authorization` header value: `Ok(None)` without a header, an
/// error for a header that is not a bearer token.
pub fn token_of_header(value: Option<&str>) -> Result<Option<&str>, AuthError> {
    match value {
        None => Ok(None),
        Some(value) => bearer(value).map(Some).ok_or(AuthError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    //! Keys and tokens from `fixtures/jwt`, made by an independent implementation (openssl
    //! keys, PyCA cryptography signatures; see `fixtures/jwt/generate.py`).
    use super::*;
    use tasker_domain::Permission;

    fn fixture(name: &str) -> String {
        let path = format!("{}/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{path}: {err}"))
            .trim()
            .to_owned()
    }

    fn with_key(key: KeySource) -> Authenticator {
        Authenticator::new(&AuthSettings {
            key,
            issuer: None,
            audience: None,
            leeway_seconds: 0,
            roles: HashMap::new(),
        })
        .unwrap()
    }

    fn pem(name: &str) -> Authenticator {
        with_key(KeySource::PublicKeyPem(fixture(name).into_bytes()))
    }

    #[test]
    fn tokens_signed_elsewhere_verify_with_pem_keys_of_each_family() {
        for (key, token) in [
            ("rsa.pub.pem", "rs256.jwt"),
            ("ec.pub.pem", "es256.jwt"),
            ("ed.pub.pem", "eddsa.jwt"),
        ] {
            let principal = pem(key)
                .authenticate(&fixture(token))
                .unwrap_or_else(|err| panic!("{token}: {err}"));
            assert_eq!(principal.subject.as_deref(), Some("fixture"));
            assert!(principal.permissions.contains(Permission::TaskIndex));
            assert!(principal.namespaces.allows("shop") && !principal.namespaces.allows("x"));
        }
    }

    #[test]
    fn a_key_accepts_only_its_own_algorithm() {
        let rsa = pem("rsa.pub.pem");
        assert_eq!(
            rsa.authenticate(&fixture("rs256-tampered.jwt")),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            rsa.authenticate(&fixture("hs-confusion.jwt")),
            Err(AuthError::WrongAlgorithm),
            "HS256 signed with the public key as the secret"
        );
        assert_eq!(
            rsa.authenticate(&fixture("es256.jwt")),
            Err(AuthError::WrongAlgorithm)
        );
        assert_eq!(
            pem("ec.pub.pem").authenticate(&fixture("rs256.jwt")),
            Err(AuthError::WrongAlgorithm)
        );
        let secret = with_key(KeySource::Secret(vec![7; MIN_SECRET_BYTES]));
        assert_eq!(
            secret.authenticate(&fixture("rs256.jwt")),
            Err(AuthError::WrongAlgorithm)
        );
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid() {
        let jwks = with_key(KeySource::Jwks(fixture("jwks.json")));
        for token in ["rs256.jwt", "es256.jwt", "eddsa.jwt"] {
            assert!(jwks.authenticate(&fixture(token)).is_ok(), "{token}");
        }
        assert_eq!(
            jwks.authenticate(&fixture("unknown-kid.jwt")),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(
            jwks.authenticate(&fixture("no-kid.jwt")),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(
            jwks.authenticate(&fixture("rs256-tampered.jwt")),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            jwks.authenticate(&fixture("hs-confusion.jwt")),
            Err(AuthError::WrongAlgorithm)
        );
    }

    #[test]
    fn bad_key_configurations_are_refused_at_start() {
        let short = Authenticator::new(&AuthSettings {
            key: KeySource::Secret(b"short".to_vec()),
            issuer: None,
            audience: None,
            leeway_seconds: 0,
            roles: HashMap::new(),
        });
        assert!(short.is_err());
        let unknown_role = Authenticator::new(&AuthSettings {
            key: KeySource::Secret(vec![1; 40]),
            issuer: None,
            audience: None,
            leeway_seconds: 0,
            roles: [("r".to_owned(), vec!["tasker.nothing:x".to_owned()])].into(),
        });
        assert!(unknown_role.err().unwrap().0.contains("tasker.nothing:x"));
        for bad in ["not a key", "{\"keys\": []}"] {
            assert!(
                Authenticator::new(&AuthSettings {
                    key: if bad.starts_with('{') {
                        KeySource::Jwks(bad.into())
                    } else {
                        KeySource::PublicKeyPem(bad.into())
                    },
                    issuer: None,
                    audience: None,
                    leeway_seconds: 0,
                    roles: HashMap::new(),
                })
                .is_err()
            );
        }
    }
}
