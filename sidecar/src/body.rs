//! Body types shared by every layer.
//!
//! One boxed body type for requests and responses keeps the tower stack free of generic body
//! parameters, so each layer reads as plain request → response code.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};

/// Errors of bodies and of the client, type-erased.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The body type flowing through every stack.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body into a [`ProxyBody`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// Bytes already read from a body, followed by the rest of it: what is sent when a body
    /// outgrew the replay buffer and the request goes out once, unbuffered.
    pub struct Prefixed {
        prefix: Option<Bytes>,
        #[pin]
        rest: ProxyBody,
    }
}

impl Prefixed {
    /// A body yielding `prefix` and then every frame of `rest`.
    pub fn new(prefix: Bytes, rest: ProxyBody) -> Self {
        Prefixed {
            prefix: Some(prefix),
            rest,
        }
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        hint.set_lower(hint.lower() + extra);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

pin_project_lite::pin_project! {
    /// A body that keeps `guard` alive until the body is dropped: the inbound bulkhead holds its
    /// permit until the application's response has been fully sent, not just its headers.
    pub struct Guarded<G> {
        #[pin]
        inner: ProxyBody,
        guard: G,
    }
}

impl<G: Send + 'static> Guarded<G> {
    /// Wraps `inner`, holding `guard` for the body's lifetime.
    pub fn wrap(inner: ProxyBody, guard: G) -> ProxyBody {
        Guarded { inner, guard }.boxed_unsync()
    }
}

impl<G> Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
