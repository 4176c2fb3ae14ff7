//! `InOrder`: hands one connection's messages of one kind to a thread of their own, in
//! arrival order. Their handling may block or run user waiters, so it stays off the
//! connection's reader; one thread (started at the first message) bounds the threads a
//! burst can take and keeps the order the peer sent them in.
use std::sync::mpsc;
use std::sync::Arc;

pub(crate) struct InOrder<T: Send + 'static> {
    name: String,
    handle: Arc<dyn Fn(T) + Send + Sync>,
    sender: Option<mpsc::Sender<T>>,
}

impl<T: Send + 'static> InOrder<T> {
    /// Messages pushed are given to `handle` on a thread called `name`.
    pub(crate) fn new(name: String, handle: impl Fn(T) + Send + Sync + 'static) -> Self {
        InOrder { name, handle: Arc::new(handle), sender: None }
    }

    /// Queues `item` for the thread (starting it first if need be); without a thread, it
    /// is handled here.
    pub(crate) fn push(&mut self, item: T) {
        if self.sender.is_none() {
            let (sender, receiver) = mpsc::channel::<T>();
            let handle = self.handle.clone();
            let started = std::thread::Builder::new().name(self.name.clone()).spawn(move || {
                for item in receiver {
                    handle(item);
                }
            });
            match started {
                Ok(_) => self.sender = Some(sender),
                Err(error) => {
                    tracing::warn!(thread = %self.name, %error, "cannot start a thread; handling here")
                }
            }
        }
        let item = match &self.sender {
            Some(sender) => match sender.send(item) {
                Ok(()) => return,
                Err(mpsc::SendError(item)) => item,
            },
            None => item,
        };
        (self.handle)(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[test]
    fn items_are_handled_in_order_on_one_other_thread() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let here = std::thread::current().id();
        let record = seen.clone();
        let mut in_order = InOrder::new("in-order-test".into(), move |i: u32| {
            record.lock().push((i, std::thread::current().id()))
        });
        for i in 0..1000 {
            in_order.push(i);
        }
        drop(in_order);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.lock().len() < 1000 {
            assert!(std::time::Instant::now() < deadline, "only {} handled", seen.lock().len());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let seen = seen.lock();
        assert!(seen.iter().map(|(i, _)| *i).eq(0..1000), "out of order");
        let thread = seen[0].1;
        assert!(thread != here && seen.iter().all(|(_, t)| *t == thread), "not one other thread");
    }
}
