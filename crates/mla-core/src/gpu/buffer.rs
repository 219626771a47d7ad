//! Device memory of one GPU: stream-ordered allocations, host-to-device copies that return
//! at once, and a pool of CUDA events.
//!
//! - Allocations come from a memory pool of the device (`cuMemAllocFromPoolAsync` on the
//!   device's stream) and are freed in stream order (`cuMemFreeAsync`): dropping a tensor
//!   never waits for the device. Work queued on the device's stream before the free still
//!   reads valid memory, and the pool hands the block out again only after that work. The
//!   pool keeps up to [`POOL_RELEASE_THRESHOLD`] bytes of freed memory for reuse (so that a
//!   per-step allocation costs no driver allocation), and gives the rest back to the driver
//!   at the next synchronisation. `MLA_ALLOC=sync` (or a device without memory pools) falls
//!   back to `cuMemAlloc` / `cuMemFree`, where a free waits for the whole device.
//! - Freed pool allocations of up to [`REUSE_MAX_BUFFER`] bytes are kept on a short list
//!   (at most [`REUSE_MAX_BUFFERS`], [`REUSE_MAX_BYTES`] in all) and handed out again to an
//!   allocation of the same size without a driver call either way (a decode's outputs,
//!   allocated and disposed every call, cost two cuMemAllocFromPoolAsync and two
//!   cuMemFreeAsync per call otherwise). The same stream order holds: work queued on the
//!   device's stream before the free comes before any use of the new allocation, which is
//!   queued later on the same stream (or on a stream made to wait for it). The list goes
//!   back to the pool at every `Device::synchronize`. `MLA_BUFFER_REUSE=0` turns it off.
//! - Work enqueued on another stream of the device (a `DecodeOptions::stream`) is not
//!   ordered before a free on the device's stream: while any such work may be pending (since
//!   the last `Device::synchronize`), a drop waits for the whole device first, as before.
//! - Host-to-device writes are staged in a pinned ring buffer and copied asynchronously on
//!   the device's stream, so `write` returns once the bytes are in the ring (the host slice
//!   is not borrowed beyond the call). Writes larger than half the ring are copied
//!   synchronously from the caller's memory.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

use crate::error::{ErrorCode, MlaError, Result};

/// Freed pool memory kept for reuse at a synchronisation, in bytes.
pub const POOL_RELEASE_THRESHOLD: u64 = 512 << 20;
/// Bytes of the pinned staging ring for host-to-device writes.
pub const STAGING_BYTES: usize = 8 << 20;
/// Freed allocations kept for reuse by size (see the module docs): at most this many, ...
pub const REUSE_MAX_BUFFERS: usize = 32;
/// ... of at most this many bytes in all, ...
pub const REUSE_MAX_BYTES: usize = 64 << 20;
/// ... each at most this large.
pub const REUSE_MAX_BUFFER: usize = 32 << 20;

/// Freed allocations kept for reuse: (bytes, address), the most recent last.
#[derive(Default)]
struct Reuse {
    bufs: Vec<(usize, sys::CUdeviceptr)>,
    bytes: usize,
}

/// A raw `CUmemoryPool` (an opaque driver handle, usable from any thread).
struct Pool(sys::CUmemoryPool);
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

/// Page-locked host memory (cuMemHostAlloc, not write-combined: the host reads it too).
pub(crate) struct PinnedBuf {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    len: usize,
}
unsafe impl Send for PinnedBuf {}
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedBuf> {
        ctx.bind_to_thread()?;
        let ptr = unsafe { result::malloc_host(len.max(16), 0)? } as *mut u8;
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(16)) };
        Ok(PinnedBuf { ctx: ctx.clone(), ptr, len })
    }
    /// Page-locked memory mapped into the context's device address space
    /// (CU_MEMHOSTALLOC_DEVICEMAP), zeroed, and its device address: kernels can write it
    /// directly (with unified addressing the two addresses are the same).
    pub(crate) fn new_mapped(ctx: &Arc<CudaContext>, len: usize) -> Result<(PinnedBuf, u64)> {
        ctx.bind_to_thread()?;
        let ptr = unsafe { result::malloc_host(len.max(16), sys::CU_MEMHOSTALLOC_DEVICEMAP)? } as *mut u8;
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(16)) };
        let buf = PinnedBuf { ctx: ctx.clone(), ptr, len };
        let mut dev: sys::CUdeviceptr = 0;
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, ptr as *mut c_void, 0).result()? };
        Ok((buf, dev))
    }
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // A copy into or out of it may still be queued.
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        unsafe {
            let _ = result::free_host(self.ptr as *mut c_void);
        }
    }
}

