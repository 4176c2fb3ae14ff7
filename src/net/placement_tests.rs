//! Placement by device, tested against scripted nodes: peers on 127.0.0.1 that do the real
//! handshake and registration and answer tasks by hand, so that a node reporting a GPU can
//! be tested on a machine without one (real node processes report what they find; see
//! `tests/placement.rs`).
#![allow(unreachable_pub, dead_code)] // items the `task!` macro generates for a test-only task
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::auth::{client_handshake, ClusterKey};
use super::frame::{encode_frame, read_frame, write_frame};
use super::wire::{ArgSource, Message, ReplyValue, Role, TaskReply};
use crate::devices::GpuInfo;
use crate::{Cluster, ClusterConfig, Error, Runtime, TaskOptions};

crate::task! {
    fn triple(x: u64) -> u64 { x * 3 }
}

crate::task! {
    /// Returns a `Ref`, so it runs where it was spawned, never on a node.
    fn triple_here(x: u64) -> Ref<u64> { Runtime::current().expect("in a task").put(x * 3) }
}

const SECRET: &str = "placement-test";

fn test_gpu() -> GpuInfo {
    GpuInfo { ordinal: 0, name: "Scripted GPU".into(), total_memory: 80 << 30 }
}

fn start_cluster() -> (Runtime, Cluster) {
    let rt = Runtime::builder().workers(2).actor_threads(1).build().expect("runtime");
    let config = ClusterConfig {
        secret: Some(SECRET.into()),
        // Scripted nodes send no heartbeats.
        heartbeat_timeout: Duration::from_secs(120),
        ..ClusterConfig::default()
    };
    let cluster = Cluster::start(&rt, config).expect("cluster");
    (rt, cluster)
}

async fn connect(cluster: &Cluster, name: &str) -> TcpStream {
    let mut stream = TcpStream::connect(cluster.addr()).await.expect("connect");
    client_handshake(&mut stream, &ClusterKey::from_secret(SECRET), Role::Node, name)
        .await
        .expect("handshake");
    stream
}

/// A scripted node that registered with `gpus`.
async fn scripted_node(cluster: &Cluster, name: &str, gpus: Vec<GpuInfo>) -> (OwnedReadHalf, OwnedWriteHalf) {
    let stream = connect(cluster, name).await;
    let (mut reader, mut writer) = stream.into_split();
    let register =
        Message::Register { data_addr: "127.0.0.1:9".parse().expect("addr"), slots: 4, pid: 1, gpus };
    write_frame(&mut writer, &register).await.expect("register");
    writer.flush().await.expect("flush");
    match read_frame::<Message, _>(&mut reader).await.expect("registered") {
        Message::Registered { .. } => {}
        other => panic!("expected Registered, got {other:?}"),
    }
    (reader, writer)
}

fn decode_u64(bytes: &[u8]) -> u64 {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard()).expect("u64").0
}

