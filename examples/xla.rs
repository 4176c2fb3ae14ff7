//! One model definition on two devices: the MLP and the LeNet-style CNN train on the bundled
//! digits data with the CPU executor and on an XLA device (a PJRT plugin compiling the same
//! op graph to StableHLO), from the same initial parameters; each epoch prints its loss and
//! throughput, and the end compares test accuracy. Without a plugin it says so and skips.
//!
//! Run it: `cargo run --release --features xla --example xla` (`scripts/install-deps.sh`
//! installs the CPU plugin; `TESSERA_PJRT_PLUGIN` names another, e.g. JAX's CUDA plugin).
#[cfg(feature = "xla")]
fn main() -> anyhow::Result<()> {
    use anyhow::ensure;
    use tessera::nn::{
        lenet, mlp, Dataset, Evaluator, Model, OptimizerConfig, TrainState, Trainer, XlaTrainer,
    };

    let device = match tessera::XlaDevice::open_default() {
        Ok(device) => device,
        Err(e) => {
            println!("no XLA device, skipped: {e}");
            return Ok(());
        }
    };
    println!("XLA device: platform {:?}", device.platform());
    let data = Dataset::digits(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))?;
    let (train, test) = data.split(0.2, 42);
    type Build = fn(usize) -> Result<Model, tessera::nn::NnError>;
    let cases: [(&str, Build, usize); 2] = [
        ("MLP 64-128-64-10", |b| mlp(b, &[64, 128, 64, 10]), 15),
        ("CNN (LeNet-style)", |b| lenet(b, 8, 10), 10),
    ];
    for (name, build, epochs) in cases {
        println!("\n{name}, {epochs} epochs, batch 32, Adam 3e-3:");
        let model = build(32)?;
        let mut cpu_state = TrainState::new(&model, OptimizerConfig::adam(3e-3), train.len(), 32, 1);
        let mut xla_state = cpu_state.clone();
        let mut cpu = Trainer::new(model.clone());
        let mut xla = XlaTrainer::new(device.clone(), model, &xla_state)?;
        for epoch in 1..=epochs {
            let c = cpu.train_epoch(&mut cpu_state, &train)?;
            let x = xla.train_epoch(&mut xla_state, &train)?;
            println!(
                "  epoch {epoch:2}: loss CPU {:.4} / XLA {:.4}   samples/s CPU {:8.0} / XLA {:8.0}",
                c.loss,
                x.loss,
                c.samples_per_second(),
                x.samples_per_second()
            );
        }
        let mut evaluator = Evaluator::new(build(test.len())?);
        let cpu_acc = evaluator.classify(&cpu_state.params, &test)?.accuracy;
        let xla_acc = evaluator.classify(&xla_state.params, &test)?.accuracy;
        println!("  test accuracy: CPU {:.2} %, XLA {:.2} %", 100.0 * cpu_acc, 100.0 * xla_acc);
        ensure!(
            xla_acc > 0.9 && (xla_acc - cpu_acc).abs() < 0.03,
            "{name}: XLA accuracy {xla_acc} vs CPU {cpu_acc}"
        );
    }
    Ok(())
}

#[cfg(not(feature = "xla"))]
fn main() {
    println!("this example needs `--features xla`: cargo run --release --features xla --example xla");
}
