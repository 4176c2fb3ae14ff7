//! Placement by device, tested against scripted nodes: peers on 127.0.0.1 that do the real
//! handshake and registration and answer tasks by hand, so that a node reporting a GPU or
//! an XLA plugin can be tested on a machine without one (real node processes report what they find; see
//! `tests/placement.rs`).
#![allow(unreachable_pub, dead_code)] // items the `task!` macro generates for a test-only task
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::auth::{client_handshake, ClusterKey};
use super::frame::{encode_frame, read_frame, write_frame};
use super::wire::{ArgSource, Message, ReplyValue, Role, TaskReply};
use crate::devices::{GpuInfo, XlaInfo};
use crate::{Cluster, ClusterConfig, Error, Runtime, TaskOptions};

crate::task! {
    fn triple(x: u64) -> u64 { x * 3 }
}

crate::task! {
    /// Returns a `Ref`: runs on a node like any other task.
    fn triple_forwarded(x: u64) -> Ref<u64> { Runtime::current().expect("in a task").put(x * 3) }
}

/// A value that cannot be encoded, so a task taking it cannot run on a node.
#[derive(Clone, serde::Deserialize)]
struct Unencodable(u64);

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this value stays in its process"))
    }
}

crate::task! {
    /// Cannot run on a node: its argument does not encode.
    fn triple_here(x: Unencodable) -> u64 { x.0 * 3 }
}

crate::task! {
    fn shout(text: String) -> String { text.to_uppercase() }
}

const SECRET: &str = "placement-test";

fn test_gpu() -> GpuInfo {
    GpuInfo { ordinal: 0, name: "Scripted GPU".into(), total_memory: 80 << 30 }
}

fn test_xla() -> XlaInfo {
    XlaInfo { plugin: "/opt/scripted/pjrt_plugin.so".into(), pjrt_api: (0, 60) }
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

/// A scripted node that registered with `gpus` and `xla`.
async fn scripted_node(
    cluster: &Cluster,
    name: &str,
    gpus: Vec<GpuInfo>,
    xla: Option<XlaInfo>,
) -> (OwnedReadHalf, OwnedWriteHalf) {
    let stream = connect(cluster, name).await;
    let (mut reader, mut writer) = stream.into_split();
    let data_addr = "127.0.0.1:9".parse().expect("addr");
    let register = Message::Register { data_addr, slots: 4, pid: 1, gpus, xla };
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

/// Answers every `triple` (or `triple_forwarded`) task the node is sent, by hand, until the connection closes;
/// counts them in `ran`.
async fn answer_triples((mut reader, mut writer): (OwnedReadHalf, OwnedWriteHalf), ran: Arc<AtomicUsize>) {
    while let Ok(message) = read_frame::<Message, _>(&mut reader).await {
        let Message::RunTasks(requests) = message else { continue };
        let mut replies = Vec::new();
        for request in requests {
            let name = &request.name;
            assert!(name.ends_with("::triple") || name.ends_with("::triple_forwarded"), "{name}");
            let ArgSource::Inline(bytes) = &request.args[0] else { panic!("inline argument expected") };
            let encoded = bincode::serde::encode_to_vec(decode_u64(bytes) * 3, bincode::config::standard())
                .expect("encode");
            replies.push(TaskReply { task_id: request.task_id, result: Ok(ReplyValue::Inline(encoded)) });
            ran.fetch_add(1, Ordering::SeqCst);
        }
        write_frame(&mut writer, &Message::TasksDone(replies)).await.expect("reply");
        writer.flush().await.expect("flush");
    }
}

/// Scripted nodes, each registered with its devices and answering tasks on `net`; gives
/// each node's count of tasks run, in order.
fn serve_scripted_nodes(
    net: &tokio::runtime::Runtime,
    cluster: &Cluster,
    nodes: Vec<(&str, Vec<GpuInfo>, Option<XlaInfo>)>,
) -> Vec<Arc<AtomicUsize>> {
    let count = nodes.len();
    let ran: Vec<_> = nodes
        .into_iter()
        .map(|(name, gpus, xla)| {
            let node = net.block_on(scripted_node(cluster, name, gpus, xla));
            let ran = Arc::new(AtomicUsize::new(0));
            net.spawn(answer_triples(node, ran.clone()));
            ran
        })
        .collect();
    cluster.wait_for_nodes(count, Duration::from_secs(10)).expect("nodes");
    ran
}

/// Spawns `triple(i)` for i in 0..count with `options` and checks the values.
fn triples(rt: &Runtime, options: TaskOptions, count: u64) {
    let refs: Vec<_> = (0..count).map(|i| triple::spawn_with(rt, options, i)).collect();
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(r.blocking_get_timeout(Duration::from_secs(10)).expect("value"), i as u64 * 3);
    }
}

fn net_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio")
}