#[test]
fn gpu_tasks_go_only_to_nodes_that_reported_a_gpu() {
    let (rt, cluster) = start_cluster();
    let net = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let ((mut cpu_reader, _cpu_writer), (mut gpu_reader, mut gpu_writer)) = net.block_on(async {
        let cpu = scripted_node(&cluster, "cpu-node", Vec::new()).await;
        let gpu = scripted_node(&cluster, "gpu-node", vec![test_gpu()]).await;
        (cpu, gpu)
    });
    cluster.wait_for_nodes(2, Duration::from_secs(10)).expect("nodes");

    // The head knows which node has which devices.
    let nodes = cluster.nodes();
    let gpu_node = nodes.iter().find(|n| n.name == "gpu-node").expect("gpu-node");
    let cpu_node = nodes.iter().find(|n| n.name == "cpu-node").expect("cpu-node");
    assert_eq!(gpu_node.gpus, vec![test_gpu()]);
    assert!(cpu_node.gpus.is_empty());
    assert_eq!(cluster.gpu_nodes(), vec![(gpu_node.id, vec![test_gpu()])]);

    // Eight GPU tasks: all of them reach the GPU node, none the CPU node (which is less
    // loaded after the first few, so least-loaded placement alone would pick it).
    let refs: Vec<_> = (0..8_u64).map(|i| triple::spawn_with(&rt, TaskOptions::new().on_gpu(), i)).collect();
    net.block_on(async {
        let mut answered = 0;
        while answered < refs.len() {
            let message =
                tokio::time::timeout(Duration::from_secs(10), read_frame::<Message, _>(&mut gpu_reader))
                    .await
                    .expect("the GPU node got its tasks in time")
                    .expect("frame");
            let Message::RunTasks(requests) = message else { continue };
            let mut replies = Vec::new();
            for request in requests {
                assert!(request.name.ends_with("::triple"), "{}", request.name);
                let ArgSource::Inline(bytes) = &request.args[0] else { panic!("inline argument expected") };
                let value = decode_u64(bytes) * 3;
                let encoded =
                    bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("encode");
                replies.push(TaskReply { task_id: request.task_id, result: Ok(ReplyValue::Inline(encoded)) });
                answered += 1;
            }
            write_frame(&mut gpu_writer, &Message::TasksDone(replies)).await.expect("reply");
            gpu_writer.flush().await.expect("flush");
        }
        let stray =
            tokio::time::timeout(Duration::from_millis(300), read_frame::<Message, _>(&mut cpu_reader)).await;
        assert!(stray.is_err(), "the CPU node got a message: {stray:?}");
    });
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(r.blocking_get_timeout(Duration::from_secs(10)).expect("value"), i as u64 * 3);
    }
    // A GPU task that cannot run on a node fails at once here, where there is no GPU,
    // and the error says that a node did have one.
    if crate::devices::gpu_absence_reason().is_some() {
        let here = triple_here::spawn_with(&rt, TaskOptions::new().on_gpu(), 1);
        match here.blocking_get_timeout(Duration::from_secs(5)) {
            Err(Error::NoGpu { nodes: 2, gpu_nodes: 1, .. }) => {}
            other => panic!("expected NoGpu with 1 of 2 GPU nodes, got {other:?}"),
        }
    }
    rt.shutdown();
}

#[test]
fn a_gpu_task_fails_at_once_when_no_node_has_a_gpu() {
    if crate::devices::gpu_absence_reason().is_none() {
        eprintln!("skipped: this process has a GPU, so a GPU task would run here");
        return;
    }
    let (rt, cluster) = start_cluster();
    let net = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let _nodes = net.block_on(async {
        (
            scripted_node(&cluster, "cpu-a", Vec::new()).await,
            scripted_node(&cluster, "cpu-b", Vec::new()).await,
        )
    });
    cluster.wait_for_nodes(2, Duration::from_secs(10)).expect("nodes");
    assert!(cluster.gpu_nodes().is_empty());
    let start = Instant::now();
    let r = triple::spawn_with(&rt, TaskOptions::new().on_gpu(), 5);
    match r.blocking_get_timeout(Duration::from_secs(10)) {
        Err(Error::NoGpu { task, nodes, gpu_nodes, local }) => {
            assert!(task.ends_with("::triple"), "{task}");
            assert_eq!((nodes, gpu_nodes), (2, 0));
            assert!(!local.is_empty());
        }
        other => panic!("expected NoGpu, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    rt.shutdown();
}

#[test]
fn a_malformed_registration_closes_only_that_connection() {
    let (rt, cluster) = start_cluster();
    let net = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    net.block_on(async {
        let stream = connect(&cluster, "broken").await;
        let (mut reader, mut writer) = stream.into_split();
        // A registration whose device list is cut short.
        let register = Message::Register {
            data_addr: "127.0.0.1:9".parse().expect("addr"),
            slots: 1,
            pid: 1,
            gpus: vec![test_gpu(), test_gpu()],
        };
        let mut frame = encode_frame(&register).expect("frame");
        frame.truncate(frame.len() - 20);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        writer.write_all(&frame).await.expect("write");
        writer.flush().await.expect("flush");
        let answer = tokio::time::timeout(Duration::from_secs(5), read_frame::<Message, _>(&mut reader))
            .await
            .expect("the head answered in time");
        assert!(answer.is_err(), "the head kept a malformed registration: {answer:?}");
        // The head still registers a well-formed node.
        let _node = scripted_node(&cluster, "fine", vec![test_gpu()]).await;
        cluster.wait_for_nodes(1, Duration::from_secs(5)).expect("node");
        let names: Vec<String> = cluster.nodes().into_iter().map(|n| n.name).collect();
        assert_eq!(names, vec!["fine".to_string()]);
    });
    rt.shutdown();
}
