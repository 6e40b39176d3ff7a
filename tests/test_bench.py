"""The benchmark runner's smoke runs: --quick writes a stamped CSV/JSON (+ plot) per op and never crashes on a
provider that cannot run here (it is recorded as skipped, with its reason)."""
import csv
import json
import sys
from pathlib import Path

import pytest

# The harness lives in the checkout's benchmarks/ (not in the installed package): its root on the path, after
# whatever vqkernels this run imports.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from benchmarks.harness import runner  # noqa: E402
from benchmarks.suites import nearest_code as nc  # noqa: E402

STAMPS = ["date_utc", "device_name", "cpu_model", "cores", "git_sha", "python", "torch", "vqkernels"]
STATUSES = {"ok", "skipped", "too_big", "timeout", "error", "oom"}


def _importable(*names):
    """Whether every one of these modules imports here. A real import, as the runner's own check: a peer that is
    absent, hidden (the GPU image has none) or broken counts as missing however its import fails (find_spec alone
    would say yes to a broken one, and raises where a finder refuses the name)."""
    for name in names:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001
            return False
    return True


def _skipped_naming(row, module):
    """A peer's row where the peer cannot be imported: skipped, with a reason that names it."""
    assert row["status"] == "skipped" and module in row["reason"], row


def _read(out, op="nearest_code"):
    with open(out / f"{op}.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    with open(out / f"{op}.json") as f:
        data = json.load(f)
    return header, rows, data


def test_quick_run_writes_stamped_results(tmp_path, capsys):
    out = tmp_path / "quick"
    rc = runner.main(["--quick", "--ops", "nearest_code", "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert rc == 0
    header, rows, data = _read(out)
    assert header == nc.SUITE.csv_columns()
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
    for r in rows:
        if r["provider"] == "faiss" and r["dtype"] == "fp32":  # the one peer this suite imports
            if _importable("faiss"):
                assert r["status"] == "ok" and float(r["correct_frac"]) == 1.0, r
            else:
                _skipped_naming(r, "faiss")
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
    rc = runner.main(["--ops", "nearest_code", "--sizes", "2048x1024x16", "--providers", "taming", "--subprocess",
                      "--repeats", "1",
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
    rc = runner.main(["--ops", "nearest_code", "--sizes", "4096x4096x8", "--providers", "taming", "torch",
                      "--device", "cpu",
                      "--in-process", "--repeats", "1", "--mem-cap-gb", "0.01", "--no-plot", "--out", str(out)])
    assert rc == 0
    _, rows, _ = _read(out)
    st = {r["provider"]: r["status"] for r in rows}
    assert st == {"taming": "too_big", "torch": "ok"}


@pytest.mark.parametrize("token,expect", [("65536x8192x64", (65536, 8192, 64)), ("taming", (3072, 1024, 256))])
def test_size_parsing(token, expect):
    s = nc.SUITE.parse_size(token)
    assert (s.N, s.K, s.D) == expect


# ---------------------------------------------------------------------------------------------
# The quantizer training-step suite

def test_quantizer_quick_run(tmp_path, capsys):
    from benchmarks.suites import quantizer as q

    have = {"taming": _importable("taming.modules.vqvae.quantize"), "vqtorch": _importable("vector_quantize_pytorch")}
    have["vqtorch-ema"] = have["vqtorch"]
    module = {"taming": "taming", "vqtorch": "vector_quantize_pytorch", "vqtorch-ema": "vector_quantize_pytorch"}
    out = tmp_path / "q"
    rc = runner.main(["--quick", "--ops", "quantizer", "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert rc == 0
    assert not (out / "nearest_code.csv").exists()
    header, rows, data = _read(out, "quantizer")
    assert header == q.SUITE.csv_columns()
    assert {r["provider"] for r in rows} == set(q.CPU_PROVIDERS)
    assert len(rows) == len(q.CPU_PROVIDERS) * len(q.default_cases("cpu", quick=True))
    for r in rows:
        assert r["op"] == "quantizer"
        assert r["status"] in STATUSES, r
        peer = r["provider"] if r["provider"] in module else None
        if peer and not have[peer]:
            _skipped_naming(r, module[peer])
            continue
        # ours always run; a peer that imports runs too
        assert r["status"] == "ok", f"{r['provider']}: {r['status']}: {r['reason']}"
        assert float(r["time_s"]) > 0 and float(r["tokens_per_s"]) > 0 and r["peak_mem_bytes"] != ""
        # the same codebook and input: every module picks taming's codes (taming's formula where it is missing)
        assert float(r["index_match_vs_taming"]) == 1.0, r
        assert float(r["loss"]) > 0
        for p, present in have.items():  # a ratio against each peer that ran, none against one that did not
            if r["provider"] != p:
                assert (r[f"speedup_vs_{p}"] != "") == present, (p, r)
        for k in STAMPS:
            assert r[k] != "", f"stamp {k} missing"
    by = {(r["case"], r["provider"]): r for r in rows}
    for (case, prov), r in by.items():
        twin = q.TWINS.get(prov)
        if twin and have[twin]:
            assert r["loss_twin"] == twin and float(r["loss_rel_diff"]) < 1e-5, r  # the same loss as its peer
        elif twin:
            assert r["loss_twin"] == "" and r["loss_rel_diff"] == "", r
    assert (out / "quantizer.png").stat().st_size > 0
    table = capsys.readouterr().out
    # the like-with-like lines where the peer ran; a missing peer's rows are skipped with the reason
    assert ("vqkernels vs taming" in table) == have["taming"]
    assert ("vqkernels-ema vs vqtorch-ema" in table) == have["vqtorch"]


def test_ops_default_to_every_suite_and_filter_by_provider():
    args = runner.build_parser().parse_args([])
    assert runner.plan_ops(args) == ["nearest_code", "quantizer"]
    # with several ops, each takes the provider names it knows; an op that knows none is left out
    args = runner.build_parser().parse_args(["--providers", "vqtorch-ema"])
    assert runner.plan_ops(args) == ["quantizer"]
    args = runner.build_parser().parse_args(["--providers", "faiss", "taming"])
    assert runner.plan_ops(args) == ["nearest_code", "quantizer"]
    args = runner.build_parser().parse_args(["--op", "nearest_code"])  # the old spelling
    assert runner.plan_ops(args) == ["nearest_code"]
    with pytest.raises(SystemExit):
        runner.plan_ops(runner.build_parser().parse_args(["--providers", "nosuch"]))


def test_list_shows_both_suites(capsys):
    assert runner.main(["--list", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "providers (nearest_code)" in text and "providers (quantizer)" in text
    assert "12288x1024x256 fp32" in text and "32768x16384x8 fp32" in text
    assert "131072x16384x32" not in text.split("providers (quantizer)")[1].split("planned")[1]  # CPU: --large only


def test_missing_peers_are_skipped_with_a_reason(tmp_path, monkeypatch):
    # The GPU image has none of the peers: their rows are skipped with the reason and ours still run and are
    # checked (against taming's formula, when taming itself is missing).
    for name in ("taming", "vector_quantize_pytorch", "faiss"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    out = tmp_path / "nopeers"
    rc = runner.main(["--quick", "--ops", "quantizer", "--device", "cpu", "--threads", "1", "--no-plot",
                      "--out", str(out)])
    assert rc == 0
    _, rows, _ = _read(out, "quantizer")
    st = {r["provider"]: r for r in rows if r["case"].startswith("768x256x32")}
    for peer, module in (("taming", "taming"), ("vqtorch", "vector_quantize_pytorch"),
                         ("vqtorch-ema", "vector_quantize_pytorch")):
        assert st[peer]["status"] == "skipped" and module in st[peer]["reason"], st[peer]
    for ours in ("vqkernels", "vqkernels-ema"):
        assert st[ours]["status"] == "ok", st[ours]["reason"]
        assert float(st[ours]["index_match_vs_taming"]) == 1.0
    out = tmp_path / "nofaiss"
    assert runner.main(["--sizes", "64x32x8", "--providers", "faiss", "torch", "--device", "cpu", "--in-process",
                        "--repeats", "1", "--no-plot", "--out", str(out)]) == 0
    _, rows, _ = _read(out)
    st = {r["provider"]: r for r in rows}
    assert st["faiss"]["status"] == "skipped" and "faiss" in st["faiss"]["reason"]
    assert st["torch"]["status"] == "ok"


def test_every_suite_declares_the_protocol():
    # Each suite imports without its providers' packages and declares sizes of its own named dimensions,
    # metrics with units, providers of known kinds, and CSV columns that hold its dimensions and metrics.
    from benchmarks.harness.protocol import KINDS, Suite
    from benchmarks.suites import SUITES, load_suite

    for op in SUITES:
        suite = load_suite(op)
        assert isinstance(suite, Suite) and suite.op == op
        fields = suite.Size._fields
        assert fields and all(isinstance(s.size, suite.Size) for s in suite.sizes.values()), op
        assert suite.metrics and all(m.unit and m.column for m in suite.metrics), op
        cols = suite.csv_columns()
        assert set(fields) <= set(cols) and {m.column for m in suite.metrics} <= set(cols), op
        assert all(p.kind in KINDS for p in suite.providers.values()), op
        for device in ("cpu", "cuda"):
            for c in suite.default_cases(device, quick=True):
                assert isinstance(c.size, suite.Size) and c.dtype in suite.dtypes and c.providers, (op, c)
                assert not suite.modes or c.mode in suite.modes, (op, c)
                assert set(c.providers) <= set(suite.providers), (op, c)


# ---------------------------------------------------------------------------------------------
# The attention and model suites: the same runner, their own dimensions and units

def test_attention_quick_run_reports_its_units(tmp_path):
    from benchmarks.suites import attention as at

    out = tmp_path / "att"
    rc = runner.main(["--quick", "--ops", "attention", "--device", "cpu", "--threads", "1", "--no-plot",
                      "--providers", "torch", "sdpa", "mingpt", "sdpa-mask", "mingpt-past", "--out", str(out)])
    assert rc == 0
    header, rows, _ = _read(out, "attention")
    assert header == at.SUITE.csv_columns() and {"B", "H", "T", "Dh", "mode", "tflops", "gb_per_s"} <= set(header)
    ran = [r for r in rows if r["status"] == "ok"]
    assert {(r["provider"], r["mode"]) for r in ran} >= {("torch", "fwd"), ("sdpa", "fwdbwd-causal"),
                                                         ("mingpt", "fwd"), ("sdpa-mask", "decode"),
                                                         ("mingpt-past", "decode")}
    for r in rows:
        if r["status"] != "ok":
            assert r["reason"], r
            continue
        assert float(r["max_abs_err"]) < 1e-4, r  # fp32 against a float32 explicit computation
        if r["mode"] == "decode":
            assert float(r["tokens_per_s"]) > 0 and float(r["gb_per_s"]) > 0 and r["tflops"] == ""
        else:
            assert float(r["tflops"]) > 0 and r["gb_per_s"] == ""
    # the decoding-only providers are skipped, with the reason, on the other modes
    st = {(r["provider"], r["mode"]): r for r in rows}
    assert st[("sdpa-mask", "fwd")]["status"] == "skipped" and st[("sdpa-mask", "fwd")]["reason"]


def test_model_suites_quick_run(tmp_path):
    # ours in-process; taming's minGPT in its own process (it needs the stand-ins of benchmarks/)
    out = tmp_path / "models"
    rc = runner.main(["--quick", "--ops", "vqgan", "gpt", "--device", "cpu", "--threads", "1", "--no-plot",
                      "--modes", "train", "--providers", "vqkernels", "taming", "--out", str(out)])
    assert rc == 0
    _, vrows, _ = _read(out, "vqgan")
    _, grows, _ = _read(out, "gpt")
    assert {r["mode"] for r in vrows} == {"train"} and {r["mode"] for r in grows} == {"train"}
    # taming's modules run with stand-ins made from Lightning's: both must import for its rows to run
    have_taming = _importable("taming", "pytorch_lightning")
    assert {r["provider"] for r in vrows} == {r["provider"] for r in grows} == {"vqkernels", "taming"}
    for r in vrows + grows:
        if r["provider"] == "taming" and not have_taming:
            _skipped_naming(r, "taming")
            continue
        assert r["status"] == "ok", f"{r['op']} {r['provider']}: {r['status']}: {r['reason']}"
        assert float(r["images_per_s" if r["op"] == "vqgan" else "tokens_per_s"]) > 0
