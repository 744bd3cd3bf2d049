//! Ports the sidecar reserves inside every pod. The application must not use them.

/// Inbound proxy port: Services target it; it forwards to the app on 127.0.0.1:`spec.port`.
pub const SIDECAR_INBOUND: u16 = 4143;
/// Outbound proxy port the app sends requests through (explicit HTTP proxy).
pub const SIDECAR_OUTBOUND: u16 = 4140;
/// Admin port: `/live`, `/ready`, `/metrics`.
pub const SIDECAR_ADMIN: u16 = 4191;

/// All reserved ports with a name for error messages.
pub const RESERVED: [(u16, &str); 3] = [
    (SIDECAR_INBOUND, "sidecar inbound"),
    (SIDECAR_OUTBOUND, "sidecar outbound"),
    (SIDECAR_ADMIN, "sidecar admin"),
];
