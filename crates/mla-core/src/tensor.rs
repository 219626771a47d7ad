//! Dense tensors on the CPU backend (host memory) or on a CUDA device.

use crate::device::Device;
use crate::dtype::{f32_slice_to_half, half_slice_to_f32, DType};
use crate::error::{ErrorCode, MlaError, Result};
use crate::gpu::DeviceBuffer;

pub use crate::host::{as_bytes, live_host_bytes, HostBuf, Pod};

pub enum Storage {
    Host(HostBuf),
    Device(DeviceBuffer),
}

/// A dense, row-major tensor. Owns its memory; dropping it frees it.
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    storage: Storage,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Bytes of a tensor of `shape` and `dtype`, or ERR_SHAPE when that overflows (every
/// index computed later assumes the storage matches the shape).
fn byte_len(shape: &[usize], dtype: DType) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| MlaError::arg(ErrorCode::ShapeMismatch, "shape", "a size that fits in memory", format!("{shape:?} of {dtype}")))
}

impl Tensor {
    /// A tensor of zero bytes (all-zero bits) on `device`.
    pub fn zeros(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let nbytes = byte_len(shape, dtype)?;
        let storage = match device {
            Device::Cpu => Storage::Host(HostBuf::zeroed(nbytes)?),
            Device::Cuda(g) => Storage::Device(g.alloc_zeroed(nbytes)?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, device: device.clone(), storage })
    }

    /// Like [`Tensor::zeros`], but CUDA memory is left unset (no memset is queued): for
    /// outputs a kernel overwrites entirely.
    pub fn empty(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let nbytes = byte_len(shape, dtype)?;
        let storage = match device {
            Device::Cpu => Storage::Host(HostBuf::zeroed(nbytes)?),
            Device::Cuda(g) => Storage::Device(g.alloc_uninit(nbytes)?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, device: device.clone(), storage })
    }

    /// A tensor from raw little-endian element bytes (length must be numel * dtype size).
    pub fn from_bytes(device: &Device, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let want = byte_len(shape, dtype)?;
        if bytes.len() != want {
            return Err(MlaError::arg(
                ErrorCode::ShapeMismatch,
                "data",
                format!("{want} bytes for shape {shape:?} of {dtype}"),
                format!("{} bytes", bytes.len()),
            ));
        }
        let storage = match device {
            Device::Cpu => Storage::Host(HostBuf::from_bytes(bytes)?),
            Device::Cuda(g) => Storage::Device(g.upload(bytes)?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, device: device.clone(), storage })
    }