#[test]
fn gpu_tasks_go_only_to_nodes_that_reported_a_gpu() {
    let (rt, cluster) = start_cluster();
    let net = net_runtime();
    let ran = serve_scripted_nodes(
        &net,
        &cluster,
        vec![("cpu-node", Vec::new(), None), ("gpu-node", vec![test_gpu()], None)],
    );

    // The head knows which node has which devices.
    let nodes = cluster.nodes();
    let gpu_node = nodes.iter().find(|n| n.name == "gpu-node").expect("gpu-node");
    let cpu_node = nodes.iter().find(|n| n.name == "cpu-node").expect("cpu-node");
    assert_eq!(gpu_node.gpus, vec![test_gpu()]);
    assert!(cpu_node.gpus.is_empty());
    assert_eq!(cluster.gpu_nodes(), vec![(gpu_node.id, vec![test_gpu()])]);

    // Eight GPU tasks: all of them reach the GPU node, none the CPU node (which is less
    // loaded after the first few, so least-loaded placement alone would pick it).
    triples(&rt, TaskOptions::new().on_gpu(), 8);
    assert_eq!((ran[0].load(Ordering::SeqCst), ran[1].load(Ordering::SeqCst)), (0, 8));
    // So does one that returns a `Ref`.
    let forwarded = triple_forwarded::spawn_with(&rt, TaskOptions::new().on_gpu(), 5);
    assert_eq!(forwarded.blocking_get_timeout(Duration::from_secs(10)).expect("value"), 15);
    assert_eq!((ran[0].load(Ordering::SeqCst), ran[1].load(Ordering::SeqCst)), (0, 9));
    // A GPU task that cannot run on a node fails at once here, where there is no GPU,
    // and the error says that a node did have one.
    if crate::devices::gpu_absence_reason().is_some() {
        let here = triple_here::spawn_with(&rt, TaskOptions::new().on_gpu(), Unencodable(1));
        match here.blocking_get_timeout(Duration::from_secs(5)) {
            Err(Error::NoGpu { nodes: 2, gpu_nodes: 1, .. }) => {}
            other => panic!("expected NoGpu with 1 of 2 GPU nodes, got {other:?}"),
        }
    }
    rt.shutdown();
}

#[test]
fn xla_tasks_go_only_to_nodes_that_reported_an_xla_plugin() {
    let (rt, cluster) = start_cluster();
    let net = net_runtime();
    let ran = serve_scripted_nodes(
        &net,
        &cluster,
        vec![
            ("gpu-node", vec![test_gpu()], None),
            ("xla-node", Vec::new(), Some(test_xla())),
            ("gpu-xla-node", vec![test_gpu()], Some(test_xla())),
        ],
    );
    let ran = || ran.iter().map(|n| n.load(Ordering::SeqCst)).collect::<Vec<_>>();
    let nodes = cluster.nodes();
    let xla_node = nodes.iter().find(|n| n.name == "xla-node").expect("xla-node");
    let both = nodes.iter().find(|n| n.name == "gpu-xla-node").expect("gpu-xla-node");
    assert_eq!(xla_node.xla, Some(test_xla()));
    assert_eq!(cluster.xla_nodes(), vec![(xla_node.id, test_xla()), (both.id, test_xla())]);

    // Tasks that need both devices reach only the node that has both.
    triples(&rt, TaskOptions::new().on_gpu().on_xla(), 6);
    assert_eq!(ran(), vec![0, 0, 6]);
    // XLA tasks never reach the GPU-only node, however idle it is.
    triples(&rt, TaskOptions::new().on_xla(), 12);
    let after = ran();
    assert_eq!(after[0], 0, "{after:?}");
    assert_eq!(after[1] + after[2], 18, "{after:?}");
    assert!(after[1] > 0, "least-loaded placement among the XLA nodes: {after:?}");

    // An XLA task that cannot run on a node fails at once here, where there is no XLA,
    // and the error says that nodes did have it.
    if crate::devices::xla_absence_reason().is_some() {
        let here = triple_here::spawn_with(&rt, TaskOptions::new().on_xla(), Unencodable(1));
        match here.blocking_get_timeout(Duration::from_secs(5)) {
            Err(Error::NoXla { nodes: 3, xla_nodes: 2, .. }) => {}
            other => panic!("expected NoXla with 2 of 3 XLA nodes, got {other:?}"),
        }
    }
    rt.shutdown();
}

