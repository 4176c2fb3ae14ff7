//! `GpuExecutor`: runs a [`Graph`] forward and backward on a CUDA device (feature `cuda`),
//! with the same semantics as [`CpuExecutor`](crate::nn::CpuExecutor), so the same model
//! definition trains on either. [`GpuTrainer`] keeps parameters, optimizer moments and the
//! data set on the device and runs whole epochs without a host round trip per step.
//!
//! # Invariants
//! 1. Every device buffer (values, gradients, parameters, saved intermediates, scratch) is
//!    allocated in [`GpuExecutor::new`]; `forward` and `backward` allocate only the few
//!    bytes of backward's seeds.
//! 2. Matrix products go through cuBLAS (row-major, transposes as operations, never
//!    copies); convolutions are im2col + one GEMM for the whole batch, then a kernel that
//!    transposes to `[N, O, OH, OW]` with bias and activation fused; attention copies q, k,
//!    v to per-head matrices and runs each product as one strided-batched GEMM over the
//!    batch and the heads; GRU cells run their hidden-side product through cuBLAS; every
//!    other op is an NVRTC kernel of [`KERNELS`](crate::KERNELS). Every op of the graph
//!    runs (the matches below are exhaustive), so each model of the zoo trains on a GPU.
//! 3. Gradients follow the CPU executor's rules: `backward(range, seeds)` zeroes the
//!    gradients of the range's nodes and of the nodes they read, adds the seeds, then walks
//!    the range in reverse; gradients flow only to nodes that depend on a parameter.
//! 4. Host copies are made only when asked: [`Executor::value`], [`Executor::grad`] and
//!    [`Executor::param_grad`] download on first read after a change and keep the copy
//!    until the next `set_value`, `forward` or `backward`.
//! 5. Parameters live on the device. [`Executor::forward`] uploads the `Params` it is given;
//!    [`GpuExecutor::forward_resident`] runs on the device copies as they are (after
//!    [`GpuExecutor::load_params`] or device-side optimizer steps). Backward uses the
//!    parameters of the last forward.
//! 6. Dropout draws its mask on the device from a counter-based generator seeded by the
//!    executor's [`Rng`] (one draw per forward), so masks differ from the CPU executor's
//!    but follow the same seeds deterministically.
//! 7. Results are deterministic run to run. Where rows add up by id (embedding gradients,
//!    sparse products and their input gradients), `set_ids` groups the entries by id on the
//!    host, and one thread per (id, column) adds its entries in ascending order (the CPU
//!    executor's order). Only ids written on the device (`GpuTrainer`'s labels) fall back to
//!    float atomics, whose order may vary in the last bits.
use std::cell::OnceCell;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::devices::{column_tiles, launch, len_u32, one_block, rows_config, DeviceError, Gemm32, Gpu};
use crate::nn::executor::rules;
use crate::nn::{Activation, DType, Executor, Graph, NnError, Node, NodeId, Op, Params, Rng};

mod replicas;
mod train;

/// The hook of [`GpuExecutor::backward_observed`]: called with the executor and a
/// parameter's index once that parameter's gradient is final on the device.
pub(crate) type GpuParamReady<'a> = dyn FnMut(&mut GpuExecutor, usize) -> Result<(), NnError> + 'a;

pub use train::{GpuDataset, GpuTrainer};

/// The kernels' activation codes (see the kernels' prelude).
fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Identity => 0,
        Activation::Relu => 1,
        Activation::Sigmoid => 2,
        Activation::Tanh => 3,
    }
}

/// The error for a buffer of op `name` that [`GpuExecutor::new`] should have allocated.
fn missing_buffer(name: &'static str) -> impl Fn() -> DeviceError + Copy {
    move || DeviceError::Shape { op: "gpu executor", message: format!("{name}: missing buffer") }
}

/// A sparse product's row and column ids on the device, its entry count, its dense side's
/// width, the row and column limits, and the kernel's work items (entries × width).
struct SparseArgs<'a> {
    rows: &'a CudaSlice<i32>,
    cols: &'a CudaSlice<i32>,
    entries: u32,
    n: u32,
    row_limit: u32,
    col_limit: u32,
    work: u32,
}

/// An i32 input's entries grouped by id, for the kernels that add rows by id in a fixed
/// order (`embedding_grad_grouped_f32`, `sparse_matmul_grouped_f32`). Allocated in
/// [`GpuExecutor::new`] for each input whose ids say where rows add up; filled by `set_ids`.
struct Grouping {
    /// The distinct ids, ascending (the first `groups`).
    keys: CudaSlice<u32>,
    /// Where each id's entries start in `order`, then the entry count.
    starts: CudaSlice<u32>,
    /// The entries, by id, ascending within each.
    order: CudaSlice<u32>,
    /// The number of distinct ids: `None` until `set_ids` fills the buffers, and again once
    /// the ids are written on the device (the kernels with atomics run then).
    groups: Option<u32>,
}

impl Grouping {
    fn new(gpu: &Gpu, entries: usize) -> Result<Grouping, DeviceError> {
        let zeros = |len: usize| gpu.stream_ref().alloc_zeros::<u32>(len).map_err(|e| gpu.driver(e));
        Ok(Grouping {
            keys: zeros(entries.max(1))?,
            starts: zeros(entries + 1)?,
            order: zeros(entries.max(1))?,
            groups: None,
        })
    }

    /// Groups `ids` (checked: none negative) and uploads the groups.
    fn fill(&mut self, gpu: &Gpu, ids: &[i32]) -> Result<(), DeviceError> {
        self.groups = None;
        let (keys, starts, order) = group_by_id(ids);
        let groups = len_u32(keys.len(), "GpuExecutor::set_ids")?;
        let stream = gpu.stream_ref();
        let driver = |e| gpu.driver(e);
        if !ids.is_empty() {
            stream.memcpy_htod(&keys, &mut self.keys.slice_mut(..keys.len())).map_err(driver)?;
            stream.memcpy_htod(&order, &mut self.order).map_err(driver)?;
        }
        stream.memcpy_htod(&starts, &mut self.starts.slice_mut(..starts.len())).map_err(driver)?;
        self.groups = Some(groups);
        Ok(())
    }
}

