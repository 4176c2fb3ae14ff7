//! The model zoo: functions that build a model's graph for a given batch size.
//!
//! Every model has the same interface ([`Model`]): one input, one i32 target, logits and a
//! scalar mean cross-entropy loss. Building the same model twice with different batch sizes
//! gives graphs with the same parameter list, so one [`Params`](crate::nn::Params) serves
//! a training graph and an evaluation graph.
use crate::nn::layers::{
    ids_input, Conv2d, Dropout, Embedding, Gru, LayerNorm, Linear, MaxPool2d, MultiHeadSelfAttention,
};
use crate::nn::{Activation, DType, Graph, Init, NnError, NodeId};

/// A built model: its graph and the nodes a trainer feeds and reads.
#[derive(Debug, Clone)]
pub struct Model {
    /// The op graph.
    pub graph: Graph,
    /// The input node (features f32, or token ids i32).
    pub input: NodeId,
    /// The i32 targets (`[N]` class labels, or `[B·T]` next-token ids).
    pub target: NodeId,
    /// The logits `[N, classes]`.
    pub logits: NodeId,
    /// The scalar mean cross-entropy.
    pub loss: NodeId,
}

fn classifier_head(mut g: Graph, input: NodeId, logits: NodeId, rows: usize) -> Result<Model, NnError> {
    let target = ids_input(&mut g, "target", &[rows]);
    let loss = g.softmax_cross_entropy(logits, target)?;
    Ok(Model { graph: g, input, target, logits, loss })
}

/// Multinomial logistic regression on `features`-wide inputs.
///
/// # Errors
/// Only on internal inconsistency (shapes are fixed here).
pub fn logistic_regression(batch: usize, features: usize, classes: usize) -> Result<Model, NnError> {
    let mut g = Graph::new();
    let x = g.input("x", &[batch, features], DType::F32);
    let fc = Linear::new(&mut g, "fc", features, classes)?;
    let logits = fc.forward(&mut g, x, Activation::Identity)?;
    classifier_head(g, x, logits, batch)
}

/// A multilayer perceptron with ReLU hidden layers: `sizes = [in, hidden.., classes]`.
///
/// # Errors
/// [`NnError::Argument`] with fewer than two sizes.
pub fn mlp(batch: usize, sizes: &[usize]) -> Result<Model, NnError> {
    if sizes.len() < 2 {
        return Err(NnError::Argument { op: "mlp", what: "needs at least input and output sizes".into() });
    }
    let mut g = Graph::new();
    let x = g.input("x", &[batch, sizes[0]], DType::F32);
    let mut h = x;
    let last = sizes.len() - 2;
    for (i, pair) in sizes.windows(2).enumerate() {
        let fc = Linear::new(&mut g, &format!("fc{}", i + 1), pair[0], pair[1])?;
        let act = if i == last { Activation::Identity } else { Activation::Relu };
        h = fc.forward(&mut g, h, act)?;
    }
    classifier_head(g, x, h, batch)
}

/// A LeNet-style CNN for `side × side` single-channel images (side divisible by 4):
/// conv 3×3 (16) → pool → conv 3×3 (32) → pool → fc 64 → dropout → fc classes.
///
/// # Errors
/// [`NnError::Shape`] if `side` is too small.
pub fn lenet(batch: usize, side: usize, classes: usize) -> Result<Model, NnError> {
    let mut g = Graph::new();
    let x = g.input("x", &[batch, side * side], DType::F32);
    let img = g.reshape(x, &[batch, 1, side, side])?;
    let conv1 = Conv2d::new(&mut g, "conv1", 1, 16, 3, 1, 1)?;
    let pool = MaxPool2d { size: 2, stride: 2 };
    let h = conv1.forward(&mut g, img, Activation::Relu)?;
    let h = pool.forward(&mut g, h)?;
    let conv2 = Conv2d::new(&mut g, "conv2", 16, 32, 3, 1, 1)?;
    let h = conv2.forward(&mut g, h, Activation::Relu)?;
    let h = pool.forward(&mut g, h)?;
    let flat: usize = g.shape(h)?[1..].iter().product();
    let h = g.reshape(h, &[batch, flat])?;
    let fc1 = Linear::new(&mut g, "fc1", flat, 64)?;
    let h = fc1.forward(&mut g, h, Activation::Relu)?;
    let h = Dropout { p: 0.25 }.forward(&mut g, h)?;
    let fc2 = Linear::new(&mut g, "fc2", 64, classes)?;
    let logits = fc2.forward(&mut g, h, Activation::Identity)?;
    classifier_head(g, x, logits, batch)
}

