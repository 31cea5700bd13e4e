"""The report model: DCFormer vision tower -> MixerProjector -> visual tokens inside a causal LM's prompt.

Visual tokens replace a run of placeholder tokens by scatter into the LM's input embeddings, so the prompt
keeps its length and every text token keeps its own embedding. The published Med3DVLM code writes the
run one position late (keeping the first placeholder and overwriting the first token after the run);
``placeholder_offset=1`` reproduces that for weights trained that way.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from voxsearch.common.cache import local_folder
from voxsearch.common.durable import replace_dir
from voxsearch.encoders.dcformer import DCFormer, dcformer
from voxsearch.encoders.projector import MixerProjector, MixerProjectorConfig
from voxsearch.reports.lm import resolve_lm_dir

FORMAT = "voxsearch-report-model"
FORMAT_VERSION = 1
LM_SUBDIR = "lm"
MM_WEIGHTS = "multimodal.safetensors"
IGNORE_INDEX = -100


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ReportModelConfig:
    vision_variant: str = "small"
    vision_input_filter: int = 0  # the DCFormer pre-filter of the vision tower (taken from a CLIP init)
    # The volume size the projector is built for: it fixes the token counts of the last two stages.
    image_size: tuple[int, int, int] = (128, 256, 256)
    # Local HF causal-LM directory to start from; None = the embedded SmolLM2-135M-Instruct.
    lm: str | None = None
    # Token counts of each mixer layer per stream; the last entries sum to the number of visual tokens.
    low_tokens: tuple[int, ...] = (192, 128)
    high_tokens: tuple[int, ...] = (64, 128)
    image_token: str = "<im_patch>"
    image_start: str = "<im_start>"
    image_end: str = "<im_end>"
    # 0 = correct scatter; 1 = the published off-by-one (overwrites the first token after the run).
    placeholder_offset: int = 0
    system_prompt: str = "You are a radiologist. Answer from the 3D scan shown."
    default_prompt: str = "Write the findings of this scan as a radiology report."
    use_chat_template: bool = True
    max_answer_tokens: int = 192
    lora: LoraSettings | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict) -> "ReportModelConfig":
        d = dict(d)
        lora = d.pop("lora", None)
        tuples = {"image_size", "low_tokens", "high_tokens"}
        cfg = cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})
        if lora is not None:
            lora = dict(lora)
            lora["target_modules"] = tuple(lora.get("target_modules", LoraSettings.target_modules))
            cfg.lora = LoraSettings(**lora)
        return cfg


def stage_tokens(image_size: Sequence[int], stage: int) -> int:
    """Tokens of a DCFormer stage map: the stem divides each axis by 4 (ceil), every later stage by 2."""
    n = 1
    for s in image_size:
        s = math.ceil(s / 4)
        for _ in range(stage):
            s = math.ceil(s / 2)
        n *= s
    return n


def merge_visual_tokens(
    embeds: torch.Tensor, input_ids: torch.Tensor, visual: torch.Tensor, image_token_id: int, offset: int = 0
) -> torch.Tensor:
    """Write ``visual`` (B, N, H) over each row's run of N placeholder ids in ``embeds`` (B, L, H).

    ``offset`` shifts the written run to the right (1 = the published behaviour). Returns a new tensor
    (autograd flows into both the text embeddings and the visual tokens).
    """
    mask = input_ids == image_token_id
    counts = mask.sum(dim=1)
    n = visual.shape[1]
    if visual.shape[0] != input_ids.shape[0] or bool((counts != n).any()):
        raise ValueError(
            f"every prompt needs exactly {n} image placeholder tokens; found {counts.tolist()} "
            f"for {visual.shape[0]} images"
        )
    if offset:
        if offset < 0 or bool(mask[:, mask.shape[1] - offset :].any()):
            raise ValueError(f"placeholder offset {offset} would push visual tokens past the end of the prompt")
        mask = torch.roll(mask, shifts=offset, dims=1)
    return embeds.masked_scatter(mask.unsqueeze(-1), visual.to(embeds.dtype))


class ReportModel(nn.Module):
    """Vision tower + projector + causal LM, with the tokenizer that knows the image placeholders."""

    def __init__(self, config: ReportModelConfig, vision: DCFormer, projector: MixerProjector, lm, tokenizer,
                 preprocess: dict | None = None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.preprocess = dict(preprocess or {"spatial_size": list(config.image_size)})
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        self.added_token_ids = sorted(
            tokenizer.convert_tokens_to_ids(t) for t in (config.image_token, config.image_start, config.image_end)
        )
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.vision.parameters()):
            # A frozen tower keeps its BatchNorm running statistics (and works with batch size 1).
            self.vision.eval()
        return self

    # ---- visual side -------------------------------------------------------------------------------
    @property
    def num_visual_tokens(self) -> int:
        return self.projector.num_tokens

    def vision_stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The vision tower's stage maps (no gradient while the tower is frozen)."""
        expected = tuple(self.config.image_size)
        if images.ndim != 5 or tuple(images.shape[2:]) != expected:
            raise ValueError(f"the report model expects images of shape (B, 1, {expected}), got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        if any(p.requires_grad for p in self.vision.parameters()):
            return self.vision(images)
        with torch.no_grad():
            return self.vision(images)

    def visual_tokens(self, images: torch.Tensor | None = None, stages: list[torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """(B, 1, D, H, W) images, or their precomputed (frozen) stage maps -> (B, N, lm_hidden)."""
        if stages is None:
            stages = self.vision_stages(images)
        return self.projector.forward_stages([s.to(self.device) for s in stages])

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    # ---- text side ---------------------------------------------------------------------------------
    def render_prompt(self, prompt: str | None) -> str:
        cfg = self.config
        block = cfg.image_start + cfg.image_token * self.num_visual_tokens + cfg.image_end
        question = prompt if prompt else cfg.default_prompt
        if cfg.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
            messages.append({"role": "user", "content": f"{block}\n{question}"})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{block}\nQuestion: {question}\nAnswer:"

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str | None) -> list[int]:
        ids = self._ids(self.render_prompt(prompt))
        bos = self.tokenizer.bos_token_id
        if not (self.config.use_chat_template and getattr(self.tokenizer, "chat_template", None)) and bos is not None:
            ids = [bos] + ids
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._ids(" " + answer.strip())[: self.config.max_answer_tokens]
        return ids + [self.eos_token_id]

    def collate(self, prompts: Sequence[str | None], answers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded training batch: labels cover the answer (and its end token) only."""
        rows = []
        for prompt, answer in zip(prompts, answers, strict=True):
            p, a = self.prompt_ids(prompt), self.answer_ids(answer)
            rows.append((p + a, [IGNORE_INDEX] * len(p) + a))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def embed_inputs(self, images: torch.Tensor | None, input_ids: torch.Tensor, stages=None) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        embeds = self.lm.get_input_embeddings()(input_ids)
        return merge_visual_tokens(
            embeds, input_ids, self.visual_tokens(images, stages), self.image_token_id, self.config.placeholder_offset
        )

    def forward(self, images, input_ids, attention_mask, labels=None, stages=None):
        embeds = self.embed_inputs(images, input_ids, stages)
        attention_mask = attention_mask.to(self.device)
        # Explicit positions: padded rows must still count their tokens from 0.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=None if labels is None else labels.to(self.device),
            use_cache=False,
        )

    # ---- generation (greedy) -----------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, images: torch.Tensor, prompts: Sequence[str | None], max_new_tokens: int = 256
                     ) -> Iterator[torch.Tensor]:
        """Greedy decoding of a left-padded batch; yields the (B,) next-token ids step by step.

        Finished rows keep producing the pad id; iteration stops when every row has ended.
        """
        ids = [self.prompt_ids(p) for p in prompts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention[i, width - len(row):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        embeds = self.embed_inputs(images, input_ids)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True)
        done = torch.zeros(len(ids), dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1, :].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            yield nxt
            done |= nxt == self.eos_token_id
            if bool(done.all()):
                return
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            cache_kw, cache = _cache_of(self.lm, out)
            out = self.lm(input_ids=nxt[:, None], attention_mask=attention, position_ids=positions,
                          use_cache=True, **{cache_kw: cache})

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_batch(self, images: torch.Tensor, prompts: Sequence[str | None] | None = None,
                       max_new_tokens: int = 256) -> list[str]:
        prompts = list(prompts) if prompts is not None else [None] * images.shape[0]
        outs: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)
        for step in self.generate_ids(images, prompts, max_new_tokens):
            for i, t in enumerate(step.tolist()):
                if ended[i]:
                    continue
                if t == self.eos_token_id:
                    ended[i] = True
                else:
                    outs[i].append(t)
        return [self._decode(o).strip() for o in outs]

    def generate(self, image: torch.Tensor, prompt: str | None = None, max_new_tokens: int = 256) -> str:
        return "".join(self.generate_stream(image, prompt, max_new_tokens)).strip()

    def generate_stream(self, image: torch.Tensor, prompt: str | None = None, max_new_tokens: int = 256
                        ) -> Iterator[str]:
        """Text pieces as they are decoded (a piece is held back while it ends in a partial character)."""
        if image.ndim == 4:
            image = image.unsqueeze(0)
        if image.shape[0] != 1:
            raise ValueError(f"generate takes one image (1, 1, D, H, W), got {tuple(image.shape)}")
        tokens: list[int] = []
        emitted = 0
        for step in self.generate_ids(image, [prompt], max_new_tokens):
            t = int(step[0])
            if t == self.eos_token_id:
                break
            tokens.append(t)
            text = self._decode(tokens)
            if text.endswith("\ufffd"):
                continue
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        text = self._decode(tokens)
        if len(text) > emitted:
            yield text[emitted:]

    # ---- training helpers --------------------------------------------------------------------------
    def set_trainable(self, *, projector: bool, lm: bool, vision: bool = False, new_embeddings: bool = True):
        """Freeze/unfreeze parts; with a frozen LM, ``new_embeddings`` still trains the added token rows."""
        self.projector.requires_grad_(projector)
        self.vision.requires_grad_(vision)
        self.lm.requires_grad_(lm)
        self.train(self.training)
        if self.config.lora is not None and lm:
            # A LoRA-wrapped LM trains its adapters only.
            for name, p in self.lm.named_parameters():
                p.requires_grad_("lora_" in name)
        emb = self.lm.get_input_embeddings().weight
        if not lm and new_embeddings:
            emb.requires_grad_(True)
            mask = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
            mask[self.added_token_ids] = 1.0
            # Old rows (and a tied output head) stay exactly as loaded: only the new rows get gradient.
            self._embedding_hook = emb.register_hook(lambda g: g * mask)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _cache_of(lm, out) -> tuple[str, object]:
    """The KV cache of an LM output and the forward keyword that takes it back: transformers 5.x calls
    it ``cache``, earlier releases ``past_key_values``."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if "cache" in inspect.signature(base.forward).parameters:
        return "cache", out.cache
    return "past_key_values", out.past_key_values


def _add_image_tokens(tokenizer, lm, config: ReportModelConfig) -> None:
    from transformers import AddedToken

    wanted = [config.image_start, config.image_token, config.image_end]
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer))


def _projector_config(config: ReportModelConfig, vision: DCFormer, lm_hidden: int) -> MixerProjectorConfig:
    ch = vision.channels
    return MixerProjectorConfig(
        low_input=(stage_tokens(config.image_size, len(ch) - 2), ch[-2]),
        high_input=(stage_tokens(config.image_size, len(ch) - 1), ch[-1]),
        low_tokens=tuple(config.low_tokens),
        high_tokens=tuple(config.high_tokens),
        output_dim=lm_hidden,
    )


def wrap_lora(lm, settings: LoraSettings):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # optional: only large LMs need it
        raise RuntimeError("LoRA needs the `peft` package (pip install peft)") from exc
    return get_peft_model(lm, LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                         target_modules=list(settings.target_modules), task_type="CAUSAL_LM"))


