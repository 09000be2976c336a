"""Questions drawn afresh during training (training.online) keep the corpus's task, rule and wording."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.processing import clip_preprocess, region_grid
from training import corpus as corpus_mod
from training.online import (
    OnlineImage,
    background_answer,
    load_online_images,
    presence_sample,
    region_grounding_sample,
    region_sample,
)
from training.train import Example, augment, spin, warp

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"


@pytest.fixture(scope="module")
def images() -> list[OnlineImage]:
    return load_online_images(ASSETS)


def test_only_train_images_are_drawn_from(images: list[OnlineImage]) -> None:
    train = [r for r in corpus_mod.load_index(ASSETS) if r["split"] == "train" and r["masks"]]
    assert len(images) == len(train)
    assert {i.modality for i in images} == {r["modality"] for r in train}


def test_region_answers_follow_the_corpus_rule_and_wording(images: list[OnlineImage]) -> None:
    rng = random.Random(0)
    wording = {t.format(region="").replace("<region></region>", "<region>")
               for t in corpus_mod.REGION_WHAT_QUESTIONS}
    seen = set()
    for _ in range(300):
        item = rng.choice(images)
        s = region_sample(item, rng)
        if s is None:
            continue
        assert s.task == "region" and s.question.count("<region>") == 1 and "</region>" not in s.question
        assert s.region.shape == item.image.shape[:2] and region_grid(s.region).any()
        if s.answer in ("yes", "no"):
            label = next(lab for lab in item.masks if f" {lab} " in f" {s.question} ".replace("?", " "))
            assert s.answer == corpus_mod.point_in_label_answer(s.region, item.masks[label])
            seen.add("yes/no")
        elif s.answer.startswith("The region shows background"):
            assert not (s.region & item.union).any()
            assert s.answer == background_answer(list(item.masks))
            seen.add("background")
        else:
            assert s.question in wording
            assert s.answer == f"The region shows the {corpus_mod.region_label(s.region, item.masks)}."
            seen.add("label")
    assert seen == {"yes/no", "background", "label"}


def test_region_grounding_draws_target_the_structure_under_a_fresh_region(images: list[OnlineImage]) -> None:
    """Issue 20: the mask of the structure the region holds (`region_label`), or words and no mask for a point on
    background; stage 4 (negatives=False) never gets a draw without a mask."""
    rng = random.Random(3)
    wording = {t.format(region="").replace("<region></region>", "<region>")
               for t in corpus_mod.REGION_SEGMENT_QUESTIONS}
    seen = set()
    for _ in range(300):
        item = rng.choice(images)
        s = region_grounding_sample(item, rng)
        if s is None:
            continue
        assert s.task == "region_grounding" and s.question in wording and region_grid(s.region).any()
        if s.gt is None:
            assert s.answer == corpus_mod.NO_STRUCTURE_ANSWER and not (s.region & item.union).any()
            seen.add("none")
        else:
            assert s.answer == corpus_mod.SEG_TOKEN and s.label == corpus_mod.region_label(s.region, item.masks)
            assert s.gt is item.masks[s.label]
            seen.add("mask")
    assert seen == {"none", "mask"}
    drawn = [region_grounding_sample(rng.choice(images), rng, negatives=False) for _ in range(100)]
    assert all(s.gt is not None for s in drawn if s is not None)


def test_presence_answers_match_the_labels_of_the_image(images: list[OnlineImage]) -> None:
    rng = random.Random(1)
    answers = set()
    for _ in range(200):
        item = rng.choice(images)
        s = presence_sample(item, rng)
        # the longest label named: "lesion" is also inside "Is any liver lesion visible?"
        label = max((lab for lab in (*item.masks, *item.absent) if lab in s.question), key=len)
        assert s.answer == ("yes" if label in item.masks else "no")
        answers.add(s.answer)
    assert answers == {"yes", "no"}


def test_quarter_turns_keep_image_region_and_mask_aligned() -> None:
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[2:5, 3:9] = 255
    mask = image[..., 0] > 0
    ex = Example(task="grounding", modality="histopathology", question="q", answer="a", image=image,
                 region=mask.copy(), gt=mask.copy(), labels=np.stack([mask, ~mask], axis=-1),
                 known=np.array([True, False]))
    shapes = set()
    for seed in range(12):
        out = augment(ex, random.Random(seed))
        shapes.add(out.image.shape[:2])
        bright = out.image[..., 0] > 128
        assert np.array_equal(out.gt, out.region)
        assert np.array_equal(out.labels[..., 0], out.gt) and np.array_equal(out.labels[..., 1], ~out.gt)
        assert out.known.tolist() == [True, False]
        assert (bright == out.gt).mean() > 0.97  # the same pixels, up to the intensity change at the edges
    assert any(h > w for h, w in shapes)  # some draws turned the 20x30 tile on its side


def test_any_angle_turns_and_elastic_warps_move_image_and_masks_alike() -> None:
    """`--spun` and `--warped` (runs 35 and 38): the masks land where the image's bright pixels went."""
    yy, xx = np.mgrid[0:64, 0:72]
    mask = ((yy - 20) ** 2 + (xx - 30) ** 2 < 81) | ((yy > 40) & (xx > 10) & (xx < 60) & (yy < 46))
    image = np.repeat((mask * 200 + 20).astype(np.uint8)[..., None], 3, axis=-1)
    labels = np.stack([mask, ~mask], axis=-1)
    assert all(np.array_equal(a, b) for a, b in zip(spin([image, mask, mask, labels], 0.0),
                                                      [image, mask, mask, labels], strict=True))
    rng = random.Random(5)
    for out in [spin([image, mask, mask, labels], 37.0), warp([image, mask, mask, labels], rng, 6.0, 8.0)]:
        assert out[0].shape == image.shape and out[0].dtype == np.uint8 and out[3].shape == labels.shape
        assert not np.array_equal(out[2], mask)  # it moved ...
        assert np.array_equal(out[1], out[2]) and np.array_equal(out[3][..., 0], out[2])
        assert np.array_equal(out[3][..., 1], ~out[2])
        assert ((out[0][..., 0] > 110) == out[2]).mean() > 0.97  # ... with the image, up to edge pixels
        assert abs(int(out[2].sum()) - int(mask.sum())) < 0.1 * mask.sum()