    /// A floating tensor from f32 values, rounded to `dtype` (bf16, fp16 or fp32).
    pub fn from_f32(device: &Device, data: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => Tensor::from_bytes(device, as_bytes(data), shape, dtype),
            DType::BF16 | DType::F16 => {
                let bits = f32_slice_to_half(data, dtype);
                Tensor::from_bytes(device, as_bytes(&bits), shape, dtype)
            }
            DType::I32 => Err(MlaError::arg(ErrorCode::DtypeMismatch, "dtype", "a floating type", dtype)),
        }
    }

    /// A 16-bit float tensor from raw bf16 / fp16 bit patterns.
    pub fn from_half_bits(device: &Device, bits: &[u16], shape: &[usize], dtype: DType) -> Result<Tensor> {
        if !dtype.is_half() {
            return Err(MlaError::arg(ErrorCode::DtypeMismatch, "dtype", "bf16 or fp16", dtype));
        }
        Tensor::from_bytes(device, as_bytes(bits), shape, dtype)
    }

    pub fn from_i32(device: &Device, data: &[i32], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_bytes(device, as_bytes(data), shape, DType::I32)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// Host bytes, when the tensor lives on the CPU backend.
    pub fn host(&self) -> Option<&HostBuf> {
        match &self.storage {
            Storage::Host(h) => Some(h),
            Storage::Device(_) => None,
        }
    }
    pub fn host_mut(&mut self) -> Option<&mut HostBuf> {
        match &mut self.storage {
            Storage::Host(h) => Some(h),
            Storage::Device(_) => None,
        }
    }
    /// The CUDA device pointer, for interop (None on the CPU backend).
    pub fn device_ptr(&self) -> Option<u64> {
        match &self.storage {
            Storage::Device(d) => Some(d.ptr()),
            Storage::Host(_) => None,
        }
    }

    /// All bytes, copied to the host. On CUDA it waits for the device's stream, so this is a
    /// synchronising call: it reports the first failed step that has completed and was not
    /// reported yet (see [`Device::step`]), and then returns no data. The CPU backend does
    /// the same with its own step log.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match (&self.storage, &self.device) {
            (Storage::Device(d), Device::Cuda(g)) => g.download_checked(d),
            (Storage::Device(d), Device::Cpu) => d.download(),
            (Storage::Host(h), _) => {
                let bytes = h.bytes().to_vec();
                self.device.check_steps()?;
                Ok(bytes)
            }
        }
    }

    /// Values as f32 (bf16 / fp16 widened exactly).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let bytes = self.to_bytes()?;
        let h = HostBuf::from_bytes(&bytes)?;
        match self.dtype {
            DType::F32 => Ok(h.as_f32().to_vec()),
            DType::BF16 | DType::F16 => Ok(half_slice_to_f32(h.as_u16(), self.dtype)),
            DType::I32 => Err(MlaError::arg(ErrorCode::DtypeMismatch, "tensor", "a floating tensor", self.dtype)),
        }
    }

    pub fn to_i32(&self) -> Result<Vec<i32>> {
        if self.dtype != DType::I32 {
            return Err(MlaError::arg(ErrorCode::DtypeMismatch, "tensor", "int32", self.dtype));
        }
        Ok(HostBuf::from_bytes(&self.to_bytes()?)?.as_i32().to_vec())
    }

    /// Overwrites `bytes.len()` bytes starting at byte `offset`.
    pub fn write_bytes(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset + bytes.len() > self.nbytes() {
            return Err(MlaError::arg(
                ErrorCode::InvalidArgument,
                "write range",
                format!("within {} bytes", self.nbytes()),
                format!("{}..{}", offset, offset + bytes.len()),
            ));
        }
        match &mut self.storage {
            Storage::Host(h) => h.bytes_mut()[offset..offset + bytes.len()].copy_from_slice(bytes),
            Storage::Device(d) => d.write(offset, bytes)?,
        }
        Ok(())
    }

    /// Overwrites this tensor with `src`'s bytes (same device, same byte size; the dtypes
    /// may differ, e.g. raw bits). On CUDA a device-to-device copy queued on the device's
    /// stream: e.g. new-token rows or queries produced by a model, with no host round trip.
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        if !src.device.same(&self.device) {
            return Err(MlaError::arg(ErrorCode::DeviceMismatch, "src", format!("a tensor on {:?}", self.device), format!("{:?}", src.device)));
        }
        if src.nbytes() != self.nbytes() {
            return Err(MlaError::arg(
                ErrorCode::ShapeMismatch,
                "src",
                format!("{} bytes ({:?} of {})", self.nbytes(), self.shape, self.dtype),
                format!("{} bytes ({:?} of {})", src.nbytes(), src.shape, src.dtype),
            ));
        }
        let n = self.nbytes();
        match (&mut self.storage, &src.storage) {
            (Storage::Host(d), Storage::Host(s)) => d.bytes_mut()[..n].copy_from_slice(&s.bytes()[..n]),
            (Storage::Device(d), Storage::Device(s)) => d.copy_from_device(0, s.ptr(), n)?,
            _ => unreachable!("same device, same storage kind"),
        }
        Ok(())
    }

    /// Copies `len` bytes inside the tensor from `src` to `dst` (ranges must not overlap).
    pub fn copy_within(&mut self, src: usize, dst: usize, len: usize) -> Result<()> {
        let n = self.nbytes();
        if src + len > n || dst + len > n || (src < dst + len && dst < src + len) {
            return Err(MlaError::new(ErrorCode::InvalidArgument, format!("copy_within: bad ranges {src}+{len} -> {dst}")));
        }
        match &mut self.storage {
            Storage::Host(h) => h.bytes_mut().copy_within(src..src + len, dst),
            Storage::Device(d) => d.copy_within(src, dst, len)?,
        }
        Ok(())
    }

    /// Fills every byte with `byte` (tests poison outputs with 0xFF: NaN in every float type).
    pub fn fill_bytes(&mut self, byte: u8) -> Result<()> {
        match &mut self.storage {
            Storage::Host(h) => h.bytes_mut().fill(byte),
            Storage::Device(d) => d.fill(byte)?,
        }
        Ok(())
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape, self.dtype, self.device.kind())
    }
}
