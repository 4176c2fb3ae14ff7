//! The node's runtime's link to the cluster: a registered task that a task or actor on this
//! node spawns is sent to the head (`Spawn`), which schedules it like any other task, so a
//! task on a node spawns tasks onto the whole cluster. Its `Ref` here is answered by
//! `SpawnDone`; a result held elsewhere is pulled from its holder when read, and released
//! (`Release`) when its last `Ref` here drops.
//!
//! Invariants:
//! 1. A spawn is in `pending` from its `Spawn` until its `SpawnDone` (or the runtime's
//!    stop), keeping its job (and so its inputs' `Ref`s here) alive.
//! 2. A held result is in `spawned` while a `Ref` here names it; so are the arguments this
//!    node keeps in its store for that spawn (the head may run the task again from its
//!    lineage, pulling them again). When the head has made it again, a second `SpawnDone`
//!    replaces its location here.
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::{Held, NodeStore};
use crate::actors::object::{
    EncodedValue, Fetched, ObjectId, ObjectTable, Outcome, RemoteAccess, RemoteLocation, RemoteValue, View,
};
use crate::actors::reference::RemoteArgKind;
use crate::actors::runtime::{NodeCounts, RemoteScheduler};
use crate::actors::task::Job;
use crate::net::data::{DataClient, ObjectSource as _};
use crate::net::head::INLINE_LIMIT;
use crate::net::wire::{
    ArgSource, Message, RemoteErrorKind, RemoteTaskError, SpawnArg, SpawnRequest, SpawnedValue,
};
use crate::{Error, Result};

/// Ids under which this node keeps the arguments of its spawns in its store: apart from
/// the ids of results it holds for the head (the head's object ids, far below this).
const FIRST_ARG_ID: u64 = 1 << 63;

/// A spawn sent to the head and not answered yet.
struct PendingSpawn {
    job: Box<Job>,
    /// Arguments kept in this node's store for the head to pull.
    kept: Vec<u64>,
}

pub(super) struct ClusterLink {
    head: mpsc::UnboundedSender<Message>,
    store: Arc<NodeStore>,
    data: Arc<DataClient>,
    data_addr: SocketAddr,
    /// The node runtime's object table (weak: the table holds this link).
    table: Weak<ObjectTable>,
    pending: Mutex<HashMap<u64, PendingSpawn>>,
    /// Held results by their id here: (spawn id, arguments kept for it).
    spawned: Mutex<HashMap<ObjectId, (u64, Vec<u64>)>>,
    next_arg: AtomicU64,
    closed: AtomicBool,
}

impl ClusterLink {
    pub(super) fn new(
        head: mpsc::UnboundedSender<Message>,
        store: Arc<NodeStore>,
        data: Arc<DataClient>,
        data_addr: SocketAddr,
        table: &Arc<ObjectTable>,
    ) -> Self {
        ClusterLink {
            head,
            store,
            data,
            data_addr,
            table: Arc::downgrade(table),
            pending: Mutex::default(),
            spawned: Mutex::default(),
            next_arg: AtomicU64::new(FIRST_ARG_ID),
            closed: AtomicBool::new(false),
        }
    }

    /// How one argument of a spawn travels; `None` if it cannot (the task then runs here).
    fn spawn_arg(&self, table: &ObjectTable, arg: &RemoteArgKind, kept: &mut Vec<u64>) -> Option<SpawnArg> {
        let id = match arg {
            RemoteArgKind::Value(bytes) => return Some(SpawnArg::Source(ArgSource::Inline(bytes.clone()))),
            RemoteArgKind::Held { addr, id, len } => {
                return Some(SpawnArg::Held { addr: *addr, id: *id, len: *len })
            }
            RemoteArgKind::Ref(id) => *id,
        };
        if let Some((spawn_id, _)) = self.spawned.lock().get(&id) {
            return Some(SpawnArg::Spawned(*spawn_id));
        }
        let Some(Outcome::Ready(value)) = table.outcome(id) else { return None };
        if let View::Remote(location) = value.view() {
            return Some(SpawnArg::Held { addr: location.addr, id: location.id, len: location.len });
        }
        let bytes = value.encode().ok()?;
        if bytes.len() <= INLINE_LIMIT {
            return Some(SpawnArg::Source(ArgSource::Inline(bytes)));
        }
        let id = self.next_arg.fetch_add(1, Ordering::Relaxed);
        let len = bytes.len() as u64;
        self.store.objects.lock().insert(id, Held::encoded(bytes));
        kept.push(id);
        Some(SpawnArg::Held { addr: self.data_addr, id, len })
    }

    /// The spawn whose held result is `id` here (the head keeps that result until this
    /// node's `Release`).
    pub(super) fn kept_spawn(&self, id: ObjectId) -> Option<u64> {
        self.spawned.lock().get(&id).map(|(spawn_id, _)| *spawn_id)
    }

    fn forget_args(&self, kept: Vec<u64>) {
        if kept.is_empty() {
            return;
        }
        let mut objects = self.store.objects.lock();
        for id in kept {
            objects.remove(&id);
        }
    }