def test_augmented_regions_always_cover_a_clip_patch(images: list[OnlineImage]) -> None:
    """Regression: a flipped or turned small region could fall between the 14-px patch sample points, and a
    crop after a quarter turn used the unturned sides; the engine then refused the region mid-training."""
    rng = random.Random(3)
    for _ in range(400):
        item = rng.choice(images)
        s = region_sample(item, rng)
        if s is None:
            continue
        ex = Example(task=s.task, modality="histopathology", question=s.question, answer=s.answer,
                     image=s.image, region=s.region)
        out = augment(ex, rng)
        assert out.region.shape == out.image.shape[:2] and region_grid(out.region).any()


def test_rare_grounding_labels_are_drawn_more_often_and_groups_keep_their_weight() -> None:
    from training.train import TrainConfig, balance_weights

    image = np.zeros((4, 4, 3), dtype=np.uint8)
    examples = [Example(task="grounding", modality="MRI", question="q", answer="<SEG>", image=image, label=lab)
                for lab in ["brain"] * 90 + ["lesion"] * 10]
    examples += [Example(task="complex", modality="MRI", question="q", answer="a", image=image)] * 100
    flat = balance_weights(examples, TrainConfig(label_balance_power=0.0))
    weights = balance_weights(examples, TrainConfig(label_balance_power=0.5))
    assert weights[-1] == pytest.approx(flat[-1])  # VQA untouched
    assert sum(weights[:100]) == pytest.approx(sum(flat[:100]))  # the MRI grounding group keeps its mass
    lesion_share = sum(weights[90:100]) / sum(weights[:100])
    assert lesion_share == pytest.approx(10 * 10 ** 0.5 / (90 * (10 / 9) ** 0.5 + 10 * 10 ** 0.5))
    assert lesion_share > 0.2  # 10 % of the masks, a quarter of the draws


