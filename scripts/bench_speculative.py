"""Speculative decoding on CPU: decode tokens/s and acceptance, every mode side by side, and the cost of
verifying.

    python scripts/bench_speculative.py --contexts 512 2048 --out eval/results/speculative

A benchmark, not a test. Batch 1, greedy (so every assisted run must reproduce its target's plain run token
for token: the `same` column checks it), in each of `--dtypes` (default fp32; every model in that dtype). One
torch thread, timed by the thread's CPU time, so other processes on a shared machine do not inflate the
numbers; every mode runs back to back for each prompt, the repeats are interleaved and the median is kept.

Modes: teacher alone; teacher + hybrid draft; teacher + prompt lookup (a reference); teacher + a cheaper
hybrid draft; hybrid alone; hybrid + prompt lookup; hybrid + the cheaper draft. Tasks: `chat` (an unseen
ShareGPT conversation, its history cut to the context) and `edit` (fix one typo in unseen replies of the
context's length: the answer copies the prompt). `--prompt-lookup` and `--lookup-ngram` take several values
(each pair its own mode); `--attention` and `--linear` (torch's MKL or oneDNN) several implementations, each a
variant beside the dtypes.

decode tokens/s counts what `generate` produces after its first round (the prefill and the first draft), so
it measures decoding, not the prompt. Acceptance is drafted tokens accepted / drafted, from the target's
forward lengths. `verify` times, at each context for the hybrid, the teacher and the cheap draft: one decode
step; one forward that verifies 4 drafted tokens (5 inputs, states recorded) and its `crop`; 5 decode steps;
and the step's and the verification's time in each part (attention, Mamba, MLPs, lm_head, the rest).
The models (and dtypes) take turns within every repeat. `rollback_costs` times the Mamba-2 state work of one
verification: recorded path against replay rollback. `--profile` adds torch.profiler's top operators of the
hybrid's verification at the largest context; `--tasks` with no task times only the verification.

Without `--student` the hybrid is freshly initialised from the teacher's attention weights (untrained: its
outputs and so every acceptance rate are lower than a distilled student's); speeds do not depend on training.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import distill.attention  # noqa: F401  (registers `sdpa_gqa` for --attention)
from distill.chat import Counter, acceptance
from distill.errors import UserError
from distill.files import write_text

# After the text: with it before 2k tokens of text, neither 135M model follows it (both continue the text's
# last reply instead of copying it back), so the task would not measure copying at all.
EDIT_INSTRUCTION = "\n\nFix the typo in the text above. Reply with the whole corrected text and nothing else."


class Clock:
    """The thread's CPU time at each streamed chunk: the prompt, then every round's accepted tokens, and at
    the end of `generate` (which calls `end` itself)."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def put(self, value) -> None:
        self.marks.append((time.thread_time(), value.numel()))

    def end(self) -> None:
        self.marks.append((time.thread_time(), 0))


def unseen_conversations() -> list[list[dict]]:
    """ShareGPT conversations no recipe trains on: the last of the split order (training takes the first
    `max_conversations` after the held-out set; the shipped recipes stop at a few thousand)."""
    from distill.data import ParseStats, split_order
    from distill.recipe import DataConfig

    pairs = split_order(DataConfig(), seed=0, stats=ParseStats())
    return [doc for _, doc in pairs[-3000:] if isinstance(doc, list)]


def long_conversations(
    conversations: list[list[dict]], tokenizer, context: int, count: int
) -> list[list[dict]]:
    """The first `count` conversations with at least `context` tokens before their last user turn."""
    chosen = []
    for conversation in conversations:
        users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
        if users and chat_tokens(conversation[: users[-1] + 1], tokenizer) >= context:
            chosen.append(conversation)
            if len(chosen) == count:
                break
    return chosen


