//! The serving path on the CPU backend: enqueued steps and their errors, caller-owned
//! outputs, in-place re-planning, batched cache appends, captured steps, a soak test.
//! The same bodies run on CUDA in `gpu_decode.rs` (common/serve.rs).
//!
//! The CPU backend's step log is one per process, so these tests run one at a time.

mod common;

use std::sync::Mutex;

use common::serve;
use mla_core::Device;

static SERIAL: Mutex<()> = Mutex::new(());

fn cpu() -> (std::sync::MutexGuard<'static, ()>, Device) {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Nothing of an earlier (failed) test may linger in the log.
    let _ = Device::Cpu.synchronize();
    (g, Device::Cpu)
}

#[test]
fn bad_step_is_reported_by_the_next_sync() {
    let (_g, dev) = cpu();
    serve::bad_step_is_reported_by_the_next_sync(&dev);
}

#[test]
fn wait_step_reports_its_own_error() {
    let (_g, dev) = cpu();
    serve::wait_step_reports_its_own_error(&dev);
}

#[test]
fn poll_step_reports_its_own_error() {
    let (_g, dev) = cpu();
    serve::poll_step_reports_its_own_error(&dev);
}

#[test]
fn reading_a_tensor_reports_the_failed_step() {
    let (_g, dev) = cpu();
    serve::reading_a_tensor_reports_the_failed_step(&dev);
}

#[test]
fn bad_length_is_reported_by_the_next_sync() {
    let (_g, dev) = cpu();
    serve::bad_length_is_reported_by_the_next_sync(&dev);
}

#[test]
fn shape_errors_fail_the_call() {
    let (_g, dev) = cpu();
    serve::shape_errors_fail_the_call(&dev);
}

#[test]
fn many_steps_bad_ones_never_touch_good_ones() {
    let (_g, dev) = cpu();
    serve::many_steps_bad_ones_never_touch_good_ones(&dev, 120);
}

#[test]
fn replan_in_place_equals_a_fresh_plan() {
    let (_g, dev) = cpu();
    serve::replan_in_place_equals_a_fresh_plan(&dev);
}

#[test]
fn append_batch_equals_per_sequence_appends() {
    let (_g, dev) = cpu();
    serve::append_batch_equals_per_sequence_appends(&dev);
}

#[test]
fn append_batch_is_all_or_nothing() {
    let (_g, dev) = cpu();
    serve::append_batch_is_all_or_nothing(&dev);
}

#[test]
fn batch_into_equals_batch() {
    let (_g, dev) = cpu();
    serve::batch_into_equals_batch(&dev);
}

#[test]
fn graph_replay_with_new_lengths_equals_eager_decode() {
    let (_g, dev) = cpu();
    serve::graph_replay_with_new_lengths_equals_eager_decode(&dev);
}

#[test]
fn graph_replay_reports_bad_steps() {
    let (_g, dev) = cpu();
    serve::graph_replay_reports_bad_steps(&dev);
}

/// 10k serving steps with forks and frees stay flat in host memory (CPU variant).
#[test]
fn soak_10k_steps_with_forks_and_frees() {
    let (_g, dev) = cpu();
    serve::soak(&dev, 10_000);
}

#[test]
fn inputs_dropped_after_enqueue_stay_valid() {
    let (_g, dev) = cpu();
    serve::inputs_dropped_after_enqueue_stay_valid(&dev);
}

#[test]
fn outputs_dropped_while_pending_are_reused_in_stream_order() {
    let (_g, dev) = cpu();
    serve::outputs_dropped_while_pending_are_reused_in_stream_order(&dev);
}
