//! `GET /openapi.json`: the OpenAPI 3.1 description of every route. utoipa
//! builds it from the `#[utoipa::path]` annotation on each handler in
//! `http` and `read_api` and the schema types here, and utoipa-axum builds the router
//! from the same `routes!` list, so a route cannot be served without being
//! described. The error and acceptance bodies are `shared`'s own types.
//!
//! Every answer's schema is derived from the very type the handler
//! serialises (`read_api::EventsPage`, `read_api::StatsAnswer`,
//! `http::Ready`, …): there are no parallel schema types to keep equal.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

pub use outpost_shared::error::{AcceptedResponse, ErrorEnvelope, FieldError};

/// The document's fixed part; `http::router` adds the paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Outpost aggregator",
        description = "Verified frames from the edges in; stored events out. \
                       Every error is the shared envelope with a stable code (README, \"Errors\")."
    ),
    components(schemas(ErrorEnvelope, FieldError, AcceptedResponse)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "ingest", description = "From the edges: frames and client records"),
        (name = "query", description = "Reading stored events"),
        (name = "operations", description = "Health, metrics and this document")
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`opk_…`) or a JWT of a client with the needed permission",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "edge_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Outpost-Signature",
                "HMAC-SHA256 with an edge key, with X-Outpost-Key (the edge key id) and \
                 X-Outpost-Timestamp, over the canonical request (README, \"HMAC request signatures\")",
            ))),
        );
    }
}

/// The document, once the router has added the paths.
pub static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