/// One part of a staged host-to-device copy ([`DeviceBuffer::write_staged`]).
#[derive(Clone, Copy)]
pub enum StagePart<'a> {
    /// Bytes as they are.
    Bytes(&'a [u8]),
    /// f32 values, rounded to the 16-bit `DType` (bf16 / fp16) while they are staged.
    Half(&'a [f32], crate::dtype::DType),
}

impl StagePart<'_> {
    /// Bytes this part takes in the copy.
    pub fn len(&self) -> usize {
        match self {
            StagePart::Bytes(b) => b.len(),
            StagePart::Half(v, _) => v.len() * 2,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes the part into `dst` (exactly `len()` bytes).
    fn write_to(&self, dst: &mut [u8]) {
        match self {
            StagePart::Bytes(b) => dst.copy_from_slice(b),
            StagePart::Half(v, dtype) => {
                // Ring regions start at multiples of 256 and parts before a 16-bit part are
                // whole elements: 2-byte aligned (checked).
                let (pre, bits, post) = unsafe { dst.align_to_mut::<u16>() };
                assert!(pre.is_empty() && post.is_empty(), "a 16-bit part at an odd address");
                crate::dtype::f32_slice_to_half_into(v, bits, *dtype)
            }
        }
    }
}

/// A staged region of the ring: [start, end) is free again once `event` completed.
struct InFlight {
    start: usize,
    end: usize,
    event: CudaEvent,
}

#[derive(Default)]
struct Staging {
    buf: Option<PinnedBuf>,
    head: usize,
    inflight: VecDeque<InFlight>,
}

/// What a device's allocations share: its context and stream, the pool, the staging ring,
/// events, and whether work on other streams may be pending.
pub(crate) struct MemCtx {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pool: Option<Pool>,
    /// Incremented whenever work is enqueued on a stream other than `stream`.
    foreign_epoch: AtomicU64,
    /// The value of `foreign_epoch` that the last whole-device synchronisation covered.
    clean_epoch: AtomicU64,
    staging: Mutex<Staging>,
    events: Mutex<Vec<CudaEvent>>,
    /// None when reuse is off (`MLA_BUFFER_REUSE=0`, or no pool).
    reuse: Option<Mutex<Reuse>>,
    /// Bytes of live allocations made here (for `Device::memory_stats`).
    live_bytes: AtomicUsize,
    live_buffers: AtomicUsize,
}

/// Memory facts of one device, see `Device::memory_stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of live buffers (tensors, plans, caches) this library allocated on the device.
    pub live_bytes: u64,
    /// Number of those buffers.
    pub live_buffers: u64,
    /// Bytes the memory pool holds from the driver (live + kept for reuse); 0 without a pool.
    pub pool_reserved: u64,
    /// Bytes of the pool in use by live allocations (and, until the next synchronize, the
    /// freed ones kept for reuse); 0 without a pool.
    pub pool_used: u64,
    /// Free device memory reported by the driver.
    pub device_free: u64,
    /// Whether allocations come from the stream-ordered pool (else `cuMemAlloc`, whose frees
    /// wait for the device).
    pub pooled: bool,
}

fn event_flags() -> Option<sys::CUevent_flags> {
    Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
}

impl MemCtx {
    /// The memory context of a device: a pool of its own when the device supports memory
    /// pools and `MLA_ALLOC` is not `sync`.
    pub(crate) fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, ordinal: usize) -> Result<Arc<MemCtx>> {
        let want_pool = std::env::var("MLA_ALLOC").as_deref() != Ok("sync");
        let supported = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED).unwrap_or(0) != 0;
        // A pool that cannot be made (an unusual driver) leaves the synchronous allocator:
        // slower frees, same results (`PoolStats::pooled` tells).
        let pool = if want_pool && supported { create_pool(ctx, ordinal).ok().map(Pool) } else { None };
        let reuse = (pool.is_some() && std::env::var("MLA_BUFFER_REUSE").as_deref() != Ok("0")).then(|| Mutex::new(Reuse::default()));
        Ok(Arc::new(MemCtx {
            ctx: ctx.clone(),
            stream: stream.clone(),
            pool,
            foreign_epoch: AtomicU64::new(0),
            clean_epoch: AtomicU64::new(0),
            staging: Mutex::new(Staging::default()),
            events: Mutex::new(Vec::new()),
            reuse,
            live_bytes: AtomicUsize::new(0),
            live_buffers: AtomicUsize::new(0),
        }))
    }

    /// Notes that work was enqueued on `stream`; returns whether it is another stream than
    /// the device's.
    pub(crate) fn note_stream(&self, stream: &CudaStream) -> bool {
        let foreign = stream.cu_stream() != self.stream.cu_stream();
        if foreign {
            self.foreign_epoch.fetch_add(1, Ordering::AcqRel);
        }
        foreign
    }

    /// The epoch to pass to [`MemCtx::mark_clean`] after a whole-device synchronisation
    /// that started after this call.
    pub(crate) fn epoch(&self) -> u64 {
        self.foreign_epoch.load(Ordering::Acquire)
    }
    pub(crate) fn mark_clean(&self, epoch: u64) {
        self.clean_epoch.fetch_max(epoch, Ordering::AcqRel);
    }
    fn foreign_pending(&self) -> bool {
        self.foreign_epoch.load(Ordering::Acquire) != self.clean_epoch.load(Ordering::Acquire)
    }

    /// An event from the pool (timing disabled).
    pub(crate) fn event(&self) -> Result<CudaEvent> {
        if let Some(e) = self.events.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(e);
        }
        Ok(self.ctx.new_event(event_flags())?)
    }
    /// Gives an event back (it must not be waited on any more).
    pub(crate) fn recycle(&self, e: CudaEvent) {
        let mut v = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < 4096 {
            v.push(e);
        }
    }

    fn alloc_raw(&self, len: usize) -> Result<sys::CUdeviceptr> {
        // Zero-byte tensors still get a distinct, valid address.
        let n = len.max(16);
        if let Some(r) = &self.reuse {
            let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = r.bufs.iter().rposition(|&(len, _)| len == n) {
                let (_, ptr) = r.bufs.swap_remove(i);
                r.bytes -= n;
                self.live_bytes.fetch_add(n, Ordering::Relaxed);
                self.live_buffers.fetch_add(1, Ordering::Relaxed);
                return Ok(ptr);
            }
        }
        self.ctx.bind_to_thread()?;
        let ptr = match &self.pool {
            Some(p) => unsafe { result::mem_pool::alloc_async(p.0, n, self.stream.cu_stream())? },
            None => unsafe { result::malloc_sync(n)? },
        };
        self.live_bytes.fetch_add(n, Ordering::Relaxed);
        self.live_buffers.fetch_add(1, Ordering::Relaxed);
        Ok(ptr)
    }

    fn free_raw(&self, ptr: sys::CUdeviceptr, len: usize) {
        let _ = self.ctx.bind_to_thread();
        match &self.pool {
            Some(_) => {
                if self.foreign_pending() {
                    // Kernels on another stream may still read it.
                    let _ = self.ctx.synchronize();
                }
                let n = len.max(16);
                let kept = self.reuse.as_ref().is_some_and(|r| {
                    let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
                    let fits = n <= REUSE_MAX_BUFFER && r.bufs.len() < REUSE_MAX_BUFFERS && r.bytes + n <= REUSE_MAX_BYTES;
                    if fits {
                        r.bufs.push((n, ptr));
                        r.bytes += n;
                    }
                    fits
                });
                if !kept {
                    unsafe {
                        let _ = result::free_async(ptr, self.stream.cu_stream());
                    }
                }
            }
            None => {
                // Kernels still queued may read this memory: let the context drain first.
                let _ = self.ctx.synchronize();
                unsafe {
                    let _ = result::free_sync(ptr);
                }
            }
        }
        self.live_bytes.fetch_sub(len.max(16), Ordering::Relaxed);
        self.live_buffers.fetch_sub(1, Ordering::Relaxed);
    }

    /// Copies `bytes` to device address `dst` on `stream`, staged through the pinned ring
    /// (returns before the copy ran; the ring slot is reused only once it has).
    pub(crate) fn upload(&self, dst: sys::CUdeviceptr, bytes: &[u8], stream: &CudaStream) -> Result<()> {
        self.upload_parts(dst, &[StagePart::Bytes(bytes)], stream)
    }

    /// [`MemCtx::upload`] of the concatenation of `parts` (one copy into the ring, one
    /// host-to-device copy); f32 parts are rounded to 16 bits straight into the ring.
    pub(crate) fn upload_parts(&self, dst: sys::CUdeviceptr, parts: &[StagePart<'_>], stream: &CudaStream) -> Result<()> {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if n == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        if n > STAGING_BYTES / 2 {
            let mut at = dst;
            let mut owned: Vec<u16> = Vec::new();
            for p in parts {
                let bytes = match p {
                    StagePart::Bytes(b) => *b,
                    StagePart::Half(v, dtype) => {
                        owned.clear();
                        owned.resize(v.len(), 0);
                        crate::dtype::f32_slice_to_half_into(v, &mut owned, *dtype);
                        crate::host::as_bytes(&owned[..])
                    }
                };
                if !bytes.is_empty() {
                    unsafe { result::memcpy_htod_async(at, bytes, stream.cu_stream())? };
                }
                at += bytes.len() as u64;
                if matches!(p, StagePart::Half(..)) {
                    // `owned` is reused by the next part: let this copy read it first.
                    stream.synchronize()?;
                }
            }
            // The host slices are only borrowed: wait until the copies have read them.
            stream.synchronize()?;
            return Ok(());
        }
        let mut st = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if st.buf.is_none() {
            st.buf = Some(PinnedBuf::new(&self.ctx, STAGING_BYTES)?);
        }
        let mut start = st.head.next_multiple_of(256);
        if start + n > STAGING_BYTES {
            start = 0;
        }
        let end = start + n;
        // Wait for the queued copies that still read the region (normally long done), then
        // drop the completed ones from the front.
        for f in st.inflight.iter() {
            if f.start < end && start < f.end {
                f.event.synchronize()?;
            }
        }
        while st.inflight.front().is_some_and(|f| (f.start < end && start < f.end) || f.event.is_complete()) {
            let f = st.inflight.pop_front().unwrap();
            self.recycle(f.event);
        }
        let base = st.buf.as_ref().unwrap().ptr();
        // SAFETY: [start, end) lies in the ring and no queued copy reads it any more.
        unsafe {
            let ring = std::slice::from_raw_parts_mut(base.add(start), n);
            let mut at = 0;
            for p in parts {
                p.write_to(&mut ring[at..at + p.len()]);
                at += p.len();
            }
            sys::cuMemcpyHtoDAsync_v2(dst, base.add(start) as *const c_void, n, stream.cu_stream()).result()?;
        }
        let event = self.event()?;
        event.record(stream)?;
        st.inflight.push_back(InFlight { start, end, event });
        st.head = end;
        Ok(())
    }

    /// Gives the allocations kept for reuse back to the pool (in stream order).
    pub(crate) fn flush_reuse(&self) {
        let Some(r) = &self.reuse else { return };
        let bufs = std::mem::take(&mut *r.lock().unwrap_or_else(|e| e.into_inner()));
        if bufs.bufs.is_empty() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        for (_, ptr) in bufs.bufs {
            unsafe {
                let _ = result::free_async(ptr, self.stream.cu_stream());
            }
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let mut s = PoolStats {
            live_bytes: self.live_bytes.load(Ordering::Relaxed) as u64,
            live_buffers: self.live_buffers.load(Ordering::Relaxed) as u64,
            pooled: self.pool.is_some(),
            ..Default::default()
        };
        if let Some(p) = &self.pool {
            let get = |attr| {
                let mut v = 0u64;
                unsafe { result::mem_pool::get_attribute(p.0, attr, &mut v as *mut u64 as *mut c_void) }.map(|_| v).unwrap_or(0)
            };
            s.pool_reserved = get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
            s.pool_used = get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT);
        }
        if self.ctx.bind_to_thread().is_ok() {
            s.device_free = result::mem_get_info().map(|(f, _)| f as u64).unwrap_or(0);
        }
        s
    }
}

