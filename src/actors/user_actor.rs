//! User actors: a state object hosted by an actix actor on one of the runtime's actor
//! threads; each call returns a `Ref` to its reply.
//!
//! # Ordering
//! Calls run one at a time, in the order they arrived from each caller (actix mailboxes
//! are FIFO).
//!
//! # Failure
//! A call that panics fails its `Ref` with `Error::ActorFailed`; the actor then stops (its
//! state may be half-updated), and every later call fails the same way. Calls still queued
//! when the runtime shuts down fail with `Error::ActorFailed`.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::{Actor as ActixActor, ActorContext, Addr, Arbiter, ArbiterHandle, Context, Handler};
use parking_lot::Mutex;

use super::object::{ObjectId, ObjectTable, Outcome};
use super::reference::{store, Payload, Ref, RefInner};
use crate::error::panic_message;
use crate::Error;

/// A user actor: state plus one message type whose calls return replies.
///
/// # Examples
/// ```
/// struct Counter(u64);
///
/// impl tessera::Actor for Counter {
///     type Message = u64;
///     type Reply = u64;
///     fn handle(&mut self, add: u64) -> u64 {
///         self.0 += add;
///         self.0
///     }
/// }
///
/// let rt = tessera::Runtime::local()?;
/// let counter = rt.actor(Counter(0));
/// counter.call(2);
/// assert_eq!(counter.call(3).blocking_get()?, 5);
/// # rt.shutdown();
/// # Ok::<(), tessera::Error>(())
/// ```
pub trait Actor: Send + 'static {
    /// What callers send.
    type Message: Send + 'static;
    /// What each call returns.
    type Reply: Payload;
    /// Handles one call.
    fn handle(&mut self, message: Self::Message) -> Self::Reply;
}

/// A handle to a running user actor. Cheap to clone.
pub struct ActorHandle<A: Actor> {
    addr: Option<Addr<Shell<A>>>,
    table: Arc<ObjectTable>,
}

impl<A: Actor> Clone for ActorHandle<A> {
    fn clone(&self) -> Self {
        ActorHandle { addr: self.addr.clone(), table: self.table.clone() }
    }
}

impl<A: Actor> ActorHandle<A> {
    /// Sends one call; the `Ref` holds the reply once the actor has handled it.
    pub fn call(&self, message: A::Message) -> Ref<A::Reply> {
        let id = self.table.create_pending();
        let reply = Ref::from_inner(Arc::new(RefInner { id, table: self.table.clone() }));
        let call = Call::<A> { message: Some(message), output: Some(id), table: self.table.clone() };
        match &self.addr {
            Some(addr) => addr.do_send(call),
            None => drop(call), // fails the reply: the actor never started
        }
        reply
    }
}

/// The actix actor that hosts user state.
struct Shell<A: Actor> {
    // Boxed: actix needs `Unpin` actors, user state need not be.
    state: Option<Box<A>>,
}

impl<A: Actor> ActixActor for Shell<A> {
    type Context = Context<Self>;
}

/// One call in an actor's mailbox. If it is dropped unhandled, its reply fails.
struct Call<A: Actor> {
    message: Option<A::Message>,
    output: Option<ObjectId>,
    table: Arc<ObjectTable>,
}

impl<A: Actor> actix::Message for Call<A> {
    type Result = ();
}

impl<A: Actor> Drop for Call<A> {
    fn drop(&mut self) {
        if let Some(id) = self.output.take() {
            let error = Error::ActorFailed {
                actor: std::any::type_name::<A>().to_string(),
                message: "the actor stopped before handling the call".into(),
            };
            self.table.complete(id, Outcome::Failed(Arc::new(error)), 0);
        }
    }
}

impl<A: Actor> Handler<Call<A>> for Shell<A> {
    type Result = ();

    fn handle(&mut self, mut call: Call<A>, ctx: &mut Context<Self>) {
        let (Some(id), Some(message)) = (call.output.take(), call.message.take()) else {
            return;
        };
        let actor = std::any::type_name::<A>();
        let outcome = match self.state.as_mut() {
            None => Err(Error::ActorFailed {
                actor: actor.to_string(),
                message: "the actor stopped after a panic".into(),
            }),
            Some(state) => match catch_unwind(AssertUnwindSafe(|| state.handle(message))) {
                Ok(reply) => Ok(store(reply)),
                Err(payload) => {
                    self.state = None;
                    ctx.stop();
                    Err(Error::ActorFailed {
                        actor: actor.to_string(),
                        message: format!("panicked: {}", panic_message(&*payload)),
                    })
                }
            },
        };
        match outcome {
            Ok((value, bytes)) => call.table.complete(id, Outcome::Ready(value), bytes),
            Err(error) => call.table.complete(id, Outcome::Failed(Arc::new(error)), 0),
        };
    }
}

/// The actix system and its arbiters (one thread each) that host user actors.
pub(crate) struct ActorSystem {
    arbiters: Vec<ArbiterHandle>,
    next: AtomicUsize,
    control: Mutex<Option<Control>>,
    start_error: Option<String>,
}

struct Control {
    system: actix::System,
    arbiters: Vec<Arbiter>,
    thread: std::thread::JoinHandle<()>,
}

impl ActorSystem {
    /// Starts the system on its own thread with `threads` arbiters; `on_thread` runs first
    /// on each arbiter thread.
    pub(crate) fn start(threads: usize, on_thread: impl Fn() + Send + Sync + Clone + 'static) -> ActorSystem {
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().name("tessera-actors".into()).spawn(move || {
            let system = actix::System::new();
            system.block_on(async {
                let arbiters: Vec<Arbiter> = (0..threads).map(|_| Arbiter::new()).collect();
                for arbiter in &arbiters {
                    let on_thread = on_thread.clone();
                    arbiter.spawn_fn(on_thread);
                }
                let _ = tx.send((actix::System::current(), arbiters));
            });
            let _ = system.run();
        });
        let failed = |message: String| ActorSystem {
            arbiters: Vec::new(),
            next: AtomicUsize::new(0),
            control: Mutex::new(None),
            start_error: Some(message),
        };
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => return failed(format!("cannot start the actor thread: {e}")),
        };
        match rx.recv() {
            Ok((system, arbiters)) => ActorSystem {
                arbiters: arbiters.iter().map(|a| a.handle()).collect(),
                next: AtomicUsize::new(0),
                control: Mutex::new(Some(Control { system, arbiters, thread })),
                start_error: None,
            },
            Err(_) => failed("the actor system failed to start".into()),
        }
    }

    pub(crate) fn start_error(&self) -> Option<Error> {
        self.start_error.clone().map(Error::Startup)
    }

    pub(crate) fn start_actor<A: Actor>(
        &self,
        state: A,
        table: Arc<ObjectTable>,
        refused: bool,
    ) -> ActorHandle<A> {
        if refused || self.arbiters.is_empty() || self.control.lock().is_none() {
            return ActorHandle { addr: None, table };
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        let shell = Shell { state: Some(Box::new(state)) };
        let addr = Shell::start_in_arbiter(&self.arbiters[index], move |_| shell);
        ActorHandle { addr: Some(addr), table }
    }

    /// Stops every arbiter and the system, and joins their threads.
    pub(crate) fn stop(&self) {
        let Some(control) = self.control.lock().take() else {
            return;
        };
        for arbiter in &control.arbiters {
            arbiter.stop();
        }
        for arbiter in control.arbiters {
            let _ = arbiter.join();
        }
        control.system.stop();
        let _ = control.thread.join();
    }
}
