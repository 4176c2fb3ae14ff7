//! The `tasks` suite: overhead of the in-process runtime (spawn, chains, round trips,
//! actor calls). Each case runs several times and reports the median.
use std::time::Instant;

use anyhow::Result;
use tessera::{Actor, Runtime};

use super::{median, Reporter};

tessera::task! {
    /// An empty task.
    fn empty() {}
}

tessera::task! {
    /// A task that depends on the previous one in a chain.
    fn link(_previous: ()) {}
}

struct Counter(u64);

impl Actor for Counter {
    type Message = u64;
    type Reply = u64;
    fn handle(&mut self, add: u64) -> u64 {
        self.0 += add;
        self.0
    }
}

const RUNS: usize = 5;

pub(crate) fn run(reporter: &Reporter) -> Result<()> {
    let rt = Runtime::local()?;
    let mut samples = Vec::new();

    for _ in 0..RUNS {
        const N: usize = 100_000;
        let start = Instant::now();
        let refs: Vec<_> = (0..N).map(|_| empty::spawn(&rt)).collect();
        for r in &refs {
            r.blocking_get()?;
        }
        drop(refs);
        samples.push(N as f64 / start.elapsed().as_secs_f64());
    }
    reporter.report("tasks/independent", median(&mut samples), "tasks/s", true);

    samples.clear();
    for _ in 0..RUNS {
        const N: usize = 10_000;
        let start = Instant::now();
        let mut previous = empty::spawn(&rt);
        for _ in 1..N {
            previous = link::spawn(&rt, &previous);
        }
        previous.blocking_get()?;
        samples.push(start.elapsed().as_secs_f64() * 1e6 / N as f64);
    }
    reporter.report("tasks/chain", median(&mut samples), "us/task", false);

    samples.clear();
    for _ in 0..1000 {
        empty::spawn(&rt).blocking_get()?; // warm up
    }
    for _ in 0..10_000 {
        let start = Instant::now();
        empty::spawn(&rt).blocking_get()?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    reporter.report("tasks/roundtrip", median(&mut samples), "us", false);

    samples.clear();
    let counter = rt.actor(Counter(0));
    for _ in 0..RUNS {
        const CALLERS: usize = 8;
        const CALLS: usize = 20_000;
        let start = Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let callers: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let counter = counter.clone();
                    scope.spawn(move || -> Result<()> {
                        // Pipelined: send a window of calls, then collect the replies.
                        for _ in 0..CALLS / 100 {
                            let replies: Vec<_> = (0..100).map(|_| counter.call(1)).collect();
                            for reply in replies {
                                reply.blocking_get()?;
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for caller in callers {
                caller.join().map_err(|_| anyhow::anyhow!("caller thread panicked"))??;
            }
            Ok(())
        })?;
        samples.push((CALLERS * CALLS) as f64 / start.elapsed().as_secs_f64());
    }
    reporter.report("tasks/actor_calls", median(&mut samples), "calls/s", true);
    rt.shutdown();
    Ok(())
}
