"""Small reference MeDi run directories, written as the reference's train_diffusion.py writes them,
with the reference's own unet.py (imported from ../shared/reference/medi/, never copied here).

``reference_unet()`` returns the reference module's UNet2DModel class, or None where the reference
code is absent (tests then skip).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "medi"
CLASSES = ["Kidney_renal_clear_cell_carcinoma", "Lung_adenocarcinoma", "Lung_squamous_cell_carcinoma"]
# values in order of first appearance, "Unknown" appended (train_diffusion.py)
DOMAINS = {"tissue_source_site": ["38", "05", "A1", "B2", "Unknown"], "gender": ["male", "female", "Unknown"],
           "race": ["white", "asian", "black or african american", "Unknown"]}
# two levels, one with attention: every kind of block the import maps
UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8)


def reference_unet():
    path = REFERENCE_DIR / "unet.py"
    if not path.is_file():
        return None
    name = "medi_reference_unet"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].UNet2DModel


def build_reference(mode: str, domains: list[str], seed: int = 0):
    """The reference UNet as train_diffusion.py builds it for --cond_type MODE --domains_to_condition DOMAINS."""
    UNet2DModel = reference_unet()
    torch.manual_seed(seed)
    model = UNet2DModel(**UNET, class_embed_type=mode, num_class_embeds=len(CLASSES),
                        domain_embeds={d: list(DOMAINS[d]) for d in domains if not d.endswith("_p")},
                        positional_domains=[d for d in domains if d.endswith("_p")],
                        pos_domain_ranges={d: (0, 100) for d in domains if d.endswith("_p")})
    with torch.no_grad():  # non-trivial embeddings (the defaults would hide mapping errors less well)
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.normal_(0, 0.5)
    return model.eval()


def write_run(run: Path, mode: str, domains: list[str], *, step: int = 20, ema: bool = True, seed: int = 0):
    """RUN/{mapping JSONs, scheduler_config.json, checkpoint-STEP/{model.safetensors, model_final.pth, ema_model/}}.

    Returns (model, ema_model): the reference modules whose weights the files hold (EMA differs from model).
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    UNet2DModel = reference_unet()
    model = build_reference(mode, domains, seed)
    ema_model = None
    if ema:
        ema_model_obj = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                                 model_cls=UNet2DModel, model_config=model.config)
    run.mkdir(parents=True, exist_ok=True)
    (run / "cancer_type_mapping.json").write_text(json.dumps({c: i for i, c in enumerate(CLASSES)}))
    dmap = {d: {v: i for i, v in enumerate(DOMAINS[d])} for d in domains if not d.endswith("_p")}
    (run / "domain_value_mapping.json").write_text(json.dumps(dmap))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    (run / "scheduler_config.json").write_text(json.dumps(sched.config, indent=4))
    ckpt = run / f"checkpoint-{step}"
    ckpt.mkdir()
    if ema:
        with torch.no_grad():  # one "training step" so the EMA weights differ from the model's
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ema_model_obj.step(model.parameters())
        ema_model_obj.save_pretrained(str(ckpt / "ema_model"))
        ema_model = UNet2DModel.from_pretrained(str(ckpt / "ema_model")).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})  # accelerator.save_state
    torch.save(model.state_dict(), ckpt / "model_final.pth")
    return model, ema_model


def reference_eps(model, x, t, class_ids, domain_values: dict):
    """eps from the reference model; domain_values in --domains_to_condition order (floats for _p)."""
    labels = {}
    for d, vals in domain_values.items():
        if d.endswith("_p"):
            labels[d] = torch.tensor(vals, dtype=torch.float)
        else:
            labels[d] = torch.tensor([DOMAINS[d].index(v) for v in vals], dtype=torch.long)
    with torch.no_grad():
        return model(x, t, class_labels=torch.tensor(class_ids), domain_labels=labels).sample
