"""The benchmark runner's smoke run: --quick writes a stamped CSV/JSON (+ plot) and never crashes on a
provider that cannot run here (it is recorded as skipped, with its reason)."""
import csv
import json

import pytest

from vqkernels.bench import runner

STAMPS = ["date_utc", "device_name", "cpu_model", "cores", "git_sha", "python", "torch", "vqkernels"]
STATUSES = {"ok", "skipped", "too_big", "timeout", "error", "oom"}


def _read(out):
    with open(out / "nearest_code.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    with open(out / "nearest_code.json") as f:
        data = json.load(f)
    return header, rows, data


def test_quick_run_writes_stamped_results(tmp_path, capsys):
    out = tmp_path / "quick"
    rc = runner.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert rc == 0
    header, rows, data = _read(out)
    assert header == runner.CSV_COLUMNS
    assert rows and len(rows) == len(data["results"])
    for r in rows:
        assert r["status"] in STATUSES, r
        if r["status"] == "ok":
            assert float(r["time_s"]) > 0 and float(r["gflops"]) > 0 and float(r["vectors_per_s"]) > 0
            assert r["peak_mem_bytes"] != "" and r["mem_method"]
            if r["kind"] != "floor":
                assert float(r["correct_frac"]) == 1.0, r  # fp32 and bf16 peers all widen or are exact here
        else:
            assert r["reason"], f"{r['provider']} {r['status']} without a reason"
        for k in STAMPS:
            assert r[k] != "", f"stamp {k} missing"
    by_prov = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"torch", "taming", "vqtorch", "torch_mm"} <= by_prov  # pure torch: they always run
    meta = data["meta"]
    for k in STAMPS + ["triton", "faiss", "cpu_isa", "usable_cores", "isolation"]:
        assert k in meta
    assert meta["isolation"] == "in-process"
    assert (out / "nearest_code.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "vs best peer" in table and "N=512 K=256 D=32 fp32" in table


def test_subprocess_measurement_reads_peak_memory(tmp_path):
    # One fresh subprocess: exercises the child protocol, the RSS baseline and the watchdog loop.
    out = tmp_path / "sub"
    rc = runner.main(["--sizes", "2048x1024x16", "--providers", "taming", "--subprocess", "--repeats", "1",
                      "--threads", "1", "--device", "cpu", "--no-plot", "--out", str(out)])
    assert rc == 0
    _, rows, data = _read(out)
    (r,) = rows
    assert r["status"] == "ok", r["reason"]
    assert r["isolation"] == "subprocess"
    # taming holds 2048 x 1024 fp32 distance matrices (8 MiB each): its peak must show at least one.
    assert int(r["peak_mem_bytes"]) >= 8 * 2**20
    assert float(r["correct_frac"]) == 1.0


def test_unavailable_provider_is_skipped_with_reason(tmp_path):
    out = tmp_path / "skip"
    rc = runner.main(["--sizes", "64x32x8", "--providers", "cuda", "cublas_matmul", "--device", "cpu",
                      "--in-process", "--repeats", "1", "--no-plot", "--out", str(out)])
    assert rc == 0
    _, rows, _ = _read(out)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert all(r["reason"] for r in rows)


def test_memory_cap_skips_full_matrix_providers(tmp_path):
    out = tmp_path / "cap"
    rc = runner.main(["--sizes", "4096x4096x8", "--providers", "taming", "torch", "--device", "cpu",
                      "--in-process", "--repeats", "1", "--mem-cap-gb", "0.01", "--no-plot", "--out", str(out)])
    assert rc == 0
    _, rows, _ = _read(out)
    st = {r["provider"]: r["status"] for r in rows}
    assert st == {"taming": "too_big", "torch": "ok"}


@pytest.mark.parametrize("token,expect", [("65536x8192x64", (65536, 8192, 64)), ("taming", (3072, 1024, 256))])
def test_size_parsing(token, expect):
    from vqkernels.bench import nearest_code as nc

    s = runner._parse_size(nc, token)
    assert (s.N, s.K, s.D) == expect
