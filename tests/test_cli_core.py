"""The CLI's user-facing failures: one line, exit code 2, no traceback, nothing written."""
import pytest
import torch

from medi_fast.cli import main


def _fails(capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medi-fast: error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args, match", [
    (["--class", "LUADX", "--tss", "05"], "unknown class 'LUADX' (closest: 'LUAD')"),
    (["--class", "LUAD", "--tss", "5"], "unknown tss '5' (closest: '05')"),
    (["--class", "LUAD", "--tss", "99"], "unknown tss '99'"),
    (["--class", "LUAD", "--tss", "05", "--n", "0"], "--n must be a positive number"),
    (["--class", "LUAD", "--tss", "05", "--n", "-3"], "--n must be a positive number"),
    (["--class", "LUAD", "--tss", "05", "--shard", "3/2"], "--shard"),
    (["--class", "LUAD", "--tss", "05", "--backend", "tensorrtx"], "unknown backend 'tensorrtx'"),
    (["--class", "LUAD", "--tss", "05", "--sampler", "unipc", "--eta", "0.5"], "takes no --eta"),
    (["--class", "LUAD", "--tss", "05", "--sampler", "euler"], "unknown sampler 'euler'"),
])
def test_generate_argument_errors_write_nothing(capsys, tiny_ckpt, tmp_path, args, match):
    out = tmp_path / "out"
    _fails(capsys, ["generate", tiny_ckpt, "--out", out, "--steps", "2", *args], match)
    assert not out.exists()


def test_tss_on_a_class_only_checkpoint(capsys, tiny_cls_ckpt, tmp_path):
    _fails(capsys, ["generate", tiny_cls_ckpt, "--class", "LUAD", "--tss", "05", "--out", tmp_path / "o"],
           "class-only checkpoint; it takes no 'tss'")


def test_bad_checkpoints(capsys, tiny_ckpt, tmp_path):
    _fails(capsys, ["generate", tmp_path / "missing.pt", "--class", "LUAD", "--out", tmp_path / "o"], "does not exist")
    data = tiny_ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[:1000])
    _fails(capsys, ["generate", tmp_path / "trunc.pt", "--class", "LUAD", "--out", tmp_path / "o"], "truncated or corrupt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    _fails(capsys, ["generate", tmp_path / "junk.pt", "--class", "LUAD", "--out", tmp_path / "o"], "corrupt")
    torch.save({"m": torch.nn.Linear(1, 1)}, tmp_path / "evil.pt")
    _fails(capsys, ["info", tmp_path / "evil.pt"], "is not a plain-data checkpoint")
    assert not (tmp_path / "o").exists()


def test_unwritable_output_directory(capsys, tiny_ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, ["generate", tiny_ckpt, "--class", "LUAD", "--tss", "05", "--out", blocker / "sub"],
           "choose another --out")


def test_init_checkpoint_info_and_generate_end_to_end(capsys, tmp_path):
    ck = tmp_path / "c.safetensors"
    main(["init-checkpoint", "--preset", "tiny-32", "--classes", "LUAD,TCGA-LUSC", "--tss", "05,44,49",
          "--out", str(ck), "--seed", "3"])
    main(["info", str(ck)])
    text = capsys.readouterr().out
    assert "tss" in text and "05, 44, 49" in text and "LUAD, LUSC" in text
    main(["generate", str(ck), "--class", "Lung_squamous_cell_carcinoma", "--tss", "49", "--n", "3", "--steps", "2",
          "--out", str(tmp_path / "g"), "--quiet"])
    assert len(list((tmp_path / "g" / "LUSC" / "49").glob("*.png"))) == 3
    cls = tmp_path / "cls.pt"
    main(["init-checkpoint", "--classes", "LUAD,LUSC", "--cls-only", "--out", str(cls)])
    main(["generate", str(cls), "--class", "LUAD", "--n", "1", "--steps", "2", "--out", str(tmp_path / "c"), "--quiet"])
    assert len(list((tmp_path / "c" / "LUAD").glob("*.png"))) == 1


def test_subprocess_error_is_one_line_without_traceback(run_cli, tiny_ckpt, tmp_path):
    r = run_cli("generate", tiny_ckpt, "--class", "LUAD", "--tss", "5", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip() == "medi-fast: error: unknown tss '5' (closest: '05'); pick one the model was trained with"


def test_generate_fid_stats_without_writing_images(capsys, tiny_ckpt, tmp_path):
    from medi_fast.eval.fid import load_stats
    from medi_fast.eval.inception import fid_inception_v3

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(fid_inception_v3().state_dict(), weights)
    main(["generate", str(tiny_ckpt), "--class", "LUAD", "--tss", "05", "--n", "3", "--steps", "2", "--quiet",
          "--fid-stats", str(tmp_path / "fake.npz"), "--inception-weights", str(weights)])
    stats, _ = load_stats(tmp_path / "fake.npz")
    mu, sigma, n = stats["LUAD"]
    assert n == 3 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.npz", "inception.pth"]