def test_stage_two_leaves_the_word_rows_of_embeddings_and_lm_head_alone() -> None:
    import torch

    from engine.loading import DEFAULT_MODEL_DIR
    from engine.tokenizer import MedPLIBTokenizer
    from training.train import TrainConfig, init_model, keep_vqa_rows, set_trainable

    tok = MedPLIBTokenizer.from_folder(DEFAULT_MODEL_DIR)
    model = init_model(TrainConfig().model_config(tok.vocab_size), seed=0)
    before = [w.detach().clone() for w in (model.lm_head.weight, model.llm.embed_tokens.weight)]
    params = set_trainable(model, "grounding_expert")
    hooks = keep_vqa_rows(model, tok)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        loss = sum((w * torch.randn_like(w)).sum() for w in (model.lm_head.weight, model.llm.embed_tokens.weight))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for hook in hooks:
        hook.remove()
    for old, new in zip(before, (model.lm_head.weight, model.llm.embed_tokens.weight), strict=True):
        changed = (old != new).any(dim=1)
        assert not changed[: tok.sp_vocab_size][torch.arange(tok.sp_vocab_size) != tok.eos_id].any()
        assert changed[tok.seg_token_id] and changed[tok.eos_id]


def _image_and_box() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    box = np.zeros((48, 40), dtype=bool)
    box[10:30, 8:25] = True
    return rng.integers(0, 255, (48, 40, 3), dtype=np.uint8), box


def _fresh_model():
    """(a model of the training sizes at seed 0, the shipped tokenizer)."""
    from engine.loading import DEFAULT_MODEL_DIR
    from engine.tokenizer import MedPLIBTokenizer
    from training.train import TrainConfig, init_model

    tok = MedPLIBTokenizer.from_folder(DEFAULT_MODEL_DIR)
    return init_model(TrainConfig().model_config(tok.vocab_size), seed=0), tok


