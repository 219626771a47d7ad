//! The binding's async work on the libuv thread pool, one pattern for every promise:
//! [`CoreTask`] runs its work there (a core error, or a panic, becomes a [`Failure`]), and
//! on the JS thread turns the value into its JS value or rejects the promise with the
//! error's `code` ([`reject_with_code`]).

use napi::bindgen_prelude::*;

use crate::error::{core_async, reject_with_code, Failure, Result};

/// Work of the libuv thread pool that yields a `T`, shown to JS as a `J`.
pub struct CoreTask<T, J> {
    work: Option<Box<dyn FnOnce() -> Result<T> + Send>>,
    to_js: fn(T) -> J,
    failure: Option<Failure>,
}

impl<T: Send + 'static, J> CoreTask<T, J> {
    /// `work` on the pool, then `to_js` on the JS thread.
    pub fn new(work: impl FnOnce() -> Result<T> + Send + 'static, to_js: fn(T) -> J) -> AsyncTask<Self>
    where
        Self: Task,
    {
        AsyncTask::new(CoreTask { work: Some(Box::new(work)), to_js, failure: None })
    }
}

impl<T: Send + 'static, J: ToNapiValue + TypeName> Task for CoreTask<T, J> {
    type Output = Option<T>;
    type JsValue = J;

    fn compute(&mut self) -> napi::Result<Option<T>> {
        let work = self.work.take().expect("computed once");
        match core_async(work) {
            Ok(v) => Ok(Some(v)),
            Err(f) => {
                self.failure = Some(f);
                Ok(None)
            }
        }
    }

    fn resolve(&mut self, env: Env, out: Option<T>) -> napi::Result<J> {
        match (out, self.failure.take()) {
            (Some(v), _) => Ok((self.to_js)(v)),
            (None, Some(f)) => Err(reject_with_code(&env, f)),
            (None, None) => unreachable!(),
        }
    }
}
