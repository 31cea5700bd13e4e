"""The per-worker training function that Ray Train's TorchTrainer runs on every rank."""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from voxsearch.training.config import ClipTrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
MODEL_DIR = "model"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(augment, motion) -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "augment": augment.state() if augment else None, "motion": motion.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], augment, motion) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if augment and state.get("augment"):
        augment.set_state(state["augment"])
    if state.get("motion") is not None:
        motion.set_state(state["motion"])


def build_model(cfg: ClipTrainConfig):
    """A fresh model, or one initialised from a project checkpoint or a published Med3DVLM file."""
    from voxsearch.encoders import ClipModel, import_med3dvlm_clip, load_clip

    if cfg.init is None:
        return ClipModel(cfg.model)
    if cfg.init.is_dir():
        model = load_clip(cfg.init)
    elif cfg.init.is_file():
        if cfg.init_text_dir is None:
            raise ValueError(f"init {cfg.init} is a Med3DVLM checkpoint file: also give init_text_dir "
                             "(its ClinicalBERT directory)")
        model = import_med3dvlm_clip(cfg.init, cfg.init_text_dir)
    else:
        raise FileNotFoundError(f"init checkpoint not found: {cfg.init}")
    wanted = tuple(cfg.model.finding_labels)
    if wanted and tuple(model.config.finding_labels) != wanted:
        # A checkpoint trained without (or with other) finding labels gets a fresh head for this run's.
        import torch

        model.config.finding_labels = wanted
        model.finding_head = torch.nn.Linear(model.config.embed_dim, len(wanted))
        model.feature_head = None
    if cfg.model.feature_finding_head and model.feature_head is None:
        model.config.feature_finding_head = True
        model.feature_head = model.new_feature_head()
    return model


def _param_groups(model, cfg: ClipTrainConfig) -> list[dict[str, Any]]:
    # No decay on biases, norms and the two loss scalars: decaying t' and b would fight the loss.
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_text = name.startswith("text.")
        no_decay = param.ndim < 2 or name in ("t_prime", "bias")
        groups.setdefault((is_text, no_decay), []).append(param)
    text_lr = cfg.text_lr if cfg.text_lr is not None else cfg.lr
    return [{"params": params, "lr": text_lr if is_text else cfg.lr,
             "weight_decay": 0.0 if no_decay else cfg.weight_decay}
            for (is_text, no_decay), params in sorted(groups.items())]