impl Drop for MemCtx {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        self.staging.get_mut().unwrap_or_else(|e| e.into_inner()).inflight.clear();
        self.flush_reuse();
        let _ = self.ctx.synchronize();
        if let Some(p) = self.pool.take() {
            unsafe {
                let _ = result::mem_pool::destroy(p.0);
            }
        }
    }
}

fn create_pool(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<sys::CUmemoryPool> {
    ctx.bind_to_thread()?;
    // SAFETY: a zeroed CUmemPoolProps is the documented default; the fields set below are
    // the ones a device-local pool needs.
    let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
    props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
    props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    props.location.id = ordinal as i32;
    let pool = unsafe { result::mem_pool::create(&props)? };
    let mut threshold = POOL_RELEASE_THRESHOLD;
    unsafe { result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut c_void)? };
    Ok(pool)
}

/// A device allocation of this library. Copies are issued on the device's stream;
/// host-visible results (download) wait for that stream. Dropping it frees it in stream
/// order (see the module docs).
pub struct DeviceBuffer {
    mem: Arc<MemCtx>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

// The pointer is an address in the context's space; the driver calls are thread-safe.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    pub(crate) fn alloc(mem: &Arc<MemCtx>, len: usize) -> Result<DeviceBuffer> {
        let ptr = mem.alloc_raw(len)?;
        Ok(DeviceBuffer { mem: mem.clone(), ptr, len })
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

