"""The recipe: one YAML file -> one typed, validated `Recipe`.

Every mistake a user can make in a recipe becomes a `RecipeError` whose message is one line naming the
key, the value and the fix. Unknown keys get a "did you mean" hint. `load_recipe` also applies
`--set a.b.0.c=value` overrides before validation, so overrides are checked exactly like the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from distill.errors import UserError


class RecipeError(UserError):
    """A user mistake in a recipe or an override; its message is the whole one-line explanation."""


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


def _parse_count(value: Any) -> Any:
    """Accept token counts written as 2e5, '2e5', '200k' or '1.5M' (YAML reads '2e5' as a string)."""
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        scale = _SUFFIX.get(text[-1:], None)
        try:
            number = float(text[:-1]) * scale if scale else float(text)
        except ValueError:
            return value
        value = number
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


TokenCount = Annotated[int, BeforeValidator(_parse_count), Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(_Section):
    """Where the teacher comes from: the built-in SmolLM2 asset, a local HF folder, a hub id or a GGUF file."""

    source: str = "smollm2-135m-instruct"
    gguf_file: str | None = None  # file name inside `source` when `source` is a folder or hub id of GGUFs
    revision: str | None = None


def attention_layers_problem(layers: list[int], num_layers: int | None = None) -> str | None:
    """What is wrong with a list of attention layers, if anything: the one check, used by the recipe (without the
    teacher, then against its layer count) and by `distill.init`."""
    if len(set(layers)) != len(layers):
        return f"has duplicates: {layers}"
    bad = [index for index in layers if num_layers is not None and not 0 <= index < num_layers]
    if bad:
        return (f"layer {bad[0]} is out of range; the teacher has {num_layers} layers, so use indices "
                f"0..{num_layers - 1}")
    return None


class StudentConfig(_Section):
    """Which layers keep attention, which mixer replaces the others, and how the mixers start. The defaults are
    the options that won the measurements (docs/findings.md): layers chosen from data, the calibrated norm and
    the identity conv."""

    mixer: Literal["mamba2", "mamba1"] = "mamba2"
    # "auto": the round(attention_fraction * layers) layers whose swap for an aligned mixer hurts the teacher most
    # (the recipe's `selection` stage; the resolved recipe.yaml records the chosen list); "uniform": that many
    # layers evenly spaced (at 0.5, every odd layer); or the list itself
    attention_layers: list[Annotated[int, Field(ge=0)]] | Literal["auto", "uniform"] = "auto"
    attention_fraction: float | None = Field(default=None, ge=0.0, le=1.0)  # with auto or uniform; None: 0.5
    init: Literal["attention", "random"] = "attention"
    # rms_ratio: each gated-norm weight = RMS(attention out) / RMS(mixer out) on 4 training rows; ones: 1
    norm_init: Literal["ones", "rms_ratio"] = "rms_ratio"
    # identity: the conv starts as a delta on the current token, so x, B, C pass through unscrambled
    conv_init: Literal["random", "identity"] = "identity"
    d_conv: int = Field(default=4, ge=1, le=8)
    chunk_size: int = Field(default=128, ge=8)
    dt_min: float = Field(default=1e-3, gt=0)
    dt_max: float = Field(default=1e-1, gt=0)
    dt_init_floor: float = Field(default=1e-4, gt=0)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    # Mamba-2's state per head (None: the teacher's head_dim); more than head_dim adds state channels, which
    # start unused (C's extra channels at zero), so the student starts where it would with head_dim
    mamba2_d_state: int | None = Field(default=None, ge=1)
    mamba1_d_state: int | None = Field(default=None, ge=1)  # None: the teacher's head_dim
    mamba1_dt_rank: int | None = Field(default=None, ge=1)  # None: ceil(hidden / 16)
    bc_norm: bool = True  # Qwen3 teachers: per-head RMSNorm on B and C from k_norm / q_norm (others: no effect)

    @model_validator(mode="after")
    def _check(self) -> StudentConfig:
        listed = isinstance(self.attention_layers, list)
        if listed and self.attention_fraction is not None:
            raise ValueError("set either attention_layers or attention_fraction, not both (a list of layers fixes the count)")
        if not listed and self.attention_fraction is None:
            self.attention_fraction = 0.5
        if isinstance(self.attention_layers, list) and (problem := attention_layers_problem(self.attention_layers)):
            raise ValueError(f"attention_layers {problem}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        if self.mamba2_d_state is not None and self.mixer != "mamba2":
            raise ValueError("mamba2_d_state sets the Mamba-2 mixer's state; with mixer: mamba1 use mamba1_d_state")
        low, high = self.A_init_range
        if not 0 < low <= high:
            raise ValueError(f"A_init_range must be 0 < low <= high, got {self.A_init_range}")
        return self


class DataConfig(_Section):
    """Training and held-out data: the built-in ShareGPT asset, a local json/jsonl/parquet, or a datasets name."""

    source: str = "sharegpt"
    split: str = "train"
    max_length: int = Field(default=512, ge=16)
    packing: bool = True  # several documents per row (position_ids restart); False: one per row, padded
    loss_on: Literal["assistant", "all"] = "assistant"  # plain-text sources always train on every token
    held_out_size: int = Field(default=64, ge=1)  # conversations held out (one per row), never trained on
    max_conversations: int | None = Field(default=None, ge=1)  # training conversations; None: all
    # teacher: the teacher answers each training prompt once (cached) and the stages train on its answers
    # (pseudo-labels); held-out rows keep the data's answers
    answers: Literal["data", "teacher"] = "data"
    answer_max_new_tokens: int = Field(default=256, ge=1)
    answer_temperature: float = Field(default=0.0, ge=0.0)  # 0: greedy
    answer_batch_size: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.answers == "teacher" and self.max_conversations is None:
            raise ValueError("answers: teacher needs max_conversations (how many training prompts the teacher "
                             "answers), e.g. max_conversations: 2000")
        return self


class StageConfig(_Section):
    """What every training stage's config has; a stage's own class adds `name: Literal["<name>"]` (its key in
    `distill.stages.STAGES`) and its settings, and goes into `STAGE_TYPES`."""

    name: str
    max_tokens: TokenCount
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=8, ge=1)  # sequences per micro-batch per process
    grad_accum: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    gradient_checkpointing: bool = False
    checkpoint_every_tokens: Annotated[int, BeforeValidator(_parse_count), Field(gt=0)] | None = None
    keep_checkpoints: int = Field(default=2, ge=1)
    resume: Literal["auto", "never"] = "auto"
    log_every_steps: int = Field(default=1, ge=1)
    held_out_rows: int = Field(default=8, ge=0)  # held-out rows scored before and after the stage (0: skip)


# the end-to-end stage's divergence between the teacher's and the student's next-token distributions
Divergence = Literal["forward", "reverse", "jsd"]
# the per-layer error of the layerwise stage (distill.losses.alignment_loss defines each); the one list of each
AlignmentObjective = Literal["mse", "token_normalized_mse", "layer_normalized_mse", "l2"]


class _KLOptions(_Section):
    kl: Divergence = "forward"
    temperature: float = Field(default=1.0, gt=0)
    jsd_beta: float = Field(default=0.5, gt=0.0, lt=1.0)
    ce_weight: float = Field(default=0.0, ge=0.0)
    kl_chunk_tokens: int = Field(default=1024, ge=1)


class LayerwiseStage(StageConfig):
    """Align each mixer with the teacher's attention output on the teacher's own inputs (MLPs frozen), or
    (`target: block_output`) each block with the teacher block's output, on the teacher's or the student's inputs."""

    name: Literal["layerwise"]
    target: Literal["mixer_output", "block_output"] = "mixer_output"
    objective: AlignmentObjective = "mse"
    # cached: the teacher's activations for max_tokens / cache_epochs tokens of rows are captured once (bf16)
    # and trained on for cache_epochs epochs; online: a teacher forward per step
    activations: Literal["cached", "online"] = "cached"
    cache_epochs: int = Field(default=4, ge=1)
    # memory: in RAM; disk: a memory-mapped file (budgets larger than RAM; same training, bit for bit)
    cache_storage: Literal["memory", "disk"] = "memory"
    cache_max_gb: float = Field(default=8.0, gt=0)  # memory: refuse to start when the activations would not fit
    cache_dir: str | None = None  # disk: where the file goes (None: the stage folder); removed once trained
    # teacher: each block runs on the teacher's hidden states; student: on the student's own (one forward through
    # its stack, each Mamba block's input detached), so a block learns to undo the errors of the layers below it
    inputs: Literal["teacher", "student"] = "teacher"

    @model_validator(mode="after")
    def _check(self) -> LayerwiseStage:
        if self.inputs == "student" and self.target != "block_output":
            raise ValueError("inputs: student matches whole blocks' outputs; set target: block_output")
        return self


