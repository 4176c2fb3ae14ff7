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
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::object::StoredValue;
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

/// An actor that can live on a node process: its state and messages travel encoded, and
/// its type is registered by name with [`remote_actor!`](crate::remote_actor).
pub trait RemoteActor: Actor + Serialize + DeserializeOwned
where
    Self::Message: Serialize + DeserializeOwned,
{
    /// The stable name the type is registered under.
    const NAME: &'static str;
}

/// A hosted actor of a registered type, driven with encoded messages (on a node process).
#[doc(hidden)]
pub trait ErasedActor: Send {
    /// Handles one encoded message, returning the encoded reply.
    fn handle_encoded(&mut self, message: &[u8]) -> Result<Vec<u8>, Error>;
}

impl<A: RemoteActor> ErasedActor for A
where
    A::Message: Serialize + DeserializeOwned,
{
    fn handle_encoded(&mut self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let message: A::Message = decode_value_bytes(message)?;
        let reply = self.handle(message);
        reply.encode()
    }
}

/// An actor type registered for node processes (by [`remote_actor!`](crate::remote_actor)).
#[doc(hidden)]
pub struct ActorEntry {
    /// The stable name.
    pub name: &'static str,
    /// Makes the actor from its encoded state.
    pub create: CreateActor,
}

/// Makes a hosted actor from its encoded state.
#[doc(hidden)]
pub type CreateActor = fn(&[u8]) -> Result<Box<dyn ErasedActor>, Error>;

inventory::collect!(ActorEntry);

impl ActorEntry {
    /// The actor type registered under `name`, if any.
    pub fn find(name: &str) -> Option<&'static ActorEntry> {
        inventory::iter::<ActorEntry>.into_iter().find(|entry| entry.name == name)
    }
}

/// Makes an actor from its encoded state (used by `remote_actor!`).
#[doc(hidden)]
pub fn create_actor<A: RemoteActor>(state: &[u8]) -> Result<Box<dyn ErasedActor>, Error>
where
    A::Message: Serialize + DeserializeOwned,
{
    let actor: A = decode_value_bytes(state)?;
    Ok(Box::new(actor))
}

fn decode_value_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    crate::codec::decode_slice(bytes)
        .map(|(value, _)| value)
        .map_err(|e| Error::Codec { type_name: std::any::type_name::<T>(), message: e.to_string() })
}

/// Registers an actor type so that node processes can host it: the type must implement
/// [`Actor`] and serde's traits, and so must its message type.
///
/// # Examples
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
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
/// tessera::remote_actor!(Counter);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! remote_actor {
    ($actor:ty) => {
        impl $crate::RemoteActor for $actor {
            const NAME: &'static str = concat!(module_path!(), "::", stringify!($actor));
        }
        $crate::__private::inventory::submit! {
            $crate::__ActorEntry {
                name: concat!(module_path!(), "::", stringify!($actor)),
                create: $crate::__create_actor::<$actor>,
            }
        }
    };
}

/// Where a remote actor lives: sends its calls (implemented by the cluster head).
pub(crate) trait RemoteActorLink: Send + Sync + 'static {
    /// Sends one encoded call whose reply completes `output`.
    fn call(&self, output: ObjectId, message: Vec<u8>);
}

enum Target<A: Actor> {
    Local(Option<Addr<Shell<A>>>),
    Remote { link: Arc<dyn RemoteActorLink>, encode: fn(A::Message) -> Result<Vec<u8>, Error> },
}

impl<A: Actor> Clone for Target<A> {
    fn clone(&self) -> Self {
        match self {
            Target::Local(addr) => Target::Local(addr.clone()),
            Target::Remote { link, encode } => Target::Remote { link: link.clone(), encode: *encode },
        }
    }
}

/// A handle to a running user actor, in this process or on a node. Cheap to clone.
pub struct ActorHandle<A: Actor> {
    target: Target<A>,
    table: Arc<ObjectTable>,
}

impl<A: Actor> Clone for ActorHandle<A> {
    fn clone(&self) -> Self {
        ActorHandle { target: self.target.clone(), table: self.table.clone() }
    }
}

impl<A: Actor> ActorHandle<A> {
    /// A handle to an actor hosted on a node.
    pub(crate) fn remote(table: Arc<ObjectTable>, link: Arc<dyn RemoteActorLink>) -> Self
    where
        A: RemoteActor,
        A::Message: Serialize + DeserializeOwned,
    {
        fn encode<M: Serialize>(message: M) -> Result<Vec<u8>, Error> {
            bincode::serde::encode_to_vec(&message, bincode::config::standard())
                .map_err(|e| Error::Codec { type_name: std::any::type_name::<M>(), message: e.to_string() })
        }
        ActorHandle { target: Target::Remote { link, encode: encode::<A::Message> }, table }
    }

    /// Sends one call; the `Ref` holds the reply once the actor has handled it.
    pub fn call(&self, message: A::Message) -> Ref<A::Reply> {
        let id = self.table.create_pending();
        let reply = Ref::from_inner(Arc::new(RefInner { id, table: self.table.clone() }));
        match &self.target {
            Target::Local(addr) => {
                let call = Call::<A> { message: Some(message), output: Some(id), table: self.table.clone() };
                match addr {
                    Some(addr) => addr.do_send(call),
                    None => drop(call), // fails the reply: the actor never started
                }
            }
            Target::Remote { link, encode } => match encode(message) {
                Ok(bytes) => link.call(id, bytes),
                Err(error) => {
                    self.table.complete(id, Outcome::Failed(Arc::new(error)), 0);
                }
            },
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
            return ActorHandle { target: Target::Local(None), table };
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        let shell = Shell { state: Some(Box::new(state)) };
        let addr = Shell::start_in_arbiter(&self.arbiters[index], move |_| shell);
        ActorHandle { target: Target::Local(Some(addr)), table }
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
