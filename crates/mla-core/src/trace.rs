//! Host-side phase timestamps for the host benchmark's breakdown
//! (`npx mla-decode bench --host-breakdown`): where one call's microseconds go between the
//! JS call, the native entry, the launches, the completion and the JS continuation.
//!
//! Off unless [`enable`]d: a [`mark`] then costs one relaxed atomic load. When on, a mark
//! appends (label, CLOCK_MONOTONIC ns) to one process-wide log, the clock of Node's
//! `process.hrtime`, so that JS-side timestamps line up with these.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ON: AtomicBool = AtomicBool::new(false);
static LOG: Mutex<Vec<(Cow<'static, str>, u64)>> = Mutex::new(Vec::new());

/// Turns recording on or off (and clears the log).
pub fn enable(on: bool) {
    LOG.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(on, Ordering::Release);
}

/// Whether marks are recorded.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Records `label` now, when recording is on.
#[inline]
pub fn mark(label: &'static str) {
    if enabled() {
        record(Cow::Borrowed(label));
    }
}

/// [`mark`] with a label made at run time (the JS side's marks).
pub fn mark_owned(label: String) {
    if enabled() {
        record(Cow::Owned(label));
    }
}

#[cold]
fn record(label: Cow<'static, str>) {
    let t = now_ns();
    LOG.lock().unwrap_or_else(|e| e.into_inner()).push((label, t));
}

/// The marks recorded since the last call (or [`enable`]), in order.
pub fn take() -> Vec<(Cow<'static, str>, u64)> {
    std::mem::take(&mut *LOG.lock().unwrap_or_else(|e| e.into_inner()))
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of `process.hrtime` / `uv_hrtime`).
pub fn now_ns() -> u64 {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            tv_sec: i64,
            tv_nsec: i64,
        }
        extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_MONOTONIC: i32 = 1;
        let mut ts = Timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: writes one timespec.
        unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
    #[cfg(not(target_os = "linux"))]
    {
        static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        BASE.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn marks_are_recorded_only_when_on_and_in_order() {
        super::mark("off");
        super::enable(true);
        super::mark("a");
        super::mark_owned("b".to_string());
        let got = super::take();
        super::enable(false);
        super::mark("off again");
        assert_eq!(got.iter().map(|(l, _)| l.as_ref()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(got[0].1 <= got[1].1);
        assert!(super::take().is_empty());
    }
}
