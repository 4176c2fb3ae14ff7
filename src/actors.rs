//! The in-process runtime: workers, the object table, `Ref`s, named tasks and user actors.
//!
//! A [`Runtime`] owns a pool of worker threads that run tasks, an object table that holds
//! every value a [`Ref`] names, and an actix system whose arbiters host user actors.
//!
//! # Ordering
//! Calls to one actor run one at a time, in arrival order per caller. Tasks run when their
//! `Ref` inputs are ready; independent tasks run in no particular order.
//!
//! # Shutdown
//! [`Runtime::shutdown`] (or dropping the last handle made by the builder) refuses new
//! work, lets running tasks and actor calls finish, fails every queued or waiting task and
//! every value not yet produced with [`Error::Shutdown`](crate::Error::Shutdown), and joins
//! every thread it started.
pub(crate) mod object;
pub(crate) mod pool;
pub(crate) mod reference;
pub(crate) mod runtime;
mod sched;
mod stats;
pub(crate) mod task;
pub(crate) mod user_actor;

pub use object::ObjectId;
pub(crate) use reference::save_ref;
pub use reference::{Arg, Payload, Ref};
pub use runtime::{Builder, Runtime};
pub use sched::{Fifo, Locality, Placement, PlacementRequest, RoundRobin, SchedulingPolicy};
pub use stats::RuntimeStats;
pub use task::{NodeRunner, TaskEntry, TaskOptions};
#[doc(hidden)]
pub use user_actor::{create_actor as __create_actor, ActorEntry as __ActorEntry, CreateActor, ErasedActor};
pub use user_actor::{Actor, ActorHandle, RemoteActor};

#[doc(hidden)]
pub use reference::Dependency as __Dependency;
#[doc(hidden)]
pub use reference::RemoteArg as __RemoteArg;
#[doc(hidden)]
pub use task::{
    spawn_task as __spawn_task, wants_remote as __wants_remote, NodeArgs as __NodeArgs,
    TaskOutput as __TaskOutput,
};