def chat_tokens(messages: list[dict], tokenizer) -> int:
    """The prompt length of `messages` as the model sees them (chat template and generation prompt)."""
    return len(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


def chat_prompt(conversation: list[dict], tokenizer, context: int) -> list[dict]:
    """The conversation up to a user turn, its oldest turns dropped and the first kept one cut to
    `context`."""
    last_user = max(i for i, m in enumerate(conversation) if m["role"] == "user")
    messages = conversation[: last_user + 1]
    while len(messages) > 1 and chat_tokens(messages[1:], tokenizer) > context:
        messages = messages[1:]
    excess = chat_tokens(messages, tokenizer) - context
    if excess > 0:
        ids = tokenizer(messages[0]["content"]).input_ids
        messages = [{**messages[0], "content": tokenizer.decode(ids[excess:])}, *messages[1:]]
    return messages


def edit_prompt(replies: list[str], tokenizer, context: int, seed: int) -> list[dict]:
    """Held-out replies joined to `context` tokens with one typo (two letters of a word swapped), then the
    instruction."""
    text = ""
    for reply in replies:
        if len(tokenizer(text).input_ids) >= context - 40:
            break
        text += reply + "\n\n"
    text = tokenizer.decode(tokenizer(text).input_ids[: context - 40])
    words = text.split(" ")
    rng = random.Random(seed)
    candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 4]
    i = rng.choice(candidates[len(candidates) // 4 :])
    w = words[i]
    words[i] = w[0] + w[2] + w[1] + w[3:]
    return [{"role": "user", "content": " ".join(words) + EDIT_INSTRUCTION}]


@torch.no_grad()
def run_mode(model, ids, max_new_tokens: int, **assist) -> dict:
    """One greedy `generate`: its tokens, CPU time and tokens after its first round, and acceptance."""
    counter = Counter()
    handle = model.register_forward_hook(counter.hook, with_kwargs=True)
    clock = Clock()
    try:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            streamer=clock,
            **assist,
        )
    finally:
        handle.remove()
    new = out[0, ids.shape[1] :]
    (first_round, _), (end, _) = clock.marks[1], clock.marks[-1]
    later_tokens = len(new) - clock.marks[1][1]
    drafted, accepted = acceptance(counter.lengths, ids.shape[1], len(new)) if assist else (0, 0)
    return {
        "tokens": new.tolist(),
        "decode_s": end - first_round,
        "decode_tokens": later_tokens,
        "drafted": drafted,
        "accepted": accepted,
    }


class OneDNNLinear(torch.nn.Linear):
    """`--linear onednn`: a linear layer through oneDNN (`torch.ops.mkldnn._linear_pointwise`, what
    `torch.compile` uses on CPU) instead of torch's default MKL product; same weights. Measured, not adopted:
    it cuts only the lm_head's 5-row product (eval/README.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def set_linear_implementation(model, implementation: str) -> None:
    for module in model.modules():
        if type(module) in (torch.nn.Linear, OneDNNLinear):
            module.__class__ = OneDNNLinear if implementation == "onednn" else torch.nn.Linear


class PartTimer:
    """The thread's CPU time spent in each part of a model's forward (mixers by kind, MLPs, lm_head), so the
    cost of verifying can be split where it grows."""

    def __init__(self, model):
        self.spent: dict[str, float] = {}
        self.handles = []
        parts = [("lm_head", model.lm_head)]
        for layer in model.model.layers:
            attention = getattr(layer, "self_attn", None)
            parts += [("attention", attention) if attention is not None else ("mamba", layer.mamba)]
            parts.append(("mlp", layer.mlp))
        for name, module in parts:
            self.handles.append(module.register_forward_pre_hook(self._start))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._stop(m, name)))
        self.started: dict[int, float] = {}

    def _start(self, module, args) -> None:
        self.started[id(module)] = time.thread_time()

    def _stop(self, module, name: str) -> None:
        self.spent[name] = self.spent.get(name, 0.0) + time.thread_time() - self.started[id(module)]

    def take(self) -> dict[str, float]:
        spent, self.spent = self.spent, {}
        return spent

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def verify_costs(models: dict, context: int, repeats: int) -> dict:
    """Per model, median CPU seconds: one decode step; verifying 4 drafts (5-token recorded forward + crop);
    5 steps; and the step's and the verification's time in each part of the model (`parts`). The models take
    turns within every repeat, so a change in the machine's speed touches them alike."""
    from transformers import DynamicCache

    vocab = next(iter(models.values())).config.vocab_size  # one tokenizer for all
    ids = torch.randint(vocab, (1, context))
    runs = {}
    for name, model in models.items():
        plain, recording = DynamicCache(config=model.config), DynamicCache(config=model.config)
        recording.activate_past_recording(recurrent_states_to_keep=4)
        model(ids, cache=plain)
        model(ids, cache=recording)
        runs[name] = (model, plain, recording, PartTimer(model))
    times = {name: {"step": [], "verify4": [], "steps5": []} for name in models}
    parts = {name: {"step": {}, "verify4": {}} for name in models}
    # both caches grow by a few tokens per repeat: no measurable cost at `context`
    for r in range(repeats + 1):
        draft = torch.randint(vocab, (1, 5))
        for name, (model, plain, recording, timer) in runs.items():
            timer.take()
            start = time.thread_time()
            model(draft[:, :1], cache=plain)
            step = time.thread_time() - start
            step_parts = timer.take()
            start = time.thread_time()
            model(draft, cache=recording)
            recording.crop(-(r % 5))  # reject 0..4 of the drafts, as verification does
            verify = time.thread_time() - start
            verify_parts = timer.take()
            start = time.thread_time()
            for t in range(5):
                model(draft[:, t : t + 1], cache=plain)
            steps = time.thread_time() - start
            if r:  # the first repeat warms up
                times[name]["step"].append(step)
                times[name]["verify4"].append(verify)
                times[name]["steps5"].append(steps)
                for kind, total, spent in (("step", step, step_parts), ("verify4", verify, verify_parts)):
                    spent["other (norms, embedding, masks, crop)"] = total - sum(spent.values())
                    for part, seconds in spent.items():
                        parts[name][kind].setdefault(part, []).append(seconds)
    costs = {}
    for name, (_, _, _, timer) in runs.items():
        timer.remove()
        costs[name] = {kind: statistics.median(values) for kind, values in times[name].items()}
        costs[name]["ratio"] = costs[name]["verify4"] / costs[name]["step"]
        costs[name]["parts"] = {
            kind: {part: statistics.median(values) for part, values in spent.items()}
            for kind, spent in parts[name].items()
        }
    return costs


@torch.no_grad()
def profile_verify(model, context: int, path: Path) -> None:
    """torch.profiler's top operators (by self CPU time) over 5 verifications of 4 drafts at `context`."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    recording = DynamicCache(config=model.config)
    recording.activate_past_recording(recurrent_states_to_keep=4)
    model(torch.randint(model.config.vocab_size, (1, context)), cache=recording)
    drafts = torch.randint(model.config.vocab_size, (6, 1, 5))
    model(drafts[0], cache=recording)  # warm-up
    recording.crop(-4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for draft in drafts[1:]:
            model(draft, cache=recording)
            recording.crop(-4)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    write_text(path, table + "\n")
    print(table, flush=True)


def replay_outputs(state, x, B, C, dt, A):
    """The outputs of m drafted tokens and the state after the last, without the m intermediate states: the
    quadratic (attention-like) form of the SSD scan. It is the verification half of the replay rollback (keep
    the state at the last accepted token, replay the accepted ones next call), timed against the recorded
    path, never used to decode."""
    x, B, C = x.float(), B.float(), C.float()
    cum = (dt * A).cumsum(dim=1)  # (b, m, h)
    m = x.shape[1]
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    gap = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal[None, :, :, None], -float("inf")).exp()
    scores = torch.einsum("bjhn,bihn->bjih", C, B) * gap * dt[:, None]  # (b, j, i, h)
    y = torch.einsum("bjih,bihp->bjhp", scores, x) + cum.exp()[..., None] * torch.einsum(
        "bhpn,bjhn->bjhp", state, C
    )
    decay = (cum[:, -1:] - cum).exp() * dt  # (b, m, h)
    final = cum[:, -1].exp()[..., None, None] * state + torch.einsum("bih,bihp,bihn->bhpn", decay, x, B)
    return y, final


@torch.no_grad()
def rollback_costs(model, repeats: int = 200) -> dict:
    """CPU seconds per verification of 4 drafts spent on the Mamba-2 states, summed over the model's Mamba-2
    layers: the recorded path (5 states from `ssd_states`, their outputs, the history the cache keeps) against
    the replay rollback's verification (outputs and the last state only). x, B and C come in the model's
    dtype; the states and both paths' sums are fp32, as in the model."""
    from distill.modeling_hybrid import ssd_states

    layers = sum(kind == "mamba2" for kind in model.config.mixer_types)
    h, p = model.config.num_attention_heads, model.config.head_dim
    state, x, B, C = torch.randn(1, h, p, p), *torch.randn(3, 1, 5, h, p, dtype=model.dtype)
    dt, A = torch.rand(1, 5, h) * 0.1, -torch.rand(h)

    def recorded():
        states = ssd_states(state, x, B, dt, A)
        torch.einsum("bjhpn,bjhn->bjhp", states, C.float())
        return [state.clone(), *states.unbind(dim=1)]

    times = {"recorded": [], "replay": []}
    for _ in range(7):
        for name, fn in (("recorded", recorded), ("replay", lambda: replay_outputs(state, x, B, C, dt, A))):
            start = time.thread_time()
            for _ in range(repeats):
                fn()
            times[name].append((time.thread_time() - start) / repeats * layers)
    return {name: statistics.median(values) for name, values in times.items()}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = (
    "teacher",
    "teacher + hybrid draft",
    "teacher + prompt lookup",
    "teacher + cheap draft",
    "hybrid",
    "hybrid + prompt lookup",
    "hybrid + cheap draft",
)


def build_models(args, dtype: str) -> tuple[dict, object]:
    """The teacher, the hybrid and the cheap draft in `dtype` (A_log stays fp32, as `from_pretrained` keeps
    it), and the tokenizer."""
    from distill.chat import check_checkpoint, load_model
    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig, TeacherConfig
    from distill.teacher import load_teacher

    teacher, tokenizer = load_teacher(TeacherConfig(), dtype=DTYPES[dtype])
    teacher.eval()

    def student(path, fraction):
        if path:
            return load_model(check_checkpoint(path), dtype, "cpu")
        config = StudentConfig(  # evenly spaced layers, untrained: no calibration rows
            attention_layers="uniform", attention_fraction=fraction, norm_init="ones", conv_init="random"
        )
        model = hybrid_from_teacher(teacher.float(), config, seed=0).eval().to(DTYPES[dtype])
        teacher.to(DTYPES[dtype])
        for name, parameter in model.named_parameters():
            if name.endswith("A_log"):
                parameter.data = parameter.data.float()
        return model

    models = {
        "teacher": teacher,
        "hybrid": student(args.student, 0.5),
        "cheap draft": student(args.cheap_draft, 0.0),
    }
    return models, tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument(
        "--tasks",
        nargs="*",
        default=["chat", "edit"],
        choices=["chat", "edit"],
        help="none: only the verification costs",
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["sdpa"],
        choices=["sdpa", "sdpa_gqa", "eager"],  # sdpa_gqa: distill/attention.py
        help="attention implementations, each with every dtype (rows name the pair when there are several)",
    )
    parser.add_argument(
        "--linear",
        nargs="+",
        default=["torch"],
        choices=["torch", "onednn"],
        help="linear layers through torch's default (MKL) or oneDNN, each with every dtype and attention",
    )
    parser.add_argument("--prompts", type=int, default=2, help="prompts per task and context")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every run (median)")
    parser.add_argument(
        "--prompt-lookup",
        type=int,
        nargs="+",
        default=[8],
        help="tokens prompt lookup drafts per round; several values run side by side ('+ prompt lookup N')",
    )
    parser.add_argument(
        "--lookup-ngram",
        type=int,
        nargs="+",
        default=[2],
        help="longest n-gram prompt lookup matches (transformers: 2); several values run side by side",
    )
    parser.add_argument("--verify-repeats", type=int, default=7)
    parser.add_argument(
        "--profile", action="store_true", help="profile the hybrid's verification at the largest context"
    )
    parser.add_argument(
        "--student", help="a distilled hybrid checkpoint (default: fresh 50%%-attention init)"
    )
    parser.add_argument("--cheap-draft", help="a cheaper hybrid draft (default: fresh 0%%-attention init)")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=MODES,
        metavar="MODE",
        help="a subset of the modes: " + ", ".join(map(repr, MODES)),
    )
    parser.add_argument("--out", type=Path, default=Path("eval/results/speculative"))
    args = parser.parse_args(argv)
    from distill.chat import check_checkpoint

    for folder in (args.student, args.cheap_draft):  # before anything loads
        if folder:
            check_checkpoint(folder)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the random prompts and drafts of the cost measurements, the same every run

    models = {}  # by variant: the dtype, then the attention and linear implementations if several
    for dtype in args.dtypes:
        for attention in args.attention:
            for linear in args.linear:
                variant = " ".join(
                    [dtype]
                    + [attention] * (len(args.attention) > 1)
                    + [f"{linear} linear"] * (len(args.linear) > 1)
                )
                models[variant], tokenizer = build_models(args, dtype)
                for model in models[variant].values():
                    model.set_attn_implementation(attention)
                    set_linear_implementation(model, linear)
    lookups = {  # a mode name's suffix -> generate's prompt lookup arguments
        f"{f' {n}' * (len(args.prompt_lookup) > 1)}{f' ngram {m}' * (len(args.lookup_ngram) > 1)}": {
            "prompt_lookup_num_tokens": n, "max_matching_ngram_size": m
        }
        for n in args.prompt_lookup
        for m in args.lookup_ngram
    }
    modes = {}
    for variant, m in models.items():
        all_modes = {
            "teacher": (m["teacher"], {}),
            "teacher + hybrid draft": (m["teacher"], {"assistant_model": m["hybrid"]}),
            "teacher + cheap draft": (m["teacher"], {"assistant_model": m["cheap draft"]}),
            "hybrid": (m["hybrid"], {}),
            "hybrid + cheap draft": (m["hybrid"], {"assistant_model": m["cheap draft"]}),
        }
        for target in ("teacher", "hybrid"):
            for suffix, kwargs in lookups.items():
                all_modes[f"{target} + prompt lookup{suffix}"] = (m[target], kwargs)
        for name in args.modes or MODES:
            for key, mode in all_modes.items():  # "... prompt lookup" picks each draft length's mode
                if key == name or name.endswith("lookup") and key.startswith(name):
                    modes[variant, key] = mode
    conversations = unseen_conversations()
    replies = [m["content"] for conv in conversations[:200] for m in conv if m["role"] == "assistant"]

    rollback = {}
    for variant, m in models.items():
        rollback[variant] = rollback_costs(m["hybrid"])
        print(
            f"{variant}: Mamba-2 states per verification of 4 drafts (all layers): recorded "
            f"{rollback[variant]['recorded'] * 1e3:.2f} ms, "
            f"replay rollback {rollback[variant]['replay'] * 1e3:.2f} ms",
            flush=True,
        )
    if args.profile:
        for variant, m in models.items():
            path = args.out / f"profile-verify-{variant.replace(' ', '-')}.txt"
            profile_verify(m["hybrid"], max(args.contexts), path)
    rows, verify = [], {}
    for context in args.contexts:
        turns = {f"{name} {variant}": model for variant, m in models.items() for name, model in m.items()}
        for key, costs in verify_costs(turns, context, args.verify_repeats).items():
            verify[f"{context} {key}"] = costs
            split = ", ".join(
                f"{part} {costs['parts']['step'][part] * 1e3:.1f} -> {seconds * 1e3:.1f} ms"
                for part, seconds in costs["parts"]["verify4"].items()
            )
            print(
                f"context {context} {key}: step {costs['step'] * 1e3:.1f} ms, verify 4 drafts = "
                f"{costs['ratio']:.2f} x one step ({split})",
                flush=True,
            )
        chats = (
            long_conversations(conversations[200:], tokenizer, context, args.prompts) if args.tasks else []
        )
        for task in args.tasks:
            for p in range(args.prompts):
                messages = (
                    chat_prompt(chats[p], tokenizer, context)
                    if task == "chat"
                    else edit_prompt(replies[p * 7 :], tokenizer, context, seed=p)
                )
                ids = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )["input_ids"]
                results: dict[tuple, list[dict]] = {key: [] for key in modes}
                for _ in range(args.repeats):
                    for key, (model, assist) in modes.items():
                        results[key].append(run_mode(model, ids, args.max_new_tokens, **assist))
                for (variant, name), runs in results.items():
                    base = results.get((variant, "teacher" if name.startswith("teacher") else "hybrid"))
                    tokens_per_s = statistics.median(r["decode_tokens"] / r["decode_s"] for r in runs)
                    row = {
                        "context": context,
                        "task": task,
                        "prompt": p,
                        "prompt_tokens": ids.shape[1],
                        "dtype": variant,  # the variant: the dtype, and the attention when several
                        "mode": name,
                        "decode_tokens_per_s": tokens_per_s,
                        "decode_tokens": runs[0]["decode_tokens"],
                        "drafted": runs[0]["drafted"],
                        "accepted": runs[0]["accepted"],
                        # every repeat against the plain run's first (the plain rows: its repeats agree)
                        "same": None
                        if base is None
                        else all(r["tokens"] == base[0]["tokens"] for r in runs),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                # after every prompt, so a run stopped by a time limit keeps what it measured
                save(args.out, rows, verify, rollback)
        save(args.out, rows, verify, rollback)
    write_report(rows, verify, args.out)


def save(out: Path, rows: list[dict], verify: dict, rollback: dict) -> None:
    """Everything measured so far, atomically, so a run stopped by a time limit keeps it."""
    results = {"rows": rows, "verify": verify, "rollback": rollback}
    write_text(out / "results.json", json.dumps(results, indent=1) + "\n")


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (context, task, dtype, mode): median tokens/s over prompts, pooled acceptance, and the
    speedup vs alone twice: the median of the per-prompt speedups, and the pooled one (all the prompts' decode
    tokens over all their decode time, against the same for the plain mode: what a user decoding every prompt
    sees). Without the target's plain mode in the run, speedups and same are None (nothing to compare)."""

    def pooled_tokens_per_s(group):
        seconds = sum(r["decode_tokens"] / r["decode_tokens_per_s"] for r in group)
        return sum(r["decode_tokens"] for r in group) / seconds

    def key(row):
        return row["context"], row["task"], row["dtype"], row["mode"]

    lines = []
    for context, task, dtype, mode in sorted(dict.fromkeys(map(key, rows)), key=lambda k: k[:3]):
        group = [r for r in rows if key(r) == (context, task, dtype, mode)]
        alone = "teacher" if mode.startswith("teacher") else "hybrid"
        base = [r for r in rows if key(r) == (context, task, dtype, alone)]
        speedups = [
            g["decode_tokens_per_s"] / b["decode_tokens_per_s"] for g, b in zip(group, base, strict=True)
        ] if base else []
        drafted = sum(r["drafted"] for r in group)
        lines.append(
            {
                "context": context,
                "task": task,
                "dtype": dtype,
                "mode": mode,
                "tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in group),
                "speedup": statistics.median(speedups) if speedups else None,
                "speedup_pooled": pooled_tokens_per_s(group) / pooled_tokens_per_s(base) if base else None,
                "acceptance": sum(r["accepted"] for r in group) / drafted if drafted else None,
                "same": None if any(r["same"] is None for r in group) else all(r["same"] for r in group),
            }
        )
    return lines


def write_report(rows: list[dict], verify: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = summarise(rows)
    columns = ["context", "task", "dtype", "mode", "decode tok/s", "vs alone (median)", "vs alone (pooled)",
               "acceptance", "same tokens"]
    table = [
        "| " + " | ".join(columns) + " |",
        "|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    for line in lines:
        acc = "" if line["acceptance"] is None else f"{line['acceptance']:.0%}"
        speedup = "-" if line["speedup"] is None else f"{line['speedup']:.2f}x"
        pooled = "-" if line["speedup_pooled"] is None else f"{line['speedup_pooled']:.2f}x"
        same = "-" if line["same"] is None else "yes" if line["same"] else "NO"
        table.append(
            f"| {line['context']} | {line['task']} | {line['dtype']} | {line['mode']} | "
            f"{line['tokens_per_s']:.1f} | "
            f"{speedup} | {pooled} | {acc} | {same} |"
        )
    table += [
        "",
        "| context, model, dtype | decode step ms | verify 4 drafts ms | ratio | 5 decode steps ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, v in verify.items():
        table.append(
            f"| {key} | {v['step'] * 1e3:.1f} | {v['verify4'] * 1e3:.1f} | {v['ratio']:.2f}x | "
            f"{v['steps5'] * 1e3:.1f} |"
        )
    table += [
        "",
        "| context, model, dtype | part | in a decode step ms | in verifying 4 drafts ms | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for key, v in verify.items():
        for part, seconds in v["parts"]["verify4"].items():
            step = v["parts"]["step"][part]
            table.append(
                f"| {key} | {part} | {step * 1e3:.1f} | {seconds * 1e3:.1f} | {seconds / step:.2f}x |"
            )
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))

    if not lines:
        return
    tasks = sorted({line["task"] for line in lines})
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    dtypes = list(dict.fromkeys(line["dtype"] for line in lines))
    # one colour per mode (and dtype, when there are several) in every panel
    all_modes = list(dict.fromkeys((line["dtype"], line["mode"]) for line in lines))
    contexts = sorted({line["context"] for line in lines})
    width = 0.8 / len(all_modes)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, (dtype, mode) in enumerate(all_modes):
            mine = [x for x in lines if (x["task"], x["dtype"], x["mode"]) == (task, dtype, mode)]
            values = {x["context"]: x["tokens_per_s"] for x in mine}
            if values:
                xs = [contexts.index(c) + i * width for c in values]
                label = mode if len(dtypes) == 1 else f"{mode}, {dtype}"
                ax.bar(xs, list(values.values()), width, label=label, color=f"C{i % 10}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))], [str(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(f"decode tokens/s (CPU, 1 thread, {'/'.join(dtypes)})")
        ax.set_title(f"{task} task")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "speculative.png", dpi=110)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # a bad --student/--cheap-draft folder: one line, as the distill CLI prints it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
