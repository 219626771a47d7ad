//! Numeric ids for the native objects of the serving path's hot calls (`Plan.update` and the
//! decode entry points): a `Tensor` or `Plan` is registered once ([`tensor_id`],
//! [`plan_id`]; its JS wrapper keeps the id) and is then passed as a number.
//!
//! Why: napi-rs converts a `&Tensor` argument with `napi_unwrap`, a type-tag check and an
//! entry in its borrow registry (a global map under a mutex, entered and left on every
//! call): about 0.3 µs per argument, over 2 µs for the seven of `decodeInto`, all paid on
//! the JS thread before the kernels are launched. A number costs a few nanoseconds.
//!
//! Safety: an id is an index into a table of this thread that holds the address napi-rs
//! boxed the object at (read with `napi_unwrap` after the type-tag check, as napi-rs's own
//! conversion does). The object removes its entry when it is dropped (its finalizer, on this
//! same thread), so an entry always points to a live object, and an object has one id for
//! life (registering it again returns the same one). A reference resolved from an id is
//! used only within the native call that resolved it: such calls run no JS and create no JS
//! value while they hold one, so no finalizer can run meanwhile. napi-rs's registry also
//! kept a `&mut` argument from aliasing another argument; the callers that take one
//! ([`tensor_mut`]) check that their ids differ instead.

use std::cell::RefCell;
use std::ptr::NonNull;

use mla_core::ErrorCode;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::error::{err, Result};
use crate::plan::Plan;
use crate::tensor::Tensor;

#[derive(Clone, Copy)]
enum Entry {
    Free,
    Tensor(NonNull<Tensor>),
    Plan(NonNull<Plan>),
}

#[derive(Default)]
struct Table {
    /// Entry `id - 1` (0 is never an id: the objects keep it for "not registered").
    entries: Vec<Entry>,
    free: Vec<u32>,
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

fn insert(e: Entry) -> u32 {
    TABLE.with(|t| {
        let mut t = t.borrow_mut();
        match t.free.pop() {
            Some(id) => {
                t.entries[id as usize - 1] = e;
                id
            }
            None => {
                t.entries.push(e);
                t.entries.len() as u32
            }
        }
    })
}

fn get(id: u32) -> Entry {
    TABLE.with(|t| t.borrow().entries.get((id as usize).wrapping_sub(1)).copied().unwrap_or(Entry::Free))
}

/// Frees `id` (the object's `Drop`). Ignored once the thread's table is gone (a finalizer
/// run at thread exit).
pub fn release(id: u32) {
    let _ = TABLE.try_with(|t| {
        let mut t = t.borrow_mut();
        t.entries[id as usize - 1] = Entry::Free;
        t.free.push(id);
    });
}

/// The boxed native object behind `obj`, after the type-tag check of its class.
unsafe fn unwrap<T: TypeTag>(env: &Env, obj: &Unknown, class: &str) -> Result<NonNull<T>> {
    let tag = T::type_tag();
    let mut matches = false;
    let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
    let ok = unsafe {
        napi::sys::napi_check_object_type_tag(env.raw(), obj.raw(), &tag, &mut matches) == napi::sys::Status::napi_ok
            && matches
            && napi::sys::napi_unwrap(env.raw(), obj.raw(), &mut p) == napi::sys::Status::napi_ok
    };
    match NonNull::new(p.cast::<T>()) {
        Some(p) if ok => Ok(p),
        _ => Err(err(ErrorCode::InvalidArgument, format!("expected a native {class}"))),
    }
}

/// The id of a native `Tensor` (registered on first use; the same id for its whole life).
#[napi(ts_args_type = "tensor: Tensor")]
pub fn tensor_id(env: Env, tensor: Unknown) -> Result<u32> {
    let p = unsafe { unwrap::<Tensor>(&env, &tensor, "Tensor")? };
    // SAFETY: a live boxed Tensor (above); no other reference to it exists during this call.
    let slot = unsafe { &mut (*p.as_ptr()).slot };
    if *slot == 0 {
        *slot = insert(Entry::Tensor(p));
    }
    Ok(*slot)
}

/// The id of a native `Plan` (as [`tensor_id`]).
#[napi(ts_args_type = "plan: Plan")]
pub fn plan_id(env: Env, plan: Unknown) -> Result<u32> {
    let p = unsafe { unwrap::<Plan>(&env, &plan, "Plan")? };
    // SAFETY: as in tensor_id.
    let slot = unsafe { &mut (*p.as_ptr()).slot };
    if *slot == 0 {
        *slot = insert(Entry::Plan(p));
    }
    Ok(*slot)
}

fn not_a(what: &str, name: &str, id: u32) -> napi::Error<String> {
    err(ErrorCode::InvalidArgument, format!("{name}: expected the id of a {what}, got {id}"))
}

/// The tensor registered as `id` (`name` is the argument's name in errors).
///
/// # Safety
///
/// The reference must not outlive the current native call, and no JS may run (nor a JS
/// value be created) while it is held; see the module's comment.
pub unsafe fn tensor<'a>(id: u32, name: &str) -> Result<&'a Tensor> {
    match get(id) {
        Entry::Tensor(p) => Ok(unsafe { p.as_ref() }),
        _ => Err(not_a("tensor", name, id)),
    }
}

/// The tensor registered as `id`, for writing.
///
/// # Safety
///
/// As [`tensor`], and no other reference to that tensor may be held meanwhile (the caller
/// checks that the ids of the references it holds differ).
pub unsafe fn tensor_mut<'a>(id: u32, name: &str) -> Result<&'a mut Tensor> {
    match get(id) {
        Entry::Tensor(mut p) => Ok(unsafe { p.as_mut() }),
        _ => Err(not_a("tensor", name, id)),
    }
}

/// The plan registered as `id`.
///
/// # Safety
///
/// As [`tensor`].
pub unsafe fn plan<'a>(id: u32, name: &str) -> Result<&'a Plan> {
    match get(id) {
        Entry::Plan(p) => Ok(unsafe { p.as_ref() }),
        _ => Err(not_a("plan", name, id)),
    }
}
