//! Runtime counters: kept in atomics on the hot path, published through `metrics`.
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Live counters of one runtime.
#[derive(Default)]
pub(crate) struct Stats {
    submitted: AtomicU64,
    running: AtomicI64,
    finished: AtomicU64,
    failed: AtomicU64,
    queued: AtomicI64,
    live_objects: AtomicI64,
    live_bytes: AtomicI64,
}

/// A snapshot of a runtime's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RuntimeStats {
    /// Tasks submitted since start.
    pub tasks_submitted: u64,
    /// Tasks running now.
    pub tasks_running: u64,
    /// Tasks that finished with a value.
    pub tasks_finished: u64,
    /// Tasks that failed (after their retries), including those whose inputs failed.
    pub tasks_failed: u64,
    /// Tasks ready to run and waiting for a worker.
    pub queue_length: u64,
    /// Values in the object table (pending or done).
    pub live_objects: u64,
    /// Encoded size of the values held, in bytes.
    pub live_bytes: u64,
}

impl Stats {
    pub(crate) fn task_submitted(&self) {
        self.submitted.fetch_add(1, Relaxed);
    }
    pub(crate) fn task_queued(&self) {
        self.queued.fetch_add(1, Relaxed);
    }
    pub(crate) fn task_dequeued(&self) {
        self.queued.fetch_sub(1, Relaxed);
    }
    pub(crate) fn task_started(&self) {
        self.running.fetch_add(1, Relaxed);
    }
    pub(crate) fn task_stopped(&self) {
        self.running.fetch_sub(1, Relaxed);
    }
    pub(crate) fn task_finished(&self) {
        self.finished.fetch_add(1, Relaxed);
    }
    pub(crate) fn task_failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }
    pub(crate) fn object_created(&self) {
        self.live_objects.fetch_add(1, Relaxed);
    }
    pub(crate) fn object_freed(&self, bytes: usize) {
        self.live_objects.fetch_sub(1, Relaxed);
        self.live_bytes.fetch_sub(bytes as i64, Relaxed);
    }
    pub(crate) fn bytes_added(&self, bytes: usize) {
        if bytes > 0 {
            self.live_bytes.fetch_add(bytes as i64, Relaxed);
        }
    }

    pub(crate) fn bytes_removed(&self, bytes: usize) {
        if bytes > 0 {
            self.live_bytes.fetch_sub(bytes as i64, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> RuntimeStats {
        let non_negative = |v: i64| v.max(0) as u64;
        RuntimeStats {
            tasks_submitted: self.submitted.load(Relaxed),
            tasks_running: non_negative(self.running.load(Relaxed)),
            tasks_finished: self.finished.load(Relaxed),
            tasks_failed: self.failed.load(Relaxed),
            queue_length: non_negative(self.queued.load(Relaxed)),
            live_objects: non_negative(self.live_objects.load(Relaxed)),
            live_bytes: non_negative(self.live_bytes.load(Relaxed)),
        }
    }

    /// Publishes the counters through the `metrics` facade.
    pub(crate) fn publish(&self) {
        let s = self.snapshot();
        metrics::counter!("tessera_tasks_submitted_total").absolute(s.tasks_submitted);
        metrics::counter!("tessera_tasks_finished_total").absolute(s.tasks_finished);
        metrics::counter!("tessera_tasks_failed_total").absolute(s.tasks_failed);
        metrics::gauge!("tessera_tasks_running").set(s.tasks_running as f64);
        metrics::gauge!("tessera_queue_length").set(s.queue_length as f64);
        metrics::gauge!("tessera_live_objects").set(s.live_objects as f64);
        metrics::gauge!("tessera_live_bytes").set(s.live_bytes as f64);
    }
}