def _changed_by_stage(stage: str, examples: list[Example]) -> set[str]:
    """Names of the weights that 2 steps of `stage` on `examples` change, from a fresh model."""
    import random

    import torch

    from training.train import RoutingControl, TrainConfig, run_stage

    model, tok = _fresh_model()
    cfg = TrainConfig(batch_size=2, warmup=1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_stage(stage, model, tok, RoutingControl(model), examples, cfg, random.Random(0), steps=2)
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_stage_four_changes_only_the_mask_decoder_side() -> None:
    """Stage 4 ("mask_decoder") trains SAM-Med2D and `text_hidden_fcs` on grounding with the LLM, CLIP and
    projector frozen: every weight the answers depend on stays bit-identical."""
    image, gt = _image_and_box()
    changed = _changed_by_stage("mask_decoder", [Example(task="grounding", modality="MRI", question="Segment the brain.",
                                                         answer="<SEG>", image=image, gt=gt, label="brain")])
    assert changed and all(k.startswith(("sam.", "text_hidden_fcs.")) for k in changed)
    assert any(k.startswith("sam.") for k in changed) and any(k.startswith("text_hidden_fcs.") for k in changed)


def _fresh_model_and_region_question():
    model, tok = _fresh_model()
    image, region = _image_and_box()
    ex = Example(task="region", modality="MRI", question="What structure is inside <region>?",
                 answer="The region shows the white matter.", image=image, region=region)
    return model, tok, ex


def test_attention_row_is_the_attention_the_decoder_layer_computes() -> None:
    """`attention_row` recomputes one query's attention of the last decoder layer by hand (q/k projections, RoPE,
    scaling, causal softmax); its probabilities times the layer's values must give the layer's own output there."""
    import torch

    from training.train import attention_row, teacher_forced_hidden

    model, tok, ex = _fresh_model_and_region_question()
    decoder = model.llm.layers[-1]
    seen: dict = {}

    def keep(module, args, out) -> None:
        seen["out"] = out[0]

    decoder.self_attn.register_forward_hook(keep)
    layers: list = []
    with torch.no_grad():
        _, spans = teacher_forced_hidden(model, tok, [ex], layers=layers)
        q_at = spans[0][0] + 2  # some answer position
        x = layers[-2][0, :q_at + 1]
        cos, sin = model.llm.rotary_emb(x[None], torch.arange(q_at + 1)[None])
        probs = attention_row(decoder, model.llm.hf_config.num_attention_heads, x, cos, sin)  # (H, T)
        attn = decoder.self_attn
        v = attn.v_proj(decoder.input_layernorm(x)).view(q_at + 1, -1, attn.head_dim).transpose(0, 1)  # (Hkv, T, d)
        v = v.repeat_interleave(probs.shape[0] // v.shape[0], dim=0)
        mine = attn.o_proj((probs[:, None] @ v).reshape(1, -1))[0]
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-5)
    assert torch.allclose(mine, seen["out"][0, q_at], atol=1e-5)


def test_region_attention_loss_is_zero_once_the_heads_give_the_region_one_head_of_attention() -> None:
    """The loss is asked at the position that predicts the word naming what the region holds ("white"), and a few
    optimiser steps on it alone bring the heads' mean attention on the region vector to 1/H, where it stops."""
    import torch

    from training.train import (
        attention_row,
        encode,
        region_answer_positions,
        region_answer_word,
        region_attention_loss,
        teacher_forced_hidden,
    )

    model, tok, ex = _fresh_model_and_region_question()
    answer = encode(tok, ex).answer
    assert tok.decode([region_answer_word(tok, answer)]).strip() == "white"
    heads = model.llm.hf_config.num_attention_heads
    opt = torch.optim.Adam(model.llm.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        layers: list = []
        _, spans = teacher_forced_hidden(model, tok, [ex], layers=layers)
        loss = region_attention_loss(model, tok, [ex], spans, layers[-2], len(layers) - 1)
        losses.append(loss.item())
        if loss.item() == 0:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > 3 and losses[-1] == 0, losses
    with torch.no_grad():
        layers = []
        _, spans = teacher_forced_hidden(model, tok, [ex], layers=layers)
        [(_, q_at, region_at)] = region_answer_positions(tok, [ex], spans)
        x = layers[-2][0, :q_at + 1]
        cos, sin = model.llm.rotary_emb(x[None], torch.arange(q_at + 1)[None])
        probs = attention_row(model.llm.layers[-1], heads, x, cos, sin)
    assert probs[:, region_at].mean() >= 1 / heads - 1e-4


def test_patch_label_targets_follow_the_clip_geometry() -> None:
    """Longest side to 336, centred padding (no label), one row per 14-px patch in row-major order."""
    from training.train import patch_label_targets

    labels = np.zeros((100, 200, 2), dtype=bool)  # 336 x 168 after the resize: 6 padding rows of cells above
    labels[:, :100, 0] = True  # left half
    labels[..., 1] = True  # the whole image
    t = patch_label_targets(labels).reshape(24, 24, 2)
    assert t[:6].max() == 0 and t[18:].max() == 0  # padding
    assert np.allclose(t[6:18, :, 1].numpy(), 1.0)
    # the bilinear resize blurs the half's edge (column 168) into the cells either side by about 1 %
    assert np.allclose(t[6:18, :12, 0].numpy(), 1.0, atol=0.02) and t[6:18, 12:, 0].max() < 0.02


def test_probe_loss_counts_only_the_labels_a_record_vouches_for() -> None:
    import torch

    from training.train import probe_loss

    image = np.zeros((28, 28, 3), dtype=np.uint8)
    labels = np.zeros((28, 28, 2), dtype=bool)
    probe = torch.nn.Linear(4, 2)
    fmap = torch.randn(1, 576, 4)

    def loss(known: list[bool]) -> float:
        ex = Example(task="complex", modality="MRI", question="q", answer="a", image=image, labels=labels,
                     known=np.array(known))
        return probe_loss(probe, fmap, [ex]).item()

    assert loss([False, False]) == 0.0
    assert 0 < loss([True, False]) < loss([True, True])
    assert loss([True, True]) == pytest.approx(loss([True, False]) + loss([False, True]))
    no_masks = Example(task="complex", modality="CT", question="q", answer="a", image=image)
    assert probe_loss(probe, fmap, [no_masks]) is None


def test_label_maps_stack_every_mask_of_a_train_image_and_its_absent_labels() -> None:
    from training.train import LabelMaps

    maps = LabelMaps(ASSETS)
    record = next(r for r in corpus_mod.load_index(ASSETS) if r["split"] == "train" and len(r["masks"]) > 1)
    got = maps.of(record["image"])
    for m in record["masks"]:
        k = maps.vocab.index(m["label"])
        assert got["known"][k] and np.array_equal(got["labels"][..., k], corpus_mod._png(ASSETS, m["path"]))
    absent = corpus_mod.absent_labels(corpus_mod.load_index(ASSETS))[record["id"]]
    assert {maps.vocab[k] for k in np.nonzero(got["known"])[0]} == {m["label"] for m in record["masks"]} | set(absent)
    test_image = next(r["image"] for r in corpus_mod.load_index(ASSETS) if r["split"] == "test")
    assert maps.of(test_image) == {}  # only train images feed the probe


def test_follow_up_samples_carry_earlier_turns_of_their_image_as_the_portal_replays_them() -> None:
    """Earlier turns come from the other train questions of the same image: region paths dropped (the portal
    replays no region), a mask answer as the empty text the portal shows; the prompt is the engine's prompt for
    that chat, and the region vector of the question asked now still sits where the region loss looks."""
    import torch

    from engine.conversation import build_prompt
    from engine.processing import pool_region
    from training.train import (
        TrainConfig,
        encode,
        history_turns,
        region_answer_positions,
        teacher_forced_hidden,
        with_history,
    )

    def sample(image: str, task: str, q: str, a: str) -> dict:
        return {"image": image, "task": task, "answer_type": "closed" if a in ("yes", "no") else "open",
                "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}

    pool = history_turns([sample("a.png", "complex", "Which modality is shown?", "The modality is MRI."),
                          sample("a.png", "region", "What is in <region>masks/r.png</region>?", "The region shows the brain."),
                          sample("a.png", "grounding", "Segment the brain.", "<SEG><mask>masks/a--brain.png</mask>"),
                          sample("a.png", "complex", "Is any brain visible?", "yes"),
                          sample("b.png", "complex", "Is any lesion visible?", "no")])
    assert pool["a.png"] == [("Which modality is shown?", "The modality is MRI."),
                             ("What is in <region>?", "The region shows the brain."), ("Segment the brain.", ""),
                             ("Is any brain visible?", "yes")]
    model, tok, ex = _fresh_model_and_region_question()
    ex = replace(ex, source="a.png")
    rng = random.Random(0)
    assert with_history(ex, pool, rng, TrainConfig(history_share=0.0)) is ex
    asked = [with_history(ex, pool, rng, TrainConfig(history_share=1.0)) for _ in range(20)]
    assert all(1 <= len(a.history) <= 2 and set(a.history) <= set(pool["a.png"]) for a in asked)
    # yes/no presence questions follow their own share (as follow-ups they cost first-turn yes/no accuracy)
    presence = replace(ex, task="complex", question="Can brain be seen in this image?", answer="yes", region=None)
    assert with_history(presence, pool, rng, TrainConfig(history_share=1.0, presence_history_share=0.0)) is presence
    assert with_history(presence, pool, rng, TrainConfig(history_share=0.0, presence_history_share=1.0)).history
    assert {len(a.history) for a in asked} == {1, 2}
    later = next(a for a in asked if len(a.history) == 2)
    prompt = build_prompt(ex.question, template="llava_v1", history=later.history, has_region=True)
    assert encode(tok, later).prompt == tok.encode_prompt(prompt)
    assert len(encode(tok, later).prompt) > len(encode(tok, ex).prompt) + 10
    with torch.no_grad():
        maps: list = []
        _, spans = teacher_forced_hidden(model, tok, [later], region_maps=maps)
        [(_, q_at, region_at)] = region_answer_positions(tok, [later], spans)
        row = model.embed_prompt(encode(tok, later).prompt, model.project_image(model.clip_features(
            torch.from_numpy(clip_preprocess(later.image)[None])))[0], pool_region(maps[0][0], region_grid(later.region)))
    assert torch.equal(row[0][region_at], pool_region(maps[0][0], region_grid(later.region)))
    assert q_at > region_at
