//! Raw device allocations ordered on one stream.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use crate::error::Result;

/// A device allocation. Copies are issued on the owning device's stream; host-visible
/// results (download) wait for that stream.
pub struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

// The pointer is an address in the context's space; the driver calls are thread-safe.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    pub(crate) fn alloc(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, len: usize) -> Result<DeviceBuffer> {
        ctx.bind_to_thread()?;
        // Zero-byte tensors still get a distinct, valid address.
        let ptr = unsafe { result::malloc_sync(len.max(16))? };
        Ok(DeviceBuffer { ctx: ctx.clone(), stream: stream.clone(), ptr, len })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn download(&self) -> Result<Vec<u8>> {
        self.ctx.bind_to_thread()?;
        let mut v = vec![0u8; self.len];
        if self.len > 0 {
            unsafe { result::memcpy_dtoh_async(&mut v, self.ptr, self.stream.cu_stream())? };
        }
        self.stream.synchronize()?;
        Ok(v)
    }

    pub fn write(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        assert!(offset + bytes.len() <= self.len);
        if bytes.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        unsafe { result::memcpy_htod_async(self.ptr + offset as u64, bytes, self.stream.cu_stream())? };
        // The host slice is only borrowed: wait until the copy has read it.
        self.stream.synchronize()?;
        Ok(())
    }

    pub fn copy_within(&mut self, src: usize, dst: usize, len: usize) -> Result<()> {
        self.ctx.bind_to_thread()?;
        unsafe {
            result::memcpy_dtod_async(self.ptr + dst as u64, self.ptr + src as u64, len, self.stream.cu_stream())?
        };
        Ok(())
    }

    pub fn fill(&self, byte: u8) -> Result<()> {
        self.ctx.bind_to_thread()?;
        unsafe { result::memset_d8_async(self.ptr, byte, self.len.max(16), self.stream.cu_stream())? };
        Ok(())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // Kernels still queued may read this memory: let the context drain first.
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        unsafe {
            let _ = result::free_sync(self.ptr);
        }
    }
}
