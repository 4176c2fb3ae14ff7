#!/usr/bin/env python3
"""PyTorch on the same GPU, beside `tessera bench cuda --json` (run by scripts/gpu-check.sh).

Measures with PyTorch what the `cuda` suite measures, the same way (same sizes, same
warm-up, median of the same number of samples), and prints each figure beside Tessera's
with the ratio:

- device-to-device copy bandwidth (1 GiB, bytes read plus bytes written);
- GEMM at 8192^3 in f32 (TF32 off, as cuBLAS in Tessera) and bf16, in TFLOP/s;
- CSR SpMV (cuSPARSE through torch.sparse) on the 2-D Poisson matrix of 3163^2 rows and a
  random matrix of 10^7 rows with 10 nonzeros per row, in GB/s counted as Tessera counts;
- MLP 64-64-128-64-10 and the LeNet-style CNN trained on digits (batch 64, Adam 1e-3,
  data on the device, one warm-up epoch, median samples/s of five epochs).

    python3 scripts/gpu_peers.py --ours bench.json [--json peers.json]
    python3 scripts/gpu_peers.py --device cpu --small   # a quick check of this script

`--ours` is the JSON lines `tessera bench cuda --json` printed; without it only PyTorch's
figures are printed. Exits non-zero if PyTorch is missing or a measurement fails.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import warnings

import torch
import torch.nn.functional as F

# torch.sparse's CSR support says it is in beta on every construction.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def median_of(samples):
    return statistics.median(samples)


def timed(device, fn, repeat):
    """Seconds of each of `repeat` calls of `fn`, each followed by a device wait."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, floats):
    src = torch.zeros(floats, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = timed(device, lambda: dst.copy_(src), 10)
    return median_of([2 * floats * 4 / t / 1e9 for t in times])


def gemm(device, n, dtype):
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.ones(n, n, device=device, dtype=dtype)
    c = a @ b
    sync(device)
    times = timed(device, lambda: torch.matmul(a, b, out=c), 10)
    return median_of([2 * n**3 / t / 1e12 for t in times])


def poisson(n, device):
    """The 5-point Laplacian on an n x n grid (as the suite's), in CSR."""
    idx = torch.arange(n * n, device=device)
    i, j = idx // n, idx % n
    # Columns in increasing order within each row: up, left, centre, right, down.
    offsets = [(-n, i > 0), (-1, j > 0), (0, None), (1, j + 1 < n), (n, i + 1 < n)]
    cols, vals, keep = [], [], []
    for off, mask in offsets:
        cols.append(idx + off)
        vals.append(torch.full((n * n,), 4.0 if off == 0 else -1.0, device=device))
        keep.append(torch.ones(n * n, dtype=torch.bool, device=device) if mask is None else mask)
    cols, vals, keep = torch.stack(cols, 1), torch.stack(vals, 1), torch.stack(keep, 1)
    crow = torch.zeros(n * n + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(keep.sum(1), 0)
    return csr(crow, cols[keep], vals[keep], n * n)


def random_csr(rows, per_row, device):
    """`per_row` pseudo-random sorted columns in each row (duplicates redrawn)."""
    gen = torch.Generator(device=device).manual_seed(0x2545F491)
    cols = torch.randint(0, rows, (rows, per_row), device=device, generator=gen)
    cols, _ = cols.sort(1)
    # Redraw the rows with a repeated column until none is left (rare at 10 per 10^7).
    while True:
        dup = (cols[:, 1:] == cols[:, :-1]).any(1)
        if not dup.any():
            break
        fresh = torch.randint(0, rows, (int(dup.sum()), per_row), device=device, generator=gen)
        cols[dup] = fresh.sort(1)[0]
    crow = torch.arange(0, rows * per_row + 1, per_row, device=device)
    vals = torch.ones(rows * per_row, device=device)
    return csr(crow, cols.reshape(-1), vals, rows)


def csr(crow, cols, vals, n):
    """A square CSR matrix with 32-bit indices, as Tessera's (and the bytes counted)."""
    return torch.sparse_csr_tensor(
        crow.to(torch.int32), cols.to(torch.int32), vals, (n, n), check_invariants=False
    )


def spmv(device, matrix):
    rows, cols = matrix.shape
    nnz = matrix.values().numel()
    # Bytes as the suite counts them: values and column indices, row offsets, x and y.
    nbytes = nnz * 8 + (rows + 1) * 4 + cols * 4 + rows * 4
    x = torch.ones(cols, device=device)
    y = matrix @ x
    sync(device)

    def ten():
        for _ in range(10):
            torch.mv(matrix, x, out=y)

    times = timed(device, ten, 10)
    return median_of([10 * nbytes / t / 1e9 for t in times])


def digits(device):
    rows = [line.split(",") for line in Path("data/digits.csv").read_text().splitlines() if line.strip()]
    x = torch.tensor([[float(v) / 16.0 for v in r[:64]] for r in rows], device=device)
    y = torch.tensor([int(r[64]) for r in rows], device=device)
    return x, y


def mlp():
    sizes = [64, 64, 128, 64, 10]
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i + 2 < len(sizes):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def lenet():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Dropout(0.25),
        torch.nn.Linear(64, 10),
    )


def train_rate(device, model, x, y, batch=64):
    """Median samples/s of five epochs over (x, y) after one warm-up epoch; each epoch also
    sums the loss and counts correct answers on the device, as Tessera's trainer does."""
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = len(x) // batch

    def epoch():
        order = torch.randperm(len(x), device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y[idx]).sum()
        return loss_sum.item(), correct.item()

    epoch()
    sync(device)
    times = timed(device, epoch, 5)
    return median_of([steps * batch / t for t in times])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", help="JSON lines of `tessera bench cuda --json`")
    parser.add_argument("--json", help="also write PyTorch's figures here as JSON lines")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small sizes (a check of this script)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_peers: PyTorch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"PyTorch {torch.__version__} on {name}", flush=True)

    ours = {}
    if args.ours:
        for line in Path(args.ours).read_text().splitlines():
            try:
                row = json.loads(line)
                ours[row["bench"]] = row["value"]
            except (ValueError, KeyError, TypeError):
                pass

    small = args.small
    n = 512 if small else 8192
    grid = 100 if small else 3163
    rows = 10_000 if small else 10_000_000
    figures = [
        ("cuda/copy_bandwidth", "GB/s", lambda: copy_bandwidth(device, (1 << 20) if small else (256 << 20))),
        ("cuda/gemm_f32_8192", "TFLOP/s", lambda: gemm(device, n, torch.float32)),
        ("cuda/gemm_bf16_8192", "TFLOP/s", lambda: gemm(device, n, torch.bfloat16)),
        ("cuda/spmv_poisson_1e7", "GB/s", lambda: spmv(device, poisson(grid, device))),
        ("cuda/spmv_random_1e7_nnz10", "GB/s", lambda: spmv(device, random_csr(rows, 10, device))),
    ]
    x, y = digits(device)
    figures += [
        ("cuda/train_mlp_digits", "samples/s", lambda: train_rate(device, mlp(), x, y)),
        ("cuda/train_cnn_digits", "samples/s", lambda: train_rate(device, lenet(), x, y)),
    ]

    out = open(args.json, "w") if args.json else None
    print(f"{'figure':32} {'unit':10} {'tessera':>12} {'pytorch':>12} {'ratio':>8}")
    for bench, unit, measure in figures:
        theirs = measure()
        mine = ours.get(bench)
        mine_text = f"{mine:12.1f}" if mine is not None else f"{'-':>12}"
        ratio = f"{100 * mine / theirs:7.1f}%" if mine is not None and theirs > 0 else f"{'-':>8}"
        print(f"{bench:32} {unit:10} {mine_text} {theirs:12.1f} {ratio}", flush=True)
        if out:
            out.write(json.dumps({"bench": bench.replace("cuda/", "torch/", 1), "value": theirs, "unit": unit}) + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main()
