//! Tasks that tasks on nodes spawn onto the cluster: the head turns each `Spawn` into a
//! job of its own (scheduled like any other), answers the node with `SpawnDone`, and keeps
//! a result held elsewhere alive for the node until the node's `Release` (or its loss).
//!
//! Invariants:
//! 1. A node's spawn whose result is held (on a node, or encoded here) is in that node's
//!    `spawned` map, under the node's spawn id, from the `Spawn` until `Release` or the
//!    node's loss; a result sent inline, or a failure, is not kept.
//! 2. The head's `Ref`s from `spawned` are dropped outside the state lock: dropping one
//!    may free a value, which takes the lock.
//! 3. A kept result rebuilt from lineage (its holder was lost) is answered again, with its
//!    new holder: the node replaces the location it had.
use std::sync::Arc;

use super::{Head, INLINE_LIMIT};
use crate::actors::object::{ObjectId, Outcome, View};
use crate::actors::reference::{Dependency, RefInner, RemoteArg, RemoteArgKind};
use crate::actors::task::{spawned_by_node, submit_when_ready, TaskEntry, TaskOptions};
use crate::net::wire::{
    ArgSource, Message, RemoteErrorKind, RemoteTaskError, SpawnArg, SpawnRequest, SpawnedValue,
};
use crate::Error;

impl Head {
    /// Runs the task that a task on node `node_id` spawned.
    pub(super) fn spawn_for_node(self: &Arc<Self>, node_id: u64, request: SpawnRequest) {
        let spawn_id = request.spawn_id;
        let refuse = |message: String| {
            let result = Err(RemoteTaskError { kind: RemoteErrorKind::Failed, message });
            self.answer_spawn(node_id, spawn_id, result, false);
        };
        let Some(core) = self.core.upgrade() else {
            return refuse("the cluster's head is shutting down".into());
        };
        let Some(entry) = TaskEntry::find(&request.name) else {
            return refuse(format!("task `{}` is not registered in the head's binary", request.name));
        };
        let mut args = Vec::with_capacity(request.args.len());
        let mut inputs = Vec::new();
        {
            let state = self.state.lock();
            let Some(node) = state.nodes.get(&node_id) else { return };
            for arg in request.args {
                let kind = match arg {
                    SpawnArg::Source(ArgSource::Inline(bytes)) => RemoteArgKind::Value(bytes),
                    SpawnArg::Source(ArgSource::Fetch { addr, id }) => {
                        RemoteArgKind::Held { addr, id, len: 0 }
                    }
                    SpawnArg::Held { addr, id, len } => RemoteArgKind::Held { addr, id, len },
                    SpawnArg::Spawned(earlier) => match node.spawned.get(&earlier) {
                        Some(inner) => {
                            inputs.push(Dependency(inner.clone()));
                            RemoteArgKind::Ref(inner.id)
                        }
                        None => {
                            drop(state);
                            return refuse(format!(
                                "an argument is the result of spawn {earlier}, which this node released"
                            ));
                        }
                    },
                };
                args.push(RemoteArg(kind));
            }
        }
        let output = self.table.create_pending();
        let holder = Arc::new(RefInner { id: output, table: self.table.clone() });
        let mut options = TaskOptions::new().retries(request.retries);
        options.gpu = request.gpu;
        options.xla = request.xla;
        let job = spawned_by_node(&core, entry, output, options, args, inputs);
        match self.state.lock().nodes.get_mut(&node_id) {
            Some(node) => node.spawned.insert(spawn_id, holder),
            None => return, // (the holder drops after the lock: see invariant 2)
        };
        self.answer_when_done(node_id, spawn_id, output);
        submit_when_ready(job);
    }

    /// Answers the node's spawn `spawn_id` once the head's `output` is done.
    fn answer_when_done(self: &Arc<Self>, node_id: u64, spawn_id: u64, output: ObjectId) {
        let head = Arc::downgrade(self);
        self.table.subscribe(
            output,
            Box::new(move |outcome| {
                if let Some(head) = head.upgrade() {
                    head.spawn_finished(node_id, spawn_id, output, outcome);
                }
            }),
        );
    }

    /// Tells the node how its spawn `spawn_id` (the head's `output`) ended.
    fn spawn_finished(&self, node_id: u64, spawn_id: u64, output: ObjectId, outcome: Outcome) {
        let result = match outcome {
            Outcome::Ready(value) => match value.view() {
                View::Remote(location) => {
                    Ok(SpawnedValue::Held { addr: location.addr, id: location.id, len: location.len })
                }
                _ => match value.encode() {
                    Ok(bytes) if bytes.len() <= INLINE_LIMIT => Ok(SpawnedValue::Inline(bytes)),
                    Ok(bytes) => Ok(SpawnedValue::Held {
                        addr: self.addr,
                        id: output.as_u64(),
                        len: bytes.len() as u64,
                    }),
                    Err(error) => {
                        Err(RemoteTaskError { kind: RemoteErrorKind::Failed, message: error.to_string() })
                    }
                },
            },
            Outcome::Failed(error) => Err(match &*error {
                Error::TaskPanicked { message, .. } => {
                    RemoteTaskError { kind: RemoteErrorKind::Panicked, message: message.clone() }
                }
                Error::TaskFailed { message, .. } => {
                    RemoteTaskError { kind: RemoteErrorKind::Failed, message: message.clone() }
                }
                other => RemoteTaskError { kind: RemoteErrorKind::Failed, message: other.to_string() },
            }),
        };
        let keep = matches!(result, Ok(SpawnedValue::Held { .. }));
        self.answer_spawn(node_id, spawn_id, result, keep);
    }

    /// Sends `SpawnDone`; unless `keep`, the head stops keeping the result for the node.
    fn answer_spawn(
        &self,
        node_id: u64,
        spawn_id: u64,
        result: std::result::Result<SpawnedValue, RemoteTaskError>,
        keep: bool,
    ) {
        let released = {
            let mut state = self.state.lock();
            let Some(node) = state.nodes.get_mut(&node_id) else { return };
            let _ = node.sender.send(Message::SpawnDone { spawn_id, result });
            if keep {
                None
            } else {
                node.spawned.remove(&spawn_id)
            }
        };
        drop(released);
    }

    /// Follows the rebuild of results the head keeps for nodes' spawns (their holder was
    /// lost; `rebuilt` went back to pending): each node is told the new holder with another
    /// `SpawnDone` once the value is made again.
    pub(super) fn follow_rebuilt_spawns(self: &Arc<Self>, rebuilt: &[ObjectId]) {
        let followed: Vec<(u64, u64, ObjectId)> = {
            let state = self.state.lock();
            let rebuilt: std::collections::HashSet<&ObjectId> = rebuilt.iter().collect();
            state
                .nodes
                .iter()
                .flat_map(|(node_id, node)| {
                    node.spawned
                        .iter()
                        .filter(|(_, inner)| rebuilt.contains(&inner.id))
                        .map(|(spawn_id, inner)| (*node_id, *spawn_id, inner.id))
                })
                .collect()
        };
        for (node_id, spawn_id, output) in followed {
            self.answer_when_done(node_id, spawn_id, output);
        }
    }

    /// The node dropped its last `Ref`s to the results of `spawn_ids`.
    pub(super) fn release_spawns(&self, node_id: u64, spawn_ids: Vec<u64>) {
        let released: Vec<Arc<RefInner>> = {
            let mut state = self.state.lock();
            let Some(node) = state.nodes.get_mut(&node_id) else { return };
            spawn_ids.iter().filter_map(|id| node.spawned.remove(id)).collect()
        };
        drop(released);
    }
}
