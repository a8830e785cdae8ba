"""import-medi of a bare weights file with the training metadata CSV (runs without mapping JSONs): a
reference-style MeDi model written here and the imported checkpoint give the same eps, for the
concat, additive and linear modes.  Run directories written with the reference's own unet.py are
tested in test_import_medi_run.py."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file
from torch import nn

from medi_fast import checkpoint as ckpt_io
from medi_fast.cli import main
from medi_fast.samplers import ddim

UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)


class ReferenceMeDi(UNet2DModel):
    """The reference code as the issue describes it: UNet2DModel + class_embedding + domain_embeddings.

    concat: floor = d_t // (1 + k); class table floor + d_t % (1 + k) wide, metadata tables floor wide,
    [class, metadata...] concatenated; additive: d_t-wide tables summed; linear: d_t-wide tables
    concatenated then linear_comb.  The result is added to the timestep embedding (diffusers adds
    the class embedding's output to it, so the combined vector is returned in its place).
    """

    def __init__(self, n_classes: int, domains: dict[str, int], mode: str, **unet):
        super().__init__(num_class_embeds=n_classes, **unet)
        d_t = unet["block_out_channels"][0] * 4
        k = len(domains)
        floor = d_t // (1 + k)
        c_dim, m_dim = (floor + d_t % (1 + k), floor) if mode == "concat" else (d_t, d_t)
        self.class_embedding = nn.Embedding(n_classes, c_dim)
        self.domain_embeddings = nn.ModuleDict({c: nn.Embedding(n, m_dim) for c, n in domains.items()})
        if mode == "linear":
            self.linear_comb = nn.Linear(d_t * (1 + k), d_t)
        self.mode = mode
        for p in self.parameters():  # non-trivial tables (zero init would hide mapping errors)
            if p.ndim == 2:
                nn.init.normal_(p, std=0.5)

    def forward(self, x, t, class_labels, domain_labels):
        parts = [self.class_embedding(class_labels)] + [self.domain_embeddings[c](domain_labels[c])
                                                        for c in self.domain_embeddings]
        if self.mode == "concat":
            z = torch.cat(parts, 1)
        elif self.mode == "additive":
            z = torch.stack(parts).sum(0)
        else:
            z = self.linear_comb(torch.cat(parts, 1))
        hook = self.class_embedding.register_forward_hook(lambda m, i, o: z)
        try:
            return super().forward(x, t, class_labels=class_labels).sample
        finally:
            hook.remove()


@pytest.fixture()
def metadata_csv(tmp_path):
    # reference training metadata: class names unsorted, TSS codes with leading zeros, one missing gender
    df = pd.DataFrame({"class": ["LUSC", "LUAD", "KIRC", "LUAD", "LUSC", "KIRC"],
                       "tissue_source_site": ["38", "05", "A1", "05", "B2", "38"],
                       "gender": ["male", "female", "male", "", "female", "male"]})
    path = tmp_path / "train_meta.csv"
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("mode,columns", [("concat", ["tissue_source_site"]), ("concat", ["tissue_source_site", "gender"]),
                                          ("additive", ["tissue_source_site"]), ("linear", ["tissue_source_site", "gender"]),
                                          ("concat", [])])
def test_import_parity(tmp_path, metadata_csv, mode, columns):
    # vocabularies as the issue says: classes sorted; metadata by first appearance, "Unknown" appended
    classes = ["KIRC", "LUAD", "LUSC"]
    vocabs = {"tissue_source_site": ["38", "05", "A1", "B2", "Unknown"], "gender": ["male", "female", "Unknown"]}
    torch.manual_seed(0)
    ref = ReferenceMeDi(len(classes), {c: len(vocabs[c]) for c in columns}, mode, **UNET).eval()
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    out = tmp_path / "imported.pt"
    assert main(["import-medi", str(weights), "--metadata", str(metadata_csv), "--condition", ",".join(columns),
                 "--mode", mode, "--resolution", "16", "--unet-config", '{"norm_num_groups": 8}', "--out", str(out)]) == 0
    ck = ckpt_io.load(out)
    if mode == "concat":  # our default widths follow the same floor/remainder rule as the reference
        from medi_fast.conditioning import ConditionSpec

        default = ConditionSpec.build(128, classes, {c: vocabs[c] for c in columns})
        assert [a.dim for a in default.attributes] == [a.dim for a in ck.spec.attributes]
    model = ck.build()
    assert ck.spec.class_vocab.names == tuple(classes)
    if columns:
        assert ck.spec["tss"].vocab.names == tuple(vocabs["tissue_source_site"])
    # null row = mean of the reference rows
    torch.testing.assert_close(model.conditioner.tables["class"].weight[-1], ref.class_embedding.weight.mean(0))

    x = torch.randn(6, 3, 16, 16)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    cls_names = ["LUAD", "KIRC", "LUSC", "LUSC", "LUAD", "KIRC"]
    values = {"tss": ["05", "38", "B2", "Unknown", "A1", "05"], "gender": ["female", "male", "Unknown", "male", "female", "male"]}
    ref_ids = {c: torch.tensor([vocabs[c].index(v) for v in values["tss" if c == "tissue_source_site" else c]])
               for c in columns}
    with torch.no_grad():
        eps_ref = ref(x, t, torch.tensor([classes.index(c) for c in cls_names]), ref_ids)
        ours = {"class": cls_names, **{("tss" if c == "tissue_source_site" else c): values["tss" if c == "tissue_source_site" else c]
                                       for c in columns}}
        eps = model(x, t, ck.spec.encode(ours, 6))
    assert eps.abs().mean() > 0.01
    torch.testing.assert_close(eps, eps_ref, rtol=0, atol=1e-5)


def test_import_errors(tmp_path, metadata_csv, capsys):
    torch.manual_seed(0)
    ref = ReferenceMeDi(3, {"tissue_source_site": 5}, "concat", **UNET)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    short = tmp_path / "short.csv"
    pd.read_csv(metadata_csv, dtype=str).iloc[:2].to_csv(short, index=False)
    climbing = tmp_path / "climbing.csv"
    table = pd.read_csv(metadata_csv, dtype=str)
    table["tissue_source_site"] = table["tissue_source_site"].replace("05", "../05")
    table.to_csv(climbing, index=False)
    cases = [(["--condition", "gender"], "domain embeddings for ['tissue_source_site'] but --condition says"),
             (["--condition", "tissue_source_site", "--metadata", str(climbing)],
              f"--metadata {climbing}: tissue_source_site value '../05' contains a path separator"),
             (["--condition", "tissue_source_site", "--metadata", str(short)], "pass the metadata CSV the reference"),
             (["--condition", "tissue_source_site", "--mode", "linear"], "--mode linear but the run is a concat model"),
             ]
    for extra, msg in cases:
        args = ["import-medi", str(weights), "--metadata", str(metadata_csv), "--resolution", "16",
                "--unet-config", '{"norm_num_groups": 8}', "--out", str(tmp_path / "o.pt"), *extra]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_imported_checkpoint_generates(tmp_path, metadata_csv):
    torch.manual_seed(0)
    ref = ReferenceMeDi(3, {"tissue_source_site": 5}, "concat", **UNET)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    from medi_fast.training.import_medi import import_medi

    ck = import_medi(weights, metadata_csv, ["tissue_source_site"], resolution=16, unet_config={"norm_num_groups": 8},
                     out=tmp_path / "c.safetensors")
    model = ckpt_io.load(tmp_path / "c.safetensors").build()
    cond = ck.spec.encode({"class": "TCGA-LUAD", "tss": "05"}, 2)
    with torch.no_grad():
        x = ddim(model, torch.randn(2, 3, 16, 16), ck.schedule.timesteps(5), ck.schedule, cond)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