#[test]
fn an_xla_task_fails_at_once_when_no_node_has_an_xla_plugin() {
    if crate::devices::xla_absence_reason().is_none() {
        eprintln!("skipped: this process has an XLA plugin, so an XLA task would run here");
        return;
    }
    let (rt, cluster) = start_cluster();
    let net = net_runtime();
    let ran = serve_scripted_nodes(&net, &cluster, vec![("gpu-node", vec![test_gpu()], None)]);
    let start = Instant::now();
    let r = triple::spawn_with(&rt, TaskOptions::new().on_xla(), 5);
    match r.blocking_get_timeout(Duration::from_secs(10)) {
        Err(error @ Error::NoXla { .. }) => {
            let Error::NoXla { task, nodes, xla_nodes, local } = &error else { unreachable!() };
            assert!(task.ends_with("::triple"), "{task}");
            assert_eq!((*nodes, *xla_nodes), (1, 0));
            assert!(!local.is_empty());
            assert!(error.to_string().contains("0 of 1 cluster node(s) reported an XLA plugin"), "{error}");
        }
        other => panic!("expected NoXla, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    assert_eq!(ran[0].load(Ordering::SeqCst), 0);
    rt.shutdown();
}

#[test]
fn a_gpu_task_fails_at_once_when_no_node_has_a_gpu() {
    if crate::devices::gpu_absence_reason().is_none() {
        eprintln!("skipped: this process has a GPU, so a GPU task would run here");
        return;
    }
    let (rt, cluster) = start_cluster();
    let net = net_runtime();
    let ran = serve_scripted_nodes(
        &net,
        &cluster,
        vec![("cpu-a", Vec::new(), None), ("xla-b", Vec::new(), Some(test_xla()))],
    );
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
    assert_eq!(ran.iter().map(|n| n.load(Ordering::SeqCst)).sum::<usize>(), 0);
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
            xla: Some(test_xla()),
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
        let _node = scripted_node(&cluster, "fine", vec![test_gpu()], None).await;
        cluster.wait_for_nodes(1, Duration::from_secs(5)).expect("node");
        let names: Vec<String> = cluster.nodes().into_iter().map(|n| n.name).collect();
        assert_eq!(names, vec!["fine".to_string()]);
    });
    rt.shutdown();
}

/// A node (buggy, corrupt or hostile, but with the secret) answers a task with bytes whose
/// length prefix claims 2^63 - 1 bytes: reading the value is a decoding error in the
/// user's `get`, where it used to abort the head allocating that much.
#[test]
fn a_result_claiming_a_huge_length_is_an_error_not_an_abort() {
    let (rt, cluster) = start_cluster();
    let net = net_runtime();
    let node = net.block_on(scripted_node(&cluster, "poisoner", Vec::new(), None));
    cluster.wait_for_nodes(1, Duration::from_secs(10)).expect("node");
    net.spawn(async move {
        let (mut reader, mut writer) = node;
        while let Ok(message) = read_frame::<Message, _>(&mut reader).await {
            let Message::RunTasks(requests) = message else { continue };
            let poison = vec![0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
            let replies = requests
                .into_iter()
                .map(|r| TaskReply { task_id: r.task_id, result: Ok(ReplyValue::Inline(poison.clone())) })
                .collect();
            write_frame(&mut writer, &Message::TasksDone(replies)).await.expect("reply");
            writer.flush().await.expect("flush");
        }
    });
    match shout::spawn(&rt, "hi".to_string()).blocking_get_timeout(Duration::from_secs(10)) {
        Err(Error::Codec { message, .. }) => {
            assert!(message.contains("larger than its 9 bytes can hold"), "{message}")
        }
        other => panic!("expected a decoding error, got {other:?}"),
    }
    rt.shutdown();
}

/// Connections that never finish their handshake hold at most `MAX_PENDING_HANDSHAKES`
/// sockets: one more is closed at once, and once they are gone a node joins as usual.
#[test]
fn connections_beyond_the_pending_handshakes_are_closed_at_once() {
    use std::io::Read;
    let (rt, cluster) = start_cluster();
    let idle: Vec<std::net::TcpStream> = (0..super::auth::MAX_PENDING_HANDSHAKES)
        .map(|_| std::net::TcpStream::connect(cluster.addr()).expect("connect"))
        .collect();
    // (The head accepts them in order, so this one comes after them all.)
    let mut extra = std::net::TcpStream::connect(cluster.addr()).expect("connect");
    extra.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut byte = [0u8; 1];
    assert!(matches!(extra.read(&mut byte), Ok(0)), "the connection past the limit stays open");
    drop(idle);
    // The head frees their places as it sees them close, which takes a moment under load:
    // wait until a connection is admitted again (not closed at once), then join.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut probe = std::net::TcpStream::connect(cluster.addr()).expect("connect");
        probe.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        if !matches!(probe.read(&mut byte), Ok(0)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the places of closed connections were never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let net = net_runtime();
    let _ran = serve_scripted_nodes(&net, &cluster, vec![("after", Vec::new(), None)]);
    rt.shutdown();
}
