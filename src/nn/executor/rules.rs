//! The bookkeeping rules every executor follows, whatever holds its buffers: which nodes
//! gradients flow to, which nodes a forward or backward walk runs, which gradients a
//! backward zeroes, and the errors for values that are missing or do not fit. The CPU and
//! GPU executors both call these, so their semantics cannot drift apart.
use std::ops::Range;

use crate::nn::{DType, Graph, NnError, Node, NodeId, Op};

/// For each node, whether gradients flow to it: parameters, and f32 nodes that read (directly
/// or not) a parameter. Inputs and constants never need one.
pub(crate) fn requires_grad(graph: &Graph) -> Vec<bool> {
    let nodes = graph.nodes();
    let mut requires_grad = vec![false; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        requires_grad[i] = match node.op {
            Op::Param { .. } => true,
            Op::Input | Op::Constant { .. } => false,
            _ => node.dtype == DType::F32 && node.inputs.iter().any(|j| requires_grad[j.0]),
        };
    }
    requires_grad
}

/// The error for reading a node that has no value (or no gradient).
pub(crate) fn missing(graph: &Graph, node: NodeId) -> NnError {
    NnError::MissingValue { node: node.0, name: graph.nodes()[node.0].name.clone() }
}

/// Errors unless every node of `range` is in the graph.
pub(crate) fn check_in_graph(graph: &Graph, range: &Range<usize>) -> Result<(), NnError> {
    let len = graph.len();
    if range.end > len {
        return Err(NnError::UnknownNode { node: range.end.saturating_sub(1), len });
    }
    Ok(())
}

/// Errors unless `got` is the node's element count.
pub(crate) fn check_len(graph: &Graph, node: NodeId, got: usize) -> Result<(), NnError> {
    let n = graph.node(node)?;
    if n.len() != got {
        return Err(NnError::Length { node: node.0, name: n.name.clone(), expected: n.len(), got });
    }
    Ok(())
}

/// Errors unless `node` can be set with values of `dtype`: f32 values go to f32 nodes other
/// than parameters (`set_value`), i32 values to i32 nodes (`set_ids`).
pub(crate) fn check_settable(graph: &Graph, node: NodeId, dtype: DType) -> Result<&Node, NnError> {
    let n = graph.node(node)?;
    let (op, settable) = match dtype {
        DType::F32 => ("set_value", n.dtype == DType::F32 && !matches!(n.op, Op::Param { .. })),
        DType::I32 => ("set_ids", n.dtype == DType::I32),
    };
    if !settable {
        return Err(NnError::DType { op, input: "node", got: n.dtype, expected: dtype });
    }
    Ok(n)
}

/// Errors unless `node` is an f32 node that holds a value (computed or set).
pub(crate) fn check_readable<'g>(
    graph: &'g Graph,
    filled: &[bool],
    node: NodeId,
) -> Result<&'g Node, NnError> {
    let n = graph.node(node)?;
    if n.dtype != DType::F32 {
        return Err(NnError::DType { op: "value", input: "node", got: n.dtype, expected: DType::F32 });
    }
    if !filled[node.0] {
        return Err(missing(graph, node));
    }
    Ok(n)
}

/// Whether a forward walk computes node `n`: every node but parameters (which hold their
/// values) and inputs (which are set). Errors if `n` is an input that was not set, or reads
/// a node without a value.
pub(crate) fn forward_computes(graph: &Graph, filled: &[bool], n: usize) -> Result<bool, NnError> {
    let node = &graph.nodes()[n];
    match node.op {
        Op::Param { .. } => return Ok(false),
        Op::Input if !filled[n] => return Err(missing(graph, NodeId(n))),
        Op::Input => return Ok(false),
        _ => {}
    }
    match node.inputs.iter().find(|i| !filled[i.0]) {
        Some(&i) => Err(missing(graph, i)),
        None => Ok(true),
    }
}

/// Whether a backward walk runs node `n`: every node that gradients flow to, but
/// parameters (which only receive). Errors if such a node was not run forward.
pub(crate) fn backward_runs(
    graph: &Graph,
    requires_grad: &[bool],
    filled: &[bool],
    n: usize,
) -> Result<bool, NnError> {
    if !requires_grad[n] || matches!(graph.nodes()[n].op, Op::Param { .. }) {
        return Ok(false);
    }
    if !filled[n] {
        return Err(missing(graph, NodeId(n)));
    }
    Ok(true)
}

/// Calls `zero` once for each gradient that `backward(range, ..)` starts by zeroing: those
/// of the range's nodes, and of the nodes before the range that they read (parameters,
/// stage inputs), which may be read many times. `seen` (one mark per node, all false) is
/// all false again on return.
pub(crate) fn zero_grads(
    graph: &Graph,
    requires_grad: &[bool],
    range: &Range<usize>,
    seen: &mut [bool],
    mut zero: impl FnMut(usize) -> Result<(), NnError>,
) -> Result<(), NnError> {
    let mut walk = || -> Result<(), NnError> {
        for n in range.clone() {
            if requires_grad[n] {
                zero(n)?;
            }
            for &i in &graph.nodes()[n].inputs {
                if i.0 < range.start && requires_grad[i.0] && !seen[i.0] {
                    seen[i.0] = true;
                    zero(i.0)?;
                }
            }
        }
        Ok(())
    };
    let result = walk();
    for n in range.clone() {
        for &i in &graph.nodes()[n].inputs {
            seen[i.0] = false;
        }
    }
    result
}