/// A classifier of the zoo without its batch size: what a node process needs to build the
/// same model for the rows it trains on (a data-parallel group that shrinks changes every
/// replica's rows).
///
/// # Examples
/// ```
/// use tessera::nn::ModelSpec;
/// let spec = ModelSpec::Lenet { side: 8, classes: 10 };
/// let (a, b) = (spec.build(32)?, spec.build(64)?);
/// assert_eq!(a.graph.params(), b.graph.params());
/// # Ok::<(), tessera::nn::NnError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ModelSpec {
    /// [`logistic_regression`].
    LogisticRegression {
        /// Input features.
        features: usize,
        /// Classes.
        classes: usize,
    },
    /// [`mlp`].
    Mlp {
        /// `[in, hidden.., classes]`.
        sizes: Vec<usize>,
    },
    /// [`lenet`].
    Lenet {
        /// Image side (divisible by 4).
        side: usize,
        /// Classes.
        classes: usize,
    },
}

impl ModelSpec {
    /// Builds the model for `batch` rows.
    ///
    /// # Errors
    /// As the zoo function it names.
    pub fn build(&self, batch: usize) -> Result<Model, NnError> {
        match self {
            ModelSpec::LogisticRegression { features, classes } => {
                logistic_regression(batch, *features, *classes)
            }
            ModelSpec::Mlp { sizes } => mlp(batch, sizes),
            ModelSpec::Lenet { side, classes } => lenet(batch, *side, *classes),
        }
    }
}

/// A character-level GRU language model: embedding → GRU → linear to the vocabulary,
/// predicting each next character of `[batch, steps]` windows.
///
/// # Errors
/// Only on internal inconsistency.
pub fn char_gru(
    batch: usize,
    steps: usize,
    vocab: usize,
    embed: usize,
    hidden: usize,
) -> Result<Model, NnError> {
    let mut g = Graph::new();
    let tokens = ids_input(&mut g, "tokens", &[batch, steps]);
    let emb = Embedding::new(&mut g, "embed", vocab, embed)?;
    let x = emb.forward(&mut g, tokens)?;
    let gru = Gru::new(&mut g, "gru", embed, hidden)?;
    let h = gru.forward(&mut g, x)?;
    let h = g.reshape(h, &[batch * steps, hidden])?;
    let head = Linear::new(&mut g, "head", hidden, vocab)?;
    let logits = head.forward(&mut g, h, Activation::Identity)?;
    classifier_head(g, tokens, logits, batch * steps)
}

/// Sizes of [`tiny_transformer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransformerConfig {
    /// Model width.
    pub width: usize,
    /// Attention heads (divide `width`).
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden width of the feed-forward part.
    pub ff: usize,
}

