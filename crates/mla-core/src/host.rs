//! Host memory of the CPU backend's tensors ([`HostBuf`]) and the byte views every layer
//! uses ([`as_bytes`]). Below the device and tensor modules (it imports only errors).

use crate::error::{ErrorCode, MlaError, Result};

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes held by live [`HostBuf`]s (the CPU backend's tensors), process-wide.
static LIVE_HOST_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of host memory held by tensors of the CPU backend right now (all devices, all
/// threads): what a soak test watches.
pub fn live_host_bytes() -> usize {
    LIVE_HOST_BYTES.load(Ordering::Relaxed)
}

/// Host bytes kept 4-byte aligned, so they can be viewed as u16, f32 or i32.
pub struct HostBuf {
    words: Vec<u32>,
    len: usize,
}

impl Clone for HostBuf {
    fn clone(&self) -> Self {
        LIVE_HOST_BYTES.fetch_add(self.words.len() * 4, Ordering::Relaxed);
        HostBuf { words: self.words.clone(), len: self.len }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        LIVE_HOST_BYTES.fetch_sub(self.words.len() * 4, Ordering::Relaxed);
    }
}

impl HostBuf {
    /// `len` zero bytes; an allocation failure is an error, not an abort.
    pub fn zeroed(len: usize) -> Result<Self> {
        let n = len.div_ceil(4);
        let mut words = Vec::new();
        words.try_reserve_exact(n).map_err(|_| MlaError::new(ErrorCode::OutOfMemory, format!("cannot allocate {len} bytes of host memory")))?;
        words.resize(n, 0);
        LIVE_HOST_BYTES.fetch_add(n * 4, Ordering::Relaxed);
        Ok(HostBuf { words, len })
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut b = HostBuf::zeroed(bytes.len())?;
        b.bytes_mut().copy_from_slice(bytes);
        Ok(b)
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u32 storage covers `len` bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
    pub fn as_u16(&self) -> &[u16] {
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u16, self.len / 2) }
    }
    pub fn as_u16_mut(&mut self) -> &mut [u16] {
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u16, self.len / 2) }
    }
    pub fn as_f32(&self) -> &[f32] {
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const f32, self.len / 4) }
    }
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut f32, self.len / 4) }
    }
    pub fn as_i32(&self) -> &[i32] {
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const i32, self.len / 4) }
    }
    pub fn as_i32_mut(&mut self) -> &mut [i32] {
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut i32, self.len / 4) }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Plain numbers with no padding bytes: what [`as_bytes`] may view.
pub trait Pod: Copy + sealed::Sealed {}
macro_rules! pod {
    ($($t:ty),*) => { $(impl sealed::Sealed for $t {} impl Pod for $t {})* };
}
pod!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

/// Reinterprets a slice of plain numbers as bytes.
pub fn as_bytes<T: Pod>(s: &[T]) -> &[u8] {
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}