class StepwiseStage(StageConfig, _KLOptions):
    """Replace layers progressively; after each step train the replaced mixers end to end."""

    name: Literal["stepwise"]
    num_steps: int = Field(default=4, ge=1)
    order: Literal["top_down", "bottom_up"] = "top_down"


class LoraOptions(_Section):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class EndToEndStage(StageConfig, _KLOptions):
    """KL between teacher and student next-token distributions over the whole model."""

    name: Literal["end_to_end"]
    trainable: Literal["mixers", "all", "lora"] = "mixers"
    mixer_lr: float | None = Field(default=None, gt=0)  # the Mamba mixers' lr when other weights train too; None: lr
    lora: LoraOptions = LoraOptions()
    teacher_logits: Literal["online", "topk"] = "online"
    topk: int = Field(default=64, ge=1)


class _Trainable(_Section):
    trainable: Literal["mixers", "all"] = "all"
    mixer_lr: float | None = Field(default=None, gt=0)  # the Mamba mixers' lr when other weights train too; None: lr


class _Sampling(_Section):
    max_prompt_tokens: int = Field(default=256, ge=1)  # longer prompts are skipped
    max_new_tokens: int = Field(default=64, ge=1)
    sample_temperature: float = Field(default=1.0, ge=0.0)  # 0: greedy