/// A decoder-only (causal) pre-norm transformer language model over characters.
///
/// # Errors
/// [`NnError::Argument`] if `heads` does not divide `width`.
pub fn tiny_transformer(
    batch: usize,
    steps: usize,
    vocab: usize,
    cfg: TransformerConfig,
) -> Result<Model, NnError> {
    let mut g = Graph::new();
    let tokens = ids_input(&mut g, "tokens", &[batch, steps]);
    let emb = Embedding::new(&mut g, "embed", vocab, cfg.width)?;
    let pos = g.param("pos", &[steps, cfg.width], Init::Normal { std: 0.02 })?;
    let x = emb.forward(&mut g, tokens)?;
    let mut x = g.add(x, pos)?;
    for l in 0..cfg.layers {
        let ln1 = LayerNorm::new(&mut g, &format!("block{l}.ln1"), cfg.width)?;
        let attn =
            MultiHeadSelfAttention::new(&mut g, &format!("block{l}.attn"), cfg.width, cfg.heads, true)?;
        let h = ln1.forward(&mut g, x)?;
        let h = attn.forward(&mut g, h)?;
        x = g.add(x, h)?;
        let ln2 = LayerNorm::new(&mut g, &format!("block{l}.ln2"), cfg.width)?;
        let ff1 = Linear::new(&mut g, &format!("block{l}.ff1"), cfg.width, cfg.ff)?;
        let ff2 = Linear::new(&mut g, &format!("block{l}.ff2"), cfg.ff, cfg.width)?;
        let h = ln2.forward(&mut g, x)?;
        let h = ff1.forward(&mut g, h, Activation::Identity)?;
        let h = g.gelu(h)?;
        let h = ff2.forward(&mut g, h, Activation::Identity)?;
        x = g.add(x, h)?;
    }
    let lnf = LayerNorm::new(&mut g, "ln_f", cfg.width)?;
    let x = lnf.forward(&mut g, x)?;
    let x = g.reshape(x, &[batch * steps, cfg.width])?;
    let head = Linear::new(&mut g, "head", cfg.width, vocab)?;
    let logits = head.forward(&mut g, x, Activation::Identity)?;
    classifier_head(g, tokens, logits, batch * steps)
}

/// A two-layer graph convolutional network (Kipf and Welling) for node classification on
/// one graph: `logits = Â · relu(Â · X·W₁ + b₁) · W₂ + b₂`, where `Â` is the graph's
/// normalized adjacency ([`gcn_adjacency`]) held as a sparse matrix in coordinate form. The
/// loss is the mean cross-entropy over the labelled nodes only (picked out of the logits by
/// a second sparse product), so the other nodes' labels stay unseen.
#[derive(Debug, Clone)]
pub struct Gcn {
    /// The op graph.
    pub graph: Graph,
    /// Node features `[nodes, features]`.
    pub features: NodeId,
    /// `Â`'s row ids `[entries]` (i32).
    pub adjacency_rows: NodeId,
    /// `Â`'s column ids `[entries]` (i32).
    pub adjacency_cols: NodeId,
    /// `Â`'s values `[entries]`.
    pub adjacency_values: NodeId,
    /// The labelled nodes, `[labelled]` (i32).
    pub labelled: NodeId,
    /// Their labels, `[labelled]` (i32).
    pub labels: NodeId,
    /// Every node's logits `[nodes, classes]`.
    pub logits: NodeId,
    /// The mean cross-entropy over the labelled nodes.
    pub loss: NodeId,
    picked_rows: NodeId,
}

impl Gcn {
    /// Sets the graph's inputs on `exec`: features (row-major), `Â` as from
    /// [`gcn_adjacency`], and the labelled nodes with their labels.
    ///
    /// # Errors
    /// As [`Executor::set_value`](crate::nn::Executor::set_value) and `set_ids` (lengths,
    /// ids outside the graph or the classes).
    pub fn bind(
        &self,
        exec: &mut dyn crate::nn::Executor,
        features: &[f32],
        adjacency: &CooMatrix,
        labelled: &[i32],
        labels: &[i32],
    ) -> Result<(), NnError> {
        exec.set_value(self.features, features)?;
        exec.set_ids(self.adjacency_rows, &adjacency.rows)?;
        exec.set_ids(self.adjacency_cols, &adjacency.cols)?;
        exec.set_value(self.adjacency_values, &adjacency.values)?;
        let rows: Vec<i32> = (0..labelled.len() as i32).collect();
        exec.set_ids(self.picked_rows, &rows)?;
        exec.set_ids(self.labelled, labelled)?;
        exec.set_ids(self.labels, labels)
    }
}

