"""`medi-fast doctor`: the environment, the self-test on the CPU backends (GPU ones reported absent
with the reason), the training check, the JSON record and the failing exit."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")

from medi_fast import doctor  # noqa: E402
from medi_fast.backends import BACKENDS  # noqa: E402
from medi_fast.cli import main  # noqa: E402


def test_environment_lists_versions_gpus_and_providers(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch        {torch.__version__.split('+')[0]}" in out or "torch        2." in out
    assert "onnxruntime  " in out and "CPUExecutionProvider" in out
    env = doctor.environment()
    assert env["packages"]["torch"] and isinstance(env["gpus"], list)
    if not torch.cuda.is_available():
        assert env["gpus"] == [] and "gpu          none" in out


@pytest.fixture(scope="module")
def inference_rows(tmp_path_factory):
    return doctor.check_inference(tmp_path_factory.mktemp("doc"), ddim_steps=2, timed_steps=2, batch=2)


@pytest.mark.slow
def test_every_backend_has_a_row_and_available_cpu_ones_are_measured(inference_rows):
    rows = {r.path: r for r in inference_rows}
    assert set(rows) == set(BACKENDS)
    for name, entry in BACKENDS.items():
        ok, why = entry.availability()
        if not ok:
            assert rows[name].status == "absent" and rows[name].detail == why
    ort = rows["ort-cpu"]
    assert ort.status == "ok" and 0 < ort.metrics["rel"] <= doctor.FP32_REL and ort.metrics["nonfinite"] == 0
    assert ort.metrics["images_per_s"] > 0 and ort.metrics["image_levels"] <= 8
    assert rows["torch"].status == "ok" and rows["torch"].metrics["rel"] == 0.0  # the reference itself
    if not torch.cuda.is_available():
        assert rows["torch-fp16"].status == "absent" and rows["torch-fp16"].detail == "no CUDA GPU"
    for name in ("torch-bf16", "openvino-bf16"):  # on a CPU with bf16 units: eps gated, images not on random weights
        if BACKENDS[name].availability()[0] and not torch.cuda.is_available():
            row = rows[name]
            assert row.status == "ok" and row.metrics["image_bound"] is None and row.metrics["image_levels"] >= 0, row
            assert row.detail.endswith("images not gated on random weights (--model CKPT gates them)")


def test_training_check_compares_each_precision_with_cpu_fp32():
    rows = doctor.check_training("cpu")
    by = {r.path: r for r in rows}
    assert by["fp32 (cpu)"].status == "ok" and by["fp32 (cpu)"].metrics["param_change_rel"] == 0.0
    cl = by["channels_last (cpu)"]
    assert cl.status == "ok" and 0 <= cl.metrics["param_change_rel"] <= doctor.TRAIN_BOUND["channels_last"]
    from medi_fast.backends import cpu_bf16_native

    # bf16 where the CPU has bf16 units (train --precision bf16, the demo's default there)
    assert doctor.training_variants(torch.device("cpu")) == ["fp32", "channels_last"] + ["bf16"] * cpu_bf16_native()
    if cpu_bf16_native():
        assert by["bf16 (cpu)"].status == "ok" and 0 < by["bf16 (cpu)"].metrics["param_change_rel"] <= doctor.TRAIN_BOUND["bf16"]
    ddp = by["ddp (2 processes, gloo)"]  # two CPU processes: the DDP code path, all-reduce included
    assert ddp.status == "ok", ddp.detail
    assert 0 < ddp.metrics["param_change_rel"] <= doctor.TRAIN_BOUND["fp32"]


def test_ddp_check_fails_when_the_ranks_disagree_with_one_process():
    wrong = torch.ones(sum(p.numel() for p in _tiny_params()))
    row = doctor.check_ddp(wrong)
    assert row.status == "FAIL" and row.metrics["param_change_rel"] > doctor.TRAIN_BOUND["fp32"]


def _tiny_params():
    from medi_fast.model import build_model

    return build_model("tiny-32", classes=["LUAD", "LUSC", "BRCA"], metadata={"tss": ["05", "44"], "age": None}).parameters()


@pytest.mark.slow
def test_a_path_over_its_bound_fails_the_command_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(doctor.REL_BOUND, "ort-cpu", 0.0)  # ORT never equals torch to the last bit
    real = doctor.check_inference
    monkeypatch.setattr(doctor, "check_inference",
                        lambda workdir, model=None, on_row=None, **kw: real(workdir, model, ddim_steps=0, timed_steps=1,
                                                                           batch=1, on_row=on_row))
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--check", "--no-training", "--json", str(tmp_path / "doctor.json")])
    io = capsys.readouterr()
    assert e.value.code == 2
    assert io.err.strip().splitlines()[-1].startswith("medi-fast: error: 1 check(s) failed (ort-cpu)")
    assert "FAIL" in io.out
    record = json.loads((tmp_path / "doctor.json").read_text())
    assert record["ok"] is False and {r["path"] for r in record["rows"] if r["status"] == "FAIL"} == {"ort-cpu"}
    packages = record["environment"]["packages"]
    assert packages["onnxruntime"] or packages["onnxruntime-gpu"]  # one of the two distributions (setup.cfg)


def test_json_is_written_as_rows_finish_and_says_whether_it_is_complete(monkeypatch, tmp_path):
    """A check that never returns (a GPU hang, a job's time limit) must not take the rows before it."""
    def two_rows(workdir, model=None, *, on_row=None, **kw):
        rows = [doctor.Row("inference", "torch", "ok"), doctor.Row("inference", "ort-cpu", "ok")]
        for row in rows:
            on_row(row)
        return rows

    def hang(device=None, on_row=None):
        on_row(doctor.Row("training", "fp32 (cpu)", "ok"))
        raise KeyboardInterrupt  # what the user's Ctrl-C or a job scheduler's signal looks like

    monkeypatch.setattr(doctor, "check_inference", two_rows)
    monkeypatch.setattr(doctor, "check_training", hang)
    out = tmp_path / "doctor.json"
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--check", "--json", str(out)])
    assert e.value.code != 0
    rec = json.loads(out.read_text())
    assert rec["complete"] is False and [r["path"] for r in rec["rows"]] == ["torch", "ort-cpu", "fp32 (cpu)"]
    monkeypatch.setattr(doctor, "check_training", lambda device=None, on_row=None: [])
    assert main(["doctor", "--check", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["complete"] is True and rec["ok"] is True and len(rec["rows"]) == 2
