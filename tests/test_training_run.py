"""`training.train.train` end to end at toy length: every stage runs, the best stage-3/4 checkpoint is written in
the released layout and loads with the real loader (so a change in the engine cannot silently break training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_state

from engine.loading import load_engine
from engine.modeling.medplib import MedPLIBModel
from training.train import TrainConfig, grow_sam_encoder, train

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"


def test_four_stages_write_a_loadable_released_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=(2, 2, 2, 2), batch_size=2, warmup=1, evals=(1, 1), val_limit=6, corpus_draws=1)
    summary = train(assets=ASSETS, out=tmp_path / "tiny", cfg=cfg)

    assert summary["best_stage_step"] in ([3, 2], [4, 2]) and summary["val"]["n"]["total"] == 6
    assert {"region_mask_mDice", "region_none_accuracy", "describe_f1"} <= summary["val"].keys()  # issue 20
    readout = summary["stage1_readout"]  # teacher-forced, right after stage 1
    assert set(readout) == {"region", "closed"} and all(np.isnan(v) or 0 <= v <= 1 for v in readout.values())
    files = {p.name for p in (tmp_path / "tiny").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "added_tokens.json",
            "training_summary.json"} <= files
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["moe"]["num_experts"] == [2, 2] and config["mask_postprocess"] == "crop"
    eng = load_engine(tmp_path / "tiny", device="cpu")
    answer = eng.ask(eng.set_image(np.zeros((40, 50, 3), dtype=np.uint8)), "Please segment the brain.",)
    assert isinstance(answer.text, str) and len(answer.experts) == 2
    # `--polish`: stage 4 alone from that checkpoint (v10 = v9 polished on redrawn masks); only the mask decoder moves
    polished = train(assets=ASSETS, out=tmp_path / "polished", cfg=cfg, polish=tmp_path / "tiny")
    start = polished["polished_from"]
    assert start["folder"] == "tiny" and start["summary"]["wall_time_s"] == summary["wall_time_s"]
    assert polished["best_stage_step"] in ([0, 0], [4, 2])
    assert "stage1_readout" not in polished
    before = load_state(tmp_path / "tiny" / "model.safetensors")
    after = load_state(tmp_path / "polished" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith(("model.visual_model.", "model.text_hidden_fcs.")) for k in moved), moved  # SAM side
    assert moved or polished["best_stage_step"] == [0, 0]
    tokenizers = [(tmp_path / name / "tokenizer.model").read_bytes() for name in ("tiny", "polished")]
    assert tokenizers[0] == tokenizers[1]


def test_grown_sam_encoder_computes_what_the_old_one_did_until_trained() -> None:
    """`--sam-depth` with `--polish` appends encoder blocks whose residual outputs start at zero (README, v11)."""
    torch.manual_seed(0)
    model = MedPLIBModel(TrainConfig().model_config(vocab_size=300)).eval()
    for p in model.sam.parameters():  # not the zero-initialised defaults of a fresh model
        p.data.add_(0.02 * torch.randn_like(p))
    grown = grow_sam_encoder(model, 4, (1, 3)).eval()

    assert grown.config.sam.encoder_depth == 4 and grown.config.sam.encoder_global_attn_indexes == (1, 3)
    assert grown.config.llm == model.config.llm and grown.config.clip == model.config.clip
    old, new = model.state_dict(), grown.state_dict()
    assert set(new) - set(old) and all(k.startswith(("sam.image_encoder.blocks.2.", "sam.image_encoder.blocks.3."))
                                       for k in set(new) - set(old))
    assert all(torch.equal(old[k], new[k]) for k in old)
    pixels = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(grown.sam.image_encoder(pixels), model.sam.image_encoder(pixels), rtol=0, atol=0)
    assert grown.sam.image_encoder.blocks[3].window_size == 0 and grown.sam.image_encoder.blocks[2].window_size > 0
    with pytest.raises(ValueError, match="global blocks"):
        grow_sam_encoder(model, 4, (3,))  # block 1 would stop attending globally
    with pytest.raises(ValueError, match="cannot grow"):
        grow_sam_encoder(grown, 2, (1,))