/// A [`Gcn`] for a graph of `nodes` nodes whose normalized adjacency has `entries` stored
/// entries, `features` features a node, `labelled` labelled nodes and `classes` classes.
///
/// # Errors
/// [`NnError::Argument`] for a zero size.
pub fn gcn(
    nodes: usize,
    entries: usize,
    features: usize,
    hidden: usize,
    classes: usize,
    labelled: usize,
) -> Result<Gcn, NnError> {
    if [nodes, features, hidden, classes, labelled].contains(&0) {
        return Err(NnError::Argument { op: "gcn", what: "every size must be positive".into() });
    }
    let mut g = Graph::new();
    let x = g.input("features", &[nodes, features], DType::F32);
    let rows = g.input("adjacency.rows", &[entries], DType::I32);
    let cols = g.input("adjacency.cols", &[entries], DType::I32);
    let values = g.input("adjacency.values", &[entries], DType::F32);
    let layer1 = Linear::new(&mut g, "gc1", features, hidden)?;
    let layer2 = Linear::new(&mut g, "gc2", hidden, classes)?;
    // Â·(X·W₁) + b₁ = Â·(X·W₁ + b₁) when Â's rows sum to one; with the symmetric
    // normalization they do not, so the bias is added after the propagation.
    let xw = g.matmul(x, layer1.weight)?;
    let propagated = g.sparse_matmul(rows, cols, values, xw, nodes)?;
    let h = g.add(propagated, layer1.bias)?;
    let h = g.act(h, Activation::Relu)?;
    let hw = g.matmul(h, layer2.weight)?;
    let propagated = g.sparse_matmul(rows, cols, values, hw, nodes)?;
    let logits = g.add(propagated, layer2.bias)?;
    // The labelled nodes' logits: a selection matrix with one 1 a row.
    let picked_rows = g.input("picked.rows", &[labelled], DType::I32);
    let labelled_nodes = g.input("labelled", &[labelled], DType::I32);
    let ones = g.constant(&[labelled], 1.0);
    let picked = g.sparse_matmul(picked_rows, labelled_nodes, ones, logits, labelled)?;
    let labels = g.input("labels", &[labelled], DType::I32);
    let loss = g.softmax_cross_entropy(picked, labels)?;
    Ok(Gcn {
        graph: g,
        features: x,
        adjacency_rows: rows,
        adjacency_cols: cols,
        adjacency_values: values,
        labelled: labelled_nodes,
        labels,
        logits,
        loss,
        picked_rows,
    })
}

/// The GCN's propagation matrix `Â = D^-½ (A + I) D^-½` of an undirected graph of `nodes`
/// nodes with `edges` (each pair once, either way round; self-loops and repeats are
/// dropped), in coordinate form: row ids, column ids, values.
///
/// # Errors
/// [`NnError::IdOutOfRange`] for an edge naming a node `≥ nodes`.
pub fn gcn_adjacency(nodes: usize, edges: &[(u32, u32)]) -> Result<CooMatrix, NnError> {
    let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(2 * edges.len() + nodes);
    for (position, &(a, b)) in edges.iter().enumerate() {
        for id in [a, b] {
            if id as usize >= nodes {
                return Err(NnError::IdOutOfRange {
                    op: "gcn_adjacency",
                    id: id as i32,
                    position,
                    limit: nodes,
                });
            }
        }
        if a != b {
            pairs.push((a, b));
            pairs.push((b, a));
        }
    }
    pairs.extend((0..nodes as u32).map(|i| (i, i)));
    pairs.sort_unstable();
    pairs.dedup();
    let mut degree = vec![0f32; nodes];
    for &(a, _) in &pairs {
        degree[a as usize] += 1.0;
    }
    let scale: Vec<f32> = degree.iter().map(|d| 1.0 / d.sqrt()).collect();
    Ok(CooMatrix {
        rows: pairs.iter().map(|&(a, _)| a as i32).collect(),
        cols: pairs.iter().map(|&(_, b)| b as i32).collect(),
        values: pairs.iter().map(|&(a, b)| scale[a as usize] * scale[b as usize]).collect(),
    })
}

/// A sparse matrix in coordinate form, as [`Graph::sparse_matmul`](crate::nn::Graph::sparse_matmul)
/// reads it: entry `e` is `values[e]` at (`rows[e]`, `cols[e]`); repeated coordinates add.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CooMatrix {
    /// Each entry's row.
    pub rows: Vec<i32>,
    /// Each entry's column.
    pub cols: Vec<i32>,
    /// Each entry's value.
    pub values: Vec<f32>,
}
