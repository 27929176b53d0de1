"""`distill chat CKPT` and `distill generate CKPT --prompt ...`: stream a checkpoint's answers, optionally
with speculative decoding.

Both go through stock transformers `generate`: `--draft CKPT` passes `assistant_model=` (a smaller hybrid, or
the teacher when the checkpoint is the student; it must share the tokenizer), `--prompt-lookup N` passes
`prompt_lookup_num_tokens=N`. Greedy by default, so the answer is exactly the one plain decoding gives; with
`--temperature` above 0 it samples (speculative sampling keeps the target's distribution). At the end it
prints tokens/s and the share of drafted tokens the target accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import UserError


def check_checkpoint(path: str | Path) -> Path:
    """A model folder with a readable config and undamaged weights (cheap: no weights are loaded)."""
    from distill.checkpoints import check_safetensors

    folder = Path(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise UserError(f"checkpoint {str(folder)!r} {what}; pass a model folder, e.g. outputs/run/final")
    try:
        json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise UserError(
            f"{folder / 'config.json'} is not valid JSON ({err}); copy the checkpoint again"
        ) from None
    check_safetensors(folder)
    return folder


def load_model(folder: Path, dtype: str, device: str):
    """A causal LM from a checked folder: our hybrid, or any stock transformers model (a teacher, a Bamba).

    On a CPU the hybrid and the teacher families attend with `sdpa_gqa` (distill/attention.py), which verifies
    drafted tokens without copying key/value heads; elsewhere, and for other models, transformers' default
    (a GPU's fused kernels take GQA only without a mask)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill import attention
    from distill.configuration_hybrid import HybridConfig
    from distill.families import TEACHER_MODEL_TYPES

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    config = AutoConfig.from_pretrained(folder)
    plain = config.model_type in (HybridConfig.model_type, *TEACHER_MODEL_TYPES)
    options = {"attn_implementation": attention.NAME} if device == "cpu" and plain else {}
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch_dtype, **options)
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer: in its folder, its run folder, or the teacher its recipe names."""
    from transformers import AutoTokenizer

    from distill.checkpoints import tokenizer_source

    source = tokenizer_source(Path(path))
    if source is None:
        raise UserError(
            f"found no tokenizer in {path}, its run folder or its recipe's teacher; "
            f"save one next to the weights (tokenizer.save_pretrained)"
        )
    return AutoTokenizer.from_pretrained(source)


def check_same_tokenizer(tokenizer, draft_tokenizer, draft_path: str) -> None:
    """A draft proposes token ids: the ids must mean the same text, or every draft is wasted (or wrong)."""
    if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise UserError(
            f"the draft {draft_path} has another tokenizer than the checkpoint; use a draft distilled from "
            f"the same teacher (or the teacher itself), or --prompt-lookup N"
        )


@dataclass
class Counter:
    """Counts the target's forwards and their input lengths, from which generate's acceptance follows."""

    lengths: list[int] = field(default_factory=list)

    def hook(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.lengths.append(ids.shape[1])


@dataclass
class Stats:
    new_tokens: int
    seconds: float
    drafted: int
    accepted: int

    def __add__(self, other: Stats) -> Stats:
        return Stats(
            self.new_tokens + other.new_tokens,
            self.seconds + other.seconds,
            self.drafted + other.drafted,
            self.accepted + other.accepted,
        )

    def line(self) -> str:
        speed = (
            f"{self.new_tokens} tokens in {self.seconds:.2f} s, {self.new_tokens / self.seconds:.1f} tokens/s"
        )
        if self.drafted == 0:
            return speed
        share = self.accepted / self.drafted
        return f"{speed}; accepted {self.accepted} of {self.drafted} drafted tokens ({share:.0%})"


def acceptance(lengths: list[int], prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(drafted, accepted) from the target's forward lengths in one assisted `generate`.

    Each forward verifies its drafted tokens (all but the first input; the prefill's first inputs are the
    prompt) and yields the accepted ones plus one of its own, so accepted = new tokens - forwards.
    """
    if not lengths:
        return 0, 0
    drafted = lengths[0] - prompt_len + sum(length - 1 for length in lengths[1:])
    return drafted, max(new_tokens - len(lengths), 0)