class OnPolicyStage(StageConfig, _KLOptions, _Trainable, _Sampling):
    """GKD-style on-policy distillation: the student answers the data's prompts, the teacher scores every
    sampled token, and the loss is a per-token divergence on the answer tokens (reverse KL by default).
    `lmbda` is the fraction of steps that sample; the others train on the data's own answers.
    max_tokens counts answer token slots (max_new_tokens per prompt)."""

    name: Literal["on_policy"]
    kl: Divergence = "reverse"
    lmbda: float = Field(default=1.0, ge=0.0, le=1.0)


class SftStage(StageConfig, _KLOptions, _Trainable):
    """`ce_weight` times the cross-entropy on the data's assistant tokens (with `data.answers: teacher`, the
    teacher's answers), plus `kl_weight` times the divergence to the teacher (MambaInLlama's first stage:
    CE + 0.1 KL)."""

    name: Literal["sft"]
    ce_weight: float = Field(default=1.0, ge=0.0)
    kl_weight: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> SftStage:
        if not (self.ce_weight or self.kl_weight):
            raise ValueError("ce_weight and kl_weight are both 0, so the stage has no loss; set either above 0")
        return self


class DpoStage(StageConfig, _Trainable, _Sampling):
    """Direct preference optimisation (sigmoid loss) on `pairs`: a local .json/.jsonl/.parquet file or a
    datasets name with TRL's prompt/chosen/rejected columns, or `teacher_vs_student` (the teacher's answer to
    each training prompt is chosen, the student's sample rejected). The reference is the student entering
    the stage or the teacher; its log-probs are computed once. max_tokens counts the pairs' tokens."""

    name: Literal["dpo"]
    pairs: str = "teacher_vs_student"
    pairs_split: str = "train"
    max_pairs: int | None = Field(default=None, ge=1)
    beta: float = Field(default=0.1, gt=0)
    reference: Literal["student", "teacher"] = "student"
    lr: float = Field(default=5e-7, gt=0)
    max_length: int = Field(default=512, ge=16)  # prompt + answer tokens of one side of a pair