    /// All bytes, after the device's stream reached this point.
    pub fn download(&self) -> Result<Vec<u8>> {
        self.download_range(0, self.len)
    }

    /// `len` bytes from byte `offset`.
    pub fn download_range(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        assert!(offset + len <= self.len);
        self.mem.ctx.bind_to_thread()?;
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|_| MlaError::new(ErrorCode::OutOfMemory, format!("cannot allocate {len} bytes of host memory")))?;
        v.resize(len, 0u8);
        if len > 0 {
            unsafe { result::memcpy_dtoh_async(&mut v, self.ptr + offset as u64, self.mem.stream.cu_stream())? };
        }
        self.mem.stream.synchronize()?;
        Ok(v)
    }

    /// Overwrites bytes from `offset`, in stream order; returns once `bytes` was staged.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        assert!(offset + bytes.len() <= self.len);
        self.mem.upload(self.ptr + offset as u64, bytes, &self.mem.stream)
    }

    /// [`DeviceBuffer::write`] of the concatenation of `parts` (one staged copy).
    pub fn write_parts(&mut self, offset: usize, parts: &[&[u8]]) -> Result<()> {
        let parts: Vec<StagePart<'_>> = parts.iter().map(|p| StagePart::Bytes(p)).collect();
        self.write_staged(offset, &parts)
    }

    /// [`DeviceBuffer::write_parts`] with parts that may be converted while they are staged
    /// (f32 rows rounded to bf16 / fp16 straight into the pinned ring).
    pub fn write_staged(&mut self, offset: usize, parts: &[StagePart<'_>]) -> Result<()> {
        assert!(offset + parts.iter().map(|p| p.len()).sum::<usize>() <= self.len);
        self.mem.upload_parts(self.ptr + offset as u64, parts, &self.mem.stream)
    }

    pub fn copy_within(&mut self, src: usize, dst: usize, len: usize) -> Result<()> {
        self.mem.ctx.bind_to_thread()?;
        unsafe { result::memcpy_dtod_async(self.ptr + dst as u64, self.ptr + src as u64, len, self.mem.stream.cu_stream())? };
        Ok(())
    }

    /// Copies `len` bytes from device address `src` to byte `offset` of this buffer.
    pub fn copy_from_device(&mut self, offset: usize, src: u64, len: usize) -> Result<()> {
        assert!(offset + len <= self.len);
        if len == 0 {
            return Ok(());
        }
        self.mem.ctx.bind_to_thread()?;
        unsafe { result::memcpy_dtod_async(self.ptr + offset as u64, src, len, self.mem.stream.cu_stream())? };
        Ok(())
    }

    pub fn fill(&self, byte: u8) -> Result<()> {
        self.mem.ctx.bind_to_thread()?;
        unsafe { result::memset_d8_async(self.ptr, byte, self.len.max(16), self.mem.stream.cu_stream())? };
        Ok(())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.mem.free_raw(self.ptr, self.len);
    }
}