def _lm_hidden(lm) -> int:
    return lm.get_input_embeddings().weight.shape[1]


def build_report_model(config: ReportModelConfig, vision: DCFormer | None = None, preprocess: dict | None = None,
                       seed: int = 0) -> ReportModel:
    """A fresh model: the LM from ``config.lm`` (or the embedded SmolLM2), a given or new vision tower,
    a new projector. ``preprocess`` (a PreprocessConfig dict) travels with the model to inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_dir = resolve_lm_dir(config.lm)
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    _add_image_tokens(tokenizer, lm, config)
    torch.manual_seed(seed)
    vision = vision if vision is not None else dcformer(config.vision_variant, input_filter=config.vision_input_filter)
    projector = MixerProjector(_projector_config(config, vision, _lm_hidden(lm)))
    if config.lora is not None:
        lm = wrap_lora(lm, config.lora)
    if preprocess is not None:
        size = tuple(preprocess.get("spatial_size") or ())
        if size and size != tuple(config.image_size):
            raise ValueError(f"preprocess spatial_size {size} differs from the model image_size {config.image_size}")
    return ReportModel(config, vision, projector, lm, tokenizer, preprocess).eval()


def save_report_model(model: ReportModel, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write a self-contained model directory (atomically: temp dir, then rename over the target)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        lm = model.lm
        if model.config.lora is not None:
            # Saved LMs are plain: adapters merged into a copy, so the live model keeps training as is.
            lm = copy.deepcopy(lm).merge_and_unload()
        lm.save_pretrained(tmp / LM_SUBDIR)
        model.tokenizer.save_pretrained(tmp / LM_SUBDIR)
        tensors = {f"vision.{k}": v.detach().cpu().contiguous() for k, v in model.vision.state_dict().items()}
        tensors.update({f"projector.{k}": v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()})
        save_file(tensors, str(tmp / MM_WEIGHTS))
        cfg = model.config.to_dict()
        cfg["lora"] = None  # merged above
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": cfg,
                "projector": model.projector.config.to_dict(), "preprocess": model.preprocess,
                "extra": extra or {}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_report_meta(directory: str | os.PathLike) -> dict:
    """The model directory's config.json, checked; the directory may be an s3:// or gs:// URI (read from
    its local copy, as load_report_model does)."""
    return _read_report_meta(*local_folder(directory, "checkpoints"))


def _read_report_meta(directory: Path, name: str) -> dict:
    """config.json of the folder `directory`, errors naming it `name` (the URI for a local copy)."""
    try:
        meta = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} is not a report model directory (no config.json)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}/config.json is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{name} holds format {meta.get('format')!r}, not a voxsearch report model")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{name} was written by a newer voxsearch (format version {meta['version']})")
    return meta


def load_report_model(directory: str | os.PathLike, device: str = "cpu") -> ReportModel:
    """Load a directory written by save_report_model, in eval mode. An s3:// or gs:// URI of such a
    directory is read from a local copy, downloaded once per machine and again when its objects change
    (voxsearch.common.cache, as CLIP checkpoints are); errors name the URI."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = local_folder(directory, "checkpoints")
    meta = _read_report_meta(directory, name)
    config = ReportModelConfig.from_dict(meta["config"])
    lm = AutoModelForCausalLM.from_pretrained(str(directory / LM_SUBDIR), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory / LM_SUBDIR))
    vision = dcformer(config.vision_variant, input_filter=config.vision_input_filter)
    projector = MixerProjector(MixerProjectorConfig.from_dict(meta["projector"]))
    tensors = load_file(str(directory / MM_WEIGHTS))
    for prefix, module in (("vision.", vision), ("projector.", projector)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    model = ReportModel(config, vision, projector, lm, tokenizer, meta.get("preprocess"))
    return model.to(device).eval()


__all__ = [
    "LoraSettings", "ReportModel", "ReportModelConfig", "build_report_model", "load_report_model",
    "merge_visual_tokens", "read_report_meta", "save_report_model", "stage_tokens", "wrap_lora",
]
