//! `MlaError` -> JS `Error` with a string `code`.
//!
//! napi-rs v3 turns `napi::Error<S>` into a JS error whose `code` is `status.as_ref()`, so
//! the binding's functions return `Result<T, napi::Error<String>>` with the stable code
//! string (`ErrorCode::as_str()`) as the status. Async work (`napi::Task`) is limited to
//! `napi::Error<Status>`: there the JS error object is built on the JS thread (see
//! [`reject_with_code`]) and handed to the promise as a referenced value, so the
//! rejection carries the same `code`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use mla_core::{ErrorCode, MlaError};
use napi::bindgen_prelude::*;

/// The result type of every exported function: the error's status is the JS `code`.
pub type Result<T> = std::result::Result<T, napi::Error<String>>;

/// Code of a panic caught in native code (a bug, never an input error).
pub const ERR_INTERNAL: &str = "ERR_INTERNAL";

pub fn to_napi(e: MlaError) -> napi::Error<String> {
    napi::Error::new(e.code.as_str().to_string(), e.message)
}

pub fn err(code: ErrorCode, msg: impl Into<String>) -> napi::Error<String> {
    napi::Error::new(code.as_str().to_string(), msg.into())
}

pub fn disposed(what: &str) -> napi::Error<String> {
    err(ErrorCode::Disposed, format!("{what} was disposed"))
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs a core call, mapping its error to the JS code and a panic to `ERR_INTERNAL`.
pub fn core<T>(f: impl FnOnce() -> mla_core::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(to_napi),
        Err(p) => Err(napi::Error::new(ERR_INTERNAL.to_string(), format!("panic in native code: {}", panic_message(p)))),
    }
}

/// A failure of async work, carried from the worker thread to the JS thread.
pub struct Failure {
    pub code: String,
    pub message: String,
}

impl From<napi::Error<String>> for Failure {
    fn from(e: napi::Error<String>) -> Self {
        Failure { code: e.status, message: e.reason }
    }
}

/// Like [`core`], for work running on the libuv thread pool.
pub fn core_async<T>(f: impl FnOnce() -> Result<T>) -> std::result::Result<T, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(Failure::from),
        Err(p) => Err(Failure { code: ERR_INTERNAL.to_string(), message: format!("panic in native code: {}", panic_message(p)) }),
    }
}

/// Builds the JS error (with `code`) on the JS thread and wraps it as a referenced
/// `napi::Error`, which napi passes to the promise's rejection verbatim.
pub fn reject_with_code(env: &Env, f: Failure) -> napi::Error {
    let js = JsError::from(napi::Error::new(f.code.clone(), f.message.clone()));
    // SAFETY: `env` is the live env of the JS thread this is called on (Task::resolve).
    let raw = unsafe { js.into_value(env.raw()) };
    if raw.is_null() {
        return napi::Error::new(Status::GenericFailure, format!("{}: {}", f.code, f.message));
    }
    let unknown = unsafe { Unknown::from_raw_unchecked(env.raw(), raw) };
    napi::Error::from(unknown)
}