def _finding_targets(cache, labels, group_same_findings: bool):
    """(labels (n, L) or None, group ids (n,) or None) for the cached studies."""
    import torch

    from voxsearch.training.finding_labels import FindingLabeler

    if not labels and not group_same_findings:
        return None, None
    labeler = FindingLabeler(labels)
    y = torch.from_numpy(np.stack([labeler.vector(r) for r in cache.rows])) if labels else None
    groups = torch.tensor([labeler.group_id(r) for r in cache.rows], dtype=torch.long) if group_same_findings else None
    return y, groups


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from voxsearch.encoders import load_clip, save_clip
    from voxsearch.encoders.clip import finding_organ_matrix
    from voxsearch.training.augment import VolumeAugment, rigid_jitter
    from voxsearch.training.evaluate import embed_pairs, headline, score_embeddings
    from voxsearch.training.schedule import warmup_cosine
    from voxsearch.training.shard_cache import build_shard_cache, text_features, worker_cache_root
    from voxsearch.training.text import token_counter, truncate_report
    from voxsearch.training.view_loss import view_loss

    cfg: ClipTrainConfig = loop_config["cfg"]
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.epochs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    _seed_everything(cfg.seed * 1000 + rank)

    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            raw = load_clip(directory / MODEL_DIR)
            state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
            if (directory / _rng_file(rank)).exists():
                rng = torch.load(directory / _rng_file(rank), map_location="cpu", weights_only=False)
    else:
        raw = build_model(cfg)
    if cfg.freeze_text:
        for p in raw.text.parameters():
            p.requires_grad_(False)
    raw.to(device)
    raw.train()
    raw.vision.use_channels_last()  # same values; 1.2-1.4x the training steps per second on CPU
    if cfg.freeze_text:
        raw.text.eval()  # no dropout in a frozen tower: its features stay the pretrained ones

    # This rank's studies, read once from the object store into a local cache.
    expected = (1, *tuple(cfg.preprocess.spatial_size))
    cache = build_shard_cache(ray.train.get_dataset_shard("train").iter_batches(batch_size=64, batch_format="numpy"),
                              loop_config["owner"], rank, expected, worker_cache_root())
    labels = tuple(raw.config.finding_labels) if cfg.finding_loss_weight > 0 else ()
    y_all, groups_all = _finding_targets(cache, labels, cfg.group_same_findings)
    organ_of_label = finding_organ_matrix(labels).to(device) if labels and raw.feature_head is not None else None
    pos_weight = None
    if y_all is not None and cfg.finding_pos_weight_cap > 1:
        positives = y_all.sum(0).clamp_min(1.0)
        pos_weight = ((len(y_all) - positives) / positives).clamp(1.0, cfg.finding_pos_weight_cap).to(device)
    feats_all = text_features(raw, list(cache.report)) if cfg.freeze_text else None

    model = ray.train.torch.prepare_model(raw, parallel_strategy_kwargs={"find_unused_parameters": False})
    optimizer = torch.optim.AdamW(_param_groups(raw, cfg), betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
    two_views = cfg.view_loss_weight > 0
    # Views must differ even when augmentation is off for the text loss.
    augment = VolumeAugment(seed=cfg.seed * 1000 + rank) if cfg.augment or two_views else None
    motion = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919)
    step, history, resumed_from = 0, [], None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
        resumed_from = step
        if rng is not None:
            _restore_rng(rng, augment, motion)
        log.info("rank %d resumed at optimiser step %d", rank, step)

    count_tokens = token_counter(raw.text)
    trainable = [p for p in raw.parameters() if p.requires_grad]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    eval_shard = ray.train.get_dataset_shard("eval")
    extra = loop_config["extra"]
    samples, busy = 0, 0.0

    def micro_batch(idx: np.ndarray):
        stored = np.asarray(cache.volumes[idx], dtype=np.float32)
        volumes = np.stack([augment(v) for v in stored]) if cfg.augment else stored
        images = torch.from_numpy(volumes)
        if two_views:
            second = torch.from_numpy(np.stack([augment(v) for v in stored]))
            if cfg.view_max_degrees or cfg.view_max_shift:
                second = rigid_jitter(second, motion, cfg.view_max_degrees, cfg.view_max_shift)
            images = torch.cat([images, second])
        images = images.to(device, non_blocking=True)
        if feats_all is not None:
            text = {"text_features": feats_all[idx].to(device)}
        else:
            reports = [truncate_report(str(r), count_tokens, raw.text.config.max_length) for r in cache.report[idx]]
            tokens = raw.text.tokenize(reports)
            text = {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}
        return images, text

    def save_and_report(metrics: dict[str, Any], epoch_done: bool) -> None:
        # Every rank writes its own RNG file; Ray Train merges the ranks' files into one checkpoint.
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            torch.save(_rng_state(augment, motion), tmp_path / _rng_file(rank))
            if rank == 0:
                save_clip(raw, tmp_path / MODEL_DIR, extra={**extra, "optimizer_steps": step})
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "step": step, "history": history}, tmp_path / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{step:08d}{'_epoch' if epoch_done else ''}")

    micro_per_epoch = steps_per_epoch * cfg.grad_accum
    try:
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            epoch_end = (epoch + 1) * steps_per_epoch
            order = cache.epoch_order(cfg.seed * 1000 + rank, epoch)
            # Micro-batches of this epoch already covered by the checkpoint we resumed from.
            first = (step - epoch * steps_per_epoch) * cfg.grad_accum
            micro, loss_sum, loss_n, aux_sum, view_sum = 0, 0.0, 0, 0.0, 0.0
            t0 = time.perf_counter()
            for m in range(first, micro_per_epoch):
                idx = order[m * cfg.batch_size:(m + 1) * cfg.batch_size]
                images, text = micro_batch(idx)
                last_micro = (micro + 1) % cfg.grad_accum == 0
                sync = nullcontext() if (last_micro or world == 1) else model.no_sync()
                with sync:
                    with autocast:
                        out = model(images, **text, with_findings=bool(labels))
                    img, txt = out[0].float(), out[1].float()
                    n = len(idx)
                    views = (slice(0, n), slice(n, 2 * n)) if two_views else (slice(0, n),)
                    groups = None if groups_all is None else groups_all[idx].to(device)
                    loss = sum(raw.loss(img[v], txt, groups=groups) for v in views) / len(views)
                    if labels:
                        target = y_all[idx].to(device)
                        aux = sum(F.binary_cross_entropy_with_logits(out[2][v].float(), target, pos_weight=pos_weight)
                                  for v in views) / len(views)
                        aux_sum += float(aux.detach())
                        loss = loss + cfg.finding_loss_weight * aux
                        if len(out) > 3:  # the feature head: labels, then "any finding in this organ"
                            wide = torch.cat([target, (target @ organ_of_label).clamp_(max=1.0)], dim=1)
                            feature = sum(F.binary_cross_entropy_with_logits(out[3][v].float(), wide)
                                          for v in views) / len(views)
                            loss = loss + cfg.feature_finding_loss_weight * feature
                    if two_views:
                        inst = view_loss(img[:n], img[n:], cfg.view_temperature)
                        view_sum += float(inst.detach())
                        loss = loss + cfg.view_loss_weight * inst
                    (loss / cfg.grad_accum).backward()
                micro += 1
                samples += len(idx)
                loss_sum += float(loss.detach())
                loss_n += 1
                if not last_micro:
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_loss = _mean_over_ranks(loss_sum / loss_n, world)
                record = {"kind": "step", "step": step, "epoch": epoch + 1, "loss": step_loss,
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "t_prime": float(raw.t_prime.detach()), "bias": float(raw.bias.detach())}
                if labels:
                    record["finding_loss"] = aux_sum / loss_n
                if two_views:
                    record["view_loss"] = view_sum / loss_n
                history.append(record)
                loss_sum, loss_n, aux_sum, view_sum = 0.0, 0, 0.0, 0.0
                crash = cfg.crash_once
                if crash and rank == crash["rank"] and step == crash["step"] and not Path(crash["marker"]).exists():
                    Path(crash["marker"]).write_text(f"crashed at step {step}\n")
                    os._exit(1)  # a hard worker death, as a node loss would be: no cleanup, no report
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < epoch_end:
                    busy += time.perf_counter() - t0
                    save_and_report({"step": step, "epoch": epoch + 1, "loss": step_loss}, epoch_done=False)
                    t0 = time.perf_counter()
            busy += time.perf_counter() - t0

            record: dict[str, Any] = {"kind": "epoch", "step": step, "epoch": epoch + 1,
                                      "samples_per_s_per_worker": samples / busy if busy else None}
            if rank == 0:
                epoch_losses = [h["loss"] for h in history if h["kind"] == "step" and h["epoch"] == epoch + 1]
                record["loss"] = float(np.mean(epoch_losses)) if epoch_losses else None
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    emb = embed_pairs(raw, eval_shard.iter_batches(batch_size=cfg.eval_batch_size,
                                                                   batch_format="numpy"), device)
                    result = score_embeddings(raw, emb, cfg.eval_ns)
                    record.update(headline(result))
                    record["eval"] = result
                if resumed_from is not None:
                    record["resumed_from_step"] = resumed_from
                history.append(record)
                log.info("epoch %d: %s", epoch + 1, json.dumps({k: v for k, v in record.items() if k != "eval"}))
            raw.train()
            if cfg.freeze_text:
                raw.text.eval()
            save_and_report({k: v for k, v in record.items() if k != "eval"}, epoch_done=True)
    finally:
        cache.close()
