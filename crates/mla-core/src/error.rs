//! Typed errors with stable codes (the TypeScript API exposes `code` verbatim).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// An argument has a wrong value (not shape or dtype): d, block_size, h_q % h_kv...
    InvalidArgument,
    /// A tensor has the wrong rank or extent.
    ShapeMismatch,
    /// A tensor has the wrong element type.
    DtypeMismatch,
    /// Tensors live on different devices (or CPU vs GPU).
    DeviceMismatch,
    /// A sequence length is outside [0, max_blocks_per_seq * block_size].
    SeqlenOutOfRange,
    /// A block index that would be read is outside [0, num_blocks).
    BlockIndexOutOfRange,
    /// The paged cache has no free block left.
    CacheExhausted,
    /// A sequence id that the cache does not know (freed or never created).
    UnknownSequence,
    /// No usable CUDA GPU (no driver, no device, or a compute capability below 8.0).
    GpuUnavailable,
    /// This build carries no GPU kernels (no CUDA compiler at build time), or none for this
    /// device or the kernel path asked for.
    KernelsUnavailable,
    /// The CUDA driver is older than the kernels need (see
    /// [`crate::device::MIN_DRIVER_CUDA_VERSION`]); the message names both versions.
    DriverTooOld,
    /// A CUDA driver call failed.
    Cuda,
    /// The object was disposed.
    Disposed,
    /// A valid request this version does not implement.
    Unsupported,
    /// Host or device memory could not be allocated.
    OutOfMemory,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "ERR_INVALID_ARGUMENT",
            ErrorCode::ShapeMismatch => "ERR_SHAPE",
            ErrorCode::DtypeMismatch => "ERR_DTYPE",
            ErrorCode::DeviceMismatch => "ERR_DEVICE_MISMATCH",
            ErrorCode::SeqlenOutOfRange => "ERR_SEQLEN_RANGE",
            ErrorCode::BlockIndexOutOfRange => "ERR_BLOCK_INDEX",
            ErrorCode::CacheExhausted => "ERR_CACHE_EXHAUSTED",
            ErrorCode::UnknownSequence => "ERR_UNKNOWN_SEQUENCE",
            ErrorCode::GpuUnavailable => "ERR_GPU_UNAVAILABLE",
            ErrorCode::KernelsUnavailable => "ERR_KERNELS_UNAVAILABLE",
            ErrorCode::DriverTooOld => "ERR_DRIVER_TOO_OLD",
            ErrorCode::Cuda => "ERR_CUDA",
            ErrorCode::Disposed => "ERR_DISPOSED",
            ErrorCode::Unsupported => "ERR_UNSUPPORTED",
            ErrorCode::OutOfMemory => "ERR_OUT_OF_MEMORY",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlaError {
    pub code: ErrorCode,
    pub message: String,
}

impl MlaError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        MlaError { code, message: message.into() }
    }
    /// An argument check that failed: names the argument, what was expected and what came.
    pub fn arg(code: ErrorCode, arg: &str, expected: impl fmt::Display, actual: impl fmt::Display) -> Self {
        MlaError::new(code, format!("{arg}: expected {expected}, got {actual}"))
    }
}

impl fmt::Display for MlaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for MlaError {}

impl From<cudarc::driver::DriverError> for MlaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        let code = if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY { ErrorCode::OutOfMemory } else { ErrorCode::Cuda };
        MlaError::new(code, format!("CUDA driver: {e:?}"))
    }
}

pub type Result<T> = std::result::Result<T, MlaError>;