class AlignConfig(LayerwiseStage):
    """The alignment of every layer's mixer that layer selection scores (a layerwise stage's settings)."""

    name: Literal["layerwise"] = "layerwise"
    max_tokens: TokenCount = 100_000

    # replaces LayerwiseStage._check (same name, on purpose): its one rule is moot once inputs is teacher; a
    # check added there must be repeated here
    @model_validator(mode="after")
    def _check(self) -> AlignConfig:
        if self.inputs != "teacher":
            raise ValueError("inputs: student has no student stack here (each layer's mixer is aligned alone, "
                             "on the teacher's inputs); drop inputs, or set it in the layerwise stage")
        return self


class SelectionConfig(_Section):
    """Align once, assemble later: a Mamba mixer is aligned for every layer (cached; see distill.selection),
    the student's mixers start from them, and `student.attention_layers: auto` keeps attention where swapping
    the teacher's attention for its aligned mixer raises the KL most (scored on the last training rows)."""

    name: Literal["selection"] = Field("selection", exclude=True)  # the stage that runs it (not a setting)
    align: AlignConfig = AlignConfig()
    score_rows: int = Field(default=8, ge=1)  # rows (the last training rows) each single-layer swap is scored on
    # single: keep attention where one layer's swap hurts most; greedy: swap layers one at a time, re-scoring the
    # rest with the current assembly after each (sum over the steps of the layers left of extra scoring passes)
    method: Literal["single", "greedy"] = "single"
    cache_dir: str | None = None  # where aligned mixers are kept; None: $MAMBA_DISTILL_CACHE/aligned


# the stages a recipe's `stages` list may hold: adding one is its class here (and its module in distill.stages)
STAGE_TYPES = (LayerwiseStage, StepwiseStage, EndToEndStage, OnPolicyStage, SftStage, DpoStage)
STAGE_NAMES = tuple(get_args(cls.model_fields["name"].annotation)[0] for cls in STAGE_TYPES)
Stage = Annotated[Union[STAGE_TYPES], Field(discriminator="name")]  # noqa: UP007 (a tuple of types)


class EvalConfig(_Section):
    """Student vs teacher at the end of a run (see distill.eval); quality on held-out rows always runs."""

    enabled: bool = True
    max_sequences: int = Field(default=64, ge=1)  # held-out rows scored
    batch_size: int = Field(default=4, ge=1)  # held-out rows per forward
    # generations on held-out prompts: teacher-scored NLL of the student's answers vs the teacher's own (0: skip)
    generation_prompts: int = Field(default=24, ge=0)
    generation_max_new_tokens: int = Field(default=64, ge=1)
    generation_temperature: float = Field(default=1.0, gt=0)  # the sampled answers' (greedy ones are judged too)
    generation_examples: int = Field(default=3, ge=0)  # side-by-side answers in report.md
    lm_eval_tasks: list[str] = []  # shipped (sharegpt_ppl, sharegpt_next_sentence) or standard task names
    lm_eval_limit: int | None = Field(default=None, ge=1)
    speed: bool = False
    speed_contexts: list[Annotated[int, Field(ge=1)]] = [512, 2048, 8192]
    speed_batch_sizes: list[Annotated[int, Field(ge=1)]] = [1, 8]
    speed_steps: int = Field(default=8, ge=1)  # timed decode steps per (batch, context)
    needle: bool = False
    needle_lengths: list[Annotated[int, Field(ge=64)]] = [512, 1024, 2048]
    needle_depths: list[Annotated[float, Field(ge=0.0, le=1.0)]] = [0.1, 0.5, 0.9]
    needle_trials: int = Field(default=3, ge=1)  # passkeys per (length, depth) cell