class Speaker:
    """The target, its tokenizer and the speculative settings, ready to answer conversations."""

    def __init__(self, args: argparse.Namespace):
        import torch

        if args.prompt_lookup is not None and args.prompt_lookup < 1:
            raise UserError(f"--prompt-lookup {args.prompt_lookup}: give the number of tokens to copy, >= 1")
        if args.draft and args.prompt_lookup:
            raise UserError("--draft and --prompt-lookup are two ways to draft; pick one")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        folder = check_checkpoint(args.checkpoint)
        self.tokenizer = load_tokenizer(folder)
        self.assist: dict = {}
        if args.draft:  # every check before any weights load
            draft = check_checkpoint(args.draft)
            check_same_tokenizer(self.tokenizer, load_tokenizer(draft), args.draft)
            self.assist["assistant_model"] = load_model(draft, args.dtype, device)
        elif args.prompt_lookup:
            self.assist["prompt_lookup_num_tokens"] = args.prompt_lookup
        self.model = load_model(folder, args.dtype, device)
        self.sampling = {"do_sample": False}
        if args.temperature > 0:
            self.sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
        self.max_new_tokens = args.max_new_tokens
        self.counter = Counter()
        self.model.register_forward_hook(self.counter.hook, with_kwargs=True)

    def encode(self, messages: list[dict]):
        if self.tokenizer.chat_template is None:  # a base model: the conversation as plain text
            text = "\n".join(message["content"] for message in messages)
            return self.tokenizer(text, return_tensors="pt").input_ids
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]

    def answer(self, messages: list[dict]) -> tuple[str, Stats]:
        """Stream the reply to `messages` to stdout; return its text and the decoding statistics."""
        import torch
        from transformers import TextStreamer

        ids = self.encode(messages).to(self.model.device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.counter.lengths.clear()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                streamer=streamer,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                **self.sampling,
                **self.assist,
            )
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1] :]
        drafted, accepted = (
            acceptance(self.counter.lengths, ids.shape[1], len(new)) if self.assist else (0, 0)
        )
        return self.tokenizer.decode(new, skip_special_tokens=True), Stats(
            len(new), seconds, drafted, accepted
        )


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "checkpoint", help="a model folder: a distilled hybrid (outputs/run/final), a teacher, ..."
    )
    parser.add_argument(
        "--draft",
        metavar="CKPT",
        help="speculative decoding with this model drafting "
        "(same tokenizer): a smaller hybrid, or the teacher",
    )
    parser.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        help="speculative decoding that drafts N tokens copied from the prompt (no draft model)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return parser


def _start(args) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def generate_main(argv: list[str]) -> int:
    parser = _parser("distill generate", "Answer one prompt, streaming the tokens.")
    parser.add_argument("--prompt", required=True, help="the user message")
    args = parser.parse_args(argv)
    speaker = Speaker(args)
    _, stats = speaker.answer([*_start(args), {"role": "user", "content": args.prompt}])
    print(stats.line(), file=sys.stderr)
    return 0


def chat_main(argv: list[str]) -> int:
    parser = _parser(
        "distill chat", "Chat with a checkpoint in the terminal (an empty line or Ctrl-D ends it)."
    )
    args = parser.parse_args(argv)
    speaker = Speaker(args)
    messages = _start(args)
    totals = Stats(0, 0.0, 0, 0)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        reply, stats = speaker.answer(messages)
        messages.append({"role": "assistant", "content": reply})
        totals += stats
    if totals.new_tokens:
        print(totals.line(), file=sys.stderr)
    return 0