/// `ids` (none negative) grouped: the distinct ids ascending, where each one's entries start
/// in the order (then the entry count), and the entries by id, ascending within each.
fn group_by_id(ids: &[i32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    // A stable sort: each id's entries stay ascending.
    order.sort_by_key(|&e| ids[e as usize]);
    let (mut keys, mut starts) = (Vec::new(), Vec::new());
    for (position, &e) in order.iter().enumerate() {
        let id = ids[e as usize] as u32;
        if keys.last() != Some(&id) {
            keys.push(id);
            starts.push(position as u32);
        }
    }
    starts.push(order.len() as u32);
    (keys, starts, order)
}

/// For each node of `graph`, whether it is `node` or a reshape of it (nodes come in
/// topological order).
fn carriers_of(graph: &Graph, node: NodeId) -> Vec<bool> {
    let mut carries = vec![false; graph.len()];
    carries[node.0] = true;
    for (i, reader) in graph.nodes().iter().enumerate().skip(node.0 + 1) {
        carries[i] = matches!(reader.op, Op::Reshape) && carries[reader.inputs[0].0];
    }
    carries
}

/// Whether rows add up by the ids of i32 input `node` somewhere in `graph`: an embedding's
/// ids, a sparse product's rows or columns (through reshapes).
fn adds_rows_by(graph: &Graph, node: NodeId) -> bool {
    let carries = carriers_of(graph, node);
    graph.nodes().iter().any(|reader| {
        let reads = |pos: usize| reader.inputs.get(pos).is_some_and(|i| carries[i.0]);
        match reader.op {
            Op::Embedding => reads(0),
            Op::SparseMatMul => reads(0) || reads(1),
            _ => false,
        }
    })
}

/// Runs a graph on one GPU with buffers allocated once.
pub struct GpuExecutor {
    gpu: Arc<Gpu>,
    graph: Graph,
    /// Values of f32 nodes other than parameters.
    vals: Vec<Option<CudaSlice<f32>>>,
    /// Values of i32 nodes.
    ids: Vec<Option<CudaSlice<i32>>>,
    /// The groups of i32 inputs by which rows add up.
    groupings: Vec<Option<Grouping>>,
    /// Parameter values, by parameter index.
    params: Vec<CudaSlice<f32>>,
    /// Gradients of nodes that depend on a parameter (parameters included).
    grads: Vec<Option<CudaSlice<f32>>>,
    /// Saved for backward: im2col columns (conv), mask (dropout), probabilities then
    /// per-row losses (softmax cross-entropy).
    aux: Vec<Option<CudaSlice<f32>>>,
    /// Saved for backward: the argmax of each max-pool window.
    idx: Vec<Option<CudaSlice<i32>>>,
    /// Shared scratch: conv products, the gradient before a fused activation.
    scratch: Option<CudaSlice<f32>>,
    /// Shared scratch: conv input-column gradients.
    scratch2: Option<CudaSlice<f32>>,
    /// A one-element buffer standing in for a value that is not there (never read: every
    /// f32 node has its buffer while others read it).
    empty: CudaSlice<f32>,
    filled: Vec<bool>,
    requires_grad: Vec<bool>,
    /// The first node reading each parameter (`usize::MAX` if none): its gradient is final
    /// once that node ran backward.
    first_reader: Vec<usize>,
    rng: Rng,
    training: bool,
    forward_trained: bool,
    host_vals: Vec<OnceCell<Vec<f32>>>,
    host_grads: Vec<OnceCell<Vec<f32>>>,
}

impl Drop for GpuExecutor {
    fn drop(&mut self) {
        // The device buffers (fields) are freed after this, on this device.
        self.gpu.make_current();
    }
}

impl std::fmt::Debug for GpuExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuExecutor").field("gpu", &self.gpu).field("nodes", &self.graph.len()).finish()
    }
}