class ExportConfig(_Section):
    """Formats written from the final checkpoint (`bamba`, `gguf`: Mamba-2 students) and an optional hub push."""

    formats: list[Literal["native", "bamba", "gguf"]] = ["native"]
    gguf_outtype: Literal["f32", "f16", "bf16", "q8_0"] = "q8_0"  # the GGUF's weight type (llama.cpp)
    push_to_hub: str | None = None  # a repo id, e.g. "me/smollm2-hybrid50"; receives the first format
    max_shard_size: str = "2GB"  # largest safetensors file, as save_pretrained reads it

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError("list each format once")
        return formats

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, repo_id: str | None) -> str | None:
        if repo_id is not None and repo_id.count("/") != 1:
            raise ValueError("use a hub repo id like 'user/name'")
        return repo_id


class LoggingConfig(_Section):
    wandb: bool = False
    wandb_project: str = "mamba-distill"
    wandb_mode: Literal["online", "offline"] = "offline"


class Recipe(_Section):
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    data: DataConfig = DataConfig()
    stages: list[Stage]
    selection: SelectionConfig | None = None
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    output_dir: str = "outputs/run"
    seed: int = 0
    # auto: bf16 where matrix products run natively in it (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX),
    # else fp32 (distill.trainer.resolve_precision; an AVX2-only CPU emulates bf16 at a fraction of fp32's speed)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.stages:
            raise ValueError("stages is empty; list at least one stage, e.g. [{name: end_to_end, max_tokens: 1e5}]")
        if self.student.attention_layers == "auto" and self.selection is None:
            self.selection = SelectionConfig()
        return self

    def check_against_teacher(self, num_layers: int) -> None:
        """Cross-checks that need the teacher's config; raises RecipeError."""
        layers = self.student.attention_layers
        if isinstance(layers, list) and (problem := attention_layers_problem(layers, num_layers)):
            raise RecipeError(f"student.attention_layers: {problem}")

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading and errors


def _fields_at(loc: tuple, model: type[BaseModel] = Recipe, data: Any = None) -> list[str]:
    """The valid key names at `loc` (used for "did you mean" on unknown keys)."""
    cls: Any = model
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            # a discriminated stage: pick the class whose name matches
            cls = dict(zip(STAGE_NAMES, STAGE_TYPES)).get(part)
            continue
        annotation = field.annotation
        cls = _model_in(annotation)
    return list(cls.model_fields) if cls is not None and hasattr(cls, "model_fields") else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_error(err: ValidationError, raw: dict) -> str:
    # an unknown key or stage name explains the rest (e.g. a misspelt required key is also "missing")
    first = min(err.errors(), key=lambda e: e["type"] not in ("extra_forbidden", "union_tag_invalid"))
    loc = tuple(part for part in first["loc"] if part not in STAGE_NAMES)
    key = ".".join(str(p) for p in loc) or "recipe"
    kind, msg, value = first["type"], first["msg"], first.get("input")
    if kind == "extra_forbidden":
        valid = _fields_at(tuple(first["loc"][:-1]))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"unknown key '{key}'; {hint}"
    if kind == "union_tag_invalid" or (kind == "union_tag_not_found"):
        name = value.get("name") if isinstance(value, dict) else None
        close = difflib.get_close_matches(str(name), STAGE_NAMES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(STAGE_NAMES)}"
        return f"{key}.name = {name!r} is not a stage; {hint}"
    if kind == "missing":
        return f"{key} is required but missing; add it to the recipe"
    msg = msg.removeprefix("Value error, ")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{key}{shown}: {msg}"


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {dotted}: index {part} does not exist (the list has {len(node)} items)")
            node = node[int(part)]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"--set {dotted}: index {last} does not exist (the list has {len(node)} items)")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.0.max_tokens=2e5")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else ""
        parsed.append((key.strip(), _parse_count(value) if isinstance(value, str) else value))
    return parsed


def recipe_from_dict(raw: dict, overrides: list[str] | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"the recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    for key, value in parse_overrides(overrides):
        _set_path(raw, key, value)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_error(err, raw)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist; pass a path such as recipes/smollm2-135m/hybrid50-mamba2.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    return recipe_from_dict(raw or {}, overrides)