    /// The head's answer to spawn `spawn_id`: completes its `Ref` here.
    pub(super) fn spawn_done(
        &self,
        spawn_id: u64,
        result: std::result::Result<SpawnedValue, RemoteTaskError>,
    ) {
        let Some(PendingSpawn { job, kept }) = self.pending.lock().remove(&spawn_id) else {
            return self.relocated(spawn_id, result);
        };
        match result {
            Ok(SpawnedValue::Inline(bytes)) => {
                self.forget_args(kept);
                let len = bytes.len();
                job.finish(Outcome::Ready(Arc::new(EncodedValue(bytes))), len);
            }
            Ok(SpawnedValue::Held { addr, id, len }) => {
                let output = job.output();
                self.spawned.lock().insert(output, (spawn_id, kept));
                let location =
                    RemoteLocation { node: 0, node_name: format!("the node at {addr}"), addr, id, len };
                if !job.finish(Outcome::Ready(Arc::new(RemoteValue(location))), len as usize) {
                    // Every Ref here dropped while the task ran.
                    self.release(output);
                }
            }
            Err(RemoteTaskError { kind, message }) => {
                self.forget_args(kept);
                let task = job.name().to_string();
                job.fail(match kind {
                    RemoteErrorKind::Panicked => Error::TaskPanicked { task, message },
                    _ => Error::TaskFailed { task, message },
                });
            }
        }
    }

    /// A held result of an earlier spawn was made again (its holder was lost): its `Ref`
    /// here (the spawn id is its id here) now names the new holder, or the failure.
    fn relocated(&self, spawn_id: u64, result: std::result::Result<SpawnedValue, RemoteTaskError>) {
        let id = ObjectId::from_raw(spawn_id);
        let Some(table) = self.table.upgrade() else { return };
        if !self.spawned.lock().contains_key(&id) {
            return; // Released meanwhile.
        }
        let outcome = match result {
            Ok(SpawnedValue::Held { addr, id, len }) => {
                let location =
                    RemoteLocation { node: 0, node_name: format!("the node at {addr}"), addr, id, len };
                Outcome::Ready(Arc::new(RemoteValue(location)))
            }
            Ok(SpawnedValue::Inline(bytes)) => {
                // (Not kept any longer by the head.)
                self.spawned.lock().remove(&id);
                Outcome::Ready(Arc::new(EncodedValue(bytes)))
            }
            Err(RemoteTaskError { message, .. }) => {
                Outcome::Failed(Arc::new(Error::ObjectLost { object: spawn_id, reason: message }))
            }
        };
        table.replace_done(id, outcome);
    }

    /// The head is gone or going: spawns waiting for an answer fail, and later ones run
    /// on this node.
    pub(super) fn close(&self) {
        let pending: Vec<PendingSpawn> = {
            let mut pending = self.pending.lock();
            self.closed.store(true, Ordering::Release);
            pending.drain().map(|(_, spawn)| spawn).collect()
        };
        for PendingSpawn { job, kept } in pending {
            self.forget_args(kept);
            job.fail(Error::Shutdown);
        }
    }

    fn release(&self, id: ObjectId) {
        let Some((spawn_id, kept)) = self.spawned.lock().remove(&id) else { return };
        self.forget_args(kept);
        let _ = self.head.send(Message::Release(vec![spawn_id]));
    }

    fn pull(&self, location: &RemoteLocation) -> Result<Fetched> {
        if location.addr == self.data_addr {
            let bytes = self.store.object_bytes(location.id).map_err(|message| Error::Transfer {
                object: location.id,
                holder: location.addr.to_string(),
                message,
            })?;
            return Ok(Fetched { head: Vec::new(), body: bytes.to_vec() });
        }
        self.data.fetch_blocking(location.addr, location.id)
    }
}

impl RemoteScheduler for ClusterLink {
    fn submit(&self, job: Box<Job>) -> std::result::Result<(), Box<Job>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(job);
        }
        let Some(table) = self.table.upgrade() else { return Err(job) };
        let Some(remote) = job.remote_args() else { return Err(job) };
        let mut kept = Vec::new();
        let args: Option<Vec<SpawnArg>> =
            remote.iter().map(|arg| self.spawn_arg(&table, &arg.0, &mut kept)).collect();
        let Some(args) = args else {
            self.forget_args(kept);
            return Err(job);
        };
        let spawn_id = job.output().as_u64();
        let request = SpawnRequest {
            spawn_id,
            name: job.name().to_string(),
            args,
            retries: job.retries(),
            gpu: job.needs_gpu(),
            xla: job.needs_xla(),
        };
        {
            // (Checked again under the lock: `close` fails every spawn in `pending`.)
            let mut pending = self.pending.lock();
            if self.closed.load(Ordering::Acquire) {
                drop(pending);
                self.forget_args(kept);
                return Err(job);
            }
            pending.insert(spawn_id, PendingSpawn { job, kept });
        }
        if self.head.send(Message::Spawn(request)).is_err() {
            // The head is gone: the task runs here.
            if let Some(PendingSpawn { job, kept }) = self.pending.lock().remove(&spawn_id) {
                self.forget_args(kept);
                return Err(job);
            }
        }
        Ok(())
    }

    fn node_counts(&self) -> NodeCounts {
        NodeCounts::default()
    }

    fn stop(&self) {
        self.close();
    }

    /// A result held elsewhere is pulled here and written from here.
    fn save_held(
        &self,
        location: &RemoteLocation,
        stash_location: &str,
        name: &str,
        type_name: &str,
        tags: &[(&str, &str)],
    ) -> Result<crate::Version> {
        let bytes = self.pull(location)?.into_bytes();
        let stash = crate::Stash::open_url(stash_location)?;
        Ok(stash.save_encoded(name, type_name, &bytes, tags)?)
    }
}

impl RemoteAccess for ClusterLink {
    fn fetch_blocking(&self, location: &RemoteLocation) -> Result<Fetched> {
        self.pull(location)
    }

    fn fetch(&self, location: RemoteLocation) -> Pin<Box<dyn Future<Output = Result<Fetched>> + Send>> {
        if location.addr == self.data_addr {
            let pulled = self.pull(&location);
            return Box::pin(async move { pulled });
        }
        self.data.fetch_in_background(location.addr, location.id)
    }

    fn released(&self, id: ObjectId, _location: &RemoteLocation) {
        self.release(id);
    }
}