impl GpuExecutor {
    /// An executor for `graph` on `gpu`, with every device buffer it will need allocated
    /// now and the parameters zeroed (they are uploaded by `forward` or
    /// [`GpuExecutor::load_params`]).
    ///
    /// # Errors
    /// [`NnError::Device`] if allocation fails. (The executor runs every op of [`Op`]: its
    /// forward and backward matches are exhaustive.)
    pub fn new(gpu: Arc<Gpu>, graph: &Graph) -> Result<Self, NnError> {
        let nodes = graph.nodes();
        let n = nodes.len();
        let requires_grad = rules::requires_grad(graph);
        let zeros = |len: usize| gpu.zeros(len.max(1));
        let (mut vals, mut ids, mut grads, mut aux, mut idx) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut groupings = Vec::with_capacity(n);
        let (mut scratch, mut scratch2) = (1usize, 1usize);
        for (i, node) in nodes.iter().enumerate() {
            let len = node.len();
            let is_param = matches!(node.op, Op::Param { .. });
            vals.push(if node.dtype == DType::F32 && !is_param { Some(zeros(len)?) } else { None });
            ids.push(if node.dtype == DType::I32 {
                Some(gpu.stream_ref().alloc_zeros::<i32>(len.max(1)).map_err(|e| gpu.driver(e))?)
            } else {
                None
            });
            let groups_rows =
                node.dtype == DType::I32 && matches!(node.op, Op::Input) && adds_rows_by(graph, NodeId(i));
            groupings.push(if groups_rows { Some(Grouping::new(&gpu, len)?) } else { None });
            grads.push(if requires_grad[i] { Some(zeros(len)?) } else { None });
            let input_shape = |k: usize| &nodes[node.inputs[k].0].shape;
            // What the op saves for backward (`None`: nothing). Like every other buffer, a
            // saved one has at least one element, even for a batch of zero.
            let (aux_len, idx_len) = match node.op {
                Op::Conv2d { .. } => {
                    let (x, w) = (input_shape(0), input_shape(1));
                    let ckk = w[1] * w[2] * w[3];
                    let nohw = x[0] * node.shape[2] * node.shape[3];
                    scratch = scratch.max(len);
                    scratch2 = scratch2.max(ckk * nohw);
                    (Some(ckk * nohw), None)
                }
                Op::Linear { .. } => {
                    scratch = scratch.max(len);
                    (None, None)
                }
                Op::MaxPool2d { .. } => (None, Some(len)),
                Op::Dropout { .. } => (Some(len), None),
                // Each row's mean and reciprocal standard deviation.
                Op::LayerNorm { .. } => {
                    (Some(2 * (len / node.shape.last().copied().unwrap_or(1).max(1))), None)
                }
                // The hidden side's pre-activations [B, 3H], then the gates r, z, n [B, H] each;
                // backward's scratch holds both sides' pre-activation gradients.
                Op::GruCell => {
                    scratch = scratch.max(6 * len);
                    (Some(6 * len), None)
                }
                // The attention probabilities [B·heads, T, T]; scratch holds the per-head
                // copies of q, k, v and the output (forward), or the score gradients, the
                // per-head copies of q, k, v, the output gradient and a product (backward).
                Op::Attention { heads, .. } => {
                    let probs = node.shape[0] * heads * node.shape[1] * node.shape[1];
                    scratch = scratch.max(probs + 5 * len);
                    (Some(probs), None)
                }
                Op::SoftmaxCrossEntropy => {
                    let l = input_shape(0);
                    (Some(l[0] * l[1] + l[0]), None)
                }
                _ => (None, None),
            };
            aux.push(aux_len.map(zeros).transpose()?);
            idx.push(
                idx_len
                    .map(|len| gpu.stream_ref().alloc_zeros::<i32>(len.max(1)).map_err(|e| gpu.driver(e)))
                    .transpose()?,
            );
        }
        let params =
            graph.params().iter().map(|p| zeros(p.shape.iter().product())).collect::<Result<_, _>>()?;
        let mut first_reader = vec![usize::MAX; graph.params().len()];
        for (i, node) in nodes.iter().enumerate().rev() {
            for &input in &node.inputs {
                if let Op::Param { index } = nodes[input.0].op {
                    first_reader[index] = i;
                }
            }
        }
        Ok(GpuExecutor {
            scratch: Some(zeros(scratch)?),
            scratch2: Some(zeros(scratch2)?),
            empty: zeros(1)?,
            gpu,
            graph: graph.clone(),
            vals,
            ids,
            groupings,
            params,
            grads,
            aux,
            idx,
            filled: nodes.iter().map(|n| matches!(n.op, Op::Param { .. })).collect(),
            requires_grad,
            first_reader,
            rng: Rng::seed(0),
            training: false,
            forward_trained: false,
            host_vals: (0..n).map(|_| OnceCell::new()).collect(),
            host_grads: (0..n).map(|_| OnceCell::new()).collect(),
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Copies `params` to the device copies the executor runs on.
    ///
    /// # Errors
    /// [`NnError::ParamMismatch`] if they do not fit the graph; [`NnError::Device`].
    pub fn load_params(&mut self, params: &Params) -> Result<(), NnError> {
        params.check(&self.graph)?;
        for (device, host) in self.params.iter_mut().zip(&params.tensors) {
            self.gpu.stream_ref().memcpy_htod(&host.data, device).map_err(|e| self.gpu.driver(e))?;
        }
        self.invalidate();
        Ok(())
    }

    /// Copies the device parameters back into `params` (which must fit the graph).
    ///
    /// # Errors
    /// [`NnError::ParamMismatch`]; [`NnError::Device`].
    pub fn download_params(&self, params: &mut Params) -> Result<(), NnError> {
        params.check(&self.graph)?;
        for (device, host) in self.params.iter().zip(&mut params.tensors) {
            let len = host.data.len();
            self.gpu
                .stream_ref()
                .memcpy_dtoh(&device.slice(0..len), &mut host.data)
                .map_err(|e| self.gpu.driver(e))?;
        }
        Ok(())
    }

    /// As [`Executor::forward`], on the parameters already on the device.
    ///
    /// # Errors
    /// As [`Executor::forward`].
    pub fn forward_resident(&mut self, range: Range<usize>) -> Result<(), NnError> {
        self.check_range(&range)?;
        self.invalidate();
        self.forward_trained = self.training;
        for n in range {
            if rules::forward_computes(&self.graph, &self.filled, n)? {
                self.forward_node(n)?;
                self.filled[n] = true;
            }
        }
        Ok(())
    }

    /// A node's device value buffer, to fill an input on the device (marks it as set).
    pub(crate) fn value_buffer_mut(&mut self, node: NodeId) -> Result<&mut CudaSlice<f32>, NnError> {
        rules::check_settable(&self.graph, node, DType::F32)?;
        self.filled[node.0] = true;
        self.host_vals[node.0].take();
        let missing = self.missing(node);
        self.vals[node.0].as_mut().ok_or(missing)
    }

    /// A node's device id buffer (labels), to fill on the device (marks it as set).
    pub(crate) fn ids_buffer_mut(&mut self, node: NodeId) -> Result<&mut CudaSlice<i32>, NnError> {
        rules::check_settable(&self.graph, node, DType::I32)?;
        self.filled[node.0] = true;
        // Written on the device: no groups on the host for them.
        if let Some(grouping) = &mut self.groupings[node.0] {
            grouping.groups = None;
        }
        let missing = self.missing(node);
        self.ids[node.0].as_mut().ok_or(missing)
    }

    /// A computed f32 value, on the device.
    pub(crate) fn value_buffer(&self, node: NodeId) -> Result<&CudaSlice<f32>, NnError> {
        self.graph.node(node)?;
        if !self.filled[node.0] {
            return Err(self.missing(node));
        }
        Ok(self.val(node))
    }

    /// An i32 node's device buffer.
    pub(crate) fn ids_buffer(&self, node: NodeId) -> Result<&CudaSlice<i32>, NnError> {
        self.graph.node(node)?;
        self.ids[node.0].as_ref().ok_or(self.missing(node))
    }

    /// Parameter `index`'s device value (mutable) and gradient, for a device optimizer.
    pub(crate) fn param_and_grad(&mut self, index: usize) -> (&mut CudaSlice<f32>, Option<&CudaSlice<f32>>) {
        let node = self.graph.params()[index].node;
        self.host_vals[node.0].take();
        (&mut self.params[index], self.grads[node.0].as_ref())
    }

    /// Parameter `index`'s device gradient (mutable; `None` if it takes none), for gradient
    /// averaging between replicas.
    pub(crate) fn param_grad_mut(&mut self, index: usize) -> Option<&mut CudaSlice<f32>> {
        let node = self.graph.params().get(index)?.node;
        self.host_grads[node.0].take();
        self.grads[node.0].as_mut()
    }

    /// As [`Executor::backward`], but calls `ready(self, index)` for each parameter as soon
    /// as the kernels that make its gradient final are queued (right after its first reader's
    /// backward), while the rest of the range is still to be queued: the hook where a
    /// replica starts reducing gradients during backward. Parameters that no node of `range`
    /// reads first are reported after the walk; every parameter is reported exactly once.
    ///
    /// # Errors
    /// As [`Executor::backward`], and the first error `ready` returns (backward stops).
    pub(crate) fn backward_observed(
        &mut self,
        params: &Params,
        range: Range<usize>,
        seeds: &[(NodeId, &[f32])],
        ready: &mut GpuParamReady<'_>,
    ) -> Result<(), NnError> {
        self.check_range(&range)?;
        params.check(&self.graph)?;
        self.invalidate();
        let gpu = self.gpu.clone();
        let stream = gpu.stream_ref().clone();
        let mut seen = vec![false; self.graph.len()];
        let grads = &mut self.grads;
        rules::zero_grads(&self.graph, &self.requires_grad, &range, &mut seen, |i| {
            if let Some(g) = grads[i].as_mut() {
                stream.memset_zeros(g).map_err(|e| gpu.driver(e))?;
            }
            Ok(())
        })?;
        for &(node, seed) in seeds {
            self.check_len(node, seed.len())?;
            if !self.requires_grad[node.0] {
                continue;
            }
            let upload = self.gpu.upload(seed)?;
            if let Some(g) = self.grads[node.0].as_mut() {
                self.gpu.axpy(1.0, &upload, g)?;
            }
        }
        let mut reported = vec![false; self.graph.params().len()];
        for n in range.rev() {
            if !rules::backward_runs(&self.graph, &self.requires_grad, &self.filled, n)? {
                continue;
            }
            self.backward_node(n)?;
            for k in 0..self.graph.nodes()[n].inputs.len() {
                let input = self.graph.nodes()[n].inputs[k];
                if let Op::Param { index } = self.graph.nodes()[input.0].op {
                    // A node may read the same parameter twice: report it once.
                    if self.first_reader[index] == n && !reported[index] {
                        reported[index] = true;
                        ready(self, index)?;
                    }
                }
            }
        }
        // Parameters not reported in the walk (no first reader in `range`), in their order.
        for (index, _) in reported.iter().enumerate().filter(|(_, &done)| !done) {
            ready(self, index)?;
        }
        Ok(())
    }

    fn invalidate(&mut self) {
        self.host_vals.iter_mut().for_each(|c| drop(c.take()));
        self.host_grads.iter_mut().for_each(|c| drop(c.take()));
    }

    fn missing(&self, node: NodeId) -> NnError {
        rules::missing(&self.graph, node)
    }

    fn check_range(&self, range: &Range<usize>) -> Result<(), NnError> {
        rules::check_in_graph(&self.graph, range)
    }

    fn check_len(&self, node: NodeId, got: usize) -> Result<(), NnError> {
        rules::check_len(&self.graph, node, got)
    }

    /// The value a node reads from `id` (parameters from their device copies).
    fn val(&self, id: NodeId) -> &CudaSlice<f32> {
        match self.graph.nodes()[id.0].op {
            Op::Param { index } => &self.params[index],
            // Every f32 non-parameter node has a buffer (allocated in `new`).
            _ => self.vals[id.0].as_ref().unwrap_or(&self.empty),
        }
    }

    fn shape(&self, id: NodeId) -> &[usize] {
        &self.graph.nodes()[id.0].shape
    }

    fn u32(len: usize, op: &'static str) -> Result<u32, NnError> {
        Ok(len_u32(len, op)?)
    }

    /// The buffers and sizes a sparse product's kernels take.
    fn sparse_args(&self, node: &Node) -> Result<SparseArgs<'_>, NnError> {
        let (inp, name) = (&node.inputs, node.op.name());
        let ids = |pos: usize| self.ids[inp[pos].0].as_ref().ok_or_else(missing_buffer(name));
        let (entries, cols) = (self.shape(inp[2])[0], self.shape(inp[3])[0]);
        Ok(SparseArgs {
            rows: ids(0)?,
            cols: ids(1)?,
            entries: Self::u32(entries, name)?,
            n: Self::u32(node.shape[1], name)?,
            row_limit: Self::u32(node.shape[0], name)?,
            col_limit: Self::u32(cols, name)?,
            work: Self::u32(entries * node.shape[1], name)?,
        })
    }

    /// The groups of the ids node `ids` is (or reshapes), if `set_ids` made them.
    fn grouping(&self, mut ids: NodeId) -> Option<(&Grouping, u32)> {
        let nodes = self.graph.nodes();
        while matches!(nodes[ids.0].op, Op::Reshape) {
            ids = nodes[ids.0].inputs[0];
        }
        let grouping = self.groupings[ids.0].as_ref()?;
        Some((grouping, grouping.groups?))
    }

    /// Runs node `n`'s forward kernel into its (taken-out) buffers.
    fn forward_node(&mut self, n: usize) -> Result<(), NnError> {
        let node = self.graph.nodes()[n].clone();
        let mut out = self.vals[n].take();
        let mut out_ids = self.ids[n].take();
        let mut aux = self.aux[n].take();
        let mut idx = self.idx[n].take();
        let mut scratch = self.scratch.take();
        let seed =
            if self.training && matches!(node.op, Op::Dropout { .. }) { self.rng.next_u64() } else { 0 };
        let result = self.forward_op(&node, &mut out, &mut out_ids, &mut aux, &mut idx, &mut scratch, seed);
        self.vals[n] = out;
        self.ids[n] = out_ids;
        self.aux[n] = aux;
        self.idx[n] = idx;
        self.scratch = scratch;
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_op(
        &self,
        node: &Node,
        out: &mut Option<CudaSlice<f32>>,
        out_ids: &mut Option<CudaSlice<i32>>,
        aux: &mut Option<CudaSlice<f32>>,
        idx: &mut Option<CudaSlice<i32>>,
        scratch: &mut Option<CudaSlice<f32>>,
        seed: u64,
    ) -> Result<(), NnError> {
        let gpu = &*self.gpu;
        let inp = &node.inputs;
        let name = node.op.name();
        let internal = missing_buffer(name);
        if node.is_empty() {
            // An empty value (a batch of zero) has nothing to compute.
            return Ok(());
        }
        if let (Op::Reshape, DType::I32) = (&node.op, node.dtype) {
            let dst = out_ids.as_mut().ok_or_else(internal)?;
            let src = self.ids[inp[0].0].as_ref().ok_or_else(internal)?;
            gpu.stream_ref().memcpy_dtod(src, dst).map_err(|e| gpu.driver(e))?;
            return Ok(());
        }
        let y = out.as_mut().ok_or_else(internal)?;
        let len = Self::u32(node.len(), name)?;
        match node.op {
            Op::Input | Op::Param { .. } => {}
            Op::Constant { value } => launch!(gpu, "fill_f32", len; y, &value, &len)?,
            Op::MatMul => {
                let (a, b) = (self.shape(inp[0]), self.shape(inp[1]));
                let (m, k, n) = (a[0], a[1], b[1]);
                let g = Gemm32 { m, n, k, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
                gpu.gemm_rm(g, self.val(inp[0]), self.val(inp[1]), y)?;
            }
            Op::Linear { act } => {
                let w = self.shape(inp[1]);
                let (k, n) = (w[0], w[1]);
                let m = node.len() / n.max(1);
                let g = Gemm32 { m, n, k, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
                gpu.gemm_rm(g, self.val(inp[0]), self.val(inp[1]), y)?;
                let (cols, act) = (Self::u32(n, name)?, act_code(act));
                launch!(gpu, "bias_act_f32", len; y, self.val(inp[2]), &len, &cols, &act)?;
            }
            Op::Conv2d { stride, pad, act } => {
                let geo =
                    Geometry::new(self.shape(inp[0]), self.shape(inp[1]), &node.shape, stride, pad, name)?;
                let cols = aux.as_mut().ok_or_else(internal)?;
                let prod = scratch.as_mut().ok_or_else(internal)?;
                let total = Self::u32(geo.ckk as usize * geo.nohw as usize, name)?;
                let Geometry { n, c, h, w, kh, kw, oh, ow, stride, pad, o, .. } = geo;
                launch!(gpu, "im2col_f32", total; self.val(inp[0]), &mut *cols, &n, &c, &h, &w, &kh, &kw, &oh, &ow, &stride, &pad)?;
                let g = Gemm32 {
                    m: o as usize,
                    n: geo.nohw as usize,
                    k: geo.ckk as usize,
                    trans_a: false,
                    trans_b: false,
                    alpha: 1.0,
                    beta: 0.0,
                };
                gpu.gemm_rm(g, self.val(inp[1]), &*cols, prod)?;
                let (ohw, act) = (oh * ow, act_code(act));
                launch!(gpu, "conv_out_f32", len; &*prod, self.val(inp[2]), y, &n, &o, &ohw, &act)?;
            }
            Op::MaxPool2d { size, stride } => {
                let x = self.shape(inp[0]);
                let planes = Self::u32(x[0] * x[1], name)?;
                let (h, w) = (Self::u32(x[2], name)?, Self::u32(x[3], name)?);
                let (oh, ow) = (Self::u32(node.shape[2], name)?, Self::u32(node.shape[3], name)?);
                let (size, stride) = (Self::u32(size, name)?, Self::u32(stride, name)?);
                let arg = idx.as_mut().ok_or_else(internal)?;
                launch!(gpu, "maxpool_f32", len; self.val(inp[0]), y, arg, &planes, &h, &w, &oh, &ow, &size, &stride)?;
            }
            Op::Add => {
                let bn = Self::u32(self.graph.nodes()[inp[1].0].len().max(1), name)?;
                launch!(gpu, "add_bcast_f32", len; self.val(inp[0]), self.val(inp[1]), y, &len, &bn)?;
            }
            Op::Sub | Op::Mul => {
                let code = i32::from(matches!(node.op, Op::Mul));
                launch!(gpu, "binary_f32", len; self.val(inp[0]), self.val(inp[1]), y, &len, &code)?;
            }
            Op::Act(act) => {
                let act = act_code(act);
                launch!(gpu, "act_f32", len; self.val(inp[0]), y, &len, &act)?;
            }
            Op::Gelu => launch!(gpu, "gelu_f32", len; self.val(inp[0]), y, &len)?,
            Op::Mse => {
                let n = Self::u32(self.graph.nodes()[inp[0].0].len(), name)?;
                launch!(gpu, "mse_f32", cfg = one_block(); self.val(inp[0]), self.val(inp[1]), y, &n)?;
            }
            Op::LayerNorm { eps } => {
                let d = *node.shape.last().unwrap_or(&1);
                let (rows, cols) = (Self::u32(node.len() / d.max(1), name)?, Self::u32(d, name)?);
                let stats = aux.as_mut().ok_or_else(internal)?;
                launch!(gpu, "layer_norm_f32", cfg = rows_config(rows, cols); self.val(inp[0]), self.val(inp[1]), self.val(inp[2]), y, stats, &rows, &cols, &eps)?;
            }
            Op::Embedding => {
                let table = self.shape(inp[1]);
                let (vocab, d) = (Self::u32(table[0], name)?, Self::u32(table[1], name)?);
                let ids = self.ids[inp[0].0].as_ref().ok_or_else(internal)?;
                let n = Self::u32(self.graph.nodes()[inp[0].0].len(), name)?;
                launch!(gpu, "embedding_f32", len; ids, self.val(inp[1]), y, &n, &d, &vocab)?;
            }
            Op::SparseMatMul => {
                let SparseArgs { rows, cols, entries, n, row_limit, col_limit, work } =
                    self.sparse_args(node)?;
                let zero = 0.0f32;
                launch!(gpu, "fill_f32", len; &mut *y, &zero, &len)?;
                if let Some((by_row, groups)) = self.grouping(inp[0]) {
                    let Grouping { keys, starts, order, .. } = by_row;
                    launch!(gpu, "sparse_matmul_grouped_f32", groups * n; keys, starts, order, cols, self.val(inp[2]), self.val(inp[3]), &mut *y, &groups, &n, &row_limit, &col_limit)?;
                } else {
                    launch!(gpu, "sparse_matmul_add_f32", work; rows, cols, self.val(inp[2]), self.val(inp[3]), &mut *y, &entries, &n, &row_limit, &col_limit)?;
                }
            }
            Op::SelectStep { step } => {
                let x = self.shape(inp[0]);
                let (b, t, d) = (Self::u32(x[0], name)?, Self::u32(x[1], name)?, Self::u32(x[2], name)?);
                let (step, assign) = (Self::u32(step, name)?, 0i32);
                launch!(gpu, "step_gather_f32", len; self.val(inp[0]), y, &b, &t, &d, &step, &assign)?;
            }
            Op::StackSteps => {
                let (b, t, d) = (node.shape[0], node.shape[1], node.shape[2]);
                let (b, t, d) = (Self::u32(b, name)?, Self::u32(t, name)?, Self::u32(d, name)?);
                let (per_step, assign) = (b * d, 0i32);
                for (step, &input) in inp.iter().enumerate() {
                    let step = Self::u32(step, name)?;
                    launch!(gpu, "step_scatter_f32", per_step; self.val(input), &mut *y, &b, &t, &d, &step, &assign)?;
                }
            }
            Op::GruCell => {
                let (b, h) = (node.shape[0], node.shape[1]);
                let saved = aux.as_mut().ok_or_else(internal)?;
                let (mut gh, mut gates) = saved.split_at_mut(b * 3 * h);
                // gh = bh (each row) + h · wh
                let (gh_len, gh_cols) = (Self::u32(b * 3 * h, name)?, Self::u32(3 * h, name)?);
                launch!(gpu, "broadcast_rows_f32", gh_len; self.val(inp[3]), &mut gh, &gh_len, &gh_cols)?;
                let g =
                    Gemm32 { m: b, n: 3 * h, k: h, trans_a: false, trans_b: false, alpha: 1.0, beta: 1.0 };
                gpu.gemm_rm(g, self.val(inp[1]), self.val(inp[2]), &mut gh)?;
                let (bb, hh) = (Self::u32(b, name)?, Self::u32(h, name)?);
                launch!(gpu, "gru_gates_f32", len; self.val(inp[0]), &mut gh, self.val(inp[1]), &mut gates, y, &bb, &hh)?;
            }
            Op::Attention { heads, causal } => {
                let shape = AttentionShape::new(node, heads, name)?;
                let probs = aux.as_mut().ok_or_else(internal)?;
                let work = scratch.as_mut().ok_or_else(internal)?;
                let (mut per_head, mut yh) = work.split_at_mut(3 * shape.len);
                for (i, &x) in inp.iter().enumerate() {
                    let mut xh = per_head.slice_mut(i * shape.len..(i + 1) * shape.len);
                    shape.split(gpu, self.val(x), &mut xh)?;
                }
                let (qh, kh, vh) =
                    (shape.head(&per_head, 0), shape.head(&per_head, 1), shape.head(&per_head, 2));
                gpu.gemm_batched_rm(shape.scores(), shape.bh, &qh, &kh, probs)?;
                let (rows, t, causal) = (shape.rows, shape.t, i32::from(causal));
                launch!(gpu, "attention_softmax_f32", cfg = rows_config(rows, t); &mut *probs, &rows, &t, &causal)?;
                gpu.gemm_batched_rm(shape.mix(), shape.bh, &*probs, &vh, &mut yh)?;
                shape.merge(gpu, &mut yh, y, false)?;
            }
            Op::Reshape => gpu.stream_ref().memcpy_dtod(self.val(inp[0]), y).map_err(|e| gpu.driver(e))?,
            Op::Dropout { p } => {
                if self.training && p > 0.0 {
                    let mask = aux.as_mut().ok_or_else(internal)?;
                    launch!(gpu, "dropout_f32", len; self.val(inp[0]), y, mask, &len, &p, &seed)?;
                } else {
                    gpu.stream_ref().memcpy_dtod(self.val(inp[0]), y).map_err(|e| gpu.driver(e))?;
                }
            }
            Op::Softmax => {
                gpu.stream_ref().memcpy_dtod(self.val(inp[0]), y).map_err(|e| gpu.driver(e))?;
                let d = *node.shape.last().unwrap_or(&1);
                gpu.softmax_rows(y, node.len() / d.max(1), d)?;
            }
            Op::SoftmaxCrossEntropy => {
                let l = self.shape(inp[0]);
                let (rows, cols) = (Self::u32(l[0], name)?, Self::u32(l[1], name)?);
                let saved = aux.as_mut().ok_or_else(internal)?;
                let (mut probs, mut row_loss) = saved.split_at_mut(l[0] * l[1]);
                let labels = self.ids[inp[1].0].as_ref().ok_or_else(internal)?;
                launch!(gpu, "softmax_xent_f32", cfg = rows_config(rows, cols); self.val(inp[0]), labels, &mut probs, &mut row_loss, &rows, &cols)?;
                launch!(gpu, "mean_f32", cfg = one_block(); &mut row_loss, y, &rows)?;
            }
        }
        Ok(())
    }

    /// Back-propagates node `n` into the gradients of its inputs.
    fn backward_node(&mut self, n: usize) -> Result<(), NnError> {
        let node = self.graph.nodes()[n].clone();
        let Some(g) = self.grads[n].take() else { return Ok(()) };
        let mut scratch = self.scratch.take();
        let mut scratch2 = self.scratch2.take();
        let result = self.backward_op(n, &node, &g, &mut scratch, &mut scratch2);
        self.grads[n] = Some(g);
        self.scratch = scratch;
        self.scratch2 = scratch2;
        result
    }

    fn backward_op(
        &mut self,
        n: usize,
        node: &Node,
        g: &CudaSlice<f32>,
        scratch: &mut Option<CudaSlice<f32>>,
        scratch2: &mut Option<CudaSlice<f32>>,
    ) -> Result<(), NnError> {
        let gpu = self.gpu.clone();
        let gpu = &*gpu;
        let name = node.op.name();
        let internal = missing_buffer(name);
        if node.is_empty() {
            // An empty output adds nothing to its inputs' gradients.
            return Ok(());
        }
        let len = Self::u32(node.len(), name)?;
        // What every input's gradient needs: the gradient before a fused activation.
        match node.op {
            Op::Linear { act } => {
                let dz = scratch.as_mut().ok_or_else(internal)?;
                let act = act_code(act);
                launch!(gpu, "act_grad_f32", len; self.val(NodeId(n)), g, dz, &len, &act)?;
            }
            Op::Conv2d { act, .. } => {
                let dz = scratch.as_mut().ok_or_else(internal)?;
                let (bn, o) = (Self::u32(node.shape[0], name)?, Self::u32(node.shape[1], name)?);
                let ohw = Self::u32(node.shape[2] * node.shape[3], name)?;
                let act = act_code(act);
                launch!(gpu, "conv_grad_out_f32", len; self.val(NodeId(n)), g, dz, &bn, &o, &ohw, &act)?;
            }
            Op::Attention { heads, .. } => {
                // Scratch: [score gradients | per-head q, k, v, output gradient | a product].
                let shape = AttentionShape::new(node, heads, name)?;
                let probs = self.aux[n].as_ref().ok_or_else(internal)?;
                let work = scratch.as_mut().ok_or_else(internal)?;
                let (mut ds, mut rest) = work.split_at_mut(shape.probs);
                let (mut per_head, _) = rest.split_at_mut(4 * shape.len);
                let sources =
                    [self.val(node.inputs[0]), self.val(node.inputs[1]), self.val(node.inputs[2]), g];
                for (i, x) in sources.into_iter().enumerate() {
                    let mut xh = per_head.slice_mut(i * shape.len..(i + 1) * shape.len);
                    shape.split(gpu, x, &mut xh)?;
                }
                // d(probabilities) = g · vᵀ per head, then through the softmax and the scale.
                let (vh, gh) = (shape.head(&per_head, 2), shape.head(&per_head, 3));
                let dprobs = Gemm32 { trans_b: true, alpha: 1.0, ..shape.scores() };
                gpu.gemm_batched_rm(dprobs, shape.bh, &gh, &vh, &mut ds)?;
                let (rows, t) = (shape.rows, shape.t);
                launch!(gpu, "attention_softmax_grad_f32", cfg = rows_config(rows, t); probs, &mut ds, &rows, &t, &shape.scale)?;
            }
            Op::GruCell => {
                // Scratch: the input side's pre-activation gradients [B, 3H], then the hidden side's.
                let (b, h) = (node.shape[0], node.shape[1]);
                let (bb, hh) = (Self::u32(b, name)?, Self::u32(h, name)?);
                let saved = self.aux[n].as_ref().ok_or_else(internal)?;
                let (gh, gates) = (saved.slice(0..b * 3 * h), saved.slice(b * 3 * h..6 * b * h));
                let (mut dga, mut dgh) = scratch.as_mut().ok_or_else(internal)?.split_at_mut(b * 3 * h);
                let h_in = self.val(node.inputs[1]);
                launch!(gpu, "gru_grad_f32", len; g, h_in, &gh, &gates, &mut dga, &mut dgh, &bb, &hh)?;
            }
            _ => {}
        }
        for (pos, &input) in node.inputs.iter().enumerate() {
            if !self.requires_grad[input.0] {
                continue;
            }
            let Some(mut gin) = self.grads[input.0].take() else { continue };
            self.host_grads[input.0].take();
            let result = self.accumulate(n, node, pos, g, scratch, scratch2, &mut gin);
            self.grads[input.0] = Some(gin);
            result?;
        }
        Ok(())
    }

    /// Adds input `pos`'s gradient contribution of node `n` into `gin`.
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        &self,
        n: usize,
        node: &Node,
        pos: usize,
        g: &CudaSlice<f32>,
        scratch: &mut Option<CudaSlice<f32>>,
        scratch2: &mut Option<CudaSlice<f32>>,
        gin: &mut CudaSlice<f32>,
    ) -> Result<(), NnError> {
        let gpu = &*self.gpu;
        let inp = &node.inputs;
        let name = node.op.name();
        let internal = missing_buffer(name);
        let len = Self::u32(node.len(), name)?;
        let y = self.val(NodeId(n));
        match node.op {
            Op::Input | Op::Param { .. } | Op::Constant { .. } => {}
            Op::MatMul => {
                let (a, b) = (self.shape(inp[0]), self.shape(inp[1]));
                let (m, k, nn) = (a[0], a[1], b[1]);
                let gm = if pos == 0 {
                    // da (m×k) += g (m×n) · bᵀ
                    gpu.gemm_rm(
                        Gemm32 { m, n: k, k: nn, trans_a: false, trans_b: true, alpha: 1.0, beta: 1.0 },
                        g,
                        self.val(inp[1]),
                        gin,
                    )
                } else {
                    // db (k×n) += aᵀ · g
                    gpu.gemm_rm(
                        Gemm32 { m: k, n: nn, k: m, trans_a: true, trans_b: false, alpha: 1.0, beta: 1.0 },
                        self.val(inp[0]),
                        g,
                        gin,
                    )
                };
                gm?;
            }
            Op::Linear { .. } => {
                let w = self.shape(inp[1]);
                let (k, nn) = (w[0], w[1]);
                let m = node.len() / nn.max(1);
                let dz = scratch.as_ref().ok_or_else(internal)?;
                match pos {
                    0 => gpu.gemm_rm(
                        Gemm32 { m, n: k, k: nn, trans_a: false, trans_b: true, alpha: 1.0, beta: 1.0 },
                        dz,
                        self.val(inp[1]),
                        gin,
                    )?,
                    1 => gpu.gemm_rm(
                        Gemm32 { m: k, n: nn, k: m, trans_a: true, trans_b: false, alpha: 1.0, beta: 1.0 },
                        self.val(inp[0]),
                        dz,
                        gin,
                    )?,
                    _ => {
                        let (rows, cols) = (Self::u32(m, name)?, Self::u32(nn, name)?);
                        launch!(gpu, "col_sums_add_f32", cfg = column_tiles(cols); dz, gin, &rows, &cols)?;
                    }
                }
            }
            Op::Conv2d { stride, pad, .. } => {
                let geo =
                    Geometry::new(self.shape(inp[0]), self.shape(inp[1]), &node.shape, stride, pad, name)?;
                let dz = scratch.as_ref().ok_or_else(internal)?;
                let cols = self.aux[n].as_ref().ok_or_else(internal)?;
                let (o, ckk, nohw) = (geo.o as usize, geo.ckk as usize, geo.nohw as usize);
                match pos {
                    0 => {
                        let dcol = scratch2.as_mut().ok_or_else(internal)?;
                        // dcol (CKK × N·OHW) = wᵀ · dz, folded back into the image.
                        let gm = Gemm32 {
                            m: ckk,
                            n: nohw,
                            k: o,
                            trans_a: true,
                            trans_b: false,
                            alpha: 1.0,
                            beta: 0.0,
                        };
                        gpu.gemm_rm(gm, self.val(inp[1]), dz, dcol)?;
                        let total = Self::u32(self.graph.nodes()[inp[0].0].len(), name)?;
                        let Geometry { n, c, h, w, kh, kw, oh, ow, stride, pad, .. } = geo;
                        launch!(gpu, "col2im_add_f32", total; &*dcol, gin, &n, &c, &h, &w, &kh, &kw, &oh, &ow, &stride, &pad)?;
                    }
                    1 => {
                        // dw (O × CKK) += dz · colsᵀ
                        let gm = Gemm32 {
                            m: o,
                            n: ckk,
                            k: nohw,
                            trans_a: false,
                            trans_b: true,
                            alpha: 1.0,
                            beta: 1.0,
                        };
                        gpu.gemm_rm(gm, dz, cols, gin)?;
                    }
                    _ => {
                        let blocks = rows_config(geo.o, geo.nohw);
                        launch!(gpu, "row_sums_add_f32", cfg = blocks; dz, gin, &geo.o, &geo.nohw)?;
                    }
                }
            }
            Op::MaxPool2d { size, stride } => {
                let x = self.shape(inp[0]);
                let (planes, total) = (Self::u32(x[0] * x[1], name)?, Self::u32(x.iter().product(), name)?);
                let (h, w) = (Self::u32(x[2], name)?, Self::u32(x[3], name)?);
                let (oh, ow) = (Self::u32(node.shape[2], name)?, Self::u32(node.shape[3], name)?);
                let (size, stride) = (Self::u32(size, name)?, Self::u32(stride, name)?);
                let arg = self.idx[n].as_ref().ok_or_else(internal)?;
                launch!(gpu, "maxpool_grad_add_f32", total; g, arg, gin, &planes, &h, &w, &oh, &ow, &size, &stride)?;
            }
            Op::Add => {
                if pos == 0 {
                    gpu.axpy(1.0, g, gin)?;
                } else {
                    let bn = self.graph.nodes()[inp[1].0].len().max(1);
                    let (rows, cols) = (Self::u32(node.len() / bn, name)?, Self::u32(bn, name)?);
                    launch!(gpu, "col_sums_add_f32", cfg = column_tiles(cols); g, gin, &rows, &cols)?;
                }
            }
            Op::Sub => gpu.axpy(if pos == 0 { 1.0 } else { -1.0 }, g, gin)?,
            Op::Mul => launch!(gpu, "mul_add_f32", len; g, self.val(inp[1 - pos]), gin, &len)?,
            Op::Act(act) => {
                let act = act_code(act);
                launch!(gpu, "act_grad_add_f32", len; y, g, gin, &len, &act)?;
            }
            Op::Gelu => launch!(gpu, "gelu_grad_add_f32", len; self.val(inp[0]), g, gin, &len)?,
            Op::Mse => {
                let n = Self::u32(self.graph.nodes()[inp[0].0].len(), name)?;
                let sign: f32 = if pos == 0 { 1.0 } else { -1.0 };
                launch!(gpu, "mse_grad_add_f32", n; self.val(inp[0]), self.val(inp[1]), g, gin, &n, &sign)?;
            }
            Op::LayerNorm { .. } => {
                let d = *node.shape.last().unwrap_or(&1);
                let (rows, cols) = (Self::u32(node.len() / d.max(1), name)?, Self::u32(d, name)?);
                let stats = self.aux[n].as_ref().ok_or_else(internal)?;
                let (x, gamma) = (self.val(inp[0]), self.val(inp[1]));
                match pos {
                    0 => {
                        launch!(gpu, "layer_norm_grad_add_f32", cfg = rows_config(rows, cols); x, gamma, g, stats, gin, &rows, &cols)?
                    }
                    1 => {
                        launch!(gpu, "layer_norm_gamma_grad_add_f32", cfg = column_tiles(cols); x, g, stats, gin, &rows, &cols)?
                    }
                    _ => launch!(gpu, "col_sums_add_f32", cfg = column_tiles(cols); g, gin, &rows, &cols)?,
                }
            }
            Op::Embedding => {
                if pos == 1 {
                    let table = self.shape(inp[1]);
                    let (vocab, d) = (Self::u32(table[0], name)?, Self::u32(table[1], name)?);
                    let ids = self.ids[inp[0].0].as_ref().ok_or_else(internal)?;
                    let count = Self::u32(self.graph.nodes()[inp[0].0].len(), name)?;
                    if let Some((by_id, groups)) = self.grouping(inp[0]) {
                        let Grouping { keys, starts, order, .. } = by_id;
                        launch!(gpu, "embedding_grad_grouped_f32", groups * d; keys, starts, order, g, gin, &groups, &d, &vocab)?;
                    } else {
                        launch!(gpu, "embedding_grad_add_f32", len; ids, g, gin, &count, &d, &vocab)?;
                    }
                }
            }
            Op::SparseMatMul => {
                // Ids were checked when they were set.
                let SparseArgs { rows, cols, entries, n, row_limit, col_limit, work } =
                    self.sparse_args(node)?;
                match pos {
                    2 => {
                        launch!(gpu, "sparse_matmul_values_grad_add_f32", entries; rows, cols, g, self.val(inp[3]), gin, &entries, &n, &row_limit, &col_limit)?
                    }
                    // dx[col] += value · g[row]: the forward kernel with the roles swapped.
                    3 => {
                        if let Some((by_col, groups)) = self.grouping(inp[1]) {
                            let Grouping { keys, starts, order, .. } = by_col;
                            launch!(gpu, "sparse_matmul_grouped_f32", groups * n; keys, starts, order, rows, self.val(inp[2]), g, gin, &groups, &n, &col_limit, &row_limit)?
                        } else {
                            launch!(gpu, "sparse_matmul_add_f32", work; cols, rows, self.val(inp[2]), g, gin, &entries, &n, &col_limit, &row_limit)?
                        }
                    }
                    _ => {}
                }
            }
            Op::SelectStep { step } => {
                let x = self.shape(inp[0]);
                let (b, t, d) = (Self::u32(x[0], name)?, Self::u32(x[1], name)?, Self::u32(x[2], name)?);
                let (step, add) = (Self::u32(step, name)?, 1i32);
                launch!(gpu, "step_scatter_f32", len; g, gin, &b, &t, &d, &step, &add)?;
            }
            Op::StackSteps => {
                let (b, t, d) = (node.shape[0], node.shape[1], node.shape[2]);
                let (b, t, d) = (Self::u32(b, name)?, Self::u32(t, name)?, Self::u32(d, name)?);
                let (step, add) = (Self::u32(pos, name)?, 1i32);
                launch!(gpu, "step_gather_f32", b * d; g, gin, &b, &t, &d, &step, &add)?;
            }
            Op::Attention { heads, .. } => {
                let shape = AttentionShape::new(node, heads, name)?;
                let probs = self.aux[n].as_ref().ok_or_else(internal)?;
                let work = scratch.as_mut().ok_or_else(internal)?;
                let (ds, mut rest) = work.split_at_mut(shape.probs);
                let (per_head, mut part) = rest.split_at_mut(4 * shape.len);
                let (qh, kh, gh) =
                    (shape.head(&per_head, 0), shape.head(&per_head, 1), shape.head(&per_head, 3));
                // Per head: dq = ds · k, dk = dsᵀ · q, dv = pᵀ · g; then added into [B, T, D].
                let (mix, mix_t) = (shape.mix(), Gemm32 { trans_a: true, ..shape.mix() });
                match pos {
                    0 => gpu.gemm_batched_rm(mix, shape.bh, &ds, &kh, &mut part)?,
                    1 => gpu.gemm_batched_rm(mix_t, shape.bh, &ds, &qh, &mut part)?,
                    _ => gpu.gemm_batched_rm(mix_t, shape.bh, probs, &gh, &mut part)?,
                }
                shape.merge(gpu, &mut part, gin, true)?;
            }
            Op::GruCell => {
                let (b, h) = (node.shape[0], node.shape[1]);
                let grads = scratch.as_ref().ok_or_else(internal)?;
                let (dga, dgh) = (grads.slice(0..b * 3 * h), grads.slice(b * 3 * h..6 * b * h));
                match pos {
                    0 => {
                        let count = Self::u32(b * 3 * h, name)?;
                        launch!(gpu, "axpy_f32", count; &1.0f32, &dga, gin, &count)?;
                    }
                    1 => {
                        // Through the update gate, then through the hidden-side product.
                        let saved = self.aux[n].as_ref().ok_or_else(internal)?;
                        let z = saved.slice(b * 3 * h + b * h..b * 3 * h + 2 * b * h);
                        launch!(gpu, "mul_add_f32", len; g, &z, &mut *gin, &len)?;
                        let gm = Gemm32 {
                            m: b,
                            n: h,
                            k: 3 * h,
                            trans_a: false,
                            trans_b: true,
                            alpha: 1.0,
                            beta: 1.0,
                        };
                        gpu.gemm_rm(gm, &dgh, self.val(inp[2]), gin)?;
                    }
                    2 => {
                        let gm = Gemm32 {
                            m: h,
                            n: 3 * h,
                            k: b,
                            trans_a: true,
                            trans_b: false,
                            alpha: 1.0,
                            beta: 1.0,
                        };
                        gpu.gemm_rm(gm, self.val(inp[1]), &dgh, gin)?;
                    }
                    _ => {
                        let (rows, cols) = (Self::u32(b, name)?, Self::u32(3 * h, name)?);
                        launch!(gpu, "col_sums_add_f32", cfg = column_tiles(cols); &dgh, gin, &rows, &cols)?;
                    }
                }
            }
            Op::Reshape => gpu.axpy(1.0, g, gin)?,
            Op::Dropout { p } => {
                if self.forward_trained && p > 0.0 {
                    let mask = self.aux[n].as_ref().ok_or_else(internal)?;
                    launch!(gpu, "mul_add_f32", len; g, mask, gin, &len)?;
                } else {
                    gpu.axpy(1.0, g, gin)?;
                }
            }
            Op::Softmax => {
                let d = *node.shape.last().unwrap_or(&1);
                let (rows, cols) = (Self::u32(node.len() / d.max(1), name)?, Self::u32(d, name)?);
                launch!(gpu, "softmax_grad_add_f32", cfg = rows_config(rows, cols); y, g, gin, &rows, &cols)?;
            }
            Op::SoftmaxCrossEntropy => {
                if pos == 0 {
                    let l = self.shape(inp[0]);
                    let (rows, cols) = (Self::u32(l[0], name)?, Self::u32(l[1], name)?);
                    let total = Self::u32(l[0] * l[1], name)?;
                    let saved = self.aux[n].as_ref().ok_or_else(internal)?;
                    let probs = saved.slice(0..l[0] * l[1]);
                    let labels = self.ids[inp[1].0].as_ref().ok_or_else(internal)?;
                    launch!(gpu, "xent_grad_add_f32", total; &probs, labels, g, gin, &rows, &cols)?;
                }
            }
        }
        Ok(())
    }

    /// Checks ids against what reads them: labels of a softmax cross-entropy against its
    /// class count, ids of an embedding against its vocabulary (the CPU executor checks
    /// them when it runs the op; the kernels cannot report an error).
    fn check_labels(&self, node: NodeId, data: &[i32]) -> Result<(), NnError> {
        let carries = carriers_of(&self.graph, node);
        for reader in self.graph.nodes() {
            let reads = |pos: usize| reader.inputs.get(pos).is_some_and(|i| carries[i.0]);
            let (op, limit) = match reader.op {
                Op::SoftmaxCrossEntropy if reads(1) => {
                    ("softmax_cross_entropy", self.graph.nodes()[reader.inputs[0].0].shape[1])
                }
                Op::Embedding if reads(0) => ("embedding", self.graph.nodes()[reader.inputs[1].0].shape[0]),
                Op::SparseMatMul if reads(0) => ("sparse_matmul rows", reader.shape[0]),
                Op::SparseMatMul if reads(1) => {
                    ("sparse_matmul cols", self.graph.nodes()[reader.inputs[3].0].shape[0])
                }
                _ => continue,
            };
            if let Some((position, &id)) =
                data.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= limit)
            {
                return Err(NnError::IdOutOfRange { op, id, position, limit });
            }
        }
        Ok(())
    }
}

/// An attention node's sizes, and the per-head layout the GPU executor runs it in: q, k,
/// v and the output are copied to `[B·heads, T, D / heads]` (each head's columns as
/// contiguous matrices) so that every product is one strided-batched cuBLAS call.
struct AttentionShape {
    /// Elements of q, k, v and the output.
    len: usize,
    /// Elements of the probabilities, `B·heads·T·T`.
    probs: usize,
    /// Products per batched call, `B·heads`.
    bh: usize,
    t_len: usize,
    dh: usize,
    /// Rows of the probabilities, `B·heads·T`.
    rows: u32,
    t: u32,
    /// `(B, T, D, heads)`, as the split and merge kernels take them.
    geometry: [u32; 4],
    scale: f32,
}

impl AttentionShape {
    fn new(node: &Node, heads: usize, name: &'static str) -> Result<Self, NnError> {
        let (b, t, d) = (node.shape[0], node.shape[1], node.shape[2]);
        let u32_of = |x: usize| GpuExecutor::u32(x, name);
        let dh = d / heads.max(1);
        Ok(AttentionShape {
            len: node.len(),
            probs: b * heads * t * t,
            bh: b * heads,
            t_len: t,
            dh,
            rows: u32_of(b * heads * t)?,
            t: u32_of(t)?,
            geometry: [u32_of(b)?, u32_of(t)?, u32_of(d)?, u32_of(heads)?],
            scale: 1.0 / (dh as f32).sqrt(),
        })
    }

    /// Scaled scores per head: `scale · q · kᵀ` (`T×T`).
    fn scores(&self) -> Gemm32 {
        let (t, dh) = (self.t_len, self.dh);
        Gemm32 { m: t, n: t, k: dh, trans_a: false, trans_b: true, alpha: self.scale, beta: 0.0 }
    }

    /// Probabilities times a per-head matrix: `(T×T) · (T×dh)`.
    fn mix(&self) -> Gemm32 {
        let (t, dh) = (self.t_len, self.dh);
        Gemm32 { m: t, n: dh, k: t, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }
    }

    /// Per-head copy `index` of the buffer `per_head` holds back to back.
    fn head<'a>(&self, per_head: &'a CudaViewMut<'_, f32>, index: usize) -> CudaView<'a, f32> {
        per_head.slice(index * self.len..(index + 1) * self.len)
    }

    fn split(&self, gpu: &Gpu, x: &CudaSlice<f32>, xh: &mut CudaViewMut<'_, f32>) -> Result<(), NnError> {
        let [b, t, d, heads] = self.geometry;
        let len = b * t * d;
        launch!(gpu, "heads_split_f32", len; x, xh, &b, &t, &d, &heads)?;
        Ok(())
    }

    fn merge(
        &self,
        gpu: &Gpu,
        xh: &mut CudaViewMut<'_, f32>,
        x: &mut CudaSlice<f32>,
        add: bool,
    ) -> Result<(), NnError> {
        let [b, t, d, heads] = self.geometry;
        let (len, add) = (b * t * d, i32::from(add));
        launch!(gpu, "heads_merge_f32", len; xh, x, &b, &t, &d, &heads, &add)?;
        Ok(())
    }
}

/// A convolution's sizes, as the kernels take them.
#[derive(Clone, Copy)]
struct Geometry {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    o: u32,
    kh: u32,
    kw: u32,
    oh: u32,
    ow: u32,
    stride: u32,
    pad: u32,
    ckk: u32,
    nohw: u32,
}

impl Geometry {
    fn new(
        x: &[usize],
        w: &[usize],
        y: &[usize],
        stride: usize,
        pad: usize,
        op: &'static str,
    ) -> Result<Self, NnError> {
        let u = |v: usize| GpuExecutor::u32(v, op);
        // Bound the largest index a kernel computes.
        u(w[1] * w[2] * w[3] * x[0] * y[2] * y[3])?;
        u(x.iter().product())?;
        Ok(Geometry {
            n: u(x[0])?,
            c: u(x[1])?,
            h: u(x[2])?,
            w: u(x[3])?,
            o: u(w[0])?,
            kh: u(w[2])?,
            kw: u(w[3])?,
            oh: u(y[2])?,
            ow: u(y[3])?,
            stride: u(stride)?,
            pad: u(pad)?,
            ckk: u(w[1] * w[2] * w[3])?,
            nohw: u(x[0] * y[2] * y[3])?,
        })
    }
}

impl Executor for GpuExecutor {
    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn set_seed(&mut self, seed: u64) {
        self.rng = Rng::seed(seed);
    }

    fn set_value(&mut self, node: NodeId, data: &[f32]) -> Result<(), NnError> {
        self.check_len(node, data.len())?;
        let gpu = self.gpu.clone();
        let buffer = self.value_buffer_mut(node)?;
        gpu.stream_ref().memcpy_htod(data, buffer).map_err(|e| gpu.driver(e))?;
        Ok(())
    }

    fn set_ids(&mut self, node: NodeId, data: &[i32]) -> Result<(), NnError> {
        self.check_len(node, data.len())?;
        self.check_labels(node, data)?;
        let gpu = self.gpu.clone();
        let buffer = self.ids_buffer_mut(node)?;
        gpu.stream_ref().memcpy_htod(data, buffer).map_err(|e| gpu.driver(e))?;
        if let Some(grouping) = &mut self.groupings[node.0] {
            grouping.fill(&gpu, data)?;
        }
        Ok(())
    }

    fn forward(&mut self, params: &Params, range: Range<usize>) -> Result<(), NnError> {
        self.check_range(&range)?;
        self.load_params(params)?;
        self.forward_resident(range)
    }

    fn backward(
        &mut self,
        params: &Params,
        range: Range<usize>,
        seeds: &[(NodeId, &[f32])],
    ) -> Result<(), NnError> {
        self.backward_observed(params, range, seeds, &mut |_, _| Ok(()))
    }

    fn value(&self, node: NodeId) -> Result<&[f32], NnError> {
        let n = rules::check_readable(&self.graph, &self.filled, node)?;
        let cell = &self.host_vals[node.0];
        if let Some(v) = cell.get() {
            return Ok(v);
        }
        let data = self.gpu.download(self.val(node))?;
        let mut data = data;
        data.truncate(n.len());
        Ok(cell.get_or_init(|| data))
    }

    fn grad(&self, node: NodeId) -> Result<&[f32], NnError> {
        let n = self.graph.node(node)?;
        let Some(g) = self.grads[node.0].as_ref().filter(|_| self.requires_grad[node.0]) else {
            return Err(self.missing(node));
        };
        let cell = &self.host_grads[node.0];
        if let Some(v) = cell.get() {
            return Ok(v);
        }
        let mut data = self.gpu.download(g)?;
        data.truncate(n.len());
        Ok(cell.get_or_init(|| data))
    }

    fn param_grad(&self, index: usize) -> &[f32] {
        let Some(spec) = self.graph.params().get(index) else { return &[] };
        match self.grad(spec.node) {
            Ok(g) => g,
            Err(error) => {
                tracing::error!(%error, index, "could not read a parameter gradient from the GPU");
                &[]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_group_by_id_ascending_within_each() {
        let (keys, starts, order) = group_by_id(&[3, 0, 3, 7, 0, 3]);
        assert_eq!(keys, [0, 3, 7]);
        assert_eq!(starts, [0, 2, 5, 6]);
        assert_eq!(order, [1, 4, 0, 2, 5, 3]);
        assert_eq!(group_by_id(&[]), (vec![], vec![0], vec![]));
    }
}
