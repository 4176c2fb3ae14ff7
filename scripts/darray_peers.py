#!/usr/bin/env python3
"""Dask's and SciPy's figures for the cases of `tessera bench darray`, on the same machine.

Same sizes, chunk shapes and element types; Dask's threaded scheduler with as many
threads as Tessera's in-process runtime has workers (the CPU count), and `dask.distributed`
with 2 local worker processes (1 thread each) for the cluster matmul. Each figure is the
median of 5 runs after a warm-up, inputs materialized first (`persist`), results computed
in place (`persist`, `wait`) like Tessera's `wait()`. Prints one JSON line per figure, in
the format of `tessera bench --json`, with names `dask/...`; the sparse × vector cases
run with SciPy's CSR matrix (one thread), named `scipy/...`, counting the bytes as the
suite does (f32 values, 4-byte column indices, 8-byte row offsets, x and y).

    python3 -m venv /tmp/daskenv && /tmp/daskenv/bin/pip install "dask[array,distributed]" numpy scipy
    /tmp/daskenv/bin/python scripts/darray_peers.py
"""
import json
import os
import statistics
import time

import dask
import dask.array as da
import numpy as np

RUNS = 5


def timed(job):
    job()
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        job()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def report(bench, value, unit):
    print(json.dumps({"bench": f"dask/{bench}", "value": value, "unit": unit, "higher_is_better": True}), flush=True)


def spmv_case(name, matrix):
    rows, cols = matrix.shape
    x = np.ones(cols, dtype=np.float32)
    seconds = timed(lambda: matrix @ x)
    moved = matrix.nnz * (4 + 4) + (rows + 1) * 8 + cols * 4 + rows * 4
    print(json.dumps({"bench": f"scipy/{name}", "value": moved / seconds / 1e9, "unit": "GB/s",
                      "higher_is_better": True}), flush=True)


def sparse_cases():
    try:
        import scipy.sparse as sp
    except ImportError:
        print("scipy is not installed: no sparse figures", flush=True)
        return
    n = 2000
    one_d = sp.diags([-1, 2, -1], [-1, 0, 1], shape=(n, n), dtype=np.float32)
    eye = sp.identity(n, dtype=np.float32)
    poisson = (sp.kron(one_d, eye) + sp.kron(eye, one_d)).tocsr()
    spmv_case("spmv_poisson_4M_f32", poisson)
    rows = 1 << 21
    rng = np.random.default_rng(7)
    columns = rng.integers(0, rows, size=(rows, 10))
    columns.sort(axis=1)
    indptr = np.arange(0, 10 * rows + 1, 10)
    values = rng.uniform(-1, 1, size=10 * rows).astype(np.float32)
    random = sp.csr_matrix((values, columns.ravel(), indptr), shape=(rows, rows))
    spmv_case("spmv_random_nnz10_2M_f32", random)
    # SpGEMM: the Laplacian of a 1000² grid squared; flops as the suite counts them.
    n = 1000
    one_d = sp.diags([-1, 2, -1], [-1, 0, 1], shape=(n, n), dtype=np.float32)
    eye = sp.identity(n, dtype=np.float32)
    laplacian = (sp.kron(one_d, eye) + sp.kron(eye, one_d)).tocsr()
    row_nnz = np.diff(laplacian.indptr)
    partial_products = int(row_nnz[laplacian.indices].sum())
    seconds = timed(lambda: laplacian @ laplacian)
    print(json.dumps({"bench": "scipy/spgemm_poisson_1M_f32", "value": 2 * partial_products / seconds / 1e9,
                      "unit": "GFLOP/s", "higher_is_better": True}), flush=True)


def main():
    sparse_cases()
    workers = os.cpu_count()
    dask.config.set(scheduler="threads", num_workers=workers)
    rng = da.random.default_rng(1)

    n, tile = 2048, 512
    a = rng.uniform(-1, 1, size=(n, n), chunks=(tile, tile)).astype(np.float32).persist()
    b = rng.uniform(-1, 1, size=(n, n), chunks=(tile, tile)).astype(np.float32).persist()
    seconds = timed(lambda: (a @ b).persist())
    report("matmul_f32_2048", 2 * n**3 / seconds / 1e9, "GFLOP/s")

    length = 32 << 20
    x = da.arange(length, chunks=1 << 20, dtype=np.float32).persist()
    y = da.ones(length, chunks=1 << 20, dtype=np.float32).persist()
    seconds = timed(lambda: (x + y).persist())
    report("add_32Mi_f32", 3 * length * 4 / seconds / 1e9, "GB/s")
    seconds = timed(lambda: y.sum(dtype=np.float64).compute())
    report("sum_32Mi_f32", length * 4 / seconds / 1e9, "GB/s")

    big = da.arange(4096 * 4096, dtype=np.float32).reshape(4096, 4096).rechunk((512, 512)).persist()
    seconds = timed(lambda: big.rechunk((384, 640)).persist())
    report("rechunk_4096sq_f32", 4096 * 4096 * 4 / seconds / 1e9, "GB/s")

    try:
        from dask.distributed import Client, LocalCluster, wait
    except ImportError:
        print("dask.distributed is not installed: no cluster figure", flush=True)
        return
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster):
            n = 1024
            m = da.random.default_rng(3).uniform(-1, 1, size=(n, n), chunks=(256, 256)).persist()
            wait(m)

            runs = iter(range(1, 1000))

            def product():
                # A fresh left operand each run: the scheduler would otherwise hand back a
                # result it still holds under the same key.
                result = ((m * (1.0 + next(runs) * 1e-9)) @ m).persist()
                wait(result)
                del result

            seconds = timed(product)
            report("cluster_matmul_f64_1024", 2 * n**3 / seconds / 1e9, "GFLOP/s")


if __name__ == "__main__":
    main()
